#!/usr/bin/env python
"""Embedded-engine generation throughput vs plain ``transformers.generate`` one request at a time.

    python tools/bench_engine.py --model smollm2-135m --new-tokens 32 --concurrency 1,8,32,64

Both sides use the same model object weights, dtype, prompts (chat-templated questions of
varied length) and greedy decoding with a fixed number of new tokens (EOS ignored), in the
same process and run. The baseline runs ``--baseline-requests`` prompts one after another
(its tokens/s does not depend on how many it runs); the engine gets ``c`` requests from ``c``
threads at once for each concurrency ``c``. Prints a table and writes CSV + Markdown.

    python tools/bench_engine.py --preset banking77 --dtype float32

``--preset banking77``: one OPHSD rollout step of the BANKING77 task on the embedded engine with
its radix prefix cache off and on, side by side in one process: 8 student prompts (the task's
own ``student_messages``: instruction + the 77 intent labels, ~670 tokens shared by all, then a
distinct customer message, ~20-45 tokens), ``n=2`` samples each, 32 new tokens (EOS ignored, so
both sides generate the same number of tokens), temperature 1, fixed per-prompt seeds. Each
round times the rollout on a cold cache (flushed, as after a weight update), then the
draft-verify harness's follow-up shape: 8 greedy calls on the same prompts (they hit what the
rollout cached). It reports wall and CPU seconds, where the time goes (prefill forwards, decode
forwards, the rest: sampling and Python), and checks that both engines sampled the same tokens.
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, next to this file
import bench_common as bc  # noqa: E402  (puts the repository root on sys.path too)

QUESTIONS = [
    "What is 17 plus 25?",
    "Name three primary colors.",
    "Explain in one sentence why the sky is blue.",
    "A train travels 60 km in 45 minutes. What is its average speed in km per hour?",
    "Write a short greeting for a new colleague.",
    "Which is larger, 0.7 or 0.65? Explain briefly.",
    "List the steps to make a cup of tea.",
    "If I have 12 apples and give away 5, how many are left?",
    "Translate 'good morning' into French.",
    "What is the capital of Japan, and what is it known for?",
    "Summarize the plot of a story about a lost dog finding its way home.",
    "Give two tips for studying effectively.",
]


# BANKING77's 77 intent names (the order of the dataset's categories.json) and eight customer
# messages in its style, so the preset needs no data files.
BANKING77_LABELS = """
card_arrival card_linking exchange_rate card_payment_wrong_exchange_rate extra_charge_on_statement
pending_cash_withdrawal fiat_currency_support card_delivery_estimate automatic_top_up
card_not_working exchange_via_app lost_or_stolen_card age_limit pin_blocked contactless_not_working
top_up_by_bank_transfer_charge pending_top_up cancel_transfer top_up_limits
wrong_amount_of_cash_received card_payment_fee_charged transfer_not_received_by_recipient
supported_cards_and_currencies getting_virtual_card card_acceptance top_up_reverted
balance_not_updated_after_cheque_or_cash_deposit card_payment_not_recognised edit_personal_details
why_verify_identity unable_to_verify_identity get_physical_card visa_or_mastercard
topping_up_by_card disposable_card_limits compromised_card atm_support
direct_debit_payment_not_recognised passcode_forgotten declined_cash_withdrawal pending_card_payment
lost_or_stolen_phone request_refund declined_transfer Refund_not_showing_up declined_card_payment
pending_transfer terminate_account card_swallowed transaction_charged_twice verify_source_of_funds
transfer_timing reverted_card_payment? change_pin beneficiary_not_allowed transfer_fee_charged
receiving_money failed_transfer transfer_into_account verify_top_up getting_spare_card
top_up_by_cash_or_cheque order_physical_card virtual_card_not_working
wrong_exchange_rate_for_cash_withdrawal get_disposable_virtual_card top_up_failed
balance_not_updated_after_bank_transfer cash_withdrawal_not_recognised exchange_charge
top_up_by_card_charge activate_my_card cash_withdrawal_charge card_about_to_expire
apple_pay_or_google_pay verify_my_identity country_support
""".split()
BANKING77_MESSAGES = [
    "I ordered my new card over two weeks ago and it still has not arrived, is there a way to track where it is?",
    "Why was I charged a fee when I paid for my groceries with my card in another currency last weekend?",
    "I tried to take out cash at the ATM this morning but the machine declined my card twice, what is wrong?",
    "My phone was stolen on the train yesterday and the app is still logged in on it, what should I do now?",
    "How long does a bank transfer from my account in Germany usually take before the money shows up here?",
    "I topped up my account with my credit card but the balance has not changed at all since this afternoon.",
    "Can I get a virtual card for online shopping, and is there a limit on how many of them I can create?",
    "There are two identical payments to the same restaurant on my statement and I only ate there once.",
]


def machine_description() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"{bc.cpu_cores('; ')}; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"{bc.gpu_name(0) or 'no GPU'}; Python {platform.python_version()}; load average at start {load[0]:.1f}")


def load_model(args):
    """(model, tokenizer, torch dtype) of ``--model`` on ``--device``; prints the load time."""
    from ophsd.models.hub import load_hf_model, load_tokenizer, resolve_model
    from ophsd.rollout.embedded import parse_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    t0 = time.time()
    source = resolve_model(args.model)
    model = load_hf_model(source, dtype).to(args.device)
    tok = load_tokenizer(source)
    machine = machine_description()
    print(f"loaded {args.model} in {time.time() - t0:.1f}s; {machine}", flush=True)
    return model, tok, dtype, machine


def write_results(out_dir, stem: str, rows: list[dict], md: list[str]) -> None:
    """``<stem>.csv`` (one line per row) and ``<stem>.md`` under ``out_dir``; print the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bc.write_csv(out / f"{stem}.csv", rows)
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    bc.wrote(out / f"{stem}.csv", out / f"{stem}.md")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model name/path (default: %(default)s)")
    ap.add_argument("--dtype", default=None,
                    help="float32 | bfloat16 (default: bfloat16; float32 for --preset banking77, the trainer's CPU dtype)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,32,64", help="comma-separated concurrent request counts")
    ap.add_argument("--baseline-requests", type=int, default=4, help="sequential HF generate calls per round")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed rounds per point; the fastest is reported (shared CPUs are noisy), median too "
                    "(default: 3; 2 for --preset banking77)")
    ap.add_argument("--out-dir", default="bench_results/engine", help="where CSV and Markdown go")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--preset", choices=["concurrency", "banking77"], default="concurrency",
                    help="concurrency: engine vs transformers.generate (default); banking77: one OPHSD rollout "
                    "step of BANKING77 with the prefix cache off vs on")
    ap.add_argument("--no-draft", action="store_true", help="banking77: skip the harness-shaped follow-up calls")
    args = ap.parse_args(argv)
    bc.offline()
    if args.preset == "banking77":
        args.dtype = args.dtype or "float32"
        args.repeats = args.repeats or 2
        return bench_banking77(args)
    args.dtype = args.dtype or "bfloat16"
    args.repeats = args.repeats or 3

    from ophsd.rollout import SamplingParams
    from ophsd.rollout.embedded import EmbeddedEngine

    conc = [int(c) for c in args.concurrency.split(",") if c.strip()]
    model, tok, dtype, _ = load_model(args)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in QUESTIONS]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    n_new = args.new_tokens

    # ---- baseline: plain transformers.generate, one request at a time
    def hf_one(p):
        ids = torch.tensor([p], device=args.device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id or 0)
        assert out.shape[1] - len(p) == n_new
        return out[0, len(p):].tolist()

    engine = EmbeddedEngine.from_pretrained_objects(model, tok, name=args.model, dtype=dtype, device=args.device,
                                                    max_running=max(conc))
    sp = SamplingParams(temperature=0.0, max_new_tokens=n_new, ignore_eos=True)

    def run(c):
        done = []
        barrier = threading.Barrier(c + 1)

        def worker(i):
            barrier.wait()
            done.append(engine.generate([prompts[i % len(prompts)]], sp)[0][0])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(c)]
        for th in threads:
            th.start()
        barrier.wait()
        t = time.perf_counter()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
        assert len(done) == c and all(len(x.output_ids) == n_new for x in done)
        return dt

    def baseline_round():
        t = time.perf_counter()
        outs = [hf_one(prompts[i % len(prompts)]) for i in range(args.baseline_requests)]
        return time.perf_counter() - t, outs

    hf_one(prompts[0])  # warm-up both
    engine.generate([prompts[0]], sp)
    # Rounds interleave the baseline and every engine point, so all see the same machine load.
    base_dts, dts = [], {c: [] for c in conc}
    for r in range(args.repeats):
        dt, baseline_out = baseline_round()
        base_dts.append(dt)
        print(f"round {r + 1}: baseline {args.baseline_requests * n_new / dt:.1f} tok/s", end="", flush=True)
        for c in conc:
            dts[c].append(run(c))
            print(f" | c={c}: {c * n_new / dts[c][-1]:.1f}", end="", flush=True)
        print(flush=True)
    base_dt, base_med = min(base_dts), statistics.median(base_dts)
    base_tps = args.baseline_requests * n_new / base_dt
    check = engine.generate([prompts[i] for i in range(min(3, args.baseline_requests))], sp)
    eos = set(engine.eos_token_ids)

    def same_until_eos(ours, ref):  # HF's min_new_tokens masks EOS, the engine's ignore_eos samples it
        k = next((i for i, t in enumerate(ours) if t in eos), len(ours))
        return ours[:k] == ref[:k]

    agree = sum(same_until_eos(c[0].output_ids, b) for c, b in zip(check, baseline_out))
    rows = [{"mode": "transformers.generate x1 sequential", "concurrency": 1, "requests": args.baseline_requests,
             "new_tokens": n_new, "seconds": round(base_dt, 3), "tokens_per_s": round(base_tps, 1),
             "tokens_per_s_median": round(args.baseline_requests * n_new / base_med, 1), "speedup": 1.0}]
    for c in conc:
        dt = min(dts[c])
        tps = c * n_new / dt
        rows.append({"mode": "EmbeddedEngine, concurrent requests", "concurrency": c, "requests": c,
                     "new_tokens": n_new, "seconds": round(dt, 3), "tokens_per_s": round(tps, 1),
                     "tokens_per_s_median": round(c * n_new / statistics.median(dts[c]), 1),
                     "speedup": round(tps / base_tps, 2)})
    engine.close()

    md = [f"Model {args.model}, dtype {args.dtype}, device {args.device}, greedy, {n_new} new tokens per request "
          f"(EOS ignored). Machine: {machine_description()}. Greedy agreement engine (batched) vs HF up to the first EOS on "
          f"{len(check)} prompts: {agree}/{len(check)}.", "",
          f"Best of {args.repeats} rounds per point (median in parentheses).", ""]
    md += bc.md_table(["mode", "concurrent requests", "seconds (best)", "tokens/s best (median)",
                       "speedup vs one-at-a-time"],
                      [[r["mode"], r["concurrency"], r["seconds"], f"{r['tokens_per_s']} ({r['tokens_per_s_median']})",
                        f"{r['speedup']}x"] for r in rows])
    write_results(args.out_dir, "bench_engine", rows, md)
    return 0



def _timed_engine(engine):
    """Count the seconds an engine spends in prefill and in decode forwards (instance patches on
    its model runner)."""
    spent = {"prefill": 0.0, "decode": 0.0}
    runner = engine._runner
    prefill, forward = runner.prefill, runner.forward
    inside = [False]

    def timed_prefill(prompts):
        t = time.perf_counter()
        inside[0] = True
        try:
            return prefill(prompts)
        finally:
            inside[0] = False
            spent["prefill"] += time.perf_counter() - t

    def timed_forward(**kw):
        t = time.perf_counter()
        try:
            return forward(**kw)
        finally:
            if not inside[0]:
                spent["decode"] += time.perf_counter() - t

    runner.prefill, runner.forward = timed_prefill, timed_forward
    return spent


def bench_banking77(args) -> int:
    from ophsd.rollout import SamplingParams
    from ophsd.rollout.embedded import EmbeddedEngine
    from ophsd.tasks import get_task
    from ophsd.tasks.base import Example

    model, tok, dtype, machine = load_model(args)
    task = get_task("banking77", labels=BANKING77_LABELS)
    prompts = []
    for i, msg in enumerate(BANKING77_MESSAGES):
        ids = tok.apply_chat_template(task.student_messages(Example(id=str(i), question=msg, answer="card_arrival")),
                                      add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    shared = min(sum(1 for _ in itertools.takewhile(lambda ab: ab[0] == ab[1], zip(prompts[0], p)))
                 for p in prompts[1:])
    n_new = args.new_tokens
    rollout = [(p, SamplingParams(temperature=1.0, max_new_tokens=n_new, n=2, seed=1000 + 2 * i, ignore_eos=True,
                                  return_logprob=True)) for i, p in enumerate(prompts)]
    draft = [(p, SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True)) for p in prompts]
    lens = [len(p) for p in prompts]
    print(f"8 prompts of {min(lens)}-{max(lens)} tokens, {shared} shared by all; n=2, {n_new} new tokens", flush=True)

    engines = {
        "off": EmbeddedEngine.from_pretrained_objects(model, tok, name=args.model, dtype=dtype, device=args.device,
                                                      prefix_cache_tokens=0),
        "on": EmbeddedEngine.from_pretrained_objects(model, tok, name=args.model, dtype=dtype, device=args.device),
    }
    spent = {k: _timed_engine(e) for k, e in engines.items()}
    warm = tok("Hello there, how are you today?")["input_ids"]
    for e in engines.values():  # warm-up on an unrelated prompt, then a cold cache
        e.generate([warm], SamplingParams(temperature=1.0, max_new_tokens=4, seed=0))
        e.flush_cache()

    rows, outputs = [], {}

    def measure(rnd, name, phase, reqs):
        """Run ``reqs`` on one engine; add its row (wall/CPU time, where it went, tokens); the outputs."""
        eng = engines[name]
        before, sp0 = eng.stats(), dict(spent[name])
        with bc.Stopwatch() as sw:
            res = [[f.result() for f in futs] for futs in eng.submit_many(reqs)]
        st = eng.stats()
        pre, dec = spent[name]["prefill"] - sp0["prefill"], spent[name]["decode"] - sp0["decode"]
        row = {"round": rnd, "cache": name, "phase": phase, "seconds": round(sw.wall, 2),
               "cpu_seconds": round(sw.cpu, 2), "prefill_s": round(pre, 2), "decode_fwd_s": round(dec, 2),
               "other_s": round(sw.wall - pre - dec, 2),
               "prefilled_tokens": st["prefill_tokens"] - before["prefill_tokens"],
               "hit_tokens": st["prefix_hit_tokens"] - before["prefix_hit_tokens"]}
        rows.append(row)
        print(row, flush=True)
        return res

    for r in range(args.repeats):
        for name in (["off", "on"] if r % 2 == 0 else ["on", "off"]):  # alternate who goes first
            engines[name].flush_cache()  # every round starts cold, as after a weight update
            outputs[name] = measure(r + 1, name, "rollout 8x2", rollout)
            if not args.no_draft:
                measure(r + 1, name, "then 8 draft calls", draft)
    same = sum(a.output_ids == b.output_ids for ga, gb in zip(outputs["off"], outputs["on"]) for a, b in zip(ga, gb))
    lp_diff = max(max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs))
                  for ga, gb in zip(outputs["off"], outputs["on"]) for a, b in zip(ga, gb))
    for e in engines.values():
        e.close()

    def best(cache, phase):
        return min((x for x in rows if x["cache"] == cache and x["phase"] == phase), key=lambda x: x["seconds"])

    md = [f"BANKING77 rollout step, {args.model}, {args.dtype}, {args.device}: 8 prompts of {min(lens)}-{max(lens)} "
          f"tokens ({shared} shared), n=2, {n_new} new tokens, temperature 1, fixed seeds. Machine: {machine}.",
          f"Sampled tokens identical with and without the cache: {same}/16; largest log-probability difference "
          f"{lp_diff:.2e}.", ""]
    md += bc.md_table(["round", "prefix cache", "phase", "wall s", "CPU s", "prefill s", "decode fwd s", "other s",
                       "prefilled tokens", "cache-hit tokens"], [list(x.values()) for x in rows])
    md.append("")
    phases = ["rollout 8x2"] + ([] if args.no_draft else ["then 8 draft calls"])
    for ph in phases:
        off, on = best("off", ph), best("on", ph)
        md.append(f"- {ph}: best wall {off['seconds']} s off, {on['seconds']} s on: **{off['seconds'] / on['seconds']:.1f}x**; "
                  f"per round: " + ", ".join(
                      f"{a['seconds'] / b['seconds']:.1f}x" for a, b in zip(
                          [x for x in rows if x["cache"] == "off" and x["phase"] == ph],
                          [x for x in rows if x["cache"] == "on" and x["phase"] == ph])))
    write_results(args.out_dir, "bench_engine_banking77", rows, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
