"""Chat templates on the client side: messages -> the prompt text the served model expects.

The server takes plain text (text_input), so the chat CLI and the OpenAI gateway render conversations with the
model's own template, read from the tokenizer directory that `make convert` writes (workspace/tokenizer).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Sequence, Union

logger = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant", "developer", "tool")


class ChatFormatter:
    def __init__(self, tokenizer_dir: Union[str, Path]):
        path = Path(tokenizer_dir).expanduser()
        if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer in {path} (expected the workspace/tokenizer that "
                                    "`make convert` writes; pass --tokenizer DIR)")
        from transformers import AutoTokenizer
        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer in {path} has no chat template")
        self.eos_text = self.tokenizer.eos_token or ""

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation; messages are {"role", "content"} with string content."""
        check_messages(messages)
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def token_texts(self, token_ids: Sequence[int]) -> List[str]:
        """Each token's own text (for logprobs), decoded alone; special tokens (the final EOS) are ""."""
        return [self.tokenizer.decode([int(t)], skip_special_tokens=True) for t in token_ids]


def check_messages(messages) -> None:
    """Raise ValueError naming the bad message field (the gateway turns it into a 400)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m.get('content')).__name__}")


def content_text(content) -> Optional[str]:
    """OpenAI message content: a string or a list of {"type": "text", "text": ...} parts -> one string."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    return None
