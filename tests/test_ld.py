"""LD (shared/methods/LD.md) against hand-computed cases: the KL over bins with temperature (mean,
not sum), DIoU, the VLR on a toy anchor set with two overlapping GTs, main-LD weighting and main-KD
normalisation on a hand-made record, the recorded assignment, build-time refusals, and 2-iteration
runs of the LD configs through tools/train_net.py."""
import math
import os
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torchvision.ops import box_iou, distance_box_iou

from csgr_distill.config import load_config
from csgr_distill.distillers.ld import LDDistiller, bin_kl, pairwise_diou, vlr_region
from csgr_distill.outputs import DetectorOutputs
from tiny import REPO, base_cfg, fake_batch, logged_keys, train_opts, write_model


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bin_kl_is_the_mean_over_bins_with_temperature():
    s = torch.tensor([[0.3, -1.0, 2.0, 0.0]])
    t = torch.tensor([[1.0, 0.5, -0.5, 0.2]])
    tau = 3.0
    ps = [math.exp(v / tau) for v in s[0].tolist()]
    pt = [math.exp(v / tau) for v in t[0].tolist()]
    ps, pt = [v / sum(ps) for v in ps], [v / sum(pt) for v in pt]
    expected = tau ** 2 * sum(b * math.log(b / a) for a, b in zip(ps, pt)) / 4  # mean, not sum
    assert math.isclose(float(bin_kl(s, t, tau)[0]), expected, rel_tol=1e-6)
    assert float(bin_kl(t, t, tau)[0]) == pytest.approx(0.0, abs=1e-7)


def test_diou_matches_torchvision():
    g = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 20.0]])
    a = torch.tensor([[1.0, 2.0, 12.0, 9.0], [20.0, 20.0, 40.0, 50.0], [0.0, 0.0, 10.0, 10.0]])
    assert torch.allclose(pairwise_diou(g, a), distance_box_iou(g, a), atol=1e-6)


def test_vlr_on_two_overlapping_gts():
    # one level, anchors of size 12 on a 4 px grid over a 40 x 20 area
    xs, ys = torch.meshgrid(torch.arange(0, 29, 4.0), torch.arange(0, 9, 4.0), indexing="xy")
    anchors = torch.stack([xs.flatten(), ys.flatten(), xs.flatten() + 12, ys.flatten() + 12], 1)
    gts = torch.tensor([[0.0, 0.0, 20.0, 20.0], [10.0, 0.0, 30.0, 20.0]])
    region, value = vlr_region([anchors], gts, topk=4, low=0.25)
    iou = box_iou(gts, anchors)
    diou = distance_box_iou(gts, anchors)
    # t_g by hand: mean + unbiased std of the 4 candidates nearest each GT's centre
    expected_region = torch.zeros(len(anchors), dtype=torch.bool)
    expected_value = torch.zeros(len(anchors))
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    claims = []
    for g in range(2):
        c = (gts[g, :2] + gts[g, 2:]) / 2
        near = ((centres - c) ** 2).sum(1).argsort()[:4]
        t = iou[g, near].mean() + iou[g, near].std()
        claims.append((diou[g] >= 0.25 * t) & (diou[g] < t))
    for a in range(len(anchors)):
        owners = [g for g in range(2) if claims[g][a]]
        if owners:
            best = max(owners, key=lambda g: float(iou[g, a]))
            expected_region[a], expected_value[a] = True, iou[best, a]
    assert torch.equal(region, expected_region) and torch.allclose(value, expected_value)
    # an anchor both GTs claim keeps the larger IoU
    both = claims[0] & claims[1] & (iou[0] != iou[1])
    assert both.any()
    assert torch.allclose(value[both], iou[:, both].max(0).values)
    # no GT: empty region
    region, value = vlr_region([anchors], torch.zeros(0, 4))
    assert not region.any() and not value.any()


def _record(cls_logits, box_logits, anchors=None, labels=None):
    """A one-level record with A = 1 anchor per cell on a 1 x R grid."""
    n, r, _ = cls_logits.shape
    fields = dict(cls_logits=[cls_logits.permute(0, 2, 1).reshape(n, -1, 1, r)],
                  box_deltas=[box_logits.permute(0, 2, 1).reshape(n, -1, 1, r)],
                  features={}, feature_names=["p3"])
    if anchors is not None:
        fields.update(anchors=[Boxes(anchors)], anchor_labels=list(labels))
    return DetectorOutputs("dense", [(64, 64)] * n, (64, 64), **fields)


def _ld(**kw):
    args = dict(num_classes=2, reg_max=3, ld_weight=1.0, ld_temperature=2.0, vlr_weight=0.0,
                vlr_exclude_positives=True, vlr_topk=9, vlr_low=0.25, kd_weight=1.0,
                kd_temperature=4.0)
    args.update(kw)
    return LDDistiller(**args)


def test_main_ld_weighting_and_main_kd_normalisation():
    torch.manual_seed(0)
    r, k, bins = 5, 2, 4
    s_cls, t_cls = torch.randn(1, r, k), torch.randn(1, r, k)
    s_box, t_box = torch.randn(1, r, 4 * bins), torch.randn(1, r, 4 * bins)
    anchors = torch.tensor([[0.0, 0, 8, 8]] * r)
    labels = [torch.tensor([0, 2, 1, -1, 2])]  # positives: anchors 0 and 2 (K = 2: background)
    gt = Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)))
    losses = _ld()(_record(s_cls, s_box, anchors, labels), _record(t_cls, t_box), [gt])
    pos = [0, 2]
    w = torch.sigmoid(s_cls[0, pos]).max(1).values
    kl = bin_kl(s_box[0, pos].reshape(-1, bins), t_box[0, pos].reshape(-1, bins), 2.0)
    expected_ld = float((kl.reshape(2, 4) * w[:, None]).sum() / 4)
    assert math.isclose(float(losses["loss_ld"]), expected_ld, rel_tol=1e-5)
    expected_kd = float(bin_kl(s_cls[0, pos], t_cls[0, pos], 4.0).sum() / 2)
    assert math.isclose(float(losses["loss_ld_kd"]), expected_kd, rel_tol=1e-5)
    assert "loss_ld_vlr" not in losses
    # gradients reach the student's logits, the weights are not differentiated
    s_cls.requires_grad_(True)
    s_box.requires_grad_(True)
    losses = _ld()(_record(s_cls, s_box, anchors, labels), _record(t_cls, t_box), [gt])
    losses["loss_ld"].backward()
    assert s_box.grad.abs().sum() > 0 and s_cls.grad is None


def test_vlr_term_excludes_positives_in_the_retinanet_recipe():
    torch.manual_seed(1)
    xs = torch.arange(0, 40, 4.0)
    anchors = torch.stack([xs, torch.zeros(10), xs + 12, torch.full((10,), 12.0)], 1)
    gt = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[8.0, 0.0, 22.0, 12.0]])))
    region, value = vlr_region([anchors], gt.gt_boxes.tensor)
    assert region.sum() >= 2
    first = int(torch.nonzero(region)[0])
    labels = torch.full((10,), 2)
    labels[first] = 0  # a positive inside the region
    s_box, t_box = torch.randn(1, 10, 16), torch.randn(1, 10, 16)
    cls = torch.zeros(1, 10, 2)

    def vlr(exclude):
        d = _ld(ld_weight=0.0, kd_weight=0.0, vlr_weight=1.0, vlr_exclude_positives=exclude)
        return float(d(_record(cls, s_box, anchors, [labels]), _record(cls, t_box), [gt])
                     ["loss_ld_vlr"])

    kl = bin_kl(s_box[0].reshape(-1, 4), t_box[0].reshape(-1, 4), 2.0).reshape(10, 4).sum(1)
    keep = region.clone()
    assert math.isclose(vlr(False), float((kl * value)[keep].sum() / 4), rel_tol=1e-5)
    keep[first] = False
    assert math.isclose(vlr(True), float((kl * value)[keep].sum() / 4), rel_tol=1e-5)


def _dist_cfg(out, meta, fpn=16):
    cfg = base_cfg(out, fpn_channels=fpn)
    cfg.MODEL.META_ARCHITECTURE = meta
    cfg.MODEL.RETINANET.BBOX_REG_LOSS_TYPE = "giou"
    return cfg


@pytest.fixture(scope="module")
def dist_teacher(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ld_teacher")
    return write_model(tmp, _dist_cfg(tmp / "t", "DistributionRetinaNet", fpn=32), "teacher")[:2]


def _student(tmp_path, teacher, methods=("LD",)):
    cfg = _dist_cfg(tmp_path / "s", "DistillDistributionRetinaNet")
    cfg.MODEL.DISTILL.ENABLED = True
    cfg.MODEL.DISTILL.METHODS = list(methods)
    cfg.MODEL.DISTILL.TEACHER.CONFIG, cfg.MODEL.DISTILL.TEACHER.WEIGHTS = teacher
    return cfg


def test_the_students_own_assignment_is_recorded(tmp_path, tiny_shapes, dist_teacher):
    model = build_model(_student(tmp_path, dist_teacher)).train()
    seen = {}
    forward = model.distillers["LD"].forward

    def spy(student, teacher, gt):
        seen["student"] = student
        return forward(student, teacher, gt)

    model.distillers["LD"].forward = spy
    batch = fake_batch()
    with EventStorage(0):
        losses = model(batch)
    assert {"loss_ld", "loss_ld_vlr", "loss_ld_kd", "loss_dfl"} <= set(losses)
    rec = seen["student"]
    labels, boxes = model.label_anchors(rec.anchors, [x["instances"] for x in batch])
    assert all(torch.equal(a, b) for a, b in zip(rec.anchor_labels, labels))
    assert all(torch.equal(a, b) for a, b in zip(rec.anchor_gt_boxes, boxes))


def test_ld_refuses_a_delta_head_and_other_bins(tmp_path, dist_teacher):
    cfg = _student(tmp_path, dist_teacher)
    cfg.MODEL.META_ARCHITECTURE = "DistillRetinaNet"
    with pytest.raises(ValueError, match="the student must be a DistributionRetinaNet"):
        build_model(cfg)
    cfg = _student(tmp_path, dist_teacher)
    cfg.MODEL.RETINANET.REG_MAX = 8
    with pytest.raises(ValueError, match="REG_MAX is 8 in the student and 16 in the teacher"):
        build_model(cfg)


@pytest.mark.parametrize("methods", [["LD"], ["CSGR", "LD"], ["FGD", "LD"]])
def test_demo_ld_config_and_combinations_train_two_iterations(tmp_path, tiny_shapes, methods):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import train_net

    teacher_yaml = os.path.join(REPO, "configs/demo/teacher-RetinaNet-Dist-R18-wide.yaml")
    _, weights, _ = write_model(tmp_path, load_config(teacher_yaml, check_steps=False), "t")
    train_net.cli(["--config-file", os.path.join(REPO, "configs/demo/LD-RetinaNet-Dist-R18.yaml"),
                   *train_opts(tmp_path / "run"), "MODEL.DISTILL.METHODS", str(methods),
                   "MODEL.DISTILL.TEACHER.CONFIG", teacher_yaml,
                   "MODEL.DISTILL.TEACHER.WEIGHTS", weights])
    keys = logged_keys(tmp_path / "run")
    assert {"loss_ld", "loss_ld_vlr", "loss_ld_kd", "loss_dfl"} <= keys
    for m in methods:
        assert any(k.startswith(f"loss_{m.lower()}_") for k in keys), m


@pytest.mark.parametrize("path", ["configs/LD-RetinaNet-R50.yaml",
                                  "configs/LD-RetinaNet-R50-GFL-recipe.yaml",
                                  "configs/CSGR+LD-RetinaNet-R50.yaml"])
def test_paper_configs_build_with_the_published_recipes(path):
    cfg = load_config(os.path.join(REPO, path), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    ld = model.distillers["LD"]
    assert (ld.ld_weight, ld.ld_temperature, ld.kd_weight, ld.bins) == (0.25, 10.0, 10.0, 17)
    if "GFL" in path:
        assert (ld.vlr_weight, ld.vlr_exclude_positives, ld.kd_temperature) == (0.25, False, 2.0)
    else:
        assert (ld.vlr_weight, ld.vlr_exclude_positives, ld.kd_temperature) == (0.03, True, 8.0)
    assert cfg.DATASETS.TRAIN == ("soda10m_train",)


def test_visualize_draws_ld_regions_and_distributions(tmp_path, tiny_shapes, dist_teacher):
    import cv2
    from detectron2.data import DatasetCatalog
    from tiny import TINY_VAL
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import visualize

    yaml_path, weights, _ = write_model(tmp_path, _student(tmp_path, dist_teacher), "ld")
    written = visualize.main(["--config-file", yaml_path, "--weights", weights, "--output",
                              str(tmp_path / "vis"), "--num-images", "1", "--dataset", TINY_VAL])
    stem = os.path.splitext(os.path.basename(DatasetCatalog.get(TINY_VAL)[0]["file_name"]))[0]
    assert sorted(os.path.basename(p) for p in written) == [f"{stem}_detections.png",
                                                            f"{stem}_ld_regions.png"]
    picture = cv2.imread(written[-1])
    assert picture is not None and picture.shape[1] > 2 * picture.shape[0]


def test_chosen_anchor_is_the_best_scored_positive():
    from csgr_distill.vis import chosen_anchor
    d = {"positive": torch.tensor([False, True, True, False]),
         "weight": torch.tensor([0.9, 0.2, 0.5, 0.8])}
    assert chosen_anchor(d) == 2
    assert chosen_anchor({"positive": torch.zeros(3, dtype=torch.bool),
                          "weight": torch.ones(3)}) == -1
