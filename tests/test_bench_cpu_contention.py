"""tools/bench_cpu_contention.py: the alone/shared table it writes, its competing process, usage errors."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "bench_cpu_contention.py"
TINY = ["--hidden", "32", "--intermediate", "64", "--kv", "16", "--layers", "2", "--vocab", "128"]


def _load():
    spec = importlib.util.spec_from_file_location("bench_cpu_contention", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_writes_alone_and_shared_times(tmp_path):
    out = tmp_path / "out"
    rc = _load().main(TINY + ["--threads", "1", "--rows", "1,3", "--repeats", "2", "--rounds", "1",
                              "--competitor-threads", "1", "--out-dir", str(out)])
    js = json.loads((out / "cpu_contention.json").read_text())
    assert rc == 0 and js["meta"]["competitor_threads"] == 1 and js["meta"]["model_shape"]["layers"] == 2
    assert [(r["work"], r["rows"]) for r in js["rows"]] == [("step", 1), ("step", 3), ("product", 1), ("product", 3)]
    for r in js["rows"]:
        assert r["alone_ms"] > 0 and r["shared_ms"] > 0
        assert r["slowdown"] == pytest.approx(r["shared_ms"] / r["alone_ms"], abs=0.005)
    assert "| step | 1 | 3 |" in (out / "cpu_contention.md").read_text()


def test_decode_step_matches_a_float64_reference():
    import torch

    mod = _load()
    step = mod.DecodeStep(hidden=8, intermediate=16, kv=4, layers=2, vocab=11)
    x = torch.randn(3, 8)
    ref = x.double()
    for L in step.layers:
        Ld = {k: v.double() for k, v in L.items()}
        ref = ref + ref @ Ld["o"].T
        ref = ref + ((ref @ Ld["gate"].T) * (ref @ Ld["up"].T)) @ Ld["down"].T
        ref = ref / ref.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(step(x).double(), ref @ step.head.double().T, rtol=1e-4, atol=1e-5)


def test_competitor_runs_inside_the_block_only():
    mod = _load()
    dims = {"hidden": 16, "intermediate": 32, "kv": 8, "layers": 1, "vocab": 64}
    with mod.competitor(1, dims) as proc:
        assert proc.poll() is None
    assert proc.poll() is not None


@pytest.mark.parametrize("flag, value", [("--rows", "0"), ("--threads", "two")])
def test_bad_counts_are_usage_errors(flag, value):
    with pytest.raises(SystemExit) as e:
        _load().main([flag, value])
    assert "positive integers" in str(e.value)
