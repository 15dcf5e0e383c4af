"""docs/own_data.md, "Distil on your own data in four commands", with the project's tools and no
Python of the user's: teacher, baseline and distilled student trained on a VOC-XML dataset given
with --register-dataset (replacing the yaml's placeholder entries), compared with
tools/compare.py; the teacher check; the class-count error; pipeline_overrides (demo, gain)."""
import json
import logging
import os
import sys
import uuid

import pytest
from detectron2.data import MetadataCatalog

import csgr_distill.data as D
from csgr_distill.data.custom import DatasetEntryError
from test_custom_data import make_coco, make_voc
from tiny import REPO, base_cfg, fake_demo_tool

sys.path.insert(0, os.path.join(REPO, "tools"))
import compare  # noqa: E402
import train_net  # noqa: E402

OBJECTS = {f"{i:06d}": [("dog", 6 + i, 5, 40 + i, 40), ("cat", 30, 8 + i, 60, 44)]
           for i in range(1, 5)}
VAL_OBJECTS = {"000011": [("cat", 4, 4, 30, 40)], "000012": [("dog", 20, 6, 62, 46)]}


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """A VOC folder (train: 4 images, val: 2; classes read from the XMLs: ['cat', 'dog']) and the
    three yamls of the walk-through, whose DATASETS.REGISTER point at a placeholder path as the
    shipped own-data configs do; the real data are given on the command line."""
    tmp = tmp_path_factory.mktemp("own")
    voc = make_voc(str(tmp), OBJECTS, split="train")
    make_voc(str(tmp), VAL_OBJECTS, split="val")
    tag = uuid.uuid4().hex[:6]
    train, val = f"walk_train_{tag}", f"walk_val_{tag}"
    placeholder = [[train, "voc", "$DETECTRON2_DATASETS/mydata", "train"],
                   [val, "voc", "$DETECTRON2_DATASETS/mydata", "val"]]

    def write(name, meta, fpn, **distill):
        cfg = base_cfg(tmp / name, fpn_channels=fpn)
        cfg.MODEL.META_ARCHITECTURE = meta
        cfg.DATASETS.REGISTER = placeholder
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (train,), (val,)
        cfg.MODEL.RETINANET.NUM_CLASSES = 1  # as the shipped own-data yamls: set K when training
        for k, v in distill.items():
            setattr(cfg.MODEL.DISTILL, k, v)
        path = tmp / f"{name}.yaml"
        path.write_text(cfg.dump())
        return str(path), cfg.OUTPUT_DIR

    teacher_yaml, teacher_dir = write("teacher", "RetinaNet", 32)
    baseline_yaml, baseline_dir = write("baseline", "DistillRetinaNet", 16, ENABLED=False)
    csgr_yaml, csgr_dir = write(
        "csgr", "DistillRetinaNet", 16, ENABLED=True, METHODS=["CSGR"],
        TEACHER=_teacher_node(teacher_yaml, os.path.join(teacher_dir, "model_final.pth")))
    flags = ["--register-dataset", f"{train}=voc:{voc}:train",
             "--register-dataset", f"{val}=voc:{voc}:val"]
    return dict(tmp=tmp, voc=voc, train=train, val=val, flags=flags,
                teacher=(teacher_yaml, teacher_dir), baseline=(baseline_yaml, baseline_dir),
                csgr=(csgr_yaml, csgr_dir))


def _teacher_node(config, weights):
    from detectron2.config import CfgNode

    return CfgNode({"CONFIG": config, "WEIGHTS": weights, "OPTS": []})


def _train(own, which, *extra):
    yaml_path, out = own[which]
    train_net.cli(["--config-file", yaml_path] + own["flags"] + list(extra)
                  + ["MODEL.RETINANET.NUM_CLASSES", "2", "SOLVER.MAX_ITER", "4"])
    return out


@pytest.mark.slow
def test_four_commands_train_compare_and_check_the_teacher(own, caplog):
    # 1-3: teacher, baseline, distilled student; nothing but tool arguments
    outs = [_train(own, "teacher"), _train(own, "baseline")]
    assert MetadataCatalog.get(own["train"]).thing_classes == ["cat", "dog"]
    assert MetadataCatalog.get(own["train"]).dirname == own["voc"]  # the flag replaced the yaml's
    with caplog.at_level(logging.INFO):
        outs.append(_train(own, "csgr", "--teacher-check", "100"))
    text = caplog.text
    # the teacher's class count followed the student's data, no TEACHER.OPTS; one sanity line
    assert f"2 classes of {own['train']}: ['cat', 'dog']" in text
    assert "TEACHER CHECK FAILED" in text and "baseline student 100.00" in text
    for out in outs:  # every training run ends with its evaluation as strict JSON
        with open(os.path.join(out, "eval_results.json")) as f:
            results = json.load(f)
        assert set(results["bbox"]) >= {"AP", "AP50", "AP75"}  # VOC evaluator: from the data
    assert os.path.isfile(os.path.join(outs[2], "model_final_student.pth"))
    # 4: compare
    table = compare.main([f"teacher={outs[0]}", f"baseline={outs[1]}", f"CSGR={outs[2]}",
                          "--baseline", "baseline"])
    lines = table.splitlines()
    assert lines[0] == "| run | AP | AP50 | AP75 | AP vs baseline |"
    assert [ln.split(" | ")[0] for ln in lines[2:5]] == ["| teacher", "| baseline", "| CSGR"]
    assert lines[3].endswith("| +0.00 |")


def test_teacher_check_against_a_baseline_run_folder(own, caplog, tmp_path):
    baseline_dir = own["baseline"][1]
    if not os.path.isfile(os.path.join(baseline_dir, "eval_results.json")):
        _train(own, "baseline")
    results = json.load(open(os.path.join(baseline_dir, "eval_results.json")))
    with caplog.at_level(logging.INFO):
        train_net.run_teacher_check(_csgr_cfg(own), baseline_dir)
    line = [r.getMessage() for r in caplog.records if "Teacher check" in r.getMessage()
            or "TEACHER CHECK FAILED" in r.getMessage()]
    assert line and f"{results['bbox']['AP']:.2f}" in line[-1]  # the baseline's number, read


def _csgr_cfg(own):
    from csgr_distill.cli import load_config

    cfg = load_config(own["csgr"][0], ["MODEL.RETINANET.NUM_CLASSES", "2"], own["flags"][1::2])
    cfg.freeze()
    return cfg


def test_class_count_differing_from_the_data_is_one_error_naming_both(own):
    yaml_path, _ = own["baseline"]
    with pytest.raises(ValueError, match=r"MODEL.RETINANET.NUM_CLASSES is 1, but the training set "
                       rf"{own['train']} has 2 classes: \['cat', 'dog'\].*"
                       r"Set MODEL.RETINANET.NUM_CLASSES 2"):
        train_net.cli(["--config-file", yaml_path] + own["flags"] + ["SOLVER.MAX_ITER", "1"])


def test_teacher_check_needs_a_teacher(own):
    from csgr_distill.cli import load_config

    cfg = load_config(own["baseline"][0], ["MODEL.RETINANET.NUM_CLASSES", "2"],
                      own["flags"][1::2])
    with pytest.raises(ValueError, match="--teacher-check needs a distillation config"):
        train_net.run_teacher_check(cfg, "")


def test_pipeline_overrides_move_every_stage_onto_the_data(tmp_path):
    """What demo.py and benchmark.py gain give every run: the registration, the sets, the class
    count of every head, and the teacher's training set (so its class count follows)."""
    json_file, images = make_coco(str(tmp_path))  # classes ['cat', 'dog']
    name = f"pipe_{uuid.uuid4().hex[:6]}"
    opts = D.pipeline_overrides([f"{name}=coco:{json_file}:{images}"], name, name)
    pairs = dict(zip(opts[::2], opts[1::2]))
    assert eval(pairs["DATASETS.REGISTER"]) == [[name, "coco", json_file, images]]
    assert pairs["DATASETS.TRAIN"] == f"('{name}',)" == pairs["DATASETS.TEST"]
    assert pairs["MODEL.RETINANET.NUM_CLASSES"] == "2" == pairs["MODEL.ROI_HEADS.NUM_CLASSES"]
    assert eval(pairs["MODEL.DISTILL.TEACHER.OPTS"]) == ["DATASETS.TRAIN", (name,)]
    # a config merges them as yacs reads the command line
    from csgr_distill.cli import load_config

    cfg = load_config(os.path.join(REPO, "configs/demo/CSGR-RetinaNet-R18.yaml"), opts)
    assert cfg.DATASETS.TRAIN == (name,) and cfg.MODEL.RETINANET.NUM_CLASSES == 2
    with pytest.raises(DatasetEntryError, match="--train 'nope' is not a registered dataset"):
        D.pipeline_overrides([], "nope")
    assert D.pipeline_overrides() == []


def test_compare_marks_missing_values_and_names_missing_runs(tmp_path):
    run = tmp_path / "a"
    run.mkdir()
    (run / "eval_results.json").write_text(json.dumps(
        {"bbox": {"AP": 7.5, "AP50": 20.0, "AP75": 4.0, "APs": 1.0, "APm": 9.0, "APl": None,
                  "AP-circle": 3.0}}))
    table = compare.comparison([compare.read_run(str(run))])
    assert table.splitlines()[2] == "| a | 7.50 | 20.00 | 4.00 | 1.00 | 9.00 | — |"
    assert table.endswith("— : no value (no objects of that size in the evaluation set)")
    from csgr_distill.cli import CliError

    with pytest.raises(CliError, match="missing does not exist; give a run's OUTPUT_DIR"):
        compare.read_run(str(tmp_path / "missing"))
    (tmp_path / "unevaluated").mkdir()
    with pytest.raises(CliError, match="no .*eval_results.json.*--eval-only"):
        compare.read_run(str(tmp_path / "unevaluated"))
    with pytest.raises(CliError, match="--baseline 'b' is not one of the runs"):
        compare.comparison([compare.read_run(str(run))], "b")


def test_voc_xmls_of_other_tools_are_evaluated_from_completed_copies(tmp_path):
    """No <pose>/<truncated>/<difficult>, float corners, a padded name: detectron2's parse_rec
    fails on the file; the completed copy reads as the official form would."""
    from detectron2.evaluation.pascal_voc_evaluation import parse_rec

    from csgr_distill.evaluation.voc import completed, needs_completion

    xml = tmp_path / "a.xml"
    xml.write_text("<annotation><object><name> dog </name><bndbox><xmin>10.4</xmin>"
                   "<ymin>3</ymin><xmax>40.6</xmax><ymax>30</ymax></bndbox></object></annotation>")
    with pytest.raises(AttributeError):
        parse_rec(str(xml))
    assert needs_completion(str(xml))
    fixed = tmp_path / "b.xml"
    completed(str(xml)).write(str(fixed))
    assert not needs_completion(str(fixed))
    assert parse_rec(str(fixed)) == [{"name": "dog", "pose": "Unspecified", "truncated": 0,
                                      "difficult": 0, "bbox": [10, 3, 41, 30]}]


def test_demo_runs_every_stage_on_the_users_data_and_checks_the_teacher(tmp_path, monkeypatch,
                                                                         caplog):
    """tools/demo.py --register-dataset ... --train --test KEY VALUE: every tool call carries the
    data overrides; teacher and baseline are evaluated before distillation and a teacher below
    the baseline is a loud warning with both numbers (the tools are faked: wiring only)."""
    import demo

    json_file, images = make_coco(str(tmp_path / "data"))
    name = f"demo_{uuid.uuid4().hex[:6]}"
    (tmp_path / "configs").symlink_to(os.path.join(REPO, "configs"))
    monkeypatch.setattr(demo, "REPO", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # demo.main changes to REPO (tmp_path): restored afterwards
    calls = []
    ap = {"teacher": 3.0, "student_baseline": 5.0, "student_csgr": 5.5}

    fake_tool = fake_demo_tool(calls, ap)

    monkeypatch.setattr(demo, "run_tool", fake_tool)
    with caplog.at_level(logging.WARNING):
        demo.main(["--register-dataset", f"{name}=coco:{json_file}:{images}", "--train", name,
                   "--test", name, "INPUT.FIXED_SIZE", "64"])
    data = D.pipeline_overrides([f"{name}=coco:{json_file}:{images}"], name, name)
    tools = [(c[0], "--eval-only" in c) for c in calls]
    assert tools == [("tools/train_net.py", False)] * 2 + [("tools/train_net.py", True)] * 2 + [
        ("tools/train_net.py", False), ("tools/train_net.py", True)] + [
        ("tools/visualize.py", False)] * 2  # teacher, baseline, check, CSGR, eval, pictures
    for c in calls:  # the data overrides, then the user's (demo may put its own in between)
        assert _find(c, ["INPUT.FIXED_SIZE", "64"]) > _find(c, data)
    assert all(c[-2:] == ["DATASETS.TEST", "()"] for c in calls if c[0].endswith("train_net.py")
               and "--eval-only" not in c)
    assert all(c[c.index("--dataset") + 1] == name for c in calls if c[0].endswith("visualize.py"))
    assert "TEACHER CHECK FAILED" in caplog.text and "the baseline student 5.00" in caplog.text
    report = open(tmp_path / "output/demo/results.md").read()
    assert f"on {name}, evaluated on {name}" in report and "| — |" in report


def _find(seq, sub):
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise AssertionError(f"{sub} not in {seq}")
