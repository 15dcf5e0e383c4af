"""The teacher: strict loading, bad input, isolation from the student, device/mode mirroring."""
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from csgr_distill.checkpoint import load_weights_strictly
from csgr_distill.teacher import build_teacher_cfg
from tiny import fake_batch, make_teacher, student_cfg


@pytest.fixture
def teacher_files(tmp_path):
    return make_teacher(tmp_path)


def _save(sd, path):
    torch.save({"model": sd}, path)
    return str(path)


def test_strict_load_lists_missing_unexpected_and_misshaped_keys(tmp_path, teacher_files):
    yaml_path, weights, teacher = teacher_files
    sd = {k: v.clone() for k, v in teacher.state_dict().items()}
    missing = "head.cls_score.weight"
    del sd[missing]
    sd["head.extra_layer.weight"] = torch.zeros(3)
    misshaped = "head.bbox_pred.bias"
    sd[misshaped] = torch.zeros(7)
    bad = _save(sd, tmp_path / "bad.pth")
    fresh = build_model(build_teacher_cfg(student_cfg(tmp_path, yaml_path, bad)))
    with pytest.raises(RuntimeError) as e:
        load_weights_strictly(fresh, bad)
    msg = str(e.value)
    assert "missing keys" in msg and missing in msg
    assert "unexpected keys" in msg and "head.extra_layer.weight" in msg
    assert "mis-shaped keys" in msg and misshaped in msg and "(7,)" in msg


def test_strict_load_accepts_the_matching_checkpoint(tmp_path, teacher_files):
    yaml_path, weights, teacher = teacher_files
    fresh = build_model(build_teacher_cfg(student_cfg(tmp_path, yaml_path, weights)))
    load_weights_strictly(fresh, weights)
    for k, v in teacher.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_empty_or_missing_teacher_weights_are_errors_in_training(tmp_path, teacher_files):
    yaml_path, _, teacher = teacher_files
    # the teacher yaml has no MODEL.WEIGHTS either
    model = build_model(student_cfg(tmp_path, yaml_path, ""))
    with pytest.raises(ValueError, match="MODEL.DISTILL.TEACHER.WEIGHTS"):
        model.attach_teacher()
    model = build_model(student_cfg(tmp_path, yaml_path, str(tmp_path / "nope.pth")))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        model.attach_teacher()


def test_missing_teacher_config_is_an_error(tmp_path, teacher_files):
    _, weights, _ = teacher_files
    with pytest.raises(ValueError, match="MODEL.DISTILL.TEACHER.CONFIG"):
        build_model(student_cfg(tmp_path, "", weights))
    with pytest.raises(FileNotFoundError, match="no_such_teacher.yaml"):
        build_model(student_cfg(tmp_path, str(tmp_path / "no_such_teacher.yaml"), weights))


def test_class_count_mismatch_names_both_values(tmp_path, teacher_files):
    yaml_path, weights, _ = teacher_files
    cfg = student_cfg(tmp_path, yaml_path, weights)
    cfg.MODEL.RETINANET.NUM_CLASSES = 5
    with pytest.raises(ValueError) as e:
        build_model(cfg)
    assert "5" in str(e.value) and "6" in str(e.value) and "class" in str(e.value)


def test_unknown_distiller_lists_registered_names(tmp_path, teacher_files):
    yaml_path, weights, _ = teacher_files
    with pytest.raises(KeyError, match="CSGR"):
        build_model(student_cfg(tmp_path, yaml_path, weights, methods=("NoSuchMethod",)))


def test_teacher_is_isolated_from_the_student(tmp_path, teacher_files):
    yaml_path, weights, _ = teacher_files
    cfg = student_cfg(tmp_path, yaml_path, weights)
    model = build_model(cfg)
    teacher = model.attach_teacher().model
    teacher_ids = {id(p) for p in teacher.parameters()} | {id(b) for b in teacher.buffers()}
    state = model.state_dict()
    assert not any(k.startswith(("teacher", "_teacher")) for k in state)
    assert not teacher_ids & {id(v) for v in state.values()}
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert not any("teacher" in name for name, _ in model.named_modules())
    optimizer = build_optimizer(cfg, model)
    opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not teacher_ids & opt_ids
    assert all(not p.requires_grad for p in teacher.parameters())

    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    DetectionCheckpointer(model, save_dir=str(ckpt_dir)).save("m")
    saved = torch.load(os.path.join(ckpt_dir, "m.pth"), weights_only=False)["model"]
    assert set(saved) == set(state)

    model.train()
    assert model.training and not teacher.training
    assert not any(m.training for m in teacher.modules())


def test_teacher_follows_student_device_and_dtype(tmp_path, teacher_files):
    yaml_path, weights, _ = teacher_files
    model = build_model(student_cfg(tmp_path, yaml_path, weights))
    teacher = model.attach_teacher().model
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    model.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


def test_inference_never_builds_the_teacher(tmp_path, teacher_files):
    yaml_path, _, _ = teacher_files
    # the teacher checkpoint does not exist: building and running the student must not care
    model = build_model(student_cfg(tmp_path, yaml_path, str(tmp_path / "absent.pth")))
    model.eval()
    with torch.no_grad():
        out = model(fake_batch(1))
    assert "instances" in out[0]
    assert model._teacher is None


def test_distillation_gradients_reach_student_and_distiller_not_teacher(tmp_path, teacher_files):
    yaml_path, weights, _ = teacher_files
    model = build_model(student_cfg(tmp_path, yaml_path, weights))
    teacher = model.attach_teacher().model
    model.train()
    with EventStorage(0):
        losses = model(fake_batch(2))
    distill = {k: v for k, v in losses.items() if k.startswith("loss_csgr")}
    assert {"loss_csgr_cs_p3", "loss_csgr_gr_p7"} <= set(distill)
    sum(distill.values()).backward()
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.grad is not None]
    assert backbone_grads and any(g.abs().sum() > 0 for g in backbone_grads)
    dparams = dict(model.distillers.named_parameters())
    assert dparams and all(p.grad is not None for p in dparams.values())
    assert all(p.grad is None for p in teacher.parameters())


def test_decay_factor_scales_distill_losses_and_zero_keeps_them(tmp_path, teacher_files):
    yaml_path, weights, _ = teacher_files
    model = build_model(student_cfg(tmp_path, yaml_path, weights))
    model.attach_teacher()
    model.train()
    batch = fake_batch(2)
    with EventStorage(0):
        torch.manual_seed(0)
        full = model(batch)
        model.distill_factor = 0.25
        quarter = model(batch)
        model.distill_factor = 0.0
        zero = model(batch)
    # (detection losses change between calls through RetinaNet's EMA loss normaliser)
    distill_keys = [k for k in full if k.startswith("loss_csgr")]
    assert distill_keys
    for k in distill_keys:
        assert full[k].item() > 0
        assert quarter[k].item() == pytest.approx(0.25 * full[k].item(), rel=1e-4)
        assert zero[k].item() == 0.0 and zero[k].requires_grad


def test_distillation_off_is_plain_retinanet(tmp_path, teacher_files):
    yaml_path, weights, _ = teacher_files
    cfg = student_cfg(tmp_path, yaml_path, weights, enabled=False)
    model = build_model(cfg)
    plain_cfg = cfg.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    assert set(model.state_dict()) == set(build_model(plain_cfg).state_dict())
    model.train()
    with EventStorage(0):
        losses = model(fake_batch(2))
    assert set(losses) == {"loss_cls", "loss_box_reg"}
