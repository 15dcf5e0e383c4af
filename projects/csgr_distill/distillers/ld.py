"""LD: Localization Distillation for Dense Object Detection (Zheng et al., CVPR 2022 / TPAMI 2023,
arXiv 2102.12252), as specified in ``shared/methods/LD.md``, on :class:`DistributionRetinaNet`
teacher and student (both predict a distribution over each box side's distance).

Three terms, over all anchors of all levels (the student's and the teacher's anchors are the
same: same anchor generator, same grid):

* ``loss_ld``: main-region LD on the student's positive anchors (its own assignment, recorded
  from ``label_anchors``): per side ``tau^2 mean_k p_t,k (log p_t,k - log q_s,k)`` (the mean over
  the ``n + 1`` bins), weighted by the student's max class score (sigmoid, no gradient), summed
  and divided by 4 (the official per-level ``avg_factor``; levels summed);
* ``loss_ld_vlr``: the same KL on the valuable localization region (:func:`vlr_region`),
  weighted by each anchor's IoU with the GT that claims it, divided by 4;
* ``loss_ld_kd``: main KD on the class logits of the positives, ``tau^2 mean_k p_t,k (log p_t,k -
  log q_s,k)`` with a softmax over the K classes, divided by the number of positives.
"""
from typing import Dict, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.structures import Boxes, pairwise_iou
from torch import Tensor, nn
from torch.nn import functional as F

from .registry import register_distiller

__all__ = ["LDDistiller", "bin_kl", "vlr_region", "pairwise_diou"]


def bin_kl(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """``[M, B]`` logits -> ``[M]``: ``tau^2 * mean_b p_t,b (log p_t,b - log q_s,b)`` with
    ``p_t = softmax(t / tau)`` (no gradient), ``q_s = softmax(s / tau)`` — the mean over the B
    bins (or classes), not the sum, as the published weights assume."""
    tau = float(temperature)
    log_q = F.log_softmax(s_logits / tau, dim=1)
    log_p = F.log_softmax(t_logits.detach() / tau, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).mean(dim=1) * tau * tau


def pairwise_diou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """``[G, 4]``, ``[R, 4]`` -> ``[G, R]`` distance IoU: IoU minus the squared distance of the
    centres over the squared diagonal of the smallest enclosing box."""
    iou = pairwise_iou(Boxes(boxes1), Boxes(boxes2))
    c1 = (boxes1[:, :2] + boxes1[:, 2:]) / 2
    c2 = (boxes2[:, :2] + boxes2[:, 2:]) / 2
    rho2 = ((c1[:, None] - c2[None]) ** 2).sum(-1)
    lt = torch.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    diag2 = ((rb - lt) ** 2).sum(-1).clamp_min(1e-12)
    return iou - rho2 / diag2


def vlr_region(anchors: Sequence[Tensor], gt_boxes: Tensor, topk: int = 9,
               low: float = 0.25) -> Tuple[Tensor, Tensor]:
    """LD's valuable localization region of one image.

    Args:
        anchors: per level ``[R_l, 4]`` anchors (the detector's, in head order).
        gt_boxes: ``[G, 4]`` ground-truth boxes.
        topk: ATSS candidates per level and GT: the ``topk`` anchors nearest the GT's centre.
        low: the band's lower factor.

    Per GT g, ``t_g`` = mean + unbiased std of the IoUs of its candidates with g; an anchor a is
    in VLR(g) when ``low * t_g <= DIoU(a, g) < t_g``; an anchor several GTs claim keeps the one
    with the largest IoU. Returns ``(in_region [R] bool, iou [R])``, the IoU with the claiming
    GT (0 outside), ``R = sum_l R_l``.
    """
    all_anchors = cat(list(anchors))
    r = all_anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.zeros(r, dtype=torch.bool, device=all_anchors.device), \
            all_anchors.new_zeros(r)
    iou = pairwise_iou(Boxes(gt_boxes), Boxes(all_anchors))  # [G, R]
    gt_c = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    candidates = []
    start = 0
    for level in anchors:
        centres = (level[:, :2] + level[:, 2:]) / 2
        dist = torch.cdist(gt_c, centres)  # [G, R_l]
        k = min(topk, level.shape[0])
        candidates.append(dist.topk(k, dim=1, largest=False).indices + start)
        start += level.shape[0]
    cand = cat(candidates, dim=1)  # [G, topk * L]
    cand_iou = iou.gather(1, cand)
    std = cand_iou.std(dim=1) if cand.shape[1] > 1 else torch.zeros_like(cand_iou[:, 0])
    t = cand_iou.mean(dim=1) + std  # [G]
    diou = pairwise_diou(gt_boxes, all_anchors)
    band = (diou >= low * t[:, None]) & (diou < t[:, None])  # [G, R]
    claimed = torch.where(band, iou, torch.full_like(iou, -1.0))
    best, _ = claimed.max(dim=0)
    in_region = best >= 0
    return in_region, torch.where(in_region, best, torch.zeros_like(best))


@register_distiller("LD")
class LDDistiller(nn.Module):
    """LD's main LD, VLR LD and main KD (module docstring), between two
    ``DistributionRetinaNet`` s with the same anchors and bins. LD has no parameters."""

    required_outputs = {"student": ("cls_logits", "box_deltas", "anchors", "anchor_labels",
                                    "anchor_gt_boxes"),
                        "teacher": ("cls_logits", "box_deltas")}
    loss_weight_keys = {"loss_ld_vlr": "MODEL.DISTILL.LD.VLR_WEIGHT",
                        "loss_ld_kd": "MODEL.DISTILL.LD.KD_WEIGHT",
                        "loss_ld": "MODEL.DISTILL.LD.LD_WEIGHT"}

    @configurable
    def __init__(self, *, num_classes: int, reg_max: int, ld_weight: float,
                 ld_temperature: float, vlr_weight: float, vlr_exclude_positives: bool,
                 vlr_topk: int, vlr_low: float, kd_weight: float, kd_temperature: float):
        """
        Args:
            num_classes: K; reg_max: n (``n + 1`` bins per side).
            ld_weight / ld_temperature: main LD; vlr_weight: VLR LD (same temperature);
            vlr_exclude_positives: leave the positives out of the VLR (the RetinaNet recipe);
            vlr_topk / vlr_low: ATSS candidates per level, the band's lower factor;
            kd_weight / kd_temperature: main KD.
        """
        super().__init__()
        node = "MODEL.DISTILL.LD"
        for key, value in (("LD_WEIGHT", ld_weight), ("VLR_WEIGHT", vlr_weight),
                           ("KD_WEIGHT", kd_weight)):
            if value < 0:
                raise ValueError(f"{node}.{key} must be >= 0, got {value}")
        for key, value in (("LD_TEMPERATURE", ld_temperature),
                           ("KD_TEMPERATURE", kd_temperature)):
            if value <= 0:
                raise ValueError(f"{node}.{key} must be > 0, got {value}")
        if vlr_topk < 1 or not 0 <= vlr_low < 1:
            raise ValueError(f"{node}.VLR_TOPK must be >= 1 and VLR_LOW in [0, 1), got "
                             f"{vlr_topk} and {vlr_low}")
        self.num_classes, self.bins = int(num_classes), int(reg_max) + 1
        self.ld_weight, self.ld_temperature = float(ld_weight), float(ld_temperature)
        self.vlr_weight, self.vlr_exclude_positives = float(vlr_weight), bool(vlr_exclude_positives)
        self.vlr_topk, self.vlr_low = int(vlr_topk), float(vlr_low)
        self.kd_weight, self.kd_temperature = float(kd_weight), float(kd_temperature)

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        from ..meta_arch.distribution_retinanet import DistributionRetinaNet
        from ..teacher import build_teacher_cfg

        for role, c in (("student", cfg), ("teacher", build_teacher_cfg(cfg))):
            arch = c.MODEL.META_ARCHITECTURE
            if not issubclass(META_ARCH_REGISTRY.get(arch), DistributionRetinaNet):
                raise ValueError(
                    f"MODEL.DISTILL.METHODS 'LD' distils box-side distributions: the {role} must "
                    f"be a DistributionRetinaNet (or DistillDistributionRetinaNet), not {arch}. "
                    "Use configs/teachers/RetinaNet-Dist-R101-SODA10M.yaml and "
                    "configs/LD-RetinaNet-R50.yaml (or drop LD)")
        tcfg = build_teacher_cfg(cfg)
        for key in ("REG_MAX",):
            if cfg.MODEL.RETINANET[key] != tcfg.MODEL.RETINANET[key]:
                raise ValueError(
                    f"LD: MODEL.RETINANET.{key} is {cfg.MODEL.RETINANET[key]} in the student and "
                    f"{tcfg.MODEL.RETINANET[key]} in the teacher; LD compares the distributions "
                    "bin by bin: use the same value")
        for key in ("SIZES", "ASPECT_RATIOS"):
            if cfg.MODEL.ANCHOR_GENERATOR[key] != tcfg.MODEL.ANCHOR_GENERATOR[key]:
                raise ValueError(
                    f"LD: MODEL.ANCHOR_GENERATOR.{key} differs between student and teacher; LD "
                    "pairs the two heads anchor by anchor: give the teacher the student's anchors")
        c = cfg.MODEL.DISTILL.LD
        return {"num_classes": cfg.MODEL.RETINANET.NUM_CLASSES,
                "reg_max": cfg.MODEL.RETINANET.REG_MAX, "ld_weight": c.LD_WEIGHT,
                "ld_temperature": c.LD_TEMPERATURE, "vlr_weight": c.VLR_WEIGHT,
                "vlr_exclude_positives": c.VLR_EXCLUDE_POSITIVES, "vlr_topk": c.VLR_TOPK,
                "vlr_low": c.VLR_LOW, "kd_weight": c.KD_WEIGHT,
                "kd_temperature": c.KD_TEMPERATURE}

    def flat(self, out, role: str) -> Tuple[Tensor, Tensor]:
        """``(class logits [N, R, K], side logits [N, R, 4 (n + 1)])`` of one record, all
        levels in head order."""
        logits = cat([permute_to_N_HWA_K(x, self.num_classes) for x in out.cls_logits], dim=1)
        width = 4 * self.bins
        for x in out.box_deltas:
            if x.shape[1] % width:
                raise ValueError(f"LD: the {role}'s box branch gives {x.shape[1]} channels per "
                                 f"cell, not a multiple of 4 x (REG_MAX + 1) = {width}")
        sides = cat([permute_to_N_HWA_K(x, width) for x in out.box_deltas], dim=1)
        return logits, sides

    def forward(self, student, teacher, gt_instances) -> Dict[str, Tensor]:
        """``(DetectorOutputs, DetectorOutputs, list[Instances]) -> {"loss_ld", "loss_ld_vlr",
        "loss_ld_kd"}`` (the terms whose weight is > 0)."""
        s_cls, s_box = self.flat(student, "student")
        t_cls, t_box = self.flat(teacher, "teacher")
        if s_cls.shape != t_cls.shape or s_box.shape != t_box.shape:
            raise ValueError(
                f"LD: student head outputs {tuple(s_cls.shape)}, {tuple(s_box.shape)} and "
                f"teacher's {tuple(t_cls.shape)}, {tuple(t_box.shape)} differ; both need the same "
                "anchors (MODEL.ANCHOR_GENERATOR), classes and REG_MAX on the same grid")
        labels = torch.stack(student.anchor_labels)  # [N, R]
        pos = (labels >= 0) & (labels != self.num_classes)
        num_pos = int(pos.sum())
        out = {}
        if self.ld_weight > 0:
            weight = torch.sigmoid(s_cls[pos].detach()).max(dim=1).values if num_pos else \
                s_cls.new_zeros(0)
            kl = self._side_kl(s_box[pos], t_box[pos])  # [P, 4]
            out["loss_ld"] = self.ld_weight * (kl * weight[:, None]).sum() / 4.0
        if self.vlr_weight > 0:
            anchors = [a.tensor for a in student.anchors]
            region, value = [], []
            for i, inst in enumerate(gt_instances):
                r, v = vlr_region(anchors, inst.gt_boxes.tensor.to(s_box.device),
                                  self.vlr_topk, self.vlr_low)
                if self.vlr_exclude_positives:
                    r = r & ~pos[i]
                region.append(r)
                value.append(v)
            region, value = torch.stack(region), torch.stack(value)
            kl = self._side_kl(s_box[region], t_box[region])
            out["loss_ld_vlr"] = self.vlr_weight * (kl * value[region][:, None]).sum() / 4.0
        if self.kd_weight > 0:
            kd = bin_kl(s_cls[pos], t_cls[pos], self.kd_temperature)
            out["loss_ld_kd"] = self.kd_weight * kd.sum() / max(num_pos, 1)
        return out

    def region_details(self, student, teacher, gt_instances, image: int = 0) -> Dict[str, Tensor]:
        """What the terms see on one image, for pictures (no grad): ``anchors`` ``[R, 4]``,
        ``positive`` ``[R]`` (the main region) with ``weight`` (the student's max class score),
        ``vlr`` ``[R]`` with ``vlr_iou`` (after the positives' exclusion when it applies), the
        side distributions at temperature 1 ``s_prob``/``t_prob`` ``[R, 4, n + 1]`` and each
        anchor's matched GT box ``gt_boxes`` ``[R, 4]``."""
        with torch.no_grad():
            s_cls, s_box = self.flat(student, "student")
            _, t_box = self.flat(teacher, "teacher")
            labels = student.anchor_labels[image]
            positive = (labels >= 0) & (labels != self.num_classes)
            anchors = [a.tensor for a in student.anchors]
            vlr, iou = vlr_region(anchors, gt_instances[image].gt_boxes.tensor.to(s_box.device),
                                  self.vlr_topk, self.vlr_low)
            if self.vlr_exclude_positives:
                vlr = vlr & ~positive
            shape = (s_box.shape[1], 4, self.bins)
            return {"anchors": cat(anchors), "positive": positive,
                    "weight": torch.sigmoid(s_cls[image]).max(dim=1).values,
                    "vlr": vlr, "vlr_iou": torch.where(vlr, iou, torch.zeros_like(iou)),
                    "s_prob": F.softmax(s_box[image].reshape(shape), dim=-1),
                    "t_prob": F.softmax(t_box[image].reshape(shape), dim=-1),
                    "gt_boxes": student.anchor_gt_boxes[image]}

    def _side_kl(self, s_box: Tensor, t_box: Tensor) -> Tensor:
        """``[M, 4 (n + 1)]`` twice -> ``[M, 4]`` the KL of each side (:func:`bin_kl`)."""
        m = s_box.shape[0]
        return bin_kl(s_box.reshape(-1, self.bins), t_box.reshape(-1, self.bins),
                      self.ld_temperature).reshape(m, 4)
