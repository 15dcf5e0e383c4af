"""LD (docs/methods/LD.md) against hand-computed cases: the KL over bins with temperature (mean,
not sum), one softmax per side or per anchor, DIoU, the VLR on a toy anchor set with two
overlapping GTs, main-LD weighting, the VLR normaliser and main-KD normalisation per level on
hand-made records, parity with the released code's formulas (HikariTJU/LD's LDHead and
LDRetinaHead, re-implemented here level by level) on random float64 tensors for both recipes,
the recorded assignment, build-time refusals, and 2-iteration runs of the LD configs through
tools/train_net.py. ``python tests/test_ld.py`` prints the sizes quoted in docs/methods/LD.md."""
import math
import os
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torchvision.ops import box_iou, distance_box_iou

from csgr_distill.cli import load_config
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
    return _levels_record([cls_logits], [box_logits], None if anchors is None else [anchors],
                          labels)


def _levels_record(cls_levels, box_levels, anchors=None, labels=None):
    """A record from per-level ``[N, R_l, K]`` / ``[N, R_l, 4 (n + 1)]`` logits, A = 1 anchor per
    cell on a 1 x R_l grid per level; ``anchors`` per level ``[R_l, 4]``, ``labels`` per image
    ``[sum R_l]``."""
    def maps(x):
        n, r, c = x.shape
        return x.permute(0, 2, 1).reshape(n, c, 1, r)

    n = cls_levels[0].shape[0]
    fields = dict(cls_logits=[maps(x) for x in cls_levels],
                  box_deltas=[maps(x) for x in box_levels], features={},
                  feature_names=[f"p{3 + i}" for i in range(len(cls_levels))])
    if anchors is not None:
        fields.update(anchors=[Boxes(a) for a in anchors], anchor_labels=list(labels))
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


def test_main_kd_divides_each_level_by_its_own_positives():
    """Two positives on p3, one on p4 (K = 2, tau = 2, student logits 0: q uniform). Teacher
    softmaxes at tau: (3/4, 1/4), (1/2, 1/2) on p3 and (1/8, 7/8) on p4, so with the mean over
    the 2 classes ``kd = tau^2 / 2 * sum_c p_c ln(2 p_c)``. Released code: p3's sum / 2 + p4's
    sum / 1 = 0.7636; all positives at once (``"all"``, the earlier formula): / 3 = 0.2981."""
    tau = 2.0
    kd = [tau ** 2 / 2 * sum(p * math.log(2 * p) for p in probs)
          for probs in ((0.75, 0.25), (0.5, 0.5), (1 / 8, 7 / 8))]
    per_level = (kd[0] + kd[1]) / 2 + kd[2] / 1
    assert math.isclose(per_level, 0.763566, rel_tol=1e-5)

    def logits(p):  # teacher logits whose softmax at tau is p
        return [tau * math.log(v) for v in p]

    t_p3 = torch.tensor([[logits((0.75, 0.25)), logits((0.5, 0.5)), [0.0, 0.0]]])
    t_p4 = torch.tensor([[logits((1 / 8, 7 / 8))]])
    s_p3, s_p4 = torch.zeros(1, 3, 2), torch.zeros(1, 1, 2)
    box = [torch.zeros(1, 3, 16), torch.zeros(1, 1, 16)]
    anchors = [torch.tensor([[0.0, 0, 8, 8]] * 3), torch.tensor([[0.0, 0, 16, 16]])]
    labels = [torch.tensor([1, 0, 2, 1])]  # p3: two positives and background; p4: a positive
    gt = Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)))
    student = _levels_record([s_p3, s_p4], box, anchors, labels)
    teacher = _levels_record([t_p3, t_p4], box)

    def kd_loss(normalizer):
        d = _ld(ld_weight=0.0, kd_temperature=tau, kd_normalizer=normalizer)
        return float(d(student, teacher, [gt])["loss_ld_kd"])

    assert math.isclose(kd_loss("level"), per_level, rel_tol=1e-5)
    assert math.isclose(kd_loss("all"), sum(kd) / 3, rel_tol=1e-5)
    assert math.isclose(sum(kd) / 3, 0.298126, rel_tol=1e-5)


def test_ld_softmax_per_side_or_over_the_whole_anchor():
    """n = 1 (2 bins per side, 8 logits per anchor), one positive, student logits 0 (weight
    sigmoid(0) = 1/2, q uniform), tau = 2; the teacher's 8 logits make ``softmax(t / tau)`` over
    the anchor ``(1, 1, 1, 1, 1, 1, 1, 9) / 16``. Per side: sides 1-3 are uniform (KL 0), side 4
    is (0.1, 0.9) -> ``tau^2 / 2 (0.1 ln 0.2 + 0.9 ln 1.8)``; over the anchor: ``tau^2 / 8 (7/16
    ln 0.5 + 9/16 ln 4.5)``. Both times weight / 4."""
    tau = 2.0
    t_box = torch.tensor([[[0.0] * 7 + [tau * math.log(9)]]])
    s_box, cls = torch.zeros(1, 1, 8), torch.zeros(1, 1, 2)
    labels = [torch.tensor([0])]
    gt = Instances((64, 64), gt_boxes=Boxes(torch.zeros(0, 4)))
    side = tau ** 2 / 2 * (0.1 * math.log(0.2) + 0.9 * math.log(1.8))
    anchor = tau ** 2 / 8 * (7 / 16 * math.log(0.5) + 9 / 16 * math.log(4.5))
    for mode, kl in (("side", side), ("anchor", anchor)):
        d = _ld(reg_max=1, ld_temperature=tau, kd_weight=0.0, softmax_over=mode)
        loss = d(_record(cls, s_box, torch.tensor([[0.0, 0, 8, 8]]), labels), _record(cls, t_box),
                 [gt])["loss_ld"]
        assert math.isclose(float(loss), 0.5 * kl / 4, rel_tol=1e-5), mode


@pytest.mark.parametrize("normalizer", [16.0, 4.0])
def test_vlr_term_excludes_positives_and_divides_by_its_normaliser(normalizer):
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
        d = _ld(ld_weight=0.0, kd_weight=0.0, vlr_weight=1.0, vlr_exclude_positives=exclude,
                vlr_normalizer=normalizer)
        return float(d(_record(cls, s_box, anchors, [labels]), _record(cls, t_box), [gt])
                     ["loss_ld_vlr"])

    kl = bin_kl(s_box[0].reshape(-1, 4), t_box[0].reshape(-1, 4), 2.0).reshape(10, 4).sum(1)
    keep = region.clone()
    assert math.isclose(vlr(False), float((kl * value)[keep].sum()) / normalizer, rel_tol=1e-5)
    keep[first] = False
    assert math.isclose(vlr(True), float((kl * value)[keep].sum()) / normalizer, rel_tol=1e-5)


def test_defaults_are_the_gfl_recipe_of_the_released_code():
    from csgr_distill.config import add_distill_config
    from detectron2.config import get_cfg
    cfg = get_cfg()
    add_distill_config(cfg)
    c = cfg.MODEL.DISTILL.LD
    assert (c.SOFTMAX_OVER, c.LD_WEIGHT, c.LD_TEMPERATURE) == ("side", 0.25, 10.0)
    assert (c.VLR_WEIGHT, c.VLR_EXCLUDE_POSITIVES, c.VLR_NORMALIZER) == (0.25, False, 16.0)
    assert (c.KD_WEIGHT, c.KD_TEMPERATURE, c.KD_NORMALIZER) == (10.0, 2.0, "level")
    assert c.VLR_DIOU == "paper"  # not the released helper's: docs/methods/LD.md


@pytest.mark.parametrize("kw, match", [
    ({"softmax_over": "bins"}, "SOFTMAX_OVER must be one of"),
    ({"kd_normalizer": "image"}, "KD_NORMALIZER must be one of"),
    ({"vlr_normalizer": 0.0}, "VLR_NORMALIZER must be > 0"),
    ({"vlr_diou": "giou"}, "VLR_DIOU must be one of")])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _ld(**kw)


# ---- parity with the released code (HikariTJU/LD, mmdet 2.x), re-implemented -------------
# Written from LDHead.loss_single / LDRetinaHead.loss_single, KnowledgeDistillationKLDivLoss and
# the assigners' VLR (assign_neg / get_vlr_region): level by level, on mmdet's per-level layout
# (``[N, A C, H, W]`` maps flattened to ``[N H W A, C]``; labels K for background and ignored).
def _released_kl(pred: torch.Tensor, soft: torch.Tensor, tau: float) -> torch.Tensor:
    """knowledge_distillation_kl_div_loss: ``[M, B]`` -> ``[M]``, mean over B, times tau^2."""
    target = torch.softmax(soft / tau, dim=1)
    return (target * (target.log() - torch.log_softmax(pred / tau, dim=1))).mean(1) * tau * tau


def _flat(x, c):
    return x.permute(0, 2, 3, 1).reshape(-1, c)


def released_gfl_head_terms(s_cls, s_box, t_cls, t_box, labels, vlr, k, bins):
    """LDHead (GFL recipe, configs/ld/ld_r50_gflv1_r101_fpn_coco_1x.py): per level, LD 0.25 at
    T 10 on the positives' sides (17-bin rows) weighted by the max sigmoid score, / 4; VLR 0.25
    at T 10 on ``vlr > 0`` (positives included) weighted by the IoU, / 16; KD 10 at T 2 on the
    positives, / the level's positives; the levels summed."""
    ld = vlr_loss = kd = 0.0
    for sc, sb, tc, tb, lab, v in zip(s_cls, s_box, t_cls, t_box, labels, vlr):
        sc, tc, sb, tb = _flat(sc, k), _flat(tc, k), _flat(sb, 4 * bins), _flat(tb, 4 * bins)
        lab, v = lab.reshape(-1), v.reshape(-1)
        pos = ((lab >= 0) & (lab < k)).nonzero().squeeze(1)
        if len(pos) > 0:
            w = sc.detach().sigmoid().max(dim=1)[0][pos]
            rows = _released_kl(sb[pos].reshape(-1, bins), tb[pos].reshape(-1, bins), 10.0)
            ld = ld + 0.25 * (rows * w[:, None].expand(-1, 4).reshape(-1)).sum() / 4.0
            kd = kd + 10.0 * _released_kl(sc[pos], tc[pos], 2.0).sum() / pos.shape[0]
        remain = (v > 0).nonzero().squeeze(1)
        if len(remain) > 0:
            rows = _released_kl(sb[remain].reshape(-1, bins), tb[remain].reshape(-1, bins), 10.0)
            vlr_loss = vlr_loss + 0.25 * (rows * v[remain][:, None].expand(-1, 4).reshape(-1)
                                          ).sum() / 16.0
    return {"loss_ld": ld, "loss_ld_vlr": vlr_loss, "loss_ld_kd": kd}


def released_retina_head_terms(s_cls, s_box, t_cls, t_box, labels, vlr, k, bins):
    """LDRetinaHead (RetinaNet recipe, configs/ld/ld_retina_r50_1x.py): per level, each anchor's
    4 (n + 1) logits one row; LD 5 at T 10 weighted by max sigmoid score x positive, / 4; VLR
    0.03 x 5 weighted by the IoU with the positives zeroed, / 4; KD 10 at T 8 on the positives,
    / the level's positives; the levels summed."""
    ld = vlr_loss = kd = 0.0
    for sc, sb, tc, tb, lab, v in zip(s_cls, s_box, t_cls, t_box, labels, vlr):
        sc, tc, sb, tb = _flat(sc, k), _flat(tc, k), _flat(sb, 4 * bins), _flat(tb, 4 * bins)
        lab = lab.reshape(-1)
        bbox_weight = ((lab >= 0) & (lab < k)).to(sc.dtype)
        pos_weights = sc.detach().sigmoid().max(dim=1)[0] * bbox_weight
        neg_weights = v.reshape(-1).clone()
        neg_weights[lab != k] = 0
        rows = _released_kl(sb, tb, 10.0)
        ld = ld + 5.0 * (rows * pos_weights).sum() / 4
        vlr_loss = vlr_loss + 0.03 * 5.0 * (rows * neg_weights).sum() / 4
        pos = (bbox_weight == 1).nonzero().squeeze(1)
        if len(pos) > 0:
            kd = kd + 10.0 * _released_kl(sc[pos], tc[pos], 8.0).sum() / pos.shape[0]
    return {"loss_ld": ld, "loss_ld_vlr": vlr_loss, "loss_ld_kd": kd}


def _overlaps(anchors, gt, mode):
    """``[R, 4]``, ``[G, 4]`` -> ``[R, G]``: ``"iou"``; ``"diou"`` the true DIoU; ``"released
    diou"`` what the released ``bbox_overlaps(..., mode='diou')`` computes: the intersection
    over the *anchor's* area (its union is ``area1`` outside 'iou'/'giou') minus the distance
    term."""
    lt = torch.max(anchors[:, None, :2], gt[None, :, :2])
    rb = torch.min(anchors[:, None, 2:], gt[None, :, 2:])
    overlap = (rb - lt).clamp(min=0).prod(-1)
    area_a = (anchors[:, 2:] - anchors[:, :2]).prod(-1)[:, None]
    area_g = (gt[:, 2:] - gt[:, :2]).prod(-1)[None]
    union = area_a.expand_as(overlap) if mode == "released diou" else area_a + area_g - overlap
    ious = overlap / union.clamp(min=1e-6)
    if mode == "iou":
        return ious
    rho2 = (((gt[None, :, :2] + gt[None, :, 2:]) - (anchors[:, None, :2] + anchors[:, None, 2:]))
            ** 2).sum(-1) / 4
    enclose = torch.max(anchors[:, None, 2:], gt[None, :, 2:]) - torch.min(anchors[:, None, :2],
                                                                          gt[None, :, :2])
    return ious - rho2 / (enclose.clamp(min=0) ** 2).sum(-1).clamp(min=1e-6)


def released_vlr(anchors, gt, diou_mode="diou", topk=9):
    """The released VLR of one image (assign_neg): ``[R]`` the IoU with the claiming GT, 0
    outside. Threshold from the ``topk`` nearest anchors per level, band over all anchors."""
    bboxes = torch.cat(anchors)
    overlaps, diou = _overlaps(bboxes, gt, "iou"), _overlaps(bboxes, gt, diou_mode)
    centres = (bboxes[:, :2] + bboxes[:, 2:]) / 2
    distances = (centres[:, None] - ((gt[:, :2] + gt[:, 2:]) / 2)[None]).pow(2).sum(-1).sqrt()
    cand, start = [], 0
    for level in anchors:
        d = distances[start:start + len(level)]
        cand.append(d.topk(min(topk, len(level)), dim=0, largest=False)[1] + start)
        start += len(level)
    cand = torch.cat(cand)
    cand_iou = overlaps[cand, torch.arange(len(gt))]
    thr = cand_iou.mean(0) + cand_iou.std(0)
    is_pos = (diou < thr[None]) & (diou >= 0.25 * thr[None])
    claimed = torch.where(is_pos, overlaps, torch.full_like(overlaps, -1e8))
    best = claimed.max(dim=1)[0]
    return torch.where(best != -1e8, best, torch.zeros_like(best))


def parity_inputs(seed=0, k=3, reg_max=4, anchors_per_cell=2, batch=2):
    """Random float64 head outputs on three levels (8 x 8, 4 x 4, 2 x 2 cells of a 64 x 64
    image, ``anchors_per_cell`` anchors per cell, jittered so no two centres tie), random labels
    (positives on every level, background, ignored) and 3 GT boxes per image (boxes at float32
    values, what detectron2's ``Boxes`` keep)."""
    g = torch.Generator().manual_seed(seed)
    bins = reg_max + 1
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    levels, anchors = [], []
    for stride, size in ((8, 16.0), (16, 32.0), (32, 64.0)):
        h = w = 64 // stride
        levels.append((h, w))
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centre = torch.stack([xs, ys], -1).reshape(-1, 1, 2).double() * stride + stride / 2
        scale = size * (1.0 + 0.5 * torch.arange(anchors_per_cell).double()).reshape(1, -1, 1)
        a = torch.cat([centre - scale / 2, centre + scale / 2], -1).reshape(-1, 4)
        a = a + torch.rand(a.shape, generator=g, dtype=torch.float64) * 2 - 1
        anchors.append(a.float().double())  # detectron2's Boxes hold float32
    maps = {}
    for role in ("s", "t"):
        maps[role] = ([rnd(batch, anchors_per_cell * k, h, w) for h, w in levels],
                      [rnd(batch, anchors_per_cell * 4 * bins, h, w) for h, w in levels])
    r = sum(len(a) for a in anchors)
    u = torch.rand(batch, r, generator=g)
    background = torch.where(u < 0.25, torch.full((batch, r), -1), torch.full((batch, r), k))
    labels = torch.where(u < 0.15, torch.randint(0, k, (batch, r), generator=g), background)
    xy = torch.rand(batch, 3, 2, generator=g, dtype=torch.float64) * 40
    wh = torch.rand(batch, 3, 2, generator=g, dtype=torch.float64) * 30 + 8
    gts = torch.cat([xy, (xy + wh).clamp(max=64)], -1).float().double()
    return maps, anchors, labels, gts, k, reg_max


def _parity_records(maps, anchors, labels, gts):
    """``(student record, teacher record, gt_instances)`` of :func:`parity_inputs`."""
    size, levels = [(64, 64)] * len(gts), ["p3", "p4", "p5"]
    student = DetectorOutputs("dense", size, (64, 64), cls_logits=maps["s"][0],
                              box_deltas=maps["s"][1], anchors=[Boxes(a) for a in anchors],
                              anchor_labels=list(labels), features={}, feature_names=levels)
    teacher = DetectorOutputs("dense", size, (64, 64), cls_logits=maps["t"][0],
                              box_deltas=maps["t"][1], features={}, feature_names=levels)
    return student, teacher, [Instances((64, 64), gt_boxes=Boxes(b)) for b in gts]


def _parity_distiller(k, reg_max, options) -> LDDistiller:
    return LDDistiller(num_classes=k, reg_max=reg_max, vlr_topk=9, vlr_low=0.25, **options)


def _ours(maps, anchors, labels, gts, k, reg_max, recipe):
    return _parity_distiller(k, reg_max, recipe)(*_parity_records(maps, anchors, labels, gts))


def _released(maps, anchors, labels, gts, k, reg_max, head, diou_mode="diou"):
    sizes = [len(a) for a in anchors]
    mm_labels = torch.where(labels < 0, torch.full_like(labels, k), labels)  # ignored: K
    vlr = torch.stack([released_vlr(anchors, g, diou_mode) for g in gts])
    terms = {"gfl": released_gfl_head_terms, "retina": released_retina_head_terms}[head]
    return terms(maps["s"][0], maps["s"][1], maps["t"][0], maps["t"][1],
                 mm_labels.split(sizes, dim=1), vlr.split(sizes, dim=1), k, reg_max + 1)


#: the published recipes as LDDistiller arguments (what the two R50 configs set), and the
#: project's formulation before 2026-12-05 with the weights it used
RECIPES = {
    "gfl": dict(softmax_over="side", ld_weight=0.25, ld_temperature=10.0, vlr_weight=0.25,
                vlr_exclude_positives=False, vlr_normalizer=16.0, kd_weight=10.0,
                kd_temperature=2.0, kd_normalizer="level"),
    "retina": dict(softmax_over="anchor", ld_weight=5.0, ld_temperature=10.0, vlr_weight=0.15,
                   vlr_exclude_positives=True, vlr_normalizer=4.0, kd_weight=10.0,
                   kd_temperature=8.0, kd_normalizer="level")}
EARLIER = {
    "gfl": dict(RECIPES["gfl"], vlr_normalizer=4.0, kd_normalizer="all"),
    "retina": dict(softmax_over="side", ld_weight=0.25, ld_temperature=10.0, vlr_weight=0.03,
                   vlr_exclude_positives=True, vlr_normalizer=4.0, kd_weight=10.0,
                   kd_temperature=8.0, kd_normalizer="all")}


def test_the_vlr_equals_the_released_one_with_the_true_diou():
    maps, anchors, labels, gts, k, reg_max = parity_inputs()
    for g in gts:
        region, value = vlr_region(anchors, g)
        released = released_vlr(anchors, g)
        assert region.sum() > 0
        assert torch.equal(region, released > 0)
        assert torch.allclose(value, released, rtol=1e-12, atol=0)


def test_the_released_helpers_diou_is_reachable():
    """GT (0, 0, 10, 10), anchor (5, 0, 10, 5): intersection 25, IoU 25 / 100, intersection over
    the anchor's area 25 / 25; centres (5, 5) and (7.5, 2.5): rho^2 = 12.5, enclosing diagonal^2
    200. The paper's DIoU 0.25 - 0.0625, the released helper's 1 - 0.0625."""
    g, a = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[5.0, 0, 10, 5]])
    assert math.isclose(float(pairwise_diou(g, a)), 0.1875, rel_tol=1e-6)
    assert math.isclose(float(pairwise_diou(g, a, "over_area2")), 0.9375, rel_tol=1e-6)
    maps, anchors, labels, gts, k, reg_max = parity_inputs()
    for gt in gts:
        region, value = vlr_region(anchors, gt, diou="released")
        released = released_vlr(anchors, gt, "released diou")
        assert torch.equal(region, released > 0)
        assert torch.allclose(value, released, rtol=1e-12, atol=0)
        assert not torch.equal(region, vlr_region(anchors, gt)[0])
    inputs = parity_inputs()
    ours = _ours(*inputs, dict(RECIPES["retina"], vlr_diou="released"))
    released = _released(*inputs, "retina", diou_mode="released diou")
    assert math.isclose(float(ours["loss_ld_vlr"]), float(released["loss_ld_vlr"]), rel_tol=1e-12)


@pytest.mark.parametrize("recipe", ["gfl", "retina"])
@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_the_released_heads_in_float64(recipe, seed):
    inputs = parity_inputs(seed)
    labels, k = inputs[2], inputs[4]
    level = torch.repeat_interleave(torch.arange(3), torch.tensor([len(a) for a in inputs[1]]))
    pos = (labels >= 0) & (labels < k)
    assert len(set(level.expand_as(pos)[pos].tolist())) == 3  # positives on every level
    ours = _ours(*inputs, RECIPES[recipe])
    released = _released(*inputs, recipe)
    assert set(ours) == set(released)
    for name, value in released.items():
        assert float(value) > 0, name
        assert math.isclose(float(ours[name]), float(value), rel_tol=1e-12), name
    # the earlier formulation was off: the KD normaliser (both), VLR / 4 (GFL), the RetinaNet
    # head's softmax and weights
    earlier = _ours(*inputs, EARLIER[recipe])
    assert not math.isclose(float(earlier["loss_ld_kd"]), float(released["loss_ld_kd"]),
                            rel_tol=0.05)
    assert not math.isclose(float(earlier["loss_ld_vlr"]), float(released["loss_ld_vlr"]),
                            rel_tol=0.05)


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
    assert {"loss_ld", "loss_ld_vlr", "loss_ld_kd"} <= keys
    assert "loss_dfl" not in keys  # the RetinaNet recipe's student has no DFL
    for m in methods:
        assert any(k.startswith(f"loss_{m.lower()}_") for k in keys), m


def _recipe_of(ld: LDDistiller) -> dict:
    return {key: getattr(ld, key) for key in RECIPES["gfl"]}


@pytest.mark.parametrize("path, recipe, dfl", [
    ("configs/LD-RetinaNet-R50.yaml", "retina", 0.0),
    ("configs/LD-RetinaNet-R50-GFL-recipe.yaml", "gfl", 0.25),
    ("configs/CSGR+LD-RetinaNet-R50.yaml", "retina", 0.0),
    ("configs/demo/LD-RetinaNet-Dist-R18.yaml", "retina", 0.0)])
def test_configs_set_the_published_recipes(path, recipe, dfl):
    """Each config's LD terms are the recipe the parity test checks against the released head."""
    cfg = load_config(os.path.join(REPO, path), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"],
                      check_steps=False)
    model = build_model(cfg)
    assert _recipe_of(model.distillers["LD"]) == RECIPES[recipe]
    assert model.distillers["LD"].bins == 17 and model.dfl_weight == dfl
    assert model.distillers["LD"].vlr_diou == "paper"
    if "demo" not in path:
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


@pytest.mark.parametrize("options", [
    dict(RECIPES["gfl"]), dict(RECIPES["retina"]), dict(EARLIER["retina"]),
    dict(RECIPES["retina"], vlr_diou="released")])
def test_the_benchmark_reference_follows_every_option(options):
    """LD's straightforward reference (``reference_losses``: what tools/benchmark.py kernels
    compares with)."""
    maps, anchors, labels, gts, k, reg_max = parity_inputs()
    records = _parity_records(maps, anchors, labels, gts)
    d = _parity_distiller(k, reg_max, options)
    ours, ref = d(*records), d.reference_losses(*records)
    assert set(ours) == set(ref)
    for name in ours:
        assert math.isclose(float(ours[name]), float(ref[name]), rel_tol=1e-6), name


def _measure():
    """The sizes docs/methods/LD.md quotes: the earlier formulation against the released heads
    on the parity inputs (5 seeds), the per-side against the per-anchor softmax at the same
    weight, and the released helper's DIoU against the true one on RetinaNet anchors."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

    for recipe in ("gfl", "retina"):
        ratios, gaps = {}, []
        for seed in range(5):
            inputs = parity_inputs(seed)
            released = _released(*inputs, recipe)
            ours, earlier = _ours(*inputs, RECIPES[recipe]), _ours(*inputs, EARLIER[recipe])
            for name, value in released.items():
                ratios.setdefault(name, []).append(float(earlier[name] / value))
                gaps.append(abs(float(ours[name] / value) - 1))
        print(f"{recipe}: now / released: max |ratio - 1| = {max(gaps):.1e}; earlier / released "
              + ", ".join(f"{n} {sum(v) / len(v):.3f} ({min(v):.3f}-{max(v):.3f})"
                          for n, v in ratios.items()))
    side = []
    for seed in range(5):
        inputs = parity_inputs(seed)
        per_side = _ours(*inputs, dict(RECIPES["retina"], softmax_over="side"))
        side.append(float(per_side["loss_ld"] / _ours(*inputs, RECIPES["retina"])["loss_ld"]))
    print(f"RetinaNet weights, per-side / per-anchor softmax, loss_ld: {sum(side) / 5:.2f} "
          f"({min(side):.2f}-{max(side):.2f})")
    # RetinaNet anchors (this project's R50 configs: 3 scales x 3 ratios, p3-p7) on 800 x 1344,
    # 8 random GTs per image from 16 to 400 px
    cfg = get_cfg()
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[x, x * 2 ** (1 / 3), x * 2 ** (2 / 3)]
                                        for x in [32, 64, 128, 256, 512]]
    gen = DefaultAnchorGenerator(cfg, [ShapeSpec(stride=s) for s in (8, 16, 32, 64, 128)])
    feats = [torch.zeros(1, 1, 800 // s, 1344 // s) for s in (8, 16, 32, 64, 128)]
    anchors = [a.tensor.double() for a in gen(feats)]
    g = torch.Generator().manual_seed(0)
    same = total_true = total_released = 0
    for _ in range(4):
        wh = 16 * (25 ** torch.rand(8, 2, generator=g, dtype=torch.float64))
        xy = torch.rand(8, 2, generator=g, dtype=torch.float64) * (torch.tensor([1344, 800]) - wh)
        gt = torch.cat([xy, xy + wh], 1)
        true, released = released_vlr(anchors, gt) > 0, released_vlr(anchors, gt,
                                                                      "released diou") > 0
        same += int((true & released).sum())
        total_true += int(true.sum())
        total_released += int(released.sum())
    print(f"VLR on RetinaNet anchors (4 images x 8 GTs): true DIoU {total_true} anchors, released "
          f"helper {total_released}, in both {same} ({same / total_true:.0%} of the true region)")


if __name__ == "__main__":
    _measure()
