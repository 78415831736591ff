"""`lmtriton serve web`: the web chat page, served by the OpenAI gateway itself.

The page (client/static/chat.html, one self-contained file, no CDN) streams answers from the gateway's
/v1/chat/completions, keeps the conversation in the browser, and has a new-chat button and temperature and
max-tokens controls. `serve web` is `serve openai` with the page's address in the log; both serve the page at /.

    lmtriton serve web --triton localhost:8001 --tokenizer workspace/tokenizer --port 23333
    # then open http://127.0.0.1:23333/
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("static") / "chat.html"


def mount_web(app: FastAPI) -> None:
    html = PAGE.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(html)


def main(argv=None) -> int:
    from client.openai_server import main as serve_openai
    return serve_openai(argv, prog="lmtriton serve web")
