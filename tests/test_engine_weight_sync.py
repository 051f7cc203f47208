"""Live weight sync: Megatron (TP=2, gloo) -> HF-named full tensors -> buckets -> engine.

After optimizer steps on the Megatron model, the embedded engine's greedy tokens and
log-probabilities equal those of the exported HF model and of Megatron's own TP forward
(fp32; atol 1e-4, see tests/test_model_backend.py for why Megatron and transformers agree only
to rounding), versions advance, and a failed push keeps the old weights.
"""
import pytest
import torch

from ophsd.rollout import EngineError, InvalidRequestError, SamplingParams
from ophsd.rollout.weight_sync import iter_buckets, push_weights, write_bucket_shards
from tests.dist_utils import run_ranks

PROMPT = [7, 120, 33, 250, 18]
SP = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True, return_logprob=True)


def test_iter_buckets_bounds_order_and_errors(tmp_path):
    ts = [(f"t{i}", torch.zeros(n)) for i, n in enumerate([10, 20, 5, 100, 1, 1])]  # fp32: 4 bytes each
    buckets = list(iter_buckets(iter(ts), bucket_bytes=100))
    assert [[n for n, _ in b] for b in buckets] == [["t0"], ["t1", "t2"], ["t3"], ["t4", "t5"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 100 or len(b) == 1 for b in buckets)
    with pytest.raises(ValueError, match="twice"):
        list(iter_buckets([("a", torch.zeros(1)), ("a", torch.zeros(1))]))
    tied = torch.ones(4)
    paths = write_bucket_shards([("x", tied), ("y", tied)], tmp_path, bucket_bytes=1 << 20)
    from safetensors.torch import load_file

    assert len(paths) == 1 and torch.equal(load_file(paths[0])["y"], tied)  # shared storage saved as a copy


def _sync_worker(rank, world, hf_dir):
    from ophsd.runtime import distributed

    distributed.initialize(world, 1)
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from ophsd.models import forward, mapping
    from ophsd.models.megatron import build_model, model_spec_from_hf
    from ophsd.rollout.embedded import EmbeddedEngine
    from ophsd.runtime.groups import ParallelGroups

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    spec = model_spec_from_hf(hf.config, world, 1)
    model = build_model(spec)
    mapping.load_full_tensors(model, mapping.hf_to_megatron(hf.state_dict(), spec))
    tp_group = ps.get_tensor_model_parallel_group()
    engine = EmbeddedEngine(hf_dir) if rank == 0 else None
    torch.manual_seed(3)
    batches = [{"tokens": torch.randint(0, 400, (2, 12))} for _ in range(2)]

    def loss_fn(batch, output, non_loss_data=False):
        logits = forward.gather_vocab_logits(output.float(), spec.vocab_size, tp_group)
        nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["tokens"][:, 1:, None]).sum()
        return nll, torch.tensor(batch["tokens"][:, 1:].numel()), {"nll": nll.detach()}

    out = {"versions": [], "gen": [], "mega_lp": [], "hf_gen": [], "hf_lp": []}
    if rank == 0:
        out["initial"] = engine.generate([PROMPT], SP)[0][0].output_ids
    for step in (1, 2):
        for p in model.parameters():
            p.grad = None
        forward.run_schedule(model, batches, loss_fn)
        with torch.no_grad():  # plain SGD on the Megatron shards
            for p in model.parameters():
                g = getattr(p, "main_grad", None)
                g = g if g is not None else p.grad
                if g is not None:
                    p.add_(g, alpha=-0.05)
        stream = mapping.iter_hf_tensors(model, tp_group)  # collective: all TP ranks iterate
        if rank == 0:
            exported = {}

            def tee():
                for name, t in stream:
                    exported[name] = t.clone()
                    yield name, t

            push_weights(engine, tee(), version=step)
            (c,), = engine.generate([PROMPT], SP)
            out["versions"].append(c.weight_version)
            out["gen"].append((c.output_ids, c.logprobs))
            ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            ref.load_state_dict(exported, strict=False)
            ref.tie_weights()
            ids = ref.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, len(PROMPT):].tolist()
            with torch.no_grad():
                lg = ref(torch.tensor([PROMPT + c.output_ids])).logits[0].float()
            lp = torch.log_softmax(lg, -1)[len(PROMPT) - 1:-1].gather(1, torch.tensor(c.output_ids)[:, None])
            out["hf_gen"].append(ids)
            out["hf_lp"].append(lp.squeeze(1).tolist())
            out["n_exported"] = len(exported)
        else:
            for _ in stream:
                pass
        # Megatron's own TP forward over the engine's output: same log-probs
        seq = PROMPT + (out["gen"][-1][0] if rank == 0 else [0] * 6)
        t = torch.tensor([seq])
        torch.distributed.broadcast(t, src=0)
        logits = forward.forward_logits(model, [{"tokens": t}], ParallelGroups.from_parallel_state())
        if rank == 0:
            lp = torch.log_softmax(logits[0][0].float(), -1)[len(PROMPT) - 1:-1]
            out["mega_lp"].append(lp.gather(1, t[0, len(PROMPT):, None]).squeeze(1).tolist())
    if rank == 0:
        # a failed push: wrong shape in the middle of the stream -> old weights, old version
        good = dict(mapping.megatron_to_hf(dict(mapping.iter_full_megatron_tensors(model, tp_group)), spec))
        bad = list(good.items())
        bad[3] = (bad[3][0], torch.zeros(3, 3))
        try:
            push_weights(engine, iter(bad), version=3)
            out["failed_push"] = "no error"
        except InvalidRequestError as e:
            out["failed_push"] = str(e)
        except EngineError as e:  # pragma: no cover - wrong class is a failure below
            out["failed_push"] = "EngineError:" + str(e)
        (c,), = engine.generate([PROMPT], SP)
        out["after_fail"] = (c.weight_version, c.output_ids, c.logprobs)
        engine.close()
    else:
        dict(mapping.iter_full_megatron_tensors(model, tp_group))  # match rank 0's collective
    distributed.destroy()
    return out if rank == 0 else None


def test_megatron_tp2_to_engine_live_sync(tiny_model_dir):
    hf_dir = str(tiny_model_dir("llama"))
    res = run_ranks(_sync_worker, 2, hf_dir)[0]
    assert res["versions"] == [1, 2]
    assert res["n_exported"] >= 30  # every HF tensor of the 4-layer model (tied head not repeated)
    for step in range(2):
        ids, lps = res["gen"][step]
        assert ids == res["hf_gen"][step], f"step {step + 1}: engine greedy != exported HF model greedy"
        assert torch.allclose(torch.tensor(lps), torch.tensor(res["hf_lp"][step]), atol=1e-4)
        assert torch.allclose(torch.tensor(lps), torch.tensor(res["mega_lp"][step]), atol=1e-4)
    assert res["gen"][0][1] != res["gen"][1][1]  # the optimizer steps changed the weights
    assert "keeps weight version 2" in res["failed_push"] and "shape" in res["failed_push"]
    version, ids, lps = res["after_fail"]
    assert version == 2 and ids == res["gen"][1][0] and lps == res["gen"][1][1]
