"""Bad YAML configs, data files, flags and output paths (issue 14, items 5, 6, 8): each is one
error line naming the file or flag, exit code 2 (usage) before any model is loaded, no traceback.
The cases live in ``tools/faults/inputs.py`` (also run by ``tools/fault_inject.py inputs``)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from faults import inputs as fi  # noqa: E402

CASES = fi.cases("/nonexistent-placeholder")  # names only; each test writes its own files


def _no_model(monkeypatch):
    """Any model load fails the test: the errors must come before."""
    import ophsd.eval

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the usage error")

    monkeypatch.setattr(ophsd.eval, "make_engine", boom)
    monkeypatch.setattr("ophsd.rollout.embedded.EmbeddedEngine.__init__", boom)
    monkeypatch.setitem(sys.modules, "ophsd.train.trainer", type(sys)("no_trainer"))  # `from ... import Trainer` fails


def _run_in_process(case, capsys):
    if case.prog == "train":
        from ophsd.train.main import main
    elif case.prog == "eval":
        from ophsd.eval import main
    else:
        from convert_hf import main  # tools/ is on sys.path
    try:
        code = main(case.argv + (["--no-progress"] if case.prog == "eval" else []))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", [c.name for c in CASES if c.in_process])
def test_bad_input_is_one_usage_error_line(name, tmp_path, capsys, monkeypatch):
    case = next(c for c in fi.cases(tmp_path) if c.name == name)
    _no_model(monkeypatch)
    code, err = _run_in_process(case, capsys)
    assert fi.judge(case, code, err) is None
    assert code == 2 and case.needle in fi.last_line(err) and "error:" in fi.last_line(err)


def test_trainer_data_error_names_the_file_before_any_model(tmp_path):
    """A data file nested 100k deep: the trainer exits 1 (a data error, like every rank's other data
    errors) with the file named, before the model (a nonexistent path here) is looked at."""
    case = next(c for c in fi.cases(tmp_path) if not c.in_process)
    code, err, seconds = fi.run_case(case)
    assert fi.judge(case, code, err) is None, err[-2000:]
    assert fi.last_line(err) == f"ophsd train: error: {tmp_path / 'deep.json'}: cannot parse the JSON (nested too deeply)"


def test_yaml_values_convert_like_flags(tmp_path):
    from ophsd.train.config import parse_args

    cfg = tmp_path / "ok.yaml"
    cfg.write_text("train_iters: '7'\nlr: 2.0e-5\nbf16: true\npack-sequences: false\nload: null\n"
                   "sglang_url: [http://a:1, http://b:2]\nrollout_engine: sglang\n")
    a = parse_args(["--config", str(cfg), "--train-iters", "9"])
    assert (a.train_iters, a.lr, a.bf16, a.pack_sequences, a.load) == (9, 2e-5, True, False, None)
    assert a.sglang_url == ["http://a:1", "http://b:2"] and a.rollout_engine == "sglang"
    assert parse_args(["--config", str(cfg)]).train_iters == 7


def test_data_files_name_themselves(tmp_path):
    from ophsd.tasks import TaskDataError, get_task

    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"question": ' + "[" * 100_000 + "]" * 100_000 + '}\n{"question": "1+1?", "answer": "#### 2"}\n')
    with pytest.warns(UserWarning, match=f"{deep}:1: skipped row: invalid JSON \\(nested too deeply\\)"):
        d = get_task("gsm8k").load(deep)
    assert len(d) == 1 and d.bad_rows[0][0] == f"{deep}:1"
    labels = tmp_path / "categories.json"
    labels.write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "t.csv").write_text("text,category\nhi,a\n")
    with pytest.raises(TaskDataError, match=f"{labels}: labels file is not readable JSON"):
        get_task("banking77").load(tmp_path / "t.csv")
    big = tmp_path / "sub" / "big.csv"
    big.parent.mkdir()
    big.write_text('text,category\nhi,a\n"' + "x" * 200_000 + '",b\n')  # past csv's field size limit
    with pytest.raises(TaskDataError, match=f"{big}:2: not a readable CSV file \\(field larger than field limit"):
        get_task("banking77").load(big)
