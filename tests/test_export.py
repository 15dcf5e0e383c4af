"""The exporter's parts: base meta-architecture, plain config, checkpoint loading without
distillers (the whole chain through a training run is in test_end_to_end.py)."""
import logging

import pytest
import torch
import yaml
from detectron2.config import get_cfg
from torch import nn

from csgr_distill.config import add_distill_config
from csgr_distill.export import (
    StudentCheckpointer,
    plain_meta_architecture,
    plain_student_cfg,
    write_student,
)


@pytest.mark.parametrize("name, base", [("DistillRetinaNet", "RetinaNet"),
                                        ("DistillGeneralizedRCNN", "GeneralizedRCNN"),
                                        ("RetinaNet", "RetinaNet")])
def test_plain_meta_architecture_is_the_registered_detectron2_base(name, base):
    assert plain_meta_architecture(name) == base


def test_rcnn_student_writes_a_yaml_that_plain_detectron2_reads(tmp_path):
    cfg = add_distill_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "DistillGeneralizedRCNN"
    cfg.MODEL.DISTILL.ENABLED = True
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
    cfg.MODEL.PROJECT_ONLY_KEY = 3  # any key plain detectron2 lacks is left out, not only DISTILL
    state = {"backbone.w": torch.ones(2), "distillers.csgr.w": torch.ones(3)}
    counts = write_student(state, str(tmp_path / "student.pth"), cfg)
    assert counts["kept"] == 1 and counts["dropped"] == 1
    assert counts["config"] == str(tmp_path / "student.yaml")
    assert list(torch.load(counts["checkpoint"], weights_only=False)["model"]) == ["backbone.w"]

    raw = yaml.safe_load(open(counts["config"]))
    assert "DISTILL" not in raw["MODEL"] and "PROJECT_ONLY_KEY" not in raw["MODEL"]
    plain = get_cfg()
    assert "DISTILL" not in plain.MODEL  # this process's get_cfg() is detectron2's own
    plain.merge_from_file(counts["config"])
    assert plain.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert plain.MODEL.WEIGHTS == str(tmp_path / "student.pth")
    assert plain.MODEL.ROI_HEADS.NUM_CLASSES == 6
    # the student's config itself is not changed
    assert cfg.MODEL.META_ARCHITECTURE == "DistillGeneralizedRCNN" and "DISTILL" in cfg.MODEL


def test_plain_student_cfg_refuses_an_architecture_without_a_plain_base():
    cfg = add_distill_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = "NoSuchArchitecture"
    with pytest.raises(KeyError, match="NoSuchArchitecture"):
        plain_student_cfg(cfg, "w.pth")


class _Net(nn.Module):
    def __init__(self, with_distillers):
        super().__init__()
        self.head = nn.Linear(2, 2)
        self.distillers = nn.ModuleDict({"csgr": nn.Linear(2, 1)}) if with_distillers else None


def _checkpoint(tmp_path):
    state = _Net(True).state_dict()
    path = str(tmp_path / "model_final.pth")
    torch.save({"model": state, "iteration": 1}, path)
    return path, state


def test_student_checkpointer_drops_distiller_tensors_with_one_info_line(tmp_path, caplog):
    path, state = _checkpoint(tmp_path)
    model = _Net(False)
    fvcore = logging.getLogger("fvcore")  # detectron2's setup may have stopped its propagation
    fvcore.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            StudentCheckpointer(model).load(path)
    finally:
        fvcore.removeHandler(caplog.handler)
    assert torch.equal(model.head.weight, state["head.weight"])
    dropped = [r.getMessage() for r in caplog.records if "distillation-only" in r.getMessage()]
    assert dropped == ["Dropped 2 distillation-only tensors (distillers.*) of the checkpoint: "
                       "the model is built without distillers"]
    assert "not used by the model" not in caplog.text


def test_student_checkpointer_keeps_distillers_for_a_distillation_model(tmp_path, caplog):
    path, state = _checkpoint(tmp_path)
    model = _Net(True)
    with caplog.at_level(logging.INFO):
        StudentCheckpointer(model).load(path)
    assert torch.equal(model.distillers["csgr"].weight, state["distillers.csgr.weight"])
    assert "distillation-only" not in caplog.text
