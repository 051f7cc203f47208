"""Tasks: loaders (bad rows with file:line), dev splits, prompts, answer extraction, rewards."""
import json
import re
import warnings
from pathlib import Path

import pytest

from ophsd.tasks import (
    BadRowWarning, Example, TaskDataError, get_task, list_tasks, register_task, split_dev,
)
from ophsd.tasks.base import Task
from ophsd.tasks.rewards import (
    LabelParser, extract_boxed, extract_math_answer, math_equal, pass_at_k, set_f1, split_label_list,
    strip_think,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return path


# ------------------------------------------------------------------------- extraction & rewards

def test_strip_think():
    assert strip_think("<think>secret</think>1. add\n2. sum") == "1. add\n2. sum"
    assert strip_think("<THINK>a</THINK>x<think>b</think>y") == "xy"
    assert strip_think("<think>1. unclosed plan") == "1. unclosed plan"  # kept, tag removed
    assert strip_think("hidden reasoning</think>the plan") == "the plan"
    assert strip_think(None) == ""


def test_extract_boxed_last_and_nested():
    assert extract_boxed(r"first \boxed{1} then \boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert extract_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed(r"unbalanced \boxed{1") is None
    assert extract_boxed("no box 42") is None


def test_extract_math_answer_fallbacks():
    assert extract_math_answer(r"so \boxed{12} and 13") == "12"
    assert extract_math_answer("work 5+5=10\n#### 1,234") == "1234"
    assert extract_math_answer("The answer is 17.") == "17"
    assert extract_math_answer("3 apples plus 4 gives 7 apples.") == "7"
    assert extract_math_answer("3 apples plus 4 gives 7.", fallback_last_number=False) is None
    assert extract_math_answer("<think>maybe 99</think>It is 5") == "5"
    assert extract_math_answer("") is None


@pytest.mark.parametrize("pred,gold,ok", [
    ("72", "72", True), ("72.0", "72", True), ("1,000", "1000", True), (r"\frac{1}{2}", "0.5", True),
    ("x^2+1", "1+x^2", True), (r"\sqrt{4}", "2", True), ("71", "72", False), (None, "1", False),
    ("", "1", False), ("$18", "18", True),
])
def test_math_equal(pred, gold, ok):
    assert math_equal(pred, gold) is ok


def test_math_equal_in_worker_thread():
    # math-verify's SIGALRM timeout only works in the main thread: the reward must not crash.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        res = list(pool.map(lambda a: math_equal(*a), [(r"\frac{6}{4}", "1.5"), ("2", "3")]))
    assert res == [True, False]


def test_label_parser_rules():
    p = LabelParser(["card_arrival", "card_payment_fee_charged", "card_payment_not_recognised", "cash"])
    assert p("card_arrival") == "card_arrival"
    assert p("Card Arrival.") == "card_arrival"
    assert p("Label: card-arrival\nbecause ...") == "card_arrival"
    # earliest mention wins; the longest label wins at the same position
    assert p("It could be card payment fee charged, or card_arrival") == "card_payment_fee_charged"
    assert p("cashback question") is None  # no word-boundary match for 'cash'
    assert p("I need cash") == "cash"
    assert p("no idea") is None and p("") is None and p(None) is None
    assert p.find_all("cash and card_arrival and cash") == ["cash", "card_arrival"]


def test_set_f1_and_split():
    assert set_f1(["theft"], ["theft"]) == 1.0
    assert set_f1(["theft", "fraud"], ["theft"]) == pytest.approx(2 / 3)
    assert set_f1([], ["theft"]) == 0.0
    assert set_f1([], []) == 1.0
    assert split_label_list("盗窃、诈骗；抢劫") == ["盗窃", "诈骗", "抢劫"]
    assert split_label_list("1. theft\n2. fraud, theft") == ["theft", "fraud"]


def test_pass_at_k():
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


# ------------------------------------------------------------------------- loaders

def test_gsm8k_bad_rows_counted_with_file_line(tmp_path):
    f = write_jsonl(tmp_path / "g.jsonl", [
        {"question": "1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"},
        {"question": "no final", "answer": "just text"},          # line 2: no ####
        "{not json",                                              # line 3
        {"answer": "#### 3"},                                     # line 4: no question
        {"question": "big", "answer": "sum\n#### 1,200"},
        {"question": "words", "answer": "#### seven"},           # line 6: not a number
    ])
    with pytest.warns(BadRowWarning) as rec:
        data = get_task("gsm8k").load(f)
    msgs = [str(w.message) for w in rec]
    assert len(data) == 2 and len(data.bad_rows) == 4
    assert [loc for loc, _ in data.bad_rows] == [f"{f}:2", f"{f}:3", f"{f}:4", f"{f}:6"]
    assert any(m.startswith(f"{f}:2: skipped row") and "####" in m for m in msgs)
    assert data[0].answer == "2" and data[0].solution == "1+1 = 2"  # calculator notes removed
    assert data[1].answer == "1200"
    assert data[0].source == f"{f}:1"


def test_file_with_no_usable_rows_is_an_error(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}, {"x": 1}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TaskDataError, match="no usable rows"):
            get_task("gsm8k").load(f)
    with pytest.raises(TaskDataError, match="does not exist"):
        get_task("gsm8k").load(tmp_path / "missing.jsonl")
    with pytest.raises(TaskDataError, match="needs a data file"):
        get_task("math").load(None)


def test_math_and_deepmath_schemas(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "p1", "answer": "\\frac{1}{2}", "solution": "s"},
        {"problem": "p2", "solution": "so \\boxed{5}"},   # answer from the solution's box
        {"problem": "p3"},                                # bad: no answer at all
    ])
    with pytest.warns(BadRowWarning, match=r"m.jsonl:3"):
        d = get_task("math").load(f)
    assert [e.answer for e in d] == ["\\frac{1}{2}", "5"]
    assert get_task("math").reward("thus \\boxed{0.5}", d[0]) == 1.0
    j = tmp_path / "d.json"
    j.write_text(json.dumps([{"question": "q", "answer": "3", "solution": "1+2"}, {"question": "q2"}]))
    with pytest.warns(BadRowWarning, match=r"d.json:\[1\]"):
        dd = get_task("deepmath").load(j)
    assert len(dd) == 1 and dd[0].solution == "1+2"
    assert "1+2" in get_task("deepmath").reference_text(dd[0])


def test_banking77_labels_beside_csv_and_bad_rows(tmp_path):
    (tmp_path / "categories.json").write_text(json.dumps(["card_arrival", "top_up_failed"]))
    f = tmp_path / "train.csv"
    f.write_text("text,category\nwhere is my card,card_arrival\n,card_arrival\n"
                 "top up failed,top_up_failed\nhello,unknown_label\n\"a,b\",card_arrival,extra\n")
    with pytest.warns(BadRowWarning):
        d = get_task("banking77").load(f)
    assert [e.answer for e in d] == ["card_arrival", "top_up_failed"]
    assert [loc.rsplit(":", 1)[1] for loc, _ in d.bad_rows] == ["3", "5", "6"]
    assert "unknown intent 'unknown_label'" in d.bad_rows[1][1]
    bad_header = tmp_path / "h.csv"
    bad_header.write_text("sentence,label\nx,y\n")
    with pytest.raises(TaskDataError, match=r"h.csv:1: CSV header"):
        get_task("banking77").load(bad_header)


def test_banking77_prompt_and_reward(tmp_path):
    f = tmp_path / "b.csv"
    f.write_text("text,category\nwhere is my card,card_arrival\ntop up failed,top_up_failed\n")
    t = get_task("banking77")
    d = t.load(f)
    assert t.labels == ["card_arrival", "top_up_failed"]  # collected from the file (no categories.json)
    msg = t.student_messages(d[0])
    assert [m["role"] for m in msg] == ["user"]
    text = msg[0]["content"]
    assert "- card_arrival\n- top_up_failed" in text and "Message: where is my card" in text
    assert t.reward("card arrival", d[0]) == 1.0
    assert t.reward("top_up_failed", d[0]) == 0.0
    assert t.reward("???", d[0]) == 0.0


def test_lawbench_set_f1(tmp_path):
    f = write_jsonl(tmp_path / "law.jsonl", [
        {"instruction": "给出罪名", "question": "事实：张三盗窃财物。", "fact": "张三盗窃财物。", "accusations": ["盗窃罪"]},
        {"instruction": "给出罪名", "question": "事实：李四诈骗并抢劫。", "fact": "李四诈骗并抢劫。",
         "accusations": ["诈骗", "抢劫"]},
        {"instruction": "给出罪名", "fact": "x", "accusations": []},  # bad: empty list
    ])
    t = get_task("lawbench")
    with pytest.warns(BadRowWarning, match="law.jsonl:3"):
        d = t.load(f)
    assert d[0].answer == ["盗窃"] and sorted(t.labels) == sorted(["盗窃", "诈骗", "抢劫"])
    assert t.input_text(d[1]) == "李四诈骗并抢劫。"
    assert t.reward("盗窃罪", d[0]) == 1.0
    assert t.reward("诈骗罪、盗窃罪", d[1]) == pytest.approx(0.5)
    assert t.reward("诈骗，抢劫", d[1]) == 1.0
    assert "给出罪名" in t.student_messages(d[0])[-1]["content"]


def test_uspto(tmp_path):
    f = write_jsonl(tmp_path / "u.jsonl", [
        {"rxn_smiles": "CCO.CC(=O)Cl>>CC(=O)OCC", "class": 2},
        {"rxn_smiles": "CCO>>CC=O", "class": "8"},
        {"rxn_smiles": "CCO", "class": 1},            # bad: no >>
        {"rxn_smiles": "C>>C", "class": 11},          # bad: out of range
    ])
    t = get_task("uspto")
    with pytest.warns(BadRowWarning):
        d = t.load(f)
    assert [e.answer for e in d] == ["2", "8"] and len(d.bad_rows) == 2
    assert t.reward("2", d[0]) == 1.0
    assert t.reward("Class 8: oxidations", d[1]) == 1.0
    assert t.reward("oxidations", d[1]) == 1.0
    assert t.reward("10", d[1]) == 0.0
    assert "8 (oxidations)" in t.student_messages(d[0])[0]["content"]


# ------------------------------------------------------------------------- arith & splits

def test_arith_seeded_endless_and_correct():
    t = get_task("arith", seed=3)
    a, b = t.example(17), get_task("arith", seed=3).example(17)
    assert a == b and a.id == "arith-train-17"
    assert get_task("arith", seed=4).example(17).question != a.question
    train = t.dataset(split="train", limit=50)
    dev = t.dataset(split="dev", limit=50)
    assert not {e.question for e in train} & {e.question for e in dev}
    step = re.compile(r"(\d+)\s+(?:[a-z]+\s+)?([-+x/])\s+(\d+)\s*=\s*(\d+)")
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b, "/": lambda a, b: a / b}
    for ex in train:
        found = step.findall(ex.solution)
        assert len(found) >= 2, ex.solution  # multi-step
        for a, op, b, c in found:  # every worked step's arithmetic is right
            assert ops[op](int(a), int(b)) == int(c), (ex.question, a, op, b, c)
        assert found[-1][3] == ex.answer and int(ex.answer) >= 0
        assert t.reward(f"\\boxed{{{ex.answer}}}", ex) == 1.0
    stream = t.stream("train")
    assert [next(stream).id for _ in range(3)] == ["arith-train-0", "arith-train-1", "arith-train-2"]
    with pytest.raises(ValueError, match="generates its data"):
        t.load("file.jsonl")


def test_split_dev_fixed_seed():
    ex = [Example(id=str(i), question=f"q{i}", answer=str(i)) for i in range(100)]
    tr, dv = split_dev(ex, 10, seed=0)
    tr2, dv2 = split_dev(ex, 10, seed=0)
    assert [e.id for e in dv] == [e.id for e in dv2] and len(dv) == 10 and len(tr) == 90
    assert not {e.id for e in tr} & {e.id for e in dv}
    assert [e.id for e in split_dev(ex, 10, seed=1)[1]] != [e.id for e in dv]
    assert len(split_dev(ex, 0.25)[1]) == 25
    with pytest.raises(ValueError):
        split_dev(ex, 0)


def test_registry():
    assert set(list_tasks()) >= {"arith", "gsm8k", "math", "deepmath", "banking77", "lawbench", "uspto"}
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")

    @register_task("my_task_for_test")
    class MyTask(Task):
        name = "my_task_for_test"

    assert isinstance(get_task("my_task_for_test"), MyTask)
    with pytest.raises(TypeError):
        register_task("x")(object)


@pytest.mark.skipif(not (SHARED / "gsm8k" / "train.jsonl").exists(), reason="shared/data not present")
def test_shared_data_loads_and_dev_split_is_stable():
    g = get_task("gsm8k")
    d = g.dataset(SHARED / "gsm8k" / "train.jsonl", split="dev", dev_size=200, seed=0)
    assert len(d) == 200 and not d.bad_rows
    assert all(g.reward(f"\\boxed{{{e.answer}}}", e) == 1.0 for e in d)
    b = get_task("banking77")
    bd = b.dataset(SHARED / "banking77" / "train.csv", split="dev", dev_size=200, seed=0)
    assert len(b.labels) == 77 and len(bd) == 200
    assert all(b.reward(e.answer, e) == 1.0 for e in bd)


# ------------------------------------------------------------------------- seeded samples

def _sorted_intents_csv(path, n_labels=77, per_label=20):
    """A BANKING77-like file sorted by intent (as the real files are)."""
    rows = ["text,category"] + [f"message {i} about topic {lab},intent_{lab:02d}"
                                for lab in range(n_labels) for i in range(per_label)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_seeded_sample_is_stratified_nested_and_deterministic(tmp_path):
    from collections import Counter

    from ophsd.tasks.base import sample_indices

    t = get_task("banking77")
    data = t.load(_sorted_intents_csv(tmp_path / "train.csv"))
    assert [e.answer for e in data[:100]].count("intent_00") == 20  # the first 100 rows: 5 intents
    s = t.sample(data, 100, seed=0)
    counts = Counter(e.answer for e in s)
    assert len(s) == 100 and len({e.id for e in s}) == 100
    assert len(counts) == 77 and set(counts.values()) == {1, 2}  # every intent once, 23 of them twice
    assert len({e.answer for e in s[:77]}) == 77  # round-robin: each label before any label twice
    assert [e.id for e in t.sample(data, 100, seed=0)] == [e.id for e in s]  # same seed, same sample
    other = t.sample(data, 100, seed=1)
    assert [e.id for e in other] != [e.id for e in s] and len({e.answer for e in other}) == 77
    assert [e.id for e in t.sample(data, 40, seed=0)] == [e.id for e in s[:40]]  # samples nest
    assert [e.id for e in t.sample(data, 5000, seed=0)] == [e.id for e in data]  # all of them: as they are
    # without labels: the first k of the seeded permutation (what split_dev always drew)
    import random

    order = list(range(50))
    random.Random(3).shuffle(order)
    assert sample_indices(50, 10, seed=3) == order[:10]
    math_ex = [Example(id=str(i), question=f"q{i}", answer=str(i)) for i in range(50)]
    assert [e.id for e in get_task("gsm8k").sample(math_ex, 10, seed=3)] == [str(i) for i in order[:10]]


def test_dev_split_is_stratified_for_classification(tmp_path):
    t = get_task("banking77")
    path = _sorted_intents_csv(tmp_path / "train.csv")
    dev = t.dataset(path, split="dev", dev_size=100, seed=7)
    train = t.dataset(path, split="train", dev_size=100, seed=7)
    assert len({e.answer for e in dev}) == 77 and len(dev) == 100
    assert not {e.id for e in dev} & {e.id for e in train} and len(dev) + len(train) == 77 * 20
    assert [e.id for e in t.dataset(path, split="dev", dev_size=100, seed=7)] == [e.id for e in dev]
    # math tasks keep the plain seeded permutation (the GSM8K dev split is unchanged)
    ex = [Example(id=str(i), question=f"q{i}", answer=str(i)) for i in range(100)]
    import random

    order = list(range(100))
    random.Random(0).shuffle(order)
    assert [e.id for e in split_dev(ex, 10, seed=0)[1]] == [str(i) for i in order[:10]]


# ------------------------------------------------------------------------- prompt length

def _count(messages):
    """A stand-in tokenizer: 1 token per 4 characters + 4 per message."""
    return sum(len(m["content"]) // 4 + 4 for m in messages)


def test_default_max_prompt_length_covers_the_prompts_training_builds(tmp_path):
    from ophsd.harness import DraftVerifyHarness, PlanSolveHarness, build_bank
    from ophsd.harness.opsd import opsd_teacher_messages

    t = get_task("banking77")
    data = t.load(_sorted_intents_csv(tmp_path / "train.csv"))
    n = t.default_max_prompt_length(_count, data, k_neighbours=5)
    assert n % 64 == 0
    student = max(_count(t.student_messages(e)) for e in data)
    assert student > 512 // 4  # the 77 intents make the student prompt long
    h = DraftVerifyHarness(t, bank=build_bank(data, t, embedder="tfidf", progress=False), k=5, progress=False)
    nbs = h.bank.search(h.bank.encode([e.question for e in data[:40]]), 5, [e.question for e in data[:40]])
    draft = max(_count(h.draft_messages(e, nb)) for e, nb in zip(data[:40], nbs))
    # a bank (--bank-data) of long messages: every verify shot at the harness's 300-character clip
    from ophsd.harness.memory_bank import Neighbour

    long_nbs = [Neighbour("a long message " * 30, f"intent_{i:02d}", 1.0, i) for i in range(3)]
    verify = _count(h.verify_messages(data[0], "intent_00", long_nbs, long_nbs))
    assert n >= 1.25 * max(student, draft, verify) and draft < verify
    # --harness-label-list: every draft/verify context also holds the whole label list
    hl = DraftVerifyHarness(t, bank=h.bank, k=5, progress=False, label_list=True)
    verify_l = _count(hl.verify_messages(data[0], "intent_00", long_nbs, long_nbs))
    assert verify_l > student and 1.25 * verify_l > n  # the default without it would not cover it
    assert t.default_max_prompt_length(_count, data, k_neighbours=5, label_list=True) >= 1.25 * verify_l
    # math: the plan-solve teacher context holds a plan of --plan-tokens tokens
    g = get_task("gsm8k")
    ex = [Example(id=str(i), question="Tom has 3 apples. " * (i + 1) + "How many?", answer="3",
                  solution="3 apples. " * (10 - i)) for i in range(10)]
    n = g.default_max_prompt_length(_count, ex, plan_tokens=200)
    ps = PlanSolveHarness(g, plan_tokens=200, progress=False)
    plan = "x" * 800  # 200 tokens of _count
    assert n >= 1.25 * max(max(_count(ps.solve_messages(e, plan, training=True)),
                               _count(opsd_teacher_messages(g, e)), _count(g.student_messages(e))) for e in ex)


def test_closest_label_reads_near_copies_only():
    from ophsd.tasks.rewards import closest_label

    labels = ["top_up_limits", "top_up_reverted", "card_arrival"]
    assert closest_label("top_up_revented", labels) == "top_up_reverted"
    assert closest_label("Top Up Limit\nbecause ...", labels) == "top_up_limits"  # first line, normalised
    assert closest_label("<think>hm</think>card arival", labels) == "card_arrival"
    assert closest_label("not_able_to_prove_identity", labels) is None  # an invented label is not a copy
    assert closest_label("", labels) is None and closest_label(None, labels) is None
    assert closest_label("top_up_limit", labels, cutoff=0.99) is None
