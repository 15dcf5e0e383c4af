"""MODEL.DISTILL.INHERIT_TEACHER: the student's neck and head start from the teacher's, the
bottom-up stays the student's; mismatched shapes and families are refused at build time; a
resumed run does not inherit again (csgr_distill/inherit.py, DistillTrainer.resume_or_load)."""
import logging
import os

import pytest
import torch
from detectron2.modeling import build_model

from csgr_distill.config import add_distill_config
from csgr_distill.engine import DistillTrainer
from tiny import base_cfg, rcnn_base_cfg

#: what the neck and head are, written out per family (independently of csgr_distill.inherit)
NECK_AND_HEAD = {"retinanet": ("backbone.fpn_", "backbone.top_block.", "head."),
                 "rcnn": ("backbone.fpn_", "proposal_generator.", "roi_heads.")}
BASE = {"retinanet": base_cfg, "rcnn": rcnn_base_cfg}


def _write(tmp_path, cfg, name, shift):
    """``cfg``'s model with every tensor moved off its initial value (buffers and counters
    included), so that a copied tensor is told from one left alone; (yaml, weights, state)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    state = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if v.is_floating_point():
                v.add_(0.01 * (torch.rand_like(v) + shift))
            else:
                v.add_(int(10 * shift) + 1)
    weights = str(tmp_path / f"{name}.pth")
    torch.save({"model": state}, weights)
    yaml_path = tmp_path / f"{name}.yaml"
    yaml_path.write_text(cfg.dump())
    return str(yaml_path), weights, {k: v.clone() for k, v in state.items()}


def _student(tmp_path, family, teacher_yaml, teacher_weights, inherit=True, **cfg_kw):
    cfg = BASE[family](tmp_path / "student", **cfg_kw)
    cfg.MODEL.META_ARCHITECTURE = "Distill" + cfg.MODEL.META_ARCHITECTURE
    cfg.MODEL.DISTILL.ENABLED = True
    cfg.MODEL.DISTILL.METHODS = ["CSGR"]
    if family == "rcnn":
        cfg.MODEL.DISTILL.CSGR.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.DISTILL.TEACHER.CONFIG = teacher_yaml
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = teacher_weights
    cfg.MODEL.DISTILL.INHERIT_TEACHER = inherit
    cfg.DATASETS.TEST = ()
    return cfg


def _teacher(tmp_path, family, fpn_channels=16, **keys):
    cfg = BASE[family](tmp_path / "teacher", fpn_channels=fpn_channels)
    for k, v in keys.items():
        node = cfg
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return _write(tmp_path, cfg, "teacher", shift=1.0)


def _state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_inheriting_is_off_by_default(tmp_path, tiny_shapes):
    assert add_distill_config(base_cfg(tmp_path)).MODEL.DISTILL.INHERIT_TEACHER is False
    tyaml, tw, teacher = _teacher(tmp_path, "retinanet")
    cfg = _student(tmp_path, "retinanet", tyaml, tw, inherit=False)
    trainer = DistillTrainer(cfg)
    trainer.resume_or_load(resume=False)
    assert trainer.inherited is None
    after = _state(trainer)
    assert not torch.equal(after["head.cls_score.weight"], teacher["head.cls_score.weight"])


@pytest.mark.parametrize("family", ["retinanet", "rcnn"])
def test_copies_exactly_the_teachers_neck_and_head(tmp_path, tiny_shapes, family, caplog):
    """Every neck/head tensor (parameters, BN statistics, counters) becomes the teacher's; the
    bottom-up and the distillers keep their values. RetinaNet: MODEL.WEIGHTS is a full student
    checkpoint (its bottom-up stays, its neck/head are replaced with a warning); R-CNN: no
    MODEL.WEIGHTS and --resume on an empty folder (a fresh start inherits)."""
    tyaml, tw, teacher = _teacher(tmp_path, family)
    cfg = _student(tmp_path, family, tyaml, tw)
    own = None
    if family == "retinanet":
        plain = base_cfg(tmp_path / "own", fpn_channels=16)
        plain.MODEL.META_ARCHITECTURE = "DistillRetinaNet"
        _, cfg.MODEL.WEIGHTS, own = _write(tmp_path, plain, "own_weights", shift=2.0)
    trainer = DistillTrainer(cfg)
    with caplog.at_level(logging.INFO, logger="csgr_distill"):
        trainer.resume_or_load(resume=family == "rcnn")
    after = _state(trainer)
    prefixes = NECK_AND_HEAD[family]
    expected = [k for k in after if k.startswith(prefixes)]
    assert len(expected) > 20
    assert trainer.inherited.keys == expected
    for k in expected:
        assert torch.equal(after[k], teacher[k]), k
    bottom_up = [k for k in after if k.startswith("backbone.bottom_up.")]
    assert bottom_up and trainer.inherited.kept == len(bottom_up)
    assert sorted(after) == sorted(expected + bottom_up
                                   + [k for k in after if k.startswith("distillers.")])
    if own is not None:  # the bottom-up MODEL.WEIGHTS loaded, untouched
        for k in bottom_up:
            assert torch.equal(after[k], own[k]), k
        assert trainer.inherited.replaced == expected
        assert f"MODEL.WEIGHTS had loaded {len(expected)} of the student's neck/head" in caplog.text
    else:
        fresh = DistillTrainer.build_model(cfg).state_dict()  # another random init
        assert all(not torch.equal(after[k], teacher[k]) for k in bottom_up
                   if teacher[k].is_floating_point())
        assert any(not torch.equal(after[k], fresh[k]) for k in bottom_up)
        assert trainer.inherited.replaced == []
        assert "MODEL.WEIGHTS had loaded" not in caplog.text
    summary = [r.getMessage() for r in caplog.records
               if "the student's neck and head start from the teacher's" in r.getMessage()]
    assert len(summary) == 1 and f": {len(expected)} tensors (" in summary[0]
    assert ("head.cls_score (2)" if family == "retinanet"
            else "roi_heads.box_predictor (4)") in summary[0]
    assert "backbone.fpn_lateral3 (2)" in summary[0] and "backbone.bottom_up" in summary[0]


def test_a_wider_teacher_fpn_is_refused_at_build_time_naming_the_key(tmp_path):
    tyaml, _, _ = _teacher(tmp_path, "retinanet", fpn_channels=32)
    cfg = _student(tmp_path, "retinanet", tyaml, str(tmp_path / "never_read.pth"))
    with pytest.raises(ValueError) as e:
        build_model(cfg)  # build time: the teacher's weights (absent here) are not read
    msg = str(e.value)
    assert msg.startswith("MODEL.DISTILL.INHERIT_TEACHER is True")
    assert ("backbone.fpn_lateral3.weight has shape (16, 128, 1, 1) in the student but "
            "(32, 128, 1, 1) in the teacher") in msg
    assert "more mismatched tensors" in msg and "MODEL.FPN.OUT_CHANNELS" in msg
    assert "Set MODEL.DISTILL.INHERIT_TEACHER False" in msg
    cfg.MODEL.DISTILL.INHERIT_TEACHER = False
    build_model(cfg)  # the same pair distils without inheriting


def test_a_deeper_teacher_head_is_refused_even_where_every_student_tensor_fits(tmp_path):
    """Same widths, 2 teacher convs against 1: each student tensor has a teacher tensor of its
    name and shape, but copying the first conv of a deeper stack is no inheritance."""
    tyaml, tw, _ = _teacher(tmp_path, "retinanet", **{"MODEL.RETINANET.NUM_CONVS": 2})
    with pytest.raises(ValueError, match=r"head\.cls_subnet\.\S+ \(16, 16, 3, 3\) exists in the "
                                         r"teacher but not in the student"):
        build_model(_student(tmp_path, "retinanet", tyaml, tw))


@pytest.mark.parametrize("student,teacher", [("retinanet", "rcnn"), ("rcnn", "retinanet")])
def test_teacher_of_another_family_is_refused_at_build_time(tmp_path, student, teacher):
    tyaml, tw, _ = _teacher(tmp_path, teacher)
    cfg = _student(tmp_path, student, tyaml, tw)
    cfg.MODEL.DISTILL.CSGR.IN_FEATURES = ["p3", "p4", "p5", "p6"]
    names = {"retinanet": "dense", "rcnn": "rcnn"}
    with pytest.raises(ValueError, match=f"INHERIT_TEACHER is True but the teacher .* is a "
                                         f"{names[teacher]} detector and the student .* a "
                                         f"{names[student]} one"):
        build_model(cfg)
    cfg.MODEL.DISTILL.INHERIT_TEACHER = False
    build_model(cfg)


def test_a_resumed_run_does_not_inherit_again(tmp_path, tiny_shapes, caplog):
    tyaml, tw, teacher = _teacher(tmp_path, "retinanet")
    cfg = _student(tmp_path, "retinanet", tyaml, tw)
    first = DistillTrainer(cfg)
    first.resume_or_load(resume=True)  # nothing to resume in the new folder: inherits
    assert first.inherited is not None
    first.train()  # 2 iterations; model_final.pth is the last checkpoint
    saved = torch.load(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), weights_only=False)["model"]
    keys = first.inherited.keys
    assert any(not torch.equal(saved[k], teacher[k]) for k in keys), \
        "training must move the neck/head away from the teacher's, or this test proves nothing"

    resumed_cfg = cfg.clone()
    resumed_cfg.SOLVER.MAX_ITER = 4
    second = DistillTrainer(resumed_cfg)
    with caplog.at_level(logging.INFO, logger="csgr_distill"):
        second.resume_or_load(resume=True)
    assert second.start_iter == 2 and second.inherited is None
    after = _state(second)
    for k in keys:
        assert torch.equal(after[k], saved[k]), k
    assert "INHERIT_TEACHER: not applied, resumed from" in caplog.text
