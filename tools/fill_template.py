"""Fill a `${key}` template; refuse keys the template does not have and placeholders left without a value.

    python -m tools.fill_template model_repository/llm/config.pbtxt name:llm,session_len:4096 > config.pbtxt
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Mapping

_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


def placeholders(template: str) -> set:
    return set(_PLACEHOLDER.findall(template))


def fill(template: str, values: Mapping[str, object], where: str = "template") -> str:
    """Substitute every ${key}; unknown keys and unfilled placeholders raise ValueError naming them."""
    keys = placeholders(template)
    unknown = sorted(set(values) - keys)
    if unknown:
        raise ValueError(f"{where} has no placeholder for {unknown}; its keys are {sorted(keys)}")
    missing = sorted(keys - set(values))
    if missing:
        raise ValueError(f"{where} needs values for {missing}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), template)


def fill_file(template_path, values: Mapping[str, object], out_path) -> Path:
    text = fill(Path(template_path).read_text(), values, where=str(template_path))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def parse_pairs(spec: str) -> dict:
    """'a:1,b:x' -> {'a': '1', 'b': 'x'} (the tensorrtllm_backend fill_template.py syntax)."""
    values = {}
    for item in filter(None, spec.split(",")):
        if ":" not in item:
            raise ValueError(f"expected key:value, got {item!r}")
        k, v = item.split(":", 1)
        values[k.strip()] = v
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("template")
    ap.add_argument("values", help="key:value,key:value")
    ap.add_argument("-o", "--out", help="write here instead of stdout")
    args = ap.parse_args(argv)
    text = fill(Path(args.template).read_text(), parse_pairs(args.values), where=args.template)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
