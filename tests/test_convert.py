"""tools/convert_hf.py: import/export round trip, verify, and every user-facing error path."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_ranks

REPO = Path(__file__).resolve().parents[1]


def convert(*args, env=None):
    e = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(env or {})
    return subprocess.run([sys.executable, str(REPO / "tools/convert_hf.py"), *map(str, args)],
                          capture_output=True, text=True, env=e, cwd=REPO)


@pytest.fixture(scope="module")
def qwen3_roundtrip(tiny_model_dir, tmp_path_factory):
    hf = tiny_model_dir("qwen3")
    root = tmp_path_factory.mktemp("convert")
    r = convert("import", "--hf-dir", hf, "--output", root / "meg")
    assert r.returncode == 0, r.stderr[-3000:]
    r = convert("export", "--megatron-dir", root / "meg", "--output", root / "hf_out")
    assert r.returncode == 0, r.stderr[-3000:]
    return hf, root / "meg", root / "hf_out"


def test_import_export_bit_exact(qwen3_roundtrip):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, meg, out = qwen3_roundtrip
    assert json.loads((meg / "ophsd_megatron.json").read_text())["vocab_size"] == 400
    assert (meg / "model" / "metadata.json").is_file() and (meg / "hf" / "config.json").is_file()
    assert not Path(str(meg) + ".partial").exists()
    a, b = load_file(hf / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(a) - {"lm_head.weight"} == set(b)  # tied: no lm_head in the export
    for k in b:
        assert torch.equal(a[k], b[k]), k
    m1 = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    m2 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
    tok1, tok2 = AutoTokenizer.from_pretrained(hf), AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "what is 3 plus 4"}]
    assert tok1.apply_chat_template(msgs, add_generation_prompt=True) == tok2.apply_chat_template(
        msgs, add_generation_prompt=True)


def _megatron_as_hf_worker(rank, world, meg, hf):
    from transformers import AutoModelForCausalLM

    from ophsd.models import hub

    m = hub.load_hf_model(hub.resolve_model(meg), torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ids = torch.randint(0, 400, (2, 10))
    with torch.no_grad():
        return torch.equal(m(ids).logits, ref(ids).logits), hub.load_tokenizer(hub.resolve_model(meg)).vocab_size


def test_megatron_dir_loads_as_hf_model(qwen3_roundtrip):
    """Eval and engines accept a Megatron directory wherever they take a model."""
    hf, meg, _ = qwen3_roundtrip
    (res,) = run_ranks(_megatron_as_hf_worker, 1, str(meg), str(hf))
    assert res[0], "Megatron directory loaded as HF gives different logits"
    assert res[1] > 0


def test_verify_passes_and_fails(qwen3_roundtrip, tiny_model_dir, tmp_path):
    hf, meg, _ = qwen3_roundtrip
    r = convert("verify", "--hf-dir", hf, "--megatron-dir", meg, "--max-new-tokens", 3)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "PASS" in r.stdout and "greedy-token agreement" in r.stdout
    from tests.tiny_models import write_tiny_model

    other = write_tiny_model(tmp_path / "other", "qwen3", seed=7, tokenizer_dir=hf)
    r = convert("verify", "--hf-dir", other, "--megatron-dir", meg, "--max-new-tokens", 1)
    assert r.returncode == 1 and "FAIL" in r.stdout
    r = convert("verify", "--hf-dir", hf, "--megatron-dir", meg, "--tp", 2)
    assert r.returncode == 2 and "needs 2 ranks but WORLD_SIZE=1" in r.stderr and "torchrun" in r.stderr


def test_import_errors(tiny_model_dir, tmp_path):
    r = convert("import", "--hf-dir", tmp_path / "missing", "--output", tmp_path / "o")
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr
    r = convert("import", "--gguf", tmp_path / "x.gguf", "--output", tmp_path / "o")
    assert r.returncode == 2 and "no such file" in r.stderr
    r = convert("import", "--output", tmp_path / "o")
    assert r.returncode == 2 and "exactly one of --hf-dir" in r.stderr

    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)
    r = convert("import", "--hf-dir", gpt2, "--output", tmp_path / "o")
    assert r.returncode == 2 and "unsupported architecture 'gpt2'" in r.stderr and "Qwen3ForCausalLM" in r.stderr
    assert not (tmp_path / "o").exists()

    # A corrupted shard: nothing but a clearly named partial directory, replaced by the next run.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir("llama"), bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = convert("import", "--hf-dir", bad, "--output", tmp_path / "o")
    assert r.returncode == 2 and "corrupted or unreadable safetensors shard" in r.stderr
    assert not (tmp_path / "o").exists() and (tmp_path / "o.partial").is_dir()
    r = convert("import", "--hf-dir", tiny_model_dir("llama"), "--output", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "removing the partial directory" in r.stdout
    assert (tmp_path / "o" / "ophsd_megatron.json").is_file() and not (tmp_path / "o.partial").exists()
    r = convert("import", "--hf-dir", tiny_model_dir("llama"), "--output", tmp_path / "o")
    assert r.returncode == 2 and "--overwrite" in r.stderr
    r = convert("export", "--megatron-dir", tiny_model_dir("llama"), "--output", tmp_path / "e")
    assert r.returncode == 2 and "not a Megatron model directory" in r.stderr


def _smollm2_worker(rank, world):
    from ophsd.runtime import distributed

    distributed.initialize(1, 1)
    from transformers import AutoTokenizer  # noqa: F401

    from ophsd.models import hub, mapping
    from ophsd.models.megatron import build_model, model_spec_from_hf

    source = hub.resolve_model("smollm2-135m")
    hf = hub.load_hf_model(source, torch.float32)
    tok = hub.load_tokenizer(source)
    spec = model_spec_from_hf(hf.config)
    model = build_model(spec, perform_initialization=False)
    mapping.load_full_tensors(model, mapping.hf_to_megatron(hf.state_dict(), spec))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 3?"}], add_generation_prompt=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    with torch.no_grad():
        ml = model(ids, torch.arange(ids.shape[1])[None], attention_mask=None)[..., : spec.vocab_size]
        hl = hf(ids).logits
    return dict(diff=(ml - hl).abs().max().item(), scale=hl.abs().max().item(),
                agree=(ml.argmax(-1) == hl.argmax(-1)).float().mean().item(), layers=spec.num_layers,
                heads=(hf.config.num_attention_heads, hf.config.num_key_value_heads), vocab=spec.vocab_size)


def test_real_smollm2_megatron_matches_hf():
    from ophsd.models import hub

    try:
        hub.resolve_model("smollm2-135m")
    except hub.ModelNotFoundError as e:
        pytest.skip(str(e))
    (r,) = run_ranks(_smollm2_worker, 1)
    assert (r["layers"], r["heads"], r["vocab"]) == (30, (9, 3), 49152)
    assert r["scale"] > 5
    assert r["diff"] < 1e-3  # float32; the README states and justifies this tolerance
    assert r["agree"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 2), (3, 1)])
def test_real_smollm2_import_verify_cli(tmp_path_factory, tp, pp):
    from ophsd.models import hub

    try:
        hub.resolve_model("smollm2-135m")
    except hub.ModelNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.getbasetemp() / "smollm2_megatron"
    if not (out / "ophsd_megatron.json").is_file():
        r = convert("import", "--model", "smollm2-135m", "--output", out, "--overwrite")
        assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp * pp),
                        str(REPO / "tools/convert_hf.py"), "verify", "--model", "smollm2-135m",
                        "--megatron-dir", str(out), "--tp", str(tp), "--pp", str(pp), "--max-new-tokens", "4"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
