"""tools/benchmark.py gain's cache: a finished run is reused only when everything that defines it
(iterations, seed, eval points, overrides, merged config, teacher, code) is unchanged, and reused
runs are labelled as cached. ``gain._train_net`` is replaced by a fake that writes the files a
real ``train_net.py`` run would, so nothing is trained here."""
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import threading

import pytest

from csgr_distill.benchmark import gain
from csgr_distill.benchmark.run_lock import LOCK_NAME, RunBusy, run_lock
from csgr_distill.teacher import REPO_ROOT

CSGR = "CSGR"


class FakeTrainNet:
    """Stands in for ``gain._train_net``: writes what a real ``train_net.py`` run would into
    OUTPUT_DIR: ``eval_results.json`` (``--eval-only``); for training, a checkpoint every
    SOLVER.CHECKPOINT_PERIOD iterations (``model_<iteration - 1>.pth`` and ``last_checkpoint``,
    ``model_final.pth`` at the end) and, for a student, ``metrics.json`` rows at each evaluation
    (every TEST.EVAL_PERIOD and at SOLVER.MAX_ITER, default 600; the teacher's default is 2000),
    after that iteration's checkpoint, as detectron2's hooks are ordered, and logged at the
    iteration detectron2 logs them at (the final one at MAX_ITER, not MAX_ITER - 1). ``--resume`` continues
    after the iteration ``last_checkpoint`` names. Every call is recorded as (kind, config file,
    OUTPUT_DIR, args) with kind in {"teacher", "eval", "student"}. Each call's AP is distinct
    (10 + call number), so a value read back from the cache is recognisable."""

    def __init__(self):
        self.calls = []
        #: (kind, iteration): the next run of that kind dies right after that iteration's
        #: checkpoint, before its evaluation (None: no run dies)
        self.kill = None
        #: --eval-only writes null APs (a model that detects nothing)
        self.null_evals = False

    def __call__(self, args, log_path):
        args = [str(a) for a in args]
        config = args[args.index("--config-file") + 1]
        eval_only = "--eval-only" in args
        resume = "--resume" in args
        opts = [a for a in args if a not in ("--eval-only", "--resume")][2:]
        kv = dict(zip(opts[::2], opts[1::2]))  # later keys win, as in yacs
        out = kv["OUTPUT_DIR"]
        os.makedirs(out, exist_ok=True)
        with open(log_path, "w") as f:
            f.write("fake\n")
        ap = 10.0 + len(self.calls)
        bbox = {"AP": ap, "AP50": ap + 20, "AP75": ap - 5}
        self.calls.append(None)  # replaced below; a killed call counts too
        if eval_only:
            kind = "eval"
            if self.null_evals:  # no detections: train_net.py writes strict JSON, null for NaN
                bbox = dict.fromkeys(bbox)
            with open(os.path.join(out, "eval_results.json"), "w") as f:
                json.dump({"bbox": bbox}, f)
        else:
            teachers = {gain.TEACHER_CFG} | {t for t, _, _ in gain.DETECTORS.values()}
            kind = "teacher" if config in teachers else "student"
            self.calls[-1] = (kind, config, out, args)
            iters = int(kv.get("SOLVER.MAX_ITER", 2000 if kind == "teacher" else 600))
            every = int(kv.get("SOLVER.CHECKPOINT_PERIOD", 100000))  # the demo configs'
            period = int(kv.get("TEST.EVAL_PERIOD", 0))
            evals = set(range(period, iters, period)) | {iters} if kind == "student" else set()
            start = 0
            if resume:
                name = open(os.path.join(out, "last_checkpoint")).read()
                start = iters if name == "model_final.pth" else int(name[6:13]) + 1
            for it in range(start + 1, iters + 1):
                if it % every == 0 or it == iters:
                    name = "model_final.pth" if it == iters else f"model_{it - 1:07d}.pth"
                    with open(os.path.join(out, name), "wb") as f:
                        f.write(f"fake {kind} weights".encode())
                    with open(os.path.join(out, "last_checkpoint"), "w") as f:
                        f.write(name)
                if self.kill == (kind, it):
                    self.kill = None
                    raise RuntimeError("train_net.py killed")
                if it in evals:  # detectron2's JSONWriter appends to an existing metrics.json
                    # the final evaluation runs in after_train, where the storage's iteration
                    # is max_iter; the periodic ones after the step of 0-based iteration it - 1
                    logged = iters if it == iters else it - 1
                    with open(os.path.join(out, "metrics.json"), "a") as f:
                        f.write(json.dumps({"iteration": it - 1, "total_loss": 1.0}) + "\n")
                        f.write(json.dumps({"iteration": logged, **{
                            f"bbox/{m}": v for m, v in bbox.items()}}) + "\n")
        self.calls[-1] = (kind, config, out, args)

    def count(self, kind):
        return sum(c[0] == kind for c in self.calls)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # torch's default (test_torch_threads)
    f = FakeTrainNet()
    monkeypatch.setattr(gain, "_train_net", f)
    return f


def _run(tmp_path, lines=None, **kw):
    """``lines``: a list the progress lines are appended to, or the progress callable."""
    kw.setdefault("methods", [CSGR])
    kw.setdefault("seeds", 1)
    progress = lines if callable(lines) else (lines.append if lines is not None
                                              else lambda m: None)
    return gain.run(str(tmp_path / "results"), str(tmp_path / "work"), command="test",
                    progress=progress, **kw)


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


def test_other_iterations_get_their_own_results_section_and_plots(tmp_path, fake):
    """``--iters 2000`` or ``--teacher-iters 6000`` into the same results folder adds a section
    and plots next to the default setting's instead of overwriting them (they replaced the
    600-iteration table and its plots before)."""
    default = _run(tmp_path)
    longer = _run(tmp_path, iters=2000)
    both = _run(tmp_path, iters=2000, teacher_iters=3000)
    saved = json.loads((tmp_path / "results" / "gain.json").read_text())
    assert set(saved) == {"shapes", "shapes, 2000 iterations",
                          "shapes, 2000 iterations, teacher 3000 iterations"}
    for section, payload in zip(saved, (default, longer, both)):
        assert saved[section]["setting"] == payload["setting"]
    md = (tmp_path / "results" / "gain.md").read_text()
    for suffix in ("", "_2000it", "_2000it_teacher3000it"):
        for name in ("gain_ap", "gain_curves"):
            assert (tmp_path / "results" / f"{name}{suffix}.png").is_file()
        assert f"(gain_ap{suffix}.png)" in md
    assert "trained 600 iterations each" in saved["shapes"]["setting"]
    assert gain.results_name("shapes_train", "rcnn", 600, 600, {"iters": None}, gain.TEACHER_CFG) \
        == ("shapes, rcnn", "_rcnn")


def test_opts_get_their_own_results_section_and_plots(tmp_path, fake):
    """``--opts`` changes every run, so its table must not replace the default setting's (it did:
    the section was named after the data and iterations only)."""
    _run(tmp_path)
    _run(tmp_path, opts=["INPUT.FIXED_SIZE", "96"])
    saved = json.loads((tmp_path / "results" / "gain.json").read_text())
    assert set(saved) == {"shapes", "shapes, --opts INPUT.FIXED_SIZE 96"}
    assert fake.count("student") == 4  # the overrides are in every run's key
    for name in ("gain_ap", "gain_curves"):
        assert (tmp_path / "results" / f"{name}_opts-fixed-size-96.png").is_file()
    assert gain.opts_tag(["MODEL.DETR.WITH_BOX_REFINE", True]) == "opts-with-box-refine-true"
    assert gain.opts_tag(["MODEL.DETR.WITH_BOX_REFINE", "True", "MODEL.DETR.TWO_STAGE", "True"]) \
        == "opts-with-box-refine-true-two-stage-true"
    long = ["MODEL.DETR.WITH_BOX_REFINE", "True", "MODEL.DETR.TWO_STAGE", "True",
            "MODEL.DETR.NUM_QUERIES", "100"]
    assert gain.opts_tag(long) == "opts-" + hashlib.sha1(" ".join(long).encode()).hexdigest()[:8]


def test_opts_reach_the_teacher_that_the_distilled_students_build(tmp_path, fake):
    """``--opts`` train the teacher with them, so the teacher each distilled student builds from
    the teacher yaml needs them too (MODEL.DISTILL.TEACHER.OPTS). Before, a Deformable DETR
    teacher trained with ``MODEL.DETR.WITH_BOX_REFINE True`` failed every distilled student's
    strict load ("unexpected keys ... bbox_embed"); the baseline builds no teacher."""
    from csgr_distill.cli import load_config
    from csgr_distill.teacher import build_teacher_cfg

    _run(tmp_path, opts=["MODEL.RETINANET.NUM_CONVS", "3"])
    students = {c[2]: c for c in fake.calls if c[0] == "student"}
    assert len(students) == 2
    for out, (_, config, _, args) in students.items():
        cfg = load_config(os.path.join(REPO_ROOT, config), args[2:], check_steps=False)
        assert cfg.MODEL.RETINANET.NUM_CONVS == 3
        if os.sep + CSGR + os.sep in out:
            assert build_teacher_cfg(cfg).MODEL.RETINANET.NUM_CONVS == 3
        else:
            assert not cfg.MODEL.DISTILL.ENABLED and "MODEL.DISTILL.TEACHER.OPTS" not in args
    teacher = next(c for c in fake.calls if c[0] == "teacher")
    assert "MODEL.RETINANET.NUM_CONVS" in teacher[3]


def test_runs_with_other_torch_threads_are_their_own_runs_and_section(tmp_path, fake,
                                                                       monkeypatch):
    """OMP_NUM_THREADS changes every CPU number (float sums in another order), so runs trained
    with one thread are not reused for the default's table (they were: the key held no thread
    count) and their table gets its own section instead of replacing it."""
    _run(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    p = _run(tmp_path)
    assert _cached(p) == {gain.BASELINE: [False], CSGR: [False]} and not p["teacher"]["cached"]
    assert fake.count("teacher") == 2
    saved = json.loads((tmp_path / "results" / "gain.json").read_text())
    assert set(saved) == {"shapes", "shapes, one torch thread"}
    assert (tmp_path / "results" / "gain_ap_one_thread.png").is_file()
    assert _cached(_run(tmp_path)) == {gain.BASELINE: [True], CSGR: [True]}  # still one thread
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert gain.results_name("shapes_train", "retinanet", 600, 600, {"iters": None},
                             gain.TEACHER_CFG, threads=gain.omp_threads()) \
        == ("shapes, 4 torch threads", "_4_threads")


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


def test_a_run_killed_before_its_first_checkpoint_starts_again_from_a_clean_folder(tmp_path,
                                                                                   fake,
                                                                                   monkeypatch):
    """A run killed before its first checkpoint leaves a metrics.json and nothing to resume from;
    detectron2 appends to that file, so the next attempt must start from an empty one, or its
    curve mixes both attempts."""
    fake.kill = ("student", 300)  # the baseline dies after its first evaluation (200)
    monkeypatch.setattr(gain, "CHECKPOINT_PERIOD", 1000)
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path)
    payload = _run(tmp_path)
    base = payload["runs"][gain.BASELINE][0]
    assert [it for it, _ in base["curve"]] == [200, 400, 600]
    assert base["resumed_from"] == [] and base["curve"][0][1]["AP"] == 13.0  # the 2nd attempt's
    assert not any("--resume" in c[3] for c in fake.calls)
    assert (tmp_path / "results" / "gain_curves.png").is_file()


def test_a_killed_student_continues_from_its_last_checkpoint_and_says_so(tmp_path, fake):
    fake.kill = ("student", 500)  # the baseline dies at 500; its last checkpoint holds 400
    lines = []
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, lines)
    n = len(fake.calls)
    payload = _run(tmp_path, lines)
    resumed_call = fake.calls[n]
    assert resumed_call[0] == "student" and "--resume" in resumed_call[3]
    assert resumed_call[2] == fake.calls[n - 1][2]  # the killed run's folder
    base = payload["runs"][gain.BASELINE][0]
    assert base["resumed_from"] == [400]
    assert [it for it, _ in base["curve"]] == [200, 400, 600]
    # 200 and 400 from the killed attempt, 600 from the resumed one
    assert [c["AP"] for _, c in base["curve"]] == [12.0, 12.0, 13.0]
    assert payload["runs"][CSGR][0]["resumed_from"] == []
    assert f"[gain] seed 0 {gain.BASELINE}: AP 13.00 (resumed at iteration 400)" in lines
    md = (tmp_path / "results" / "gain.md").read_text()
    assert f"resumed runs: {gain.BASELINE} seed 0 (resumed at iteration 400)" in md
    rdir = resumed_call[2]
    assert sorted(f for f in os.listdir(rdir) if f.endswith(".pth")) == ["model_final.pth"]
    assert os.path.isfile(os.path.join(rdir, "train-resumed-at-400.log"))
    # from the cache, it still says it was resumed
    again = _run(tmp_path)
    assert len(fake.calls) == n + 2 and again["runs"][gain.BASELINE][0]["resumed_from"] == [400]
    assert "resumed runs:" in (tmp_path / "results" / "gain.md").read_text()


def test_a_run_killed_inside_an_evaluation_gets_that_point_from_its_checkpoint(tmp_path, fake):
    """Killed while evaluating after iteration 400: the resumed run starts after 400 and does not
    evaluate it, so that point is evaluated from the checkpoint saved just before."""
    fake.kill = ("student", 400)
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path)
    n = len(fake.calls)
    payload = _run(tmp_path)
    base = payload["runs"][gain.BASELINE][0]
    assert base["resumed_from"] == [400]
    assert [it for it, _ in base["curve"]] == [200, 400, 600]
    kind, _, out, args = fake.calls[n + 1]  # the resumed training, then the point's evaluation
    assert kind == "eval" and args[args.index("MODEL.WEIGHTS") + 1].endswith("model_0000399.pth")
    assert base["curve"][1][1]["AP"] == 10.0 + n + 1


def test_a_re_run_evaluation_without_detections_is_a_nan_point(tmp_path, fake):
    """eval_results.json has null where metrics.json has NaN (no detections): the point read
    from the checkpoint's evaluation is NaN too, and the curve plot is drawn."""
    fake.kill = ("student", 400)
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path)
    fake.null_evals = True
    base = _run(tmp_path)["runs"][gain.BASELINE][0]
    assert [it for it, _ in base["curve"]] == [200, 400, 600]
    assert all(math.isnan(v) for v in base["curve"][1][1].values())
    assert (tmp_path / "results" / "gain_curves.png").is_file()


def test_an_evaluation_logged_twice_keeps_the_resumed_runs_value(tmp_path, fake):
    """Evaluated at 300, killed at 350, resumed from its checkpoint at 200: 300 is evaluated and
    logged again, and the curve keeps the later row, once."""
    fake.kill = ("student", 350)
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, iters=900)
    n = len(fake.calls)
    base = _run(tmp_path, iters=900)["runs"][gain.BASELINE][0]
    assert base["resumed_from"] == [200]
    assert [it for it, _ in base["curve"]] == [300, 600, 900]
    assert all(c["AP"] == 10.0 + n for _, c in base["curve"])


def test_a_killed_teacher_continues_from_its_last_checkpoint(tmp_path, fake):
    fake.kill = ("teacher", 1100)
    lines = []
    with pytest.raises(RuntimeError, match="killed"):
        _run(tmp_path, lines)
    payload = _run(tmp_path, lines)
    teachers = [c for c in fake.calls if c[0] == "teacher"]
    assert len(teachers) == 2 and "--resume" in teachers[1][3]
    assert payload["teacher"]["resumed_from"] == [1000]
    assert any(m.startswith("[gain] teacher AP") and "(in this invocation, resumed at iteration "
               "1000)" in m for m in lines)
    tdir = teachers[1][2]
    assert sorted(f for f in os.listdir(tdir) if f.endswith(".pth")) == ["model_final.pth"]
    again = _run(tmp_path)
    assert again["teacher"]["cached"] and again["teacher"]["resumed_from"] == [1000]
    assert ("trained 2000 iterations (cached, resumed at iteration 1000)"
            in (tmp_path / "results" / "gain.md").read_text())


def test_the_final_evaluation_is_the_curve_point_at_max_iter(tmp_path, fake):
    """detectron2 logs the final evaluation (after_train) at iteration MAX_ITER, the periodic
    ones at the 0-based iteration they follow; the curve counts iterations trained, so the final
    point is 600, not 601 (as runs stored before this fix had it: read back as 600)."""
    payload = _run(tmp_path)
    for rs in payload["runs"].values():
        assert [it for it, _ in rs[0]["curve"]] == [200, 400, 600]
    final = next((tmp_path / "work" / "runs" / "CSGR").glob("seed0-*")) / "final.json"
    stored = json.loads(final.read_text())
    stored["result"]["curve"][-1][0] = 601  # as the old _read_curve stored it
    final.write_text(json.dumps(stored))
    again = _run(tmp_path)
    assert again["runs"][CSGR][0]["cached"]
    assert [it for it, _ in again["runs"][CSGR][0]["curve"]] == [200, 400, 600]


def test_resume_point_reads_the_last_checkpoint(tmp_path):
    assert gain.resume_point(str(tmp_path), 600) is None
    (tmp_path / "last_checkpoint").write_text("model_0000399.pth")
    assert gain.resume_point(str(tmp_path), 600) is None  # named, but the file is gone
    (tmp_path / "model_0000399.pth").write_bytes(b"w")
    assert gain.resume_point(str(tmp_path), 600) == 400
    (tmp_path / "last_checkpoint").write_text("model_final.pth")
    (tmp_path / "model_final.pth").write_bytes(b"w")
    assert gain.resume_point(str(tmp_path), 600) == 600


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
    # its own section and plots, next to the RetinaNet pair's
    _run(tmp_path)
    saved = json.loads((tmp_path / "results" / "gain.json").read_text())
    assert set(saved) == {"shapes", "shapes, rcnn"}
    assert "Faster R-CNN" in saved["shapes, rcnn"]["setting"]
    for name in ("gain_ap", "gain_curves"):
        assert (tmp_path / "results" / f"{name}_rcnn.png").is_file()
        assert (tmp_path / "results" / f"{name}.png").is_file()
    assert "gain_ap_rcnn.png" in (tmp_path / "results" / "gain.md").read_text()
    with pytest.raises(SystemExit, match="--detector 'yolo'"):
        _run(tmp_path, detector="yolo")


def test_first_seed_trains_only_the_later_seeds_and_a_full_run_reuses_them(tmp_path, fake):
    """``--first-seed 1 --seeds 2`` adds seeds 1-2 (e.g. to a seed-0 table whose work folder is
    gone); a later run over seeds 0-2 trains seed 0 only and reads the others from the cache."""
    lines = []
    later = _run(tmp_path, lines, seeds=2, first_seed=1)
    seeds_given = [c[3][c[3].index("SEED") + 1] for c in fake.calls if c[0] == "student"]
    assert seeds_given == ["1", "1", "2", "2"]
    assert {label: [r["seed"] for r in rs] for label, rs in later["runs"].items()} == {
        gain.BASELINE: [1, 2], CSGR: [1, 2]}
    assert "seeds 1..2" in (tmp_path / "results" / "gain.md").read_text()
    assert any(m.startswith("[gain] teacher check") for m in lines)  # on the first seed run
    full = _run(tmp_path, seeds=3)
    assert fake.count("student") == 6  # seed 0 of both labels only
    assert _cached(full) == {gain.BASELINE: [False, True, True], CSGR: [False, True, True]}
    assert "seeds 0..2" in (tmp_path / "results" / "gain.md").read_text()


def test_no_seed_is_refused_with_the_flags_named(tmp_path, fake):
    with pytest.raises(SystemExit, match="--seeds 0 --first-seed 0"):
        _run(tmp_path, seeds=0)
    assert fake.calls == []


def test_edited_data_retrains_the_teacher_and_every_student(tmp_path, fake):
    """Runs are keyed on the datasets' content (the annotation files' sha1, the image list with
    file sizes), so editing the json of a --register-dataset set retrains everything that used
    it (before: the teacher and every student came back "(cached)")."""
    import uuid

    import csgr_distill.data as D
    from test_custom_data import _image, make_coco

    json_file, images = make_coco(str(tmp_path / "data"))
    name = f"gain_{uuid.uuid4().hex[:8]}"
    data_opts = D.pipeline_overrides([f"{name}=coco:{json_file}:{images}"], name, name)
    first = _run(tmp_path, data_opts=data_opts)
    assert (fake.count("teacher"), fake.count("eval"), fake.count("student")) == (1, 1, 2)
    assert _cached(_run(tmp_path, data_opts=data_opts)) == {gain.BASELINE: [True], CSGR: [True]}
    assert fake.count("student") == 2

    with open(json_file) as f:
        data = json.load(f)
    data["annotations"][0]["bbox"][0] += 1.0  # one box moved
    with open(json_file, "w") as f:
        json.dump(data, f)
    edited = _run(tmp_path, data_opts=data_opts)
    assert (fake.count("teacher"), fake.count("eval"), fake.count("student")) == (2, 2, 4)
    assert not edited["teacher"]["cached"]
    assert _cached(edited) == {gain.BASELINE: [False], CSGR: [False]}
    assert edited["runs"][CSGR][0]["key"] != first["runs"][CSGR][0]["key"]
    folder = tmp_path / "work" / "runs" / "CSGR" / f"seed0-{edited['runs'][CSGR][0]['key']}"
    material = json.loads((folder / "final.json").read_text())["key_material"]
    assert material["data"][name]["num_images"] == 2

    _image(os.path.join(images, "a.png"), 64, 48)  # re-exported: same name, other file
    with open(os.path.join(images, "a.png"), "ab") as f:
        f.write(b"\0" * 7)  # (PNG bytes after IEND: another size, the same pixels)
    assert _cached(_run(tmp_path, data_opts=data_opts)) == {gain.BASELINE: [False],
                                                            CSGR: [False]}


def test_generated_shapes_runs_keep_their_keys(tmp_path, fake):
    """The shapes sets have no fingerprint (their content follows from the generator's code,
    in the key through code_version): their key material is what it was before datasets were
    fingerprinted, so their keys and existing caches stay valid."""
    _run(tmp_path)
    for final in (tmp_path / "work").rglob("final.json"):
        assert "data" not in json.loads(final.read_text())["key_material"], final


def test_detr_pairs_start_from_the_retinanet_pairs_resnets(tmp_path, fake):
    """--detector deformable-detr: the RetinaNet pair's teacher and seed-0 baseline student are
    trained (or read from the cache) first; the DETR teacher starts from the former's ResNet,
    every DETR student (each seed, distilled or not) from the latter's (MODEL.BACKBONE_WEIGHTS);
    a second invocation trains nothing, and changed backbone weights retrain what starts from
    them."""
    _run(tmp_path, detector="deformable-detr", methods=["DETRDistill"], seeds=2)
    trained = [c for c in fake.calls if c[0] != "eval"]
    retina_teacher, retina_baseline = trained[0], trained[1]
    assert retina_teacher[1] == gain.TEACHER_CFG and retina_baseline[1] == gain.STUDENT_CFG
    assert "MODEL.BACKBONE_WEIGHTS" not in retina_teacher[3] + retina_baseline[3]
    t_weights = os.path.join(retina_teacher[2], "model_final.pth")
    s_weights = os.path.join(retina_baseline[2], "model_final.pth")

    def backbone(call):
        args = call[3]
        return args[len(args) - 1 - args[::-1].index("MODEL.BACKBONE_WEIGHTS") + 1]

    detr_teacher, *detr_students = trained[2:]
    assert detr_teacher[1] == gain.DETECTORS["deformable-detr"][0]
    assert backbone(detr_teacher) == t_weights
    assert len(detr_students) == 4  # baseline and DETRDistill, seeds 0 and 1
    assert {backbone(c) for c in detr_students} == {s_weights}
    n = len(fake.calls)
    again = _run(tmp_path, detector="deformable-detr", methods=["DETRDistill"], seeds=2)
    assert len(fake.calls) == n and all(all(v) for v in _cached(again).values())
    with open(s_weights, "wb") as f:  # another baseline R18: the DETR students retrain
        f.write(b"other weights")
    _run(tmp_path, detector="deformable-detr", methods=["DETRDistill"], seeds=2)
    retrained = [c for c in fake.calls[n:] if c[0] != "eval"]
    assert [c[1] for c in retrained] == [gain.DETECTORS["deformable-detr"][1]] * 4


# ----------------------------------------------------------------------------------------------
# several invocations on one work folder


def _hold(rdir, pid="4242"):
    """Lock a run folder as another invocation would (its own open file description)."""
    f = open(os.path.join(rdir, LOCK_NAME), "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(pid)
    f.flush()
    return f


def test_run_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    """The lock of another process refuses (wait=False, naming its pid) and is free again once
    that process is killed: no stale lock file blocks a later invocation."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from csgr_distill.benchmark.run_lock import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunBusy, match=f"another invocation \\(pid {holder.pid}\\)"):
            with run_lock(str(tmp_path), wait=False):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(str(tmp_path), wait=False):  # freed by the kernel, the file still there
        assert (tmp_path / LOCK_NAME).read_text() == str(os.getpid())


def test_run_lock_waits_for_its_holder_and_says_so_once(tmp_path):
    held = _hold(str(tmp_path))
    threading.Timer(0.3, held.close).start()  # closing releases the lock
    told = []
    with run_lock(str(tmp_path), on_wait=told.append):
        assert told == ["pid 4242"]


def _other_invocation(rdir, lines):
    """Another invocation training the finished run in ``rdir``: its ``final.json`` is taken away
    and its folder locked until this invocation says it waits for it; then, 0.2 s later, the
    other one "finishes" (the file back, the lock released). Returns this invocation's progress
    callable, which appends to ``lines``."""
    final = os.path.join(rdir, "final.json")
    finished = open(final).read()
    os.remove(final)
    held = _hold(rdir)

    def finish():
        with open(final, "w") as f:
            f.write(finished)
        held.close()

    def progress(line):
        lines.append(line)
        if line.endswith("waiting for it"):
            threading.Timer(0.2, finish).start()

    return progress


def test_a_run_another_invocation_trains_is_left_for_later_then_read_from_the_cache(tmp_path,
                                                                                    fake):
    """Two invocations on one work folder (one per core): a student run locked by the other is
    skipped, the next one trained, and the skipped one waited for and read from the cache. The
    code before the lock trained the baseline here a second time, into the other's folder."""
    first = _run(tmp_path)
    base_dir = os.path.dirname(first["runs"][gain.BASELINE][0]["weights"])
    csgr_dir = os.path.dirname(first["runs"][CSGR][0]["weights"])
    for name in ("final.json", "last_checkpoint"):  # CSGR starts again from scratch
        os.remove(os.path.join(csgr_dir, name))
    lines = []
    progress = _other_invocation(base_dir, lines)
    n = len(fake.calls)
    second = _run(tmp_path, progress)
    assert [c[2] for c in fake.calls[n:]] == [csgr_dir]  # the baseline was not trained here
    assert _cached(second) == {gain.BASELINE: [True], CSGR: [False]}
    assert second["runs"][gain.BASELINE][0]["final"] == first["runs"][gain.BASELINE][0]["final"]
    student = [m for m in lines if m.startswith("[gain] seed 0")]
    assert student == [
        f"[gain] seed 0 {gain.BASELINE}: being trained by another invocation (pid 4242); back "
        "to it after the others",
        f"[gain] seed 0 {CSGR}: AP {second['runs'][CSGR][0]['final']['AP']:.2f}",
        f"[gain] seed 0 {gain.BASELINE}: being trained by another invocation (pid 4242); "
        "waiting for it",
        f"[gain] seed 0 {gain.BASELINE}: AP "
        f"{first['runs'][gain.BASELINE][0]['final']['AP']:.2f} (cached)"]
    assert any(m.startswith("[gain] teacher check") for m in lines)  # after the late baseline
    saved = json.loads((tmp_path / "results" / "gain.json").read_text())["shapes"]
    assert list(saved["runs"]) == [gain.BASELINE, CSGR]  # the table keeps the plan's order


def test_a_teacher_another_invocation_trains_is_waited_for_not_trained_twice(tmp_path, fake):
    first = _run(tmp_path)
    lines = []
    progress = _other_invocation(os.path.dirname(first["teacher"]["weights"]), lines)
    n = len(fake.calls)
    second = _run(tmp_path, progress)
    assert fake.calls[n:] == [] and second["teacher"]["cached"]
    assert any("the teacher (" in m and "waiting for it" in m for m in lines)
