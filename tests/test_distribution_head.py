"""DistributionRetinaNet (the box representation LD distils): integral decoding and side targets
on hand cases, Distribution Focal Loss against its formula, the stride table, a GIoU fit that
learns, training/inference/export of the model on the tiny data."""
import math
import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from csgr_distill.layers.box_distribution import (DistributionBoxTransform,
                                                  distribution_focal_loss, integral)
from tiny import base_cfg, fake_batch


pytestmark = pytest.mark.usefixtures("one_thread")


def _one_hot_logits(distances, bins=17, big=50.0):
    """Logits [1, 4 * bins] whose softmax is (almost) one-hot at each side's distance."""
    z = torch.full((4, bins), -big)
    for side, d in enumerate(distances):
        z[side, d] = big
    return z.reshape(1, -1)


def test_integral_is_the_expected_distance():
    z = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0 + 1e-30]]))
    assert math.isclose(float(integral(z)[0]), 0.25 + 0.5, rel_tol=1e-6)  # 0*.5 + 1*.25 + 2*.25
    assert math.isclose(float(integral(torch.zeros(1, 5))[0]), 2.0, rel_tol=1e-6)  # uniform


def test_decoding_a_hand_case():
    # one level, stride 8, anchor size 32 centred at (100, 60); sides 1, 2, 3, 4 strides
    t = DistributionBoxTransform(16, [[32]], [8])
    anchor = torch.tensor([[84.0, 44.0, 116.0, 76.0]])
    box = t.apply_deltas(_one_hot_logits([1, 2, 3, 4]), anchor)
    assert torch.allclose(box, torch.tensor([[100 - 8.0, 60 - 16.0, 100 + 24.0, 60 + 32.0]]))
    # the targets invert the decoding
    assert torch.allclose(t.side_targets(anchor, box), torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    # beyond n: clamped to n - 0.1 (DFL's range, GFL's margin); behind the centre: 0
    far = torch.tensor([[100 - 8 * 30.0, 60 + 1.0, 101.0, 61.0]])
    assert torch.allclose(t.side_targets(anchor, far), torch.tensor([[15.9, 0.0, 0.125, 0.125]]))
    # just under n (15.95 strides): clamped too, DFL's two bins stay 15 and 16
    near = torch.tensor([[100 - 8 * 15.95, 44.0, 116.0, 76.0]])
    assert math.isclose(float(t.side_targets(anchor, near)[0, 0]), 15.9, rel_tol=1e-6)


def test_stride_is_found_by_anchor_size_on_every_level_and_aspect_ratio():
    sizes = [[32, 40.32, 50.8], [64, 80.63, 101.59], [128, 161.27, 203.19]]
    t = DistributionBoxTransform(16, sizes, [8, 16, 32])
    anchors = []
    expected = []
    for level_sizes, stride in zip(sizes, [8, 16, 32]):
        for size in level_sizes:
            for ratio in (0.5, 1.0, 2.0):  # h / w, area kept
                w = size / math.sqrt(ratio)
                h = size * math.sqrt(ratio)
                anchors.append([-w / 2, -h / 2, w / 2, h / 2])
                expected.append(stride)
    assert t.strides_of(torch.tensor(anchors)).tolist() == expected
    with pytest.raises(ValueError, match="MODEL.ANCHOR_GENERATOR.SIZES"):
        DistributionBoxTransform(16, [[32], [32]], [8, 16])
    with pytest.raises(ValueError, match="REG_MAX must be >= 1"):
        DistributionBoxTransform(0, [[32]], [8])


def test_distribution_focal_loss_against_its_formula():
    z = torch.tensor([[0.2, 1.0, -0.5, 0.3], [2.0, 0.0, 0.0, 1.0]])
    y = torch.tensor([1.25, 0.0])
    logp = torch.log_softmax(z, dim=1)
    expected = [-(0.75 * logp[0, 1] + 0.25 * logp[0, 2]), -(1.0 * logp[1, 0])]
    assert torch.allclose(distribution_focal_loss(z, y), torch.stack(expected))


def test_giou_fit_through_the_distribution_learns():
    """Gradient descent on one anchor's logits brings its decoded box onto the target."""
    from fvcore.nn import giou_loss
    t = DistributionBoxTransform(16, [[32]], [8])
    anchor = torch.tensor([[84.0, 44.0, 116.0, 76.0]])
    target = torch.tensor([[70.0, 50.0, 130.0, 100.0]])
    logits = torch.zeros(1, 68, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=2.0)
    first = None
    for _ in range(300):
        loss = giou_loss(t.apply_deltas(logits, anchor), target, reduction="sum")
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 0.3 and float(loss) < 0.02


def _cfg(tmp_path, meta="DistributionRetinaNet"):
    cfg = base_cfg(tmp_path)
    cfg.MODEL.META_ARCHITECTURE = meta
    cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "giou"
    return cfg


def test_model_trains_with_giou_and_dfl_and_predicts(tmp_path):
    torch.manual_seed(0)
    model = build_model(_cfg(tmp_path))
    a = model.anchor_generator.num_cell_anchors[0]
    assert model.head.bbox_pred.out_channels == a * 4 * 17
    model.train()
    with EventStorage(0):
        losses = model(fake_batch())
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_dfl"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.head.bbox_pred.weight.grad.abs().sum() > 0
    model.eval()
    model.test_score_thresh = 0.0
    with torch.no_grad():
        inst = model(fake_batch(n=1))[0]["instances"]
    assert len(inst) > 0 and torch.isfinite(inst.pred_boxes.tensor).all()


def test_dfl_weight_zero_and_wrong_loss_type(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.MODEL.RETINANET.DFL_WEIGHT = 0.0
    model = build_model(cfg).train()
    with EventStorage(0):
        assert "loss_dfl" not in model(fake_batch())
    cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "smooth_l1"
    with pytest.raises(ValueError, match="BBOX_REG_LOSS_TYPE 'giou'"):
        build_model(cfg)


def test_export_and_reload_give_identical_predictions(tmp_path):
    """A DistillDistributionRetinaNet's exported student is a DistributionRetinaNet with its
    REG_MAX/DFL_WEIGHT kept; loaded the way tools/train_net.py loads a config, it predicts what
    the training model predicts."""
    from csgr_distill.cli import load_config
    from csgr_distill.export import StudentCheckpointer, write_student

    cfg = _cfg(tmp_path, meta="DistillDistributionRetinaNet")
    cfg.MODEL.RETINANET.REG_MAX = 8
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.test_score_thresh = 0.0
    counts = write_student(model.state_dict(), str(tmp_path / "student.pth"), cfg)
    plain = load_config(counts["config"])
    assert plain.MODEL.META_ARCHITECTURE == "DistributionRetinaNet"
    assert plain.MODEL.RETINANET.REG_MAX == 8 and "DISTILL" not in open(counts["config"]).read()
    reloaded = build_model(plain).eval()
    StudentCheckpointer(reloaded).load(plain.MODEL.WEIGHTS)
    reloaded.test_score_thresh = 0.0
    batch = fake_batch(n=1)
    with torch.no_grad():
        a, b = model(batch)[0]["instances"], reloaded(batch)[0]["instances"]
    assert len(a) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("config, dfl", [
    ("configs/demo/teacher-RetinaNet-Dist-R18-wide.yaml", True),
    ("configs/demo/student-RetinaNet-Dist-R18.yaml", False)])
def test_demo_distribution_configs_train_two_iterations(tmp_path, tiny_shapes, config, dfl):
    """The demo teacher trains with DFL 0.25; the demo student, as LD's RetinaNet recipe, without
    (docs/methods/LD.md)."""
    import json
    import sys
    from tiny import REPO, TINY_TRAIN
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_net

    train_net.cli(["--config-file", os.path.join(REPO, config), "DATASETS.TRAIN",
                   f"('{TINY_TRAIN}',)", "DATASETS.TEST", "()", "INPUT.FIXED_SIZE", "64",
                   "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS",
                   "0", "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(tmp_path)])
    with open(tmp_path / "metrics.json") as f:
        keys = set().union(*[json.loads(line) for line in f if line.strip()])
    assert {"loss_cls", "loss_box_reg"} <= keys and ("loss_dfl" in keys) == dfl
