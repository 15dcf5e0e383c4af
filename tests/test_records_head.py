"""The dense family's head fields (records/dense.py): ``head_towers``, the towers' activations
stage by stage, captured from the student's own training forward (no second pass) and computed in
the teacher's pass only when asked; ``head_from``, the head run from a stage on: on a record's own
stage-k activations it gives back the record's own logits and deltas exactly, for RetinaNet with
and without the per-level BatchNorm and for DistributionRetinaNet; the teacher's is
differentiable with respect to its inputs while its frozen parameters get no gradient."""
import pytest
import torch
from detectron2.layers import CycleBatchNormList
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from csgr_distill.records import recorder_for
from csgr_distill.records.dense import DenseHeadFrom, tower_blocks
from csgr_distill.teacher import FrozenTeacher
from tiny import base_cfg, fake_batch

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD_FIELDS = ("cls_logits", "box_deltas", "head_towers", "head_from")


def _cfg(tmp_path, meta="RetinaNet", norm="BN", convs=2):
    cfg = base_cfg(tmp_path / "m")
    cfg.MODEL.META_ARCHITECTURE = meta
    cfg.MODEL.RETINANET.NORM = norm
    cfg.MODEL.RETINANET.NUM_CONVS = convs
    if "Distribution" in meta:
        cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "giou"
    return cfg


def _model(cfg, seed=0):
    """A model with every head layer drawn at unit gain and distinct per-level BatchNorm
    statistics (detectron2 starts the head at std 0.01: every logit would be its prior)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    for m in model.head.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.normal_(m.bias, std=0.1)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def _student_record(model, batch, fields=HEAD_FIELDS):
    """The student's record of one training forward (the hooks a Distill* model installs),
    and that forward's losses."""
    recorder = recorder_for(model)
    model.train()
    with EventStorage(0), model_recording(model, recorder, fields) as captured:
        losses = model(batch)
    return recorder.from_hooks(model, captured, batch, fields), losses


def model_recording(model, recorder, fields):
    from csgr_distill.meta_arch.base import DistillMixin

    return DistillMixin._recording(model, recorder.hook_modules(model, fields),
                                   recorder.capture_methods(model, fields))


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("meta,norm", [("RetinaNet", "BN"), ("RetinaNet", ""),
                                       ("DistributionRetinaNet", "BN")])
def test_student_towers_from_its_forward_give_back_its_outputs_from_every_stage(
        tmp_path, meta, norm):
    model = _model(_cfg(tmp_path, meta, norm, convs=2))
    batch = fake_batch(2)
    rec, losses = _student_record(model, batch)
    assert losses["loss_cls"].isfinite()
    towers = rec.head_towers
    assert set(towers) == {"cls", "box"} and len(towers["cls"]) == 3  # stages 0, 1, 2
    levels = model.head_in_features
    # stage 0: the head's input maps themselves
    assert all(towers[t][0][i] is rec.features[f] for t in towers for i, f in enumerate(levels))
    for t in towers:
        for stage in towers[t]:
            assert len(stage) == len(levels)
            assert [x.shape[1] for x in stage] == [16] * len(levels)
            assert all(x.requires_grad for x in stage)  # the student's graph
    if norm:  # the pre-activation map: negative values remain (after BN, before the ReLU)
        assert (towers["cls"][1][0] < 0).any()
    head_from = rec.head_from
    assert isinstance(head_from, DenseHeadFrom) and head_from.num_convs == 2
    for k in range(3):
        logits, deltas = head_from(k, towers["cls"][k], towers["box"][k])
        _assert_same(logits, rec.cls_logits)
        _assert_same(deltas, rec.box_deltas)
    logits, deltas = head_from(1, towers["cls"][1], None)
    assert deltas is None
    _assert_same(logits, rec.cls_logits)


@pytest.mark.parametrize("meta", ["RetinaNet", "DistributionRetinaNet"])
def test_teacher_pass_records_the_towers_and_gives_back_its_outputs(tmp_path, meta):
    """The teacher's own pass (eval mode, per-level BatchNorm with distinct statistics); the
    towers are the ones the head's own forward computes."""
    teacher = FrozenTeacher(_model(_cfg(tmp_path, meta, "BN", convs=3), seed=1), None).model
    batch = fake_batch(2)
    images = teacher.preprocess_image(batch)
    with torch.no_grad():
        rec = recorder_for(teacher).record(teacher, images, batch, HEAD_FIELDS)
        feats = teacher.backbone(images.tensor)
        own_logits, own_deltas = teacher.head([feats[f] for f in teacher.head_in_features])
    _assert_same(rec.cls_logits, own_logits)
    _assert_same(rec.box_deltas, own_deltas)
    # stage 2 of the class tower by hand: its third layer group (conv 2 + norm at each level)
    subnet = teacher.head.cls_subnet
    for i, f in enumerate(teacher.head_in_features):
        x = feats[f]
        norm = subnet[1]
        norm._pos = i
        x = subnet[2](norm(subnet[0](x)))
        subnet[4]._pos = i
        assert torch.equal(rec.head_towers["cls"][2][i], subnet[4](subnet[3](x)))
    for k in range(4):
        logits, deltas = rec.head_from(k, rec.head_towers["cls"][k], rec.head_towers["box"][k])
        _assert_same(logits, own_logits)
        _assert_same(deltas, own_deltas)
    # each level's own BatchNorm statistics whatever state a cycling norm was left in (a call
    # interrupted midway): the level, not the call count, picks them
    for m in teacher.head.modules():
        if isinstance(m, CycleBatchNormList):
            m._pos = 3
    logits, deltas = rec.head_from(1, rec.head_towers["cls"][1], rec.head_towers["box"][1])
    _assert_same(logits, own_logits)
    _assert_same(deltas, own_deltas)


def test_teachers_head_from_is_differentiable_in_its_input_not_its_parameters(tmp_path):
    teacher = FrozenTeacher(_model(_cfg(tmp_path, "RetinaNet", "BN", convs=3), seed=1),
                            None).model
    batch = fake_batch(2)
    with torch.no_grad():  # as the teacher runs in training
        rec = recorder_for(teacher).record(teacher, teacher.preprocess_image(batch), batch,
                                           ("head_towers", "head_from"))
    assert not any(p.requires_grad for p in teacher.parameters())
    # a student's stage-2 maps (leaves here) through the teacher's third conv and predictors
    cls = [x.detach().clone().requires_grad_(True) for x in rec.head_towers["cls"][2]]
    box = [x.detach().clone().requires_grad_(True) for x in rec.head_towers["box"][2]]
    logits, deltas = rec.head_from(2, cls, box)
    (sum(x.square().sum() for x in logits) + sum(x.square().sum() for x in deltas)).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in cls + box)
    assert all(p.grad is None for p in teacher.parameters())
    # the gradient is the one of the teacher's layers: a finite-difference check on one value
    x0 = cls[0].detach().clone()
    idx = (0, 3, 1, 1)
    eps = 1e-3
    with torch.no_grad():
        def value(x):
            out, _ = rec.head_from(2, [x] + [c.detach() for c in cls[1:]], None)
            return sum(v.square().sum() for v in out)
        up, down = x0.clone(), x0.clone()
        up[idx] += eps
        down[idx] -= eps
        numeric = (value(up) - value(down)) / (2 * eps)
    assert float(cls[0].grad[idx]) == pytest.approx(float(numeric), rel=2e-2, abs=1e-3)


def test_teacher_computes_the_head_fields_only_when_asked(tmp_path):
    teacher = FrozenTeacher(_model(_cfg(tmp_path, "RetinaNet", "BN", convs=2)), None).model
    calls = []
    teacher.head.cls_subnet[0].register_forward_hook(lambda *_: calls.append("cls"))
    teacher.head.bbox_subnet[0].register_forward_hook(lambda *_: calls.append("box"))
    batch = fake_batch(2)
    images = teacher.preprocess_image(batch)
    recorder = recorder_for(teacher)
    with torch.no_grad():
        rec = recorder.record(teacher, images, batch, ("cls_logits",))
        assert "head_towers" not in rec and "head_from" not in rec
        assert calls.count("box") == 0
        calls.clear()
        rec = recorder.record(teacher, images, batch, ("head_from",))
        assert calls == [] and "head_towers" not in rec  # the callable alone runs nothing
        rec = recorder.record(teacher, images, batch, ("head_towers",))
        assert calls.count("cls") == 5 and calls.count("box") == 5  # one pass per level
        assert "cls_logits" not in rec and "head_from" not in rec


def test_student_hooks_the_tower_layers_only_when_asked(tmp_path):
    model = _model(_cfg(tmp_path, "RetinaNet", "BN", convs=2))
    recorder = recorder_for(model)
    assert set(recorder.hook_modules(model, ("cls_logits",))) == {"backbone", "head"}
    hooked = recorder.hook_modules(model, ("head_towers",))
    blocks = tower_blocks(model.head)
    assert [hooked[f"head_towers_cls_{k}"] for k in (1, 2)] == [b[0][-1] for b in blocks["cls"]]
    assert hooked["head_towers_box_1"] is model.head.bbox_subnet[1]  # the norm, before the ReLU


def test_towers_that_are_not_conv_blocks_are_refused(tmp_path):
    model = _model(_cfg(tmp_path, "RetinaNet", "", convs=1))
    model.head.cls_subnet[1] = torch.nn.ReLU(inplace=True)
    with pytest.raises(ValueError, match="in-place activation"):
        recorder_for(model).hook_modules(model, ("head_towers",))
    model.head.cls_subnet.append(torch.nn.Conv2d(16, 16, 3, padding=1))
    with pytest.raises(ValueError, match=r"ends with .* after its last activation"):
        tower_blocks(model.head)
    del model.head.cls_score
    with pytest.raises(ValueError, match="need a RetinaNet-style head"):
        tower_blocks(model.head)
