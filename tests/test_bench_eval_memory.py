"""tools/bench_eval_memory.py: the eval at several batch sizes decodes the same answers; the
JSON and Markdown it writes; a missing data file is a usage error."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "bench_eval_memory.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_eval_memory", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _csv(tmp_path, n=60, labels=4) -> Path:
    names = [f"intent_{i}" for i in range(labels)]
    (tmp_path / "categories.json").write_text(json.dumps(names))
    rows = ["text,category"] + [f"message number {i} about thing {i % labels},{names[i % labels]}" for i in range(n)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "train.csv"


def test_batch_sizes_decode_the_same_answers(tiny_model_dir, tmp_path):
    mod = _load()
    out = tmp_path / "out"
    rc = mod.main(["--data", str(_csv(tmp_path)), "--model", str(tiny_model_dir("llama")), "--limit", "6",
                   "--batch-sizes", "6,2,1", "--out-dir", str(out)])
    js = json.loads((out / "eval_memory.json").read_text())
    assert rc == 0 and js["same_answers"] is True
    assert [r["eval_batch_size"] for r in js["rows"]] == [6, 2, 1]
    assert len({r["answers_sha1"] for r in js["rows"]}) == 1
    for r in js["rows"]:
        assert r["peak_rss_gib"] > 0 and r["cpu_s"] >= 0 and 0.0 <= r["accuracy"] <= 1.0
    assert "| 6 |" in (out / "eval_memory.md").read_text()


def test_missing_data_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _load().main(["--data", str(tmp_path / "nope.csv")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
