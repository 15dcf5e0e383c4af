"""DistillGeneralizedRCNN: CSGR on a Faster R-CNN FPN student (p2-p5), teacher kept apart."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from tiny import fake_batch, rcnn_base_cfg


def rcnn_cfg(fpn_channels):
    return rcnn_base_cfg("unused", fpn_channels)


@pytest.fixture
def rcnn_student(tmp_path):
    tcfg = rcnn_cfg(32)
    torch.manual_seed(0)
    teacher = build_model(tcfg)
    weights = str(tmp_path / "teacher.pth")
    torch.save({"model": teacher.state_dict()}, weights)
    yaml_path = tmp_path / "teacher.yaml"
    yaml_path.write_text(tcfg.dump())
    cfg = rcnn_cfg(16)
    cfg.MODEL.META_ARCHITECTURE = "DistillGeneralizedRCNN"
    cfg.MODEL.DISTILL.ENABLED = True
    cfg.MODEL.DISTILL.METHODS = ["CSGR"]
    cfg.MODEL.DISTILL.CSGR.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.DISTILL.TEACHER.CONFIG = str(yaml_path)
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = weights
    return cfg


def test_csgr_on_faster_rcnn_trains_the_student_not_the_teacher(rcnn_student):
    model = build_model(rcnn_student)
    teacher = model.attach_teacher().model
    model.train()
    with EventStorage(0):
        losses = model(fake_batch(2))
    expected = {f"loss_csgr_{t}_{l}" for t in ("cs", "gr") for l in ("p2", "p3", "p4", "p5")}
    assert expected <= set(losses)
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    sum(losses[k] for k in expected).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.backbone.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training


def test_faster_rcnn_inference_is_the_plain_model(rcnn_student):
    model = build_model(rcnn_student).eval()
    plain_cfg = rcnn_student.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    plain_cfg.MODEL.DISTILL.ENABLED = False
    plain = build_model(plain_cfg).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("distillers.")}
    plain.load_state_dict(state)
    batch = fake_batch(1)
    with torch.no_grad():
        a, b = model(batch)[0]["instances"], plain(batch)[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    assert model._teacher is None


def test_rcnn_rejects_dense_head_fields(rcnn_student):
    rcnn_student.MODEL.DISTILL.CSGR.ATTENTION = "teacher_head"
    with pytest.raises(ValueError, match="cls_logits"):
        build_model(rcnn_student)
