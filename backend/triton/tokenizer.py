"""The frontend's tokenizer: `tokenizers` on tokenizer.json, without transformers.

The Triton 2.51 stub embeds its own CPython build; importing transformers there pulls in ssl (through
huggingface_hub/httpx), whose C extension from the host Python fails to load in the stub. tokenizer.json holds
everything the frontend needs: the vocabulary, the BOS post-processor and the special tokens to skip.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from tokenizers import Tokenizer


class TextTokenizer:
    def __init__(self, tokenizer_dir):
        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"tokenizer_dir {tokenizer_dir} has no tokenizer.json (run `lmtriton convert`)")
        self.tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
