"""tools/quant_gpu.py (the GPU columns of the quantization report) end to end on CPU with the tiny random shape:
every row builds and decodes, and the merge renders the JSON into the marked block of a document."""
import json

from tools.quant_gpu import MARK_BEGIN, MARK_END, ROWS, merge_into_doc, run_gpu


def test_quant_gpu_rows_and_merge(tmp_path):
    out = tmp_path / "q.json"
    run_gpu("tiny", str(out), new=4)
    res = json.loads(out.read_text())
    assert [r["label"] for r in res["rows"]] == [r[0] for r in ROWS]
    assert all("error" not in r for r in res["rows"]), res["rows"]
    by = {r["label"]: r for r in res["rows"]}
    assert by["KV int4 (rotated)"]["rotated"] and not by["KV int4 unrotated"]["rotated"]
    assert by["KV int8 + rotation"]["rotated"] and not by["KV int8"]["rotated"]
    assert by["KV int4 (rotated)"]["kv_bytes_per_token"] < by["KV int8"]["kv_bytes_per_token"] < \
        by["fp16"]["kv_bytes_per_token"]
    assert by["W4A16"]["weight_bytes"] < by["fp16"]["weight_bytes"]
    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{MARK_BEGIN}\nthe previous table\n{MARK_END}\nafter\n")
    merge_into_doc(str(out), str(doc), "CMD")
    text = doc.read_text()
    assert "the previous table" not in text and "| W4A16 + KV int8 |" in text and "`CMD`" in text
    assert text.endswith("after\n")
