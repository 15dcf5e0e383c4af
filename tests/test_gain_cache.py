"""tools/benchmark.py gain's cache: a finished run is reused only when everything that defines it
(iterations, seed, eval points, overrides, merged config, teacher, code) is unchanged, and reused
runs are labelled as cached. ``gain._train_net`` is replaced by a fake that writes the files a
real ``train_net.py`` run would, so nothing is trained here."""
import json
import os

import pytest

from csgr_distill.benchmark import gain
from csgr_distill.teacher import REPO_ROOT

CSGR = "CSGR"


class FakeTrainNet:
    """Stands in for ``gain._train_net``: writes ``model_final.pth`` (teacher training),
    ``eval_results.json`` (``--eval-only``) or ``metrics.json`` (student training, one bbox row per
    evaluation period and at SOLVER.MAX_ITER, default 600, as detectron2's EvalHook) into
    OUTPUT_DIR, and records every call
    as (kind, config file, OUTPUT_DIR) with kind in {"teacher", "eval", "student"}. Each call's AP
    is distinct (10 + call number), so a value read back from the cache is recognisable."""

    def __init__(self):
        self.calls = []
        #: a student run is killed after writing this many evaluations (None: never)
        self.kill_student_after = None

    def __call__(self, args, log_path):
        args = [str(a) for a in args]
        config = args[args.index("--config-file") + 1]
        eval_only = "--eval-only" in args
        opts = [a for a in args if a != "--eval-only"][2:]
        kv = dict(zip(opts[::2], opts[1::2]))  # later keys win, as in yacs
        out = kv["OUTPUT_DIR"]
        os.makedirs(out, exist_ok=True)
        with open(log_path, "w") as f:
            f.write("fake\n")
        ap = 10.0 + len(self.calls)
        bbox = {"AP": ap, "AP50": ap + 20, "AP75": ap - 5}
        if eval_only:
            kind = "eval"
            with open(os.path.join(out, "eval_results.json"), "w") as f:
                json.dump({"bbox": bbox}, f)
        elif config in (gain.TEACHER_CFG, gain.DETECTORS["rcnn"][0]):
            kind = "teacher"
            with open(os.path.join(out, "model_final.pth"), "wb") as f:
                f.write(b"fake teacher weights")
        else:
            kind = "student"
            iters = int(kv.get("SOLVER.MAX_ITER", 600))
            period = int(kv["TEST.EVAL_PERIOD"])
            # detectron2's JSONWriter appends to an existing metrics.json
            with open(os.path.join(out, "metrics.json"), "a") as f:
                for k, it in enumerate(sorted(set(range(period, iters, period)) | {iters})):
                    if self.kill_student_after is not None and k >= self.kill_student_after:
                        self.kill_student_after = None
                        raise RuntimeError("train_net.py killed")
                    f.write(json.dumps({"iteration": it - 1, "total_loss": 1.0}) + "\n")
                    f.write(json.dumps({"iteration": it - 1, **{f"bbox/{m}": v
                                                                for m, v in bbox.items()}}) + "\n")
        self.calls.append((kind, config, out))

    def count(self, kind):
        return sum(c[0] == kind for c in self.calls)


@pytest.fixture
def fake(monkeypatch):
    f = FakeTrainNet()
    monkeypatch.setattr(gain, "_train_net", f)
    return f


def _run(tmp_path, lines=None, **kw):
    kw.setdefault("methods", [CSGR])
    kw.setdefault("seeds", 1)
    return gain.run(str(tmp_path / "results"), str(tmp_path / "work"), command="test",
                    progress=(lines.append if lines is not None else lambda m: None), **kw)


def _cached(payload):
    """label -> [cached flag per seed]"""
    return {label: [r["cached"] for r in rs] for label, rs in payload["runs"].items()}


def test_second_identical_run_trains_nothing_and_says_cached(tmp_path, fake):
    first = _run(tmp_path, seeds=2)
    assert (fake.count("teacher"), fake.count("eval"), fake.count("student")) == (1, 1, 4)
    assert _cached(first) == {gain.BASELINE: [False, False], CSGR: [False, False]}
    assert not first["teacher"]["cached"]
    assert (tmp_path / "results" / "gain_ap.png").is_file()
    assert (tmp_path / "results" / "gain_curves.png").is_file()
    md = (tmp_path / "results" / "gain.md").read_text()
    assert "cached runs: none" in md and "(in this invocation)" in md

    lines = []
    second = _run(tmp_path, lines, seeds=2)
    assert len(fake.calls) == 6  # nothing trained or evaluated
    assert _cached(second) == {gain.BASELINE: [True, True], CSGR: [True, True]}
    assert second["teacher"]["cached"] and second["teacher"]["AP"] == first["teacher"]["AP"]
    for label in second["runs"]:
        assert ([r["final"] for r in second["runs"][label]]
                == [r["final"] for r in first["runs"][label]])
    student_lines = [m for m in lines if m.startswith("[gain] seed")]
    assert len(student_lines) == 4 and all(m.endswith("(cached)") for m in student_lines)
    assert any(m.startswith("[gain] teacher AP") and "(cached)" in m for m in lines)
    md = (tmp_path / "results" / "gain.md").read_text()
    assert f"cached runs: {gain.BASELINE} seeds 0,1; {CSGR} seeds 0,1" in md
    assert "trained 2000 iterations (cached)" in md and "evaluation cached" in md
    saved = json.loads((tmp_path / "results" / "gain.json").read_text())["shapes"]
    assert all(r["cached"] for rs in saved["runs"].values() for r in rs)


def test_changed_iterations_retrain_every_student(tmp_path, fake):
    _run(tmp_path)                       # the config's 600 iterations
    _run(tmp_path, iters=600)            # the same run, spelled out: cached
    assert fake.count("student") == 2
    lines = []
    p = _run(tmp_path, lines, iters=2000)
    assert fake.count("student") == 4 and fake.count("teacher") == 1
    assert _cached(p) == {gain.BASELINE: [False], CSGR: [False]}
    for rs in p["runs"].values():
        assert rs[0]["iters"] == 2000 and rs[0]["curve"][-1][0] == 2000
    assert "trained 2000 iterations each" in p["setting"]
    assert not any("(cached)" in m for m in lines if m.startswith("[gain] seed"))
    # the 600-iteration runs are still there, under their own key
    assert _cached(_run(tmp_path, iters=600)) == {gain.BASELINE: [True], CSGR: [True]}
    assert fake.count("student") == 4


def test_changed_variant_overrides_retrain_only_that_run(tmp_path, fake):
    alpha = "MODEL.DISTILL.CSGR.ALPHA"
    v1 = {"CSGR x2": ["MODEL.DISTILL.METHODS", "['CSGR']", alpha, "1e-3"]}
    v2 = {"CSGR x2": ["MODEL.DISTILL.METHODS", "['CSGR']", alpha, "2e-3"]}
    _run(tmp_path, methods=[CSGR], variants=v1)
    assert fake.count("student") == 3
    p = _run(tmp_path, methods=[CSGR], variants=v2)
    assert fake.count("student") == 4
    assert _cached(p) == {gain.BASELINE: [True], CSGR: [True], "CSGR x2": [False]}
    assert "cached runs: baseline (no distillation) seeds 0; CSGR seeds 0 (" in (
        tmp_path / "results" / "gain.md").read_text()


def test_changed_teacher_weights_retrain_the_distilled_students(tmp_path, fake):
    weights = tmp_path / "teacher.pth"
    weights.write_bytes(b"teacher A")
    first = _run(tmp_path, teacher_weights=str(weights))
    assert fake.count("teacher") == 0 and fake.count("eval") == 1
    assert first["teacher"]["given"] and not first["teacher"]["cached"]
    assert _cached(_run(tmp_path, teacher_weights=str(weights)))[CSGR] == [True]

    weights.write_bytes(b"teacher B")  # same path, other content
    p = _run(tmp_path, teacher_weights=str(weights))
    assert fake.count("eval") == 2 and not p["teacher"]["cached"]
    assert p["teacher"]["weights_sha1"] != first["teacher"]["weights_sha1"]
    # the baseline never builds the teacher (distillation off): its run stays valid
    assert _cached(p) == {gain.BASELINE: [True], CSGR: [False]}
    assert fake.count("student") == 3


def test_trained_teacher_is_keyed_by_its_iterations(tmp_path, fake):
    _run(tmp_path, teacher_iters=100)
    p = _run(tmp_path, teacher_iters=200)
    assert fake.count("teacher") == 2 and p["teacher"]["iters"] == 200
    assert _cached(p) == {gain.BASELINE: [True], CSGR: [False]}
    assert "teacher trained 200 iterations (in this invocation)" in p["setting"]


def test_changed_code_version_retrains_everything(tmp_path, fake, monkeypatch):
    _run(tmp_path)
    monkeypatch.setattr(gain, "code_version", lambda: "0" * 40)
    p = _run(tmp_path)
    assert (fake.count("teacher"), fake.count("eval"), fake.count("student")) == (2, 2, 4)
    assert _cached(p) == {gain.BASELINE: [False], CSGR: [False]}


def test_edited_student_config_retrains_the_students(tmp_path, fake, monkeypatch):
    _run(tmp_path)
    edited = tmp_path / "student.yaml"
    edited.write_text(f'_BASE_: "{os.path.join(REPO_ROOT, gain.STUDENT_CFG)}"\n'
                      "SOLVER:\n  BASE_LR: 0.01\n")
    monkeypatch.setattr(gain, "STUDENT_CFG", str(edited))
    p = _run(tmp_path)
    assert fake.count("student") == 4 and fake.count("teacher") == 1
    assert _cached(p) == {gain.BASELINE: [False], CSGR: [False]}


def test_code_version_covers_training_sources_only():
    v = gain.code_version()
    assert len(v) == 40 and v == gain.code_version()
    assert "projects/csgr_distill/benchmark" in gain.CODE_EXCLUDE
    assert "tools/train_net.py" in gain.CODE_FILES


def test_old_layout_cache_is_never_reused(tmp_path, fake):
    work = tmp_path / "work"
    stale = {"final": {"AP": 99.0, "AP50": 99.0, "AP75": 99.0}, "curve": [[600, {"AP": 99.0}]],
             "seed": 0, "label": CSGR}
    for label, folder in ((gain.BASELINE, "baseline_(no_distillation)"), (CSGR, "CSGR")):
        d = work / "runs" / folder / "seed0"
        d.mkdir(parents=True)
        (d / "final.json").write_text(json.dumps(dict(stale, label=label)))
    (work / "teacher").mkdir()
    (work / "teacher" / "model_final.pth").write_bytes(b"old teacher")
    (work / "teacher_eval").mkdir()
    (work / "teacher_eval" / "eval_results.json").write_text(
        json.dumps({"bbox": {"AP": 99.0, "AP50": 99.0, "AP75": 99.0}}))
    p = _run(tmp_path)
    assert (fake.count("teacher"), fake.count("eval"), fake.count("student")) == (1, 1, 2)
    assert _cached(p) == {gain.BASELINE: [False], CSGR: [False]}
    assert p["teacher"]["AP"] != 99.0
    assert all(rs[0]["final"]["AP"] != 99.0 for rs in p["runs"].values())


def test_cache_entry_with_other_material_is_ignored(tmp_path, fake):
    """A final.json in the right folder whose stored material differs (a truncated-hash clash or
    a hand-edited file) is not reused."""
    first = _run(tmp_path)
    key = first["runs"][CSGR][0]["key"]
    rdir = tmp_path / "work" / "runs" / gain._folder(CSGR) / f"seed0-{key}"
    data = json.loads((rdir / "final.json").read_text())
    data["key_material"]["seed"] = 7
    (rdir / "final.json").write_text(json.dumps(data))
    p = _run(tmp_path)
    assert _cached(p) == {gain.BASELINE: [True], CSGR: [False]}


def test_a_run_killed_before_it_finished_is_trained_again_from_a_clean_folder(tmp_path, fake):
    """A killed run leaves a metrics.json without final.json; detectron2 appends to it, so the
    next attempt must start from an empty one, or its curve mixes both runs (and the curve plot
    fails on curves of different lengths)."""
    fake.kill_student_after = 2  # the baseline run dies after two of its three evaluations
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path)
    payload = _run(tmp_path)
    for label, rs in payload["runs"].items():
        assert [it for it, _ in rs[0]["curve"]] == [200, 400, 600], label
    assert (tmp_path / "results" / "gain_curves.png").is_file()


def test_rcnn_detector_trains_the_faster_rcnn_pair_with_tars_ablation(tmp_path, fake):
    """--detector rcnn: the Faster R-CNN demo teacher and student configs, TAR's ablation runs
    and CSGR+TAR heads in the plan; the RetinaNet plan has none of them."""
    t_config, s_config, _ = gain.DETECTORS["rcnn"]
    ablation = ["TAR features, no decay", "TAR features + cls, no decay",
                "TAR features + cls + reg, no decay", "CSGR+TAR heads"]
    plan = gain.method_runs(None, None, "rcnn")
    assert set(ablation) <= set(plan) and "TAR" in plan
    assert not set(ablation) & set(gain.method_runs())
    gain.check_overrides(plan, gain.student_cfg((), s_config))  # valid keys of the R-CNN student
    payload = _run(tmp_path, methods=["TAR"] + ablation, detector="rcnn")
    assert [c[1] for c in fake.calls if c[0] == "teacher"] == [t_config]
    students = [c for c in fake.calls if c[0] == "student"]
    assert len(students) == 6 and {c[1] for c in students} == {s_config}
    assert {r["method"] for r in payload["rows"]} == {gain.BASELINE, "TAR", *ablation}
    assert "Faster R-CNN" in payload["setting"]
    with pytest.raises(SystemExit, match="--detector 'yolo'"):
        _run(tmp_path, detector="yolo")
