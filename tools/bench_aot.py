"""Compile the Triton divergence kernels for Hopper (sm_90) without a GPU; report resources.

    python tools/bench_aot.py            # table: registers, spills, shared, SASS mix
    python tools/bench_aot.py --check    # exit 1 on a compile error, spills or narrow loads

Triton's own ``ptxas`` and ``nvdisasm`` (shipped in the triton wheel) turn each kernel, for
each kind/dtype and the launch parameters of :data:`ophsd_kernels.triton_divergence.CONFIG`,
into a real sm_90 cubin. This checks what the interpreter cannot (the kernels compile, the
loop-carried types agree, no register spills, 16-byte global accesses) and gives the static
numbers that explain a profile (registers -> CTAs per SM, MUFU and barrier counts), all at no
GPU time. It is not a timing: speed is measured by ``tools/bench_kernel.py`` on a GPU.

``--check`` also reads each kernel's PTX: every ``lg2.approx`` (JSD's log of the mixture
``m``) must take a value clamped by ``max`` with the smallest normal fp32 (``0f00800000``),
because the compiled exp2/lg2 are flush-to-zero and an unclamped subnormal ``m`` gives
``log m = -inf`` and an inf/NaN loss (issue 13). ``--dump-ptx DIR`` writes the PTX.

Must run with ``TRITON_INTERPRET`` unset (the kernels must be ``JITFunction``s).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

ARCH = 90
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048


def _tools():
    import triton

    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.join(d, "cuobjdump"), os.path.join(d, "nvdisasm")


def _signature(name, dtype):
    p = "*" + dtype
    i = "i32"
    if name == "stats":
        sig = {"S": p, "T": p, "OUT": "*fp32", "stride_s": i, "stride_t": i, "n_valid": i,
               "n_full": i, "scale": "fp32"}
        div = ["S", "T", "OUT", "stride_s", "stride_t", "n_valid", "n_full"]
    elif name == "jsd":
        sig = {"S": p, "T": p, "OUT": "*fp32", "LSE_S": "*fp32", "LSE_T": "*fp32", "stride_s": i,
               "stride_t": i, "n_valid": i, "n_full": i, "scale": "fp32", "beta": "fp32"}
        div = ["S", "T", "OUT", "LSE_S", "LSE_T", "stride_s", "stride_t", "n_valid", "n_full"]
    else:
        sig = {"S": p, "T": p, "G": p, "LSE_S": "*fp32", "LSE_T": "*fp32", "COEF": "*fp32",
               "EXTRA": "*fp32", "stride_s": i, "stride_t": i, "stride_g": i, "n_cols": i,
               "n_valid": i, "n_cb": i, "scale": "fp32", "beta": "fp32"}
        div = ["S", "T", "G", "LSE_S", "LSE_T", "COEF", "EXTRA", "stride_s", "stride_t",
               "stride_g", "n_cols", "n_valid"]
    return sig, div


SMALLEST_NORMAL_PTX = "0f00800000"  # 2^-126 = 1.1754944e-38 as a PTX float immediate
_PTX_INS = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][A-Za-z0-9_.]*)\s+([^;]*);", re.M)


def log_clamp_report(ptx: str):
    """``(n_log, n_clamped, unclamped)`` for the ``lg2.approx`` instructions of a PTX listing:
    how many there are, how many take a register defined by ``max[.NaN|.ftz].f32`` of some
    value and the smallest normal fp32 (an immediate, or a register moved from one), and the
    source lines of the others."""
    defs, consts = {}, set()
    logs = []
    for m in _PTX_INS.finditer(ptx):
        op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        if not args or not args[0].startswith("%"):
            continue
        defs[args[0]] = (op, args[1:])
        if op.startswith("mov.") and args[1:] == [SMALLEST_NORMAL_PTX]:
            consts.add(args[0])
        if op.startswith("lg2.approx"):
            logs.append((m.group(0).strip(), args[1] if len(args) > 1 else ""))
    clamped, bad = 0, []
    for line, src_reg in logs:
        op, ops = defs.get(src_reg, ("", []))
        if (op.startswith("max.") and op.endswith(".f32")
                and any(o == SMALLEST_NORMAL_PTX or o in consts for o in ops)):
            clamped += 1
        else:
            bad.append(line)
    return len(logs), clamped, bad


def loop_body(sass: str):
    """Instructions of the longest loop (a backward branch to a label) in nvdisasm output."""
    ins, labels, best = [], {}, []
    for line in sass.splitlines():
        m = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(.*?)\s*;", line)
        if m:
            ins.append(m.group(1))
            continue
        m = re.match(r"^\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ins)
    for i, txt in enumerate(ins):
        m = re.search(r"BRA\s+(?:`\()?\.?(L_x_\d+)", txt)
        if m and labels.get(m.group(1), i + 1) <= i and i + 1 - labels[m.group(1)] > len(best):
            best = ins[labels[m.group(1)]:i + 1]
    return best


def compile_kernel(name, kind, dtype, cfg):
    """Compile one kernel variant for sm_90; the compiled kernel, whose ``asm`` dict holds each
    stage's text (``ttir``, ``ttgir``, ``llir``, ``ptx``) and the ``cubin``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ophsd_kernels import triton_divergence as td

    if td._interpreted():
        raise RuntimeError("TRITON_INTERPRET is set: unset it to compile for sm_90")
    fn = {"stats": td._stats_kernel, "jsd": td._jsd_kernel, "grad": td._grad_kernel}[name]
    sig, div = _signature(name, dtype)
    consts = {"BLOCK": cfg["BLOCK"]}
    if name in ("stats", "grad"):
        consts["KIND"] = td._KIND_ID[kind]
    if name in ("stats", "jsd"):
        consts["NUM_STAGES"] = cfg.get("num_stages", 1)
    if name == "stats":
        consts["FUSED"] = cfg.get("FUSED") is not False
    else:
        consts["FAST_LOG"] = True
    for k, v in consts.items():
        sig[k] = "constexpr"
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div}
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                          options={"num_warps": cfg["num_warps"]})


def compile_one(name, kind, dtype, cfg):
    """Compile one kernel variant; return a dict of static facts."""
    k = compile_kernel(name, kind, dtype, cfg)
    cuobjdump, nvdisasm = _tools()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                             text=True, check=True).stdout
        sass = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True,
                              check=True).stdout
    n_log, n_clamped, _ = log_clamp_report(k.asm["ptx"])
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    ops = collections.Counter(
        re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T\d]\s+)?([A-Z0-9_.]+)", sass, re.M))
    regs = int(usage.get("REG", 0))
    loop = loop_body(sass)
    if len(loop) < 4:  # no streaming loop (the gradient kernel), just the trailing self-branch
        loop = []
    per_thread = cfg["BLOCK"] // (32 * cfg["num_warps"])  # elements of each input per iteration
    threads = 32 * cfg["num_warps"]
    smem = int(getattr(k.metadata, "shared", 0))
    ctas = min(REGS_PER_SM // max(1, regs * threads), MAX_THREADS_PER_SM // threads,
               (228 * 1024) // smem if smem else 32)
    wide_ld = sum(n for op, n in ops.items()
                  if (op.startswith("LDG") or op.startswith("LDGSTS")) and op.endswith(".128"))
    narrow_ld = sum(n for op, n in ops.items()
                    if op.startswith("LDG") and not op.endswith(".128") and "DEPBAR" not in op)
    wide_st = sum(n for op, n in ops.items() if op.startswith("STG") and op.endswith(".128"))
    return dict(kernel=name, kind=kind, dtype=dtype, block=cfg["BLOCK"], warps=cfg["num_warps"],
                stages=cfg.get("num_stages", 1), fused=int(cfg.get("FUSED") is not False),
                regs=regs, stack=int(usage.get("STACK", 0)), local=int(usage.get("LOCAL", 0)),
                smem=smem, ctas_per_sm=ctas, occupancy=ctas * threads / MAX_THREADS_PER_SM,
                ld128=wide_ld, ld_narrow=narrow_ld, st128=wide_st,
                mufu=sum(n for op, n in ops.items() if op.startswith("MUFU")),
                bar=sum(n for op, n in ops.items() if op.startswith("BAR")),
                shfl=sum(n for op, n in ops.items() if op.startswith("SHFL")),
                instrs=sum(ops.values()), loop=len(loop),
                loop_per_elem=(len(loop) / per_thread) if loop else 0.0,
                loop_bar=sum(1 for t in loop if "BAR" in t),
                lg2=n_log, lg2_unclamped=n_log - n_clamped, ptx=k.asm["ptx"])


def variants(configs=None):
    from ophsd_kernels import triton_divergence as td

    configs = configs or td.CONFIG
    for dtype in ("bf16", "fp16", "fp32"):
        for kind in ("reverse_kl", "forward_kl", "jsd"):
            yield "stats", kind, dtype, configs["stats"]
            yield "grad", kind, dtype, configs["grad"]
        yield "jsd", "jsd", dtype, configs["jsd"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="fail on compile errors, register spills or missing 16-byte accesses")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--extra", action="store_true",
                    help="also compile alternative stats variants (FUSED, blocks, warps)")
    ap.add_argument("--kernels", default="stats,grad,jsd",
                    help="compile only these kernels (comma-separated)")
    ap.add_argument("--kinds", default="reverse_kl,forward_kl,jsd",
                    help="compile only these kinds (comma-separated)")
    ap.add_argument("--dump-ptx", metavar="DIR", help="write each variant's PTX into DIR")
    args = ap.parse_args(argv)
    rows, problems = [], []
    todo = [v for v in variants() if v[2] in args.dtypes.split(",")
            and v[0] in args.kernels.split(",") and v[1] in args.kinds.split(",")]
    if args.extra:
        for block in (2048, 4096, 8192):
            for warps in (4, 8, 16):
                for fused in (False, True):
                    todo.append(("stats", "reverse_kl", "bf16", {"BLOCK": block, "num_warps": warps,
                                                                 "num_stages": 2, "FUSED": fused}))
    cols = ["kernel", "kind", "dtype", "block", "warps", "stages", "fused", "regs", "stack",
            "local", "smem", "ctas_per_sm", "occupancy", "ld128", "ld_narrow", "st128", "mufu",
            "bar", "shfl", "instrs", "loop", "loop_per_elem", "loop_bar", "lg2", "lg2_unclamped"]
    print(" ".join(f"{c:>10}" for c in cols))
    n_default = len(todo) - (18 if args.extra else 0)
    for i, (name, kind, dtype, cfg) in enumerate(todo):
        if args.extra and i == n_default:
            print("(alternative stats variants: reported, never failed on)")
        try:
            r = compile_one(name, kind, dtype, cfg)
        except Exception as exc:  # noqa: BLE001 - report every failure, fail at the end
            problems.append(f"{name}/{kind}/{dtype}: compile failed: {type(exc).__name__}: {exc}")
            print(problems[-1])
            continue
        rows.append(r)
        if args.dump_ptx:
            os.makedirs(args.dump_ptx, exist_ok=True)
            with open(os.path.join(args.dump_ptx, f"{name}_{kind}_{dtype}_b{cfg['BLOCK']}"
                                   f"_w{cfg['num_warps']}.ptx"), "w") as f:
                f.write(r["ptx"])
        print(" ".join(f"{r[c]:>10.2f}" if isinstance(r[c], float) else f"{r[c]!s:>10}"
                       for c in cols), flush=True)
        if i >= n_default:
            continue
        if r["stack"] or r["local"]:
            problems.append(f"{name}/{kind}/{dtype}: spills (stack {r['stack']}, local {r['local']})")
        if r["ld128"] == 0:
            problems.append(f"{name}/{kind}/{dtype}: no 16-byte global loads")
        if name == "grad" and r["st128"] == 0:
            problems.append(f"{name}/{kind}/{dtype}: no 16-byte gradient stores")
        if r["lg2_unclamped"]:
            problems.append(f"{name}/{kind}/{dtype}: {r['lg2_unclamped']} of {r['lg2']} lg2.approx "
                            f"take a value not clamped to the smallest normal (FTZ: log of a "
                            f"subnormal mixture is -inf)")
        if kind == "jsd" and name != "stats" and r["lg2"] == 0:
            problems.append(f"{name}/{kind}/{dtype}: no lg2.approx found (the clamp check "
                            f"would be vacuous: did the log change?)")
    for p in problems:
        print("PROBLEM:", p)
    if args.check and problems:
        return 1
    print(f"compiled {len(rows)} kernel variants for sm_{ARCH}; {len(problems)} problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
