"""tools/demo.py --method NAME: the distilled student is trained with
configs/demo/<NAME>-RetinaNet-R18.yaml into output/demo/student_<name>, its row is
"student R18 + NAME", its pictures are drawn from that run; the default (CSGR) run is as before;
an unknown method or a missing demo config is one error listing the available methods, before
anything runs. The tools are faked (wiring only)."""
import json
import logging
import os
import sys

import pytest
from detectron2.config import get_cfg

import csgr_distill.evaluation.teacher_check
from csgr_distill.cli import load_config
from csgr_distill.config import add_distill_config
from csgr_distill.distillers import DISTILLER_REGISTRY, registered_distillers
from tiny import REPO, TINY_TRAIN, TINY_VAL, fake_demo_tool

sys.path.insert(0, os.path.join(REPO, "tools"))
import demo  # noqa: E402
from csgr_distill.cli import run_cli  # noqa: E402

TOY_YAML = """_BASE_: "student-RetinaNet-R18.yaml"
MODEL:
  DISTILL:
    ENABLED: True
    METHODS: ["TOY"]
OUTPUT_DIR: "output/demo/student_baseline"  # wrong on purpose: the demo gives OUTPUT_DIR itself
"""
AP = {"teacher": 9.0, "student_baseline": 5.0, "student_csgr": 6.0, "student_toy": 7.0}


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A copy of the repository's configs (links) with a toy method's demo config
    (TOY-RetinaNet-R18.yaml, TOY registered) and a config without a distiller
    (ZZZ-RetinaNet-R18.yaml); demo.REPO points at it. Returns (root, tool calls, teacher-check
    configs)."""
    configs = tmp_path / "configs"
    configs.mkdir()
    for entry in os.listdir(os.path.join(REPO, "configs")):
        if entry != "demo":
            (configs / entry).symlink_to(os.path.join(REPO, "configs", entry))
    (configs / "demo").mkdir()
    for entry in os.listdir(os.path.join(REPO, "configs", "demo")):
        (configs / "demo" / entry).symlink_to(os.path.join(REPO, "configs", "demo", entry))
    (configs / "demo" / "TOY-RetinaNet-R18.yaml").write_text(TOY_YAML)
    (configs / "demo" / "ZZZ-RetinaNet-R18.yaml").write_text(TOY_YAML)
    monkeypatch.setitem(DISTILLER_REGISTRY._obj_map, "TOY", object)
    monkeypatch.setattr(demo, "REPO", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # demo.main changes to REPO; restored afterwards
    calls, checked = [], []

    fake_tool = fake_demo_tool(calls, AP)

    real_check = csgr_distill.evaluation.teacher_check.teacher_check

    def recording_check(cfg, **kw):
        checked.append(cfg)
        return real_check(cfg, **kw)

    monkeypatch.setattr(demo, "run_tool", fake_tool)
    monkeypatch.setattr(csgr_distill.evaluation.teacher_check, "teacher_check", recording_check)
    return tmp_path, calls, checked


def _run(argv, tiny_shapes):
    demo.main(argv + ["--train", TINY_TRAIN, "--test", TINY_VAL])


def _train_calls(calls):
    return [c for c in calls if c[0] == "tools/train_net.py" and "--eval-only" not in c]


def _value(call, key):
    return call[call.index(key) + 1]


def test_default_run_distils_with_csgr_as_before(repo, tiny_shapes):
    root, calls, checked = repo
    _run([], tiny_shapes)
    trains = _train_calls(calls)
    assert [_value(c, "--config-file") for c in trains] == [
        "configs/demo/teacher-RetinaNet-R18-wide.yaml", "configs/demo/student-RetinaNet-R18.yaml",
        "configs/demo/CSGR-RetinaNet-R18.yaml"]
    assert _value(trains[2], "OUTPUT_DIR") == "output/demo/student_csgr"
    evals = [c for c in calls if "--eval-only" in c]
    assert _value(evals[-1], "MODEL.WEIGHTS") == "output/demo/student_csgr/model_final_student.pth"
    assert _value(evals[-1], "--config-file") == "configs/demo/student-RetinaNet-R18.yaml"
    assert [cfg.MODEL.DISTILL.METHODS for cfg in checked] == [["CSGR"]]
    pictures = [(_value(c, "--config-file"), _value(c, "--weights"), _value(c, "--output"))
                for c in calls if c[0] == "tools/visualize.py"]
    assert pictures == [
        ("configs/demo/CSGR-RetinaNet-R18.yaml", "output/demo/student_csgr/model_final.pth",
         "output/demo/vis"),
        ("configs/demo/student-RetinaNet-R18.yaml", "output/demo/student_baseline/model_final.pth",
         "output/demo/vis/baseline")]
    report = (root / "output/demo/results.md").read_text()
    assert "| student R18 + CSGR | 6.00 |" in report
    assert "CSGR gain over the baseline student: +1.00 AP (25% of" in report
    saved = json.loads((root / "output/demo/results.json").read_text())
    assert list(saved["results"]) == ["teacher R18-wide", "student R18 (baseline)",
                                      "student R18 + CSGR"]
    assert not list((root / "output/demo").glob("results_*"))
    assert json.loads((root / "output/demo/results.json").read_text())["smoke_run"] is False
    assert not report.startswith("**SMOKE")


def test_method_trains_its_demo_config_into_its_own_folder(repo, tiny_shapes):
    """--method toy (any case): the TOY yaml, OUTPUT_DIR student_toy whatever the yaml says,
    its row, its own report files and pictures; the teacher check reads the TOY config."""
    root, calls, checked = repo
    _run(["--method", "toy"], tiny_shapes)
    trains = _train_calls(calls)
    assert _value(trains[2], "--config-file") == "configs/demo/TOY-RetinaNet-R18.yaml"
    assert _value(trains[2], "OUTPUT_DIR") == "output/demo/student_toy"
    assert [_value(c, "--config-file") for c in trains[:2]] == [
        "configs/demo/teacher-RetinaNet-R18-wide.yaml", "configs/demo/student-RetinaNet-R18.yaml"]
    evals = [c for c in calls if "--eval-only" in c]
    assert _value(evals[-1], "MODEL.WEIGHTS") == "output/demo/student_toy/model_final_student.pth"
    assert _value(evals[-1], "OUTPUT_DIR") == "output/demo/eval/student_r18_toy"
    assert [cfg.MODEL.DISTILL.METHODS for cfg in checked] == [["TOY"]]
    pictures = [(_value(c, "--config-file"), _value(c, "--weights"), _value(c, "--output"))
                for c in calls if c[0] == "tools/visualize.py"]
    assert pictures == [
        ("configs/demo/TOY-RetinaNet-R18.yaml", "output/demo/student_toy/model_final.pth",
         "output/demo/vis_toy"),
        ("configs/demo/student-RetinaNet-R18.yaml", "output/demo/student_baseline/model_final.pth",
         "output/demo/vis_toy/baseline")]
    report = (root / "output/demo/results_toy.md").read_text()
    assert "| student R18 + TOY | 7.00 |" in report and "CSGR" not in report
    assert "TOY gain over the baseline student: +2.00 AP (50% of" in report
    assert (root / "output/demo/results_toy.png").is_file()
    assert not (root / "output/demo/results.md").exists()  # the CSGR table is not overwritten


def test_quick_is_a_labelled_smoke_run_in_its_own_folder(repo, tiny_shapes):
    """--quick: teacher 300 and students 100 iterations (lr steps at the same fractions), every
    run, evaluation, table and picture under output/demo_quick/ (the full demo's files are not
    touched), the students distil from that run's teacher, and the table, json and chart say
    it is a smoke run."""
    root, calls, checked = repo
    _run(["--quick"], tiny_shapes)
    trains = _train_calls(calls)
    assert [(_value(c, "OUTPUT_DIR"), _value(c, "SOLVER.MAX_ITER")) for c in trains] == [
        ("output/demo_quick/teacher", "300"), ("output/demo_quick/student_baseline", "100"),
        ("output/demo_quick/student_csgr", "100")]
    assert all(_value(c, "SOLVER.STEPS") == "(0.8, 0.95)" for c in trains)
    assert {_value(c, "MODEL.DISTILL.TEACHER.WEIGHTS") for c in trains} == {
        "output/demo_quick/teacher/model_final.pth"}
    assert [cfg.MODEL.DISTILL.TEACHER.WEIGHTS for cfg in checked] == [
        "output/demo_quick/teacher/model_final.pth"]
    evals = [c for c in calls if "--eval-only" in c]
    assert [_value(c, "MODEL.WEIGHTS") for c in evals] == [
        "output/demo_quick/teacher/model_final.pth",
        "output/demo_quick/student_baseline/model_final.pth",
        "output/demo_quick/student_csgr/model_final_student.pth"]
    assert all(_value(c, "OUTPUT_DIR").startswith("output/demo_quick/eval/") for c in evals)
    pictures = [_value(c, "--output") for c in calls if c[0] == "tools/visualize.py"]
    assert pictures == ["output/demo_quick/vis", "output/demo_quick/vis/baseline"]
    report = (root / "output/demo_quick/results.md").read_text()
    assert report.startswith("**SMOKE RUN (--quick)")
    assert "students trained 100 iterations each" in report
    assert json.loads((root / "output/demo_quick/results.json").read_text())["smoke_run"] is True
    assert (root / "output/demo_quick/results.png").is_file()
    assert not (root / "output/demo").exists()


@pytest.mark.parametrize("method,why", [
    ("NOPE", "'NOPE' is not a registered distiller and configs/demo/NOPE-RetinaNet-R18.yaml "
             "does not exist"),
    ("NOCFG", "NOCFG is a registered distiller but has no demo config "
              "(configs/demo/NOCFG-RetinaNet-R18.yaml does not exist)"),
    ("ZZZ", "configs/demo/ZZZ-RetinaNet-R18.yaml exists but 'ZZZ' is not a registered "
            "distiller"),
])
def test_unknown_method_is_one_error_listing_the_available_ones(repo, monkeypatch, capsys,
                                                                method, why):
    _, calls, _ = repo
    monkeypatch.setitem(DISTILLER_REGISTRY._obj_map, "NOCFG", object)
    assert run_cli(demo.main, ["--method", method]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: --method {method}: {why}. Available: ")
    available = lines[0].split("Available: ")[1].split(" (")[0].split(", ")
    assert "CSGR" in available and "TOY" in available
    assert not {"ZZZ", "NOCFG", "NOPE", "student", "teacher"} & set(available)
    assert calls == []  # refused before anything ran


def _real_methods():
    folder = os.path.join(REPO, "configs", "demo")
    return sorted(n for n in registered_distillers()
                  if os.path.isfile(os.path.join(folder, n + demo.METHOD_CONFIG_SUFFIX)))


@pytest.mark.parametrize("method", _real_methods())
def test_every_available_demo_config_distils_the_demo_student_with_its_method(method,
                                                                              tiny_shapes):
    """The shipped demo configs of the registered methods (CSGR, and those being added): the
    baseline student with distillation on, that method in METHODS, the demo teacher."""
    assert method in demo.available_methods()
    cfg = load_config(os.path.join(REPO, "configs/demo", method + demo.METHOD_CONFIG_SUFFIX),
                      check_steps=False)
    base = add_distill_config(get_cfg())
    base.merge_from_file(os.path.join(REPO, "configs/demo/student-RetinaNet-R18.yaml"))
    assert cfg.MODEL.DISTILL.ENABLED and method in cfg.MODEL.DISTILL.METHODS
    for key in ("META_ARCHITECTURE", "RESNETS", "FPN", "RETINANET", "ANCHOR_GENERATOR"):
        assert cfg.MODEL[key] == base.MODEL[key], key
    assert cfg.MODEL.DISTILL.TEACHER.CONFIG == base.MODEL.DISTILL.TEACHER.CONFIG
    assert cfg.SOLVER.MAX_ITER == base.SOLVER.MAX_ITER
