"""`make chat` / `lmtriton chat`: an interactive streaming chat that keeps its history on the server.

Each conversation is a Triton sequence (session): the first turn opens it with START and the whole rendered
prompt; later turns send only the text the chat template adds since what the server already holds (the new
user message and the assistant header), so the history is never recomputed. If the server has released the
session (idle TTL, memory pressure, restart), the turn is resent with the whole history under a new START.

    lmtriton chat --url localhost:8001 --model llm --tokenizer workspace/tokenizer
    lmtriton chat --prompt "What is Triton?"          # one answer, then exit (for scripts)
Type `exit` (or end the input) to quit.
"""
from __future__ import annotations

import argparse
import logging
import random
import re
import sys
from typing import Iterator, List, Optional

from client.grpc_client import GrpcClient
from client.protocol import Generation, TritonError
from client.template import ChatFormatter

logger = logging.getLogger(__name__)
# messages of the engine and of Triton's sequence batcher when a turn names a session it no longer has
_SESSION_LOST = re.compile(r"session .*(expired|unknown)|START flag|sequence .*(unknown|not found)", re.I)


class ChatSession:
    """One conversation: the messages so far and the prompt text whose KV the server holds."""

    def __init__(self, client: GrpcClient, formatter: ChatFormatter, system: Optional[str] = None,
                 **params):
        self.client, self.formatter, self.params = client, formatter, params
        self.messages: List[dict] = [{"role": "system", "content": system}] if system else []
        self.session_id = 0
        self.held = ""            # the text of the tokens in the server's session (prompts + answers)
        self.num_restarts = 0     # how many turns had to resend the whole history
        self.last = Generation()  # the latest turn: text, token counts (cached_tokens: history reused)

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to one user message; the exchange is added to the history when it completes."""
        self.messages.append({"role": "user", "content": text})
        full = self.formatter.render(self.messages)
        try:
            if self.session_id and self.held and full.startswith(self.held):
                try:
                    yield from self._turn(full[len(self.held):], start=False)
                    return
                except TritonError as e:
                    if not _SESSION_LOST.search(str(e)):
                        raise
                    logger.warning("session %d is gone (%s); resending the history", self.session_id, e)
                    self.num_restarts += 1
            yield from self._turn(full, start=True)
        except BaseException:
            self.messages.pop()      # the turn did not happen
            raise

    def _turn(self, text: str, start: bool) -> Iterator[str]:
        if start:
            self.session_id = random.randrange(1, 2**63)
            self.held = ""
        self.last = turn = Generation()
        for delta in self.client.stream(text, session_id=self.session_id, session_start=start, **self.params):
            turn.add(delta)
            if delta.text:
                yield delta.text
        # an answer that stopped on EOS keeps the EOS token in the session's KV
        self.held += text + turn.text + (self.formatter.eos_text if turn.finish_reason == "stop" else "")
        self.messages.append({"role": "assistant", "content": turn.text})

    def close(self) -> None:
        """Release the server-side session (END); the server's TTL would release it anyway."""
        if not self.session_id:
            return
        try:
            for _ in self.client.stream("", session_id=self.session_id, session_end=True, max_tokens=1):
                pass
        except TritonError as e:
            logger.debug("ending session %d: %s", self.session_id, e)
        self.session_id = 0


def _params(args) -> dict:
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.seed is not None:
        params["seed"] = args.seed
    return params


def one_shot(args, formatter: ChatFormatter, out) -> int:
    with GrpcClient(args.url, model=args.model) as client:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        for delta in client.stream(formatter.render(messages), **_params(args)):
            out.write(delta.text)
            out.flush()
    out.write("\n")
    return 0


def interactive(args, formatter: ChatFormatter, inp, out) -> int:
    tty = inp.isatty()
    with GrpcClient(args.url, model=args.model, session_model=args.session_model) as client:
        chat = ChatSession(client, formatter, args.system, **_params(args))
        try:
            while True:
                if tty:
                    out.write("\n>>> ")
                    out.flush()
                line = inp.readline()
                if not line or line.strip() == "exit":
                    break
                if not line.strip():
                    continue
                for piece in chat.ask(line.rstrip("\n")):
                    out.write(piece)
                    out.flush()
                out.write("\n")
        except KeyboardInterrupt:
            out.write("\n")
        finally:
            chat.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtriton chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="localhost:8001", help="tritonserver gRPC address")
    p.add_argument("--model", default="llm", help="the stateless model (one-shot --prompt)")
    p.add_argument("--session-model", default=None,
                   help="the sequence-batched model for sessions (default: <model>_session)")
    p.add_argument("--tokenizer", default="workspace/tokenizer", help="directory with the chat template")
    p.add_argument("--prompt", default=None, help="answer this one message and exit")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    return p


def main(argv=None, inp=None, out=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.session_model = args.session_model or f"{args.model}_session"
    inp, out = inp or sys.stdin, out or sys.stdout
    try:
        formatter = ChatFormatter(args.tokenizer)
        return one_shot(args, formatter, out) if args.prompt is not None else interactive(args, formatter, inp, out)
    except (TritonError, FileNotFoundError, ValueError) as e:
        sys.stderr.write(f"lmtriton chat: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
