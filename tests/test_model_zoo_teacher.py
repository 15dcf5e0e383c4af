"""Model-zoo and third-party teachers: detectron2 model-zoo .pkl files and detectron2:// URLs
loaded strictly, the teacher's sanity line, the student's dataset registrations applied to the
teacher, TEACHER.OPTS errors, and teacher_check."""
import logging
import os
import pickle
import uuid

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

import csgr_distill.data as D
from csgr_distill.checkpoint import load_weights_strictly
from csgr_distill.evaluation.teacher_check import read_metric, teacher_check
from csgr_distill.teacher import FrozenTeacher, build_teacher_cfg
from test_custom_data import make_coco
from tiny import TINY_TRAIN, TINY_VAL, base_cfg, make_teacher, student_cfg

ZOO_AUTHOR = "Detectron2 Model Zoo"


def write_zoo_pkl(path, state_dict, rename=lambda k: k, drop=()):
    """A checkpoint in the Detectron2 Model Zoo layout, as DetectionCheckpointer._load_file
    recognises it: a pickle of {"model": {name: numpy array}, "__author__": ...,
    "matching_heuristics": True} in a file ending in .pkl."""
    model = {rename(k): v.detach().cpu().numpy() for k, v in state_dict.items() if k not in drop}
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": ZOO_AUTHOR, "matching_heuristics": True}, f)
    return str(path)


def _strip_backbone(key):
    return key[len("backbone."):] if key.startswith("backbone.") else key


@pytest.fixture
def teacher_files(tmp_path, tiny_shapes):
    return make_teacher(tmp_path)


def _fresh_teacher_model(tmp_path, yaml_path):
    return build_model(build_teacher_cfg(student_cfg(tmp_path, yaml_path, "unused.pth")))


def test_model_zoo_pkl_loads_strictly_with_renamed_keys_counted(tmp_path, teacher_files):
    yaml_path, _, teacher = teacher_files
    sd = teacher.state_dict()
    pkl = write_zoo_pkl(tmp_path / "model_final_zoo.pkl", sd, rename=_strip_backbone)
    fresh = _fresh_teacher_model(tmp_path, yaml_path)
    report = load_weights_strictly(fresh, pkl)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    backbone = [k for k in sd if k.startswith("backbone.")]
    assert backbone and report.renamed == len(backbone)
    assert report.tensors == len(sd) and report.author == ZOO_AUTHOR
    assert report.values == sum(v.numel() for v in sd.values())
    # same names as the model: nothing renamed
    same = write_zoo_pkl(tmp_path / "same.pkl", sd)
    assert load_weights_strictly(_fresh_teacher_model(tmp_path, yaml_path), same).renamed == 0


def test_model_zoo_pkl_with_a_missing_key_is_a_strict_error(tmp_path, teacher_files):
    yaml_path, _, teacher = teacher_files
    missing = "head.cls_score.weight"
    pkl = write_zoo_pkl(tmp_path / "missing.pkl", teacher.state_dict(), rename=_strip_backbone,
                        drop=(missing,))
    with pytest.raises(RuntimeError) as e:
        load_weights_strictly(_fresh_teacher_model(tmp_path, yaml_path), pkl)
    assert "missing keys" in str(e.value) and missing in str(e.value) and pkl in str(e.value)


def test_model_zoo_pkl_of_other_classes_says_fine_tune_first(tmp_path, teacher_files):
    yaml_path, _, teacher = teacher_files
    sd = dict(teacher.state_dict())
    w, b = sd["head.cls_score.weight"], sd["head.cls_score.bias"]
    sd["head.cls_score.weight"] = torch.zeros((80 * w.shape[0] // 6,) + tuple(w.shape[1:]))
    sd["head.cls_score.bias"] = torch.zeros(80 * b.shape[0] // 6)
    pkl = write_zoo_pkl(tmp_path / "coco80.pkl", sd)
    with pytest.raises(RuntimeError) as e:
        load_weights_strictly(_fresh_teacher_model(tmp_path, yaml_path), pkl)
    msg = str(e.value)
    assert "mis-shaped keys" in msg and "head.cls_score.weight" in msg
    assert "fine-tune it on your data first" in msg and "docs/own_data.md" in msg


def test_fine_tuning_from_a_zoo_pkl_of_other_classes_keeps_all_but_the_logits(tmp_path,
                                                                              teacher_files):
    """The documented route: training (detectron2's non-strict load) starts a model of the
    user's classes from a checkpoint of other classes, everything but the class logits loaded."""
    from detectron2.checkpoint import DetectionCheckpointer

    yaml_path, _, teacher = teacher_files
    pkl = write_zoo_pkl(tmp_path / "six_classes.pkl", teacher.state_dict(),
                        rename=_strip_backbone)
    cfg = base_cfg(tmp_path / "finetune", fpn_channels=32)
    cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    cfg.MODEL.RETINANET.NUM_CLASSES = 2
    torch.manual_seed(1)
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    DetectionCheckpointer(model).load(pkl)
    after = model.state_dict()
    logits = {"head.cls_score.weight", "head.cls_score.bias"}
    assert all(torch.equal(after[k], before[k]) for k in logits)
    assert all(torch.equal(after[k], v) for k, v in teacher.state_dict().items()
               if k not in logits)


def test_detectron2_url_is_fetched_through_detectron2s_path_manager(tmp_path, teacher_files,
                                                                   monkeypatch):
    yaml_path, _, teacher = teacher_files
    pkl = write_zoo_pkl(tmp_path / "model_final_abc.pkl", teacher.state_dict())
    url = "detectron2://COCO-Detection/retinanet_R_50_FPN_3x/190397829/model_final_abc.pkl"
    asked = []
    real = PathManager.get_local_path

    def fake(path, **kwargs):
        if path.startswith("detectron2://"):
            asked.append(path)
            return pkl
        return real(path, **kwargs)

    monkeypatch.setattr(PathManager, "get_local_path", fake)
    report = load_weights_strictly(_fresh_teacher_model(tmp_path, yaml_path), url)
    assert asked and set(asked) == {url} and report.path == url
    assert report.author == ZOO_AUTHOR and report.tensors == len(teacher.state_dict())

    def offline(path, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(PathManager, "get_local_path", offline)
    with pytest.raises(FileNotFoundError) as e:
        load_weights_strictly(_fresh_teacher_model(tmp_path, yaml_path), url)
    msg = str(e.value)
    assert url in msg and "name resolution" in msg
    assert "MODEL.DISTILL.TEACHER.WEIGHTS to the local file" in msg


def test_teacher_build_logs_one_sanity_line(tmp_path, teacher_files, caplog):
    yaml_path, _, teacher = teacher_files
    pkl = write_zoo_pkl(tmp_path / "zoo.pkl", teacher.state_dict(), rename=_strip_backbone)
    cfg = student_cfg(tmp_path, yaml_path, pkl)
    with caplog.at_level(logging.INFO, logger="csgr_distill"):
        frozen = FrozenTeacher.from_student_cfg(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Teacher ")]
    line = [ln for ln in lines if "loaded" in ln]
    assert len(line) == 1, lines
    n_backbone = sum(1 for k in teacher.state_dict() if k.startswith("backbone."))
    classes = list(MetadataCatalog.get(TINY_TRAIN).thing_classes)
    assert line[0].startswith(f"Teacher RetinaNet: loaded {len(teacher.state_dict())} tensors")
    assert f"{n_backbone} renamed by detectron2's name heuristics" in line[0]
    assert f"6 classes of {TINY_TRAIN}: {classes}" in line[0]
    assert line[0].endswith(f"weights {pkl} ({ZOO_AUTHOR})")
    assert frozen.load_report.renamed == n_backbone


def test_teacher_opts_that_are_not_pairs_show_the_exact_form(tmp_path, teacher_files):
    yaml_path, weights, _ = teacher_files
    cfg = student_cfg(tmp_path, yaml_path, weights)
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.RETINANET.NUM_CLASSES", 6, "SOLVER.BASE_LR"]
    with pytest.raises(ValueError) as e:
        build_teacher_cfg(cfg)
    assert "MODEL.DISTILL.TEACHER.OPTS \"['MODEL.RETINANET.NUM_CLASSES', 6]\"" in str(e.value)


def test_teacher_gets_the_students_registrations_and_its_count_follows_the_data(
        tmp_path, teacher_files, caplog):
    yaml_path, weights, _ = teacher_files
    json_file, image_root = make_coco(str(tmp_path / "data"))
    name = f"own_teacher_{uuid.uuid4().hex[:8]}"
    # the teacher yaml names the student's own data, registered on the student's side only
    tcfg = base_cfg(tmp_path / "t_own", fpn_channels=32)
    tcfg.DATASETS.TRAIN = (name,)
    assert tcfg.MODEL.RETINANET.NUM_CLASSES == 6
    own_yaml = tmp_path / "teacher_own.yaml"
    own_yaml.write_text(tcfg.dump())
    cfg = student_cfg(tmp_path, str(own_yaml), weights)
    cfg.DATASETS.REGISTER = [[name, "coco", json_file, image_root]]
    cfg.DATASETS.TRAIN = (name,)
    cfg.MODEL.RETINANET.NUM_CLASSES = 2
    with caplog.at_level(logging.INFO, logger="csgr_distill"):
        teacher_cfg = build_teacher_cfg(cfg)
    assert teacher_cfg.DATASETS.REGISTER == [[name, "coco", json_file, image_root]]
    assert teacher_cfg.MODEL.RETINANET.NUM_CLASSES == 2  # no second override needed
    assert f"MODEL.RETINANET.NUM_CLASSES 6 -> 2, the classes of its training set {name}" \
        in caplog.text
    assert name in D.register_from_cfg(teacher_cfg)
    # an explicit teacher count that the data contradict: the exact form of the fix
    cfg.MODEL.DISTILL.TEACHER.OPTS = ["MODEL.RETINANET.NUM_CLASSES", 5]
    with pytest.raises(ValueError) as e:
        build_teacher_cfg(cfg)
    assert "MODEL.RETINANET.NUM_CLASSES is 5, but the training set" in str(e.value)
    assert "MODEL.DISTILL.TEACHER.OPTS \"['MODEL.RETINANET.NUM_CLASSES', 2]\"" in str(e.value)
    # a teacher of other data keeps its count; the mismatch names the exact override
    cfg.MODEL.DISTILL.TEACHER.OPTS = []
    cfg.MODEL.DISTILL.TEACHER.CONFIG = yaml_path  # trained on the 6 shapes classes
    with pytest.raises(ValueError) as e:
        build_teacher_cfg(cfg)
    assert "the student trains 2 classes (MODEL.RETINANET.NUM_CLASSES), the teacher" in \
        str(e.value)
    assert "MODEL.DISTILL.TEACHER.OPTS \"['MODEL.RETINANET.NUM_CLASSES', 2]\"" in str(e.value)


def test_teacher_check_warns_loudly_with_both_numbers(tmp_path, teacher_files, caplog):
    yaml_path, weights, _ = teacher_files
    cfg = student_cfg(tmp_path, yaml_path, weights)
    with caplog.at_level(logging.WARNING, logger="csgr_distill"):
        out = teacher_check(cfg, baseline_ap=5.8, teacher_ap=3.1)
    assert out == {"metric": "bbox/AP", "dataset": TINY_VAL, "teacher": 3.1, "baseline": 5.8,
                   "teacher_beats_baseline": False}
    assert "TEACHER CHECK FAILED: the teacher has bbox/AP 3.10 on " + TINY_VAL in caplog.text
    assert "the baseline student 5.80" in caplog.text and weights in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="csgr_distill"):
        assert teacher_check(cfg, baseline_ap=5.8, teacher_ap=16.3)["teacher_beats_baseline"]
    assert "TEACHER CHECK" not in caplog.text
    # evaluated here, through the project's evaluator (a random teacher: it does not beat 50 AP)
    with caplog.at_level(logging.WARNING, logger="csgr_distill"):
        out = teacher_check(cfg, baseline_ap=50.0)
    assert out["teacher_beats_baseline"] is False and out["dataset"] == TINY_VAL
    assert np.isnan(out["teacher"]) or 0.0 <= out["teacher"] < 50.0
    assert "TEACHER CHECK FAILED" in caplog.text
    assert os.path.isdir(os.path.join(cfg.OUTPUT_DIR, "teacher_check", TINY_VAL))


def test_read_metric_from_eval_results(tmp_path):
    (tmp_path / "eval_results.json").write_text('{"bbox": {"AP": 7.06, "AP50": 17.28}}')
    assert read_metric(str(tmp_path)) == 7.06
    assert read_metric(str(tmp_path / "eval_results.json"), "bbox/AP50") == 17.28
    with pytest.raises(KeyError, match="segm/AP"):
        read_metric(str(tmp_path), "segm/AP")
    with pytest.raises(FileNotFoundError, match="--eval-only"):
        read_metric(str(tmp_path / "nowhere"))


def test_own_data_configs_resolve_from_the_documented_layout(tmp_path, monkeypatch):
    """configs/own-data + configs/teachers/RetinaNet-R101-own-data.yaml with the data at
    $DETECTRON2_DATASETS/mydata/{annotations/train.json, annotations/val.json, images/}."""
    from detectron2.config import get_cfg
    from detectron2.model_zoo.model_zoo import _ModelZooUrls

    from csgr_distill.config import add_distill_config, apply_derived_keys, merge_command_line
    from tiny import REPO

    root = tmp_path / "datasets"
    (root / "mydata" / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        make_coco(str(root / "mydata"), json_name=os.path.join("annotations", split + ".json"))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    monkeypatch.chdir(REPO)
    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file("configs/own-data/CSGR-RetinaNet-R50.yaml")
    merge_command_line(cfg, ["MODEL.RETINANET.NUM_CLASSES", "2"])
    apply_derived_keys(cfg)
    assert cfg.SOLVER.STEPS == (2400, 2850)
    names = ["mydata_train", "mydata_val"]
    assert not set(names) & set(DatasetCatalog.list())
    try:
        assert D.register_from_cfg(cfg) == names
        assert MetadataCatalog.get("mydata_val").json_file == str(
            root / "mydata" / "annotations" / "val.json")
        assert D.check_training_data(cfg) == ["cat", "dog"]
        tcfg = build_teacher_cfg(cfg)
        assert tcfg.MODEL.RETINANET.NUM_CLASSES == 2 and tcfg.MODEL.RESNETS.DEPTH == 101
        assert tcfg.MODEL.WEIGHTS == "output/own-data/teacher/model_final.pth"  # fine-tuned
        zoo = add_distill_config(get_cfg())  # the teacher yaml starts from the model zoo
        zoo.merge_from_file(cfg.MODEL.DISTILL.TEACHER.CONFIG)
        prefix = "detectron2://COCO-Detection/retinanet_R_101_FPN_3x/"
        assert zoo.MODEL.WEIGHTS.startswith(prefix)
        assert _ModelZooUrls.CONFIG_PATH_TO_URL_SUFFIX[
            "COCO-Detection/retinanet_R_101_FPN_3x"] == zoo.MODEL.WEIGHTS[len(prefix):]
        cfg.MODEL.RETINANET.NUM_CLASSES = 1  # the yaml's placeholder: the exact override named
        with pytest.raises(ValueError, match="Set MODEL.RETINANET.NUM_CLASSES 2"):
            D.check_training_data(cfg)
    finally:
        for name in names:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
