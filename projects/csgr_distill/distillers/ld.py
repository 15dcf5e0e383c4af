"""LD: Localization Distillation for Dense Object Detection (Zheng et al., CVPR 2022 / TPAMI 2023,
arXiv 2102.12252; released code HikariTJU/LD), on :class:`DistributionRetinaNet` teacher and
student (both predict a distribution over each box side's distance). Formulas, config keys,
the two published recipes and every difference from the released code: ``docs/methods/LD.md``.

Three terms, over the anchors of all levels (the student's and the teacher's anchors are the
same: same anchor generator, same grid), ``KL_tau(s, t) = tau^2 mean_b p_t,b (log p_t,b -
log q_s,b)`` with ``p_t = softmax(t / tau)`` (no gradient), ``q_s = softmax(s / tau)``:

* ``loss_ld``: main-region LD on the student's positive anchors (its own assignment, recorded
  from ``label_anchors``), weighted by the student's max class score (sigmoid, no gradient),
  summed and divided by 4 (the released heads' ``avg_factor`` per level; levels summed). The KL
  is taken per side over its ``n + 1`` bins and summed over the 4 sides
  (``SOFTMAX_OVER "side"``: the paper and the released GFL head) or once over the anchor's
  ``4 (n + 1)`` logits (``"anchor"``: the released RetinaNet head);
* ``loss_ld_vlr``: the same KL on the valuable localization region (:func:`vlr_region`, with
  the paper's DIoU by default, ``VLR_DIOU``), weighted by each anchor's IoU with the GT that
  claims it, divided by ``VLR_NORMALIZER`` (released code: 16 in the GFL head, 4 in the
  RetinaNet head);
* ``loss_ld_kd``: main KD on the class logits of the positives, softmax over the K classes,
  ``KD_NORMALIZER "level"``: each level's sum divided by that level's positives, the levels
  summed (the released heads); ``"all"``: the sum over all levels divided by all positives.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import box_area, box_iou

from ..layers.reference import plain_iou, plain_kl, plain_sigmoid, plain_softmax
from ..modeling.distribution_retinanet import DistributionRetinaNet
from .base import Distiller, Variant
from .registry import register_distiller

__all__ = ["LDDistiller", "bin_kl", "vlr_region", "vlr_regions", "pairwise_diou",
           "SOFTMAX_OVER", "KD_NORMALIZERS", "VLR_DIOUS"]


def bin_kl(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """``[M, B]`` logits -> ``[M]``: ``tau^2 * mean_b p_t,b (log p_t,b - log q_s,b)`` with
    ``p_t = softmax(t / tau)`` (no gradient), ``q_s = softmax(s / tau)`` — the mean over the B
    bins (or classes), not the sum, as the published weights assume."""
    tau = float(temperature)
    log_q = F.log_softmax(s_logits / tau, dim=1)
    log_p = F.log_softmax(t_logits.detach() / tau, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).mean(dim=1) * tau * tau


def pairwise_diou(boxes1: Tensor, boxes2: Tensor, overlap: str = "iou") -> Tensor:
    """``[G, 4]``, ``[R, 4]`` -> ``[G, R]`` distance IoU: the overlap minus the squared distance
    of the centres over the squared diagonal of the smallest enclosing box. ``overlap "iou"``:
    the paper's DIoU; ``"over_area2"``: the intersection over ``boxes2``'s area instead of the
    union, what the released code's VLR helper computes with the anchors as ``boxes2`` (its
    ``bbox_overlaps(anchors, gts, mode='diou')`` divides by ``area1``, the anchors')."""
    if overlap == "iou":
        ratio = box_iou(boxes1, boxes2)
    else:
        wh = (torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
              - torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])).clamp_min(0)
        ratio = wh.prod(-1) / box_area(boxes2).clamp_min(1e-6)[None]
    c1 = (boxes1[:, :2] + boxes1[:, 2:]) / 2
    c2 = (boxes2[:, :2] + boxes2[:, 2:]) / 2
    rho2 = ((c1[:, None] - c2[None]) ** 2).sum(-1)
    lt = torch.minimum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.maximum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    diag2 = ((rb - lt) ** 2).sum(-1).clamp_min(1e-12)
    return ratio - rho2 / diag2


def vlr_region(anchors: Sequence[Tensor], gt_boxes: Tensor, topk: int = 9,
               low: float = 0.25, diou: str = "paper") -> Tuple[Tensor, Tensor]:
    """LD's valuable localization region of one image.

    Args:
        anchors: per level ``[R_l, 4]`` anchors (the detector's, in head order).
        gt_boxes: ``[G, 4]`` ground-truth boxes.
        topk: ATSS candidates per level and GT: the ``topk`` anchors nearest the GT's centre.
        low: the band's lower factor.
        diou: ``"paper"`` the true DIoU, ``"released"`` the released helper's (intersection
            over the anchor's area minus the distance term; :func:`pairwise_diou`).

    Per GT g, ``t_g`` = mean + unbiased std of the IoUs of its candidates with g; an anchor a is
    in VLR(g) when ``low * t_g <= DIoU(a, g) < t_g``; an anchor several GTs claim keeps the one
    with the largest IoU. Returns ``(in_region [R] bool, iou [R])``, the IoU with the claiming
    GT (0 outside), ``R = sum_l R_l``. One image of :func:`vlr_regions`.
    """
    region, iou = vlr_regions(anchors, [gt_boxes], topk, low, diou)
    return region[0], iou[0]


def vlr_regions(anchors: Sequence[Tensor], gt_boxes: Sequence[Tensor], topk: int = 9,
                low: float = 0.25, diou: str = "paper") -> Tuple[Tensor, Tensor]:
    """:func:`vlr_region` of every image at once (``gt_boxes``: per image ``[G_i, 4]``):
    ``(in_region [N, R] bool, iou [N, R])``. The GTs of all images are the rows of one IoU, one
    distance and one DIoU matrix against the anchors (shared by the batch); the claim keeps,
    per image, the largest IoU over that image's GTs."""
    all_anchors = cat(list(anchors))
    n, r = len(gt_boxes), all_anchors.shape[0]
    gts = cat(list(gt_boxes)) if n > 1 else gt_boxes[0]
    best = all_anchors.new_full((n, r), -1.0)
    if gts.numel():
        image = torch.tensor([i for i, g in enumerate(gt_boxes) for _ in range(len(g))],
                             device=gts.device)
        iou = box_iou(gts, all_anchors)  # [G, R], in the boxes' dtype
        gt_c = (gts[:, :2] + gts[:, 2:]) / 2
        # ATSS candidates: per level the topk anchors nearest each GT's centre (one distance
        # matrix over all levels, its columns taken level by level)
        dist = torch.cdist(gt_c, (all_anchors[:, :2] + all_anchors[:, 2:]) / 2)  # [G, R]
        candidates, start = [], 0
        for level in anchors:
            k = min(topk, level.shape[0])
            candidates.append(dist[:, start:start + level.shape[0]].topk(
                k, dim=1, largest=False).indices + start)
            start += level.shape[0]
        cand_iou = iou.gather(1, cat(candidates, dim=1))  # [G, topk * L]
        std = cand_iou.std(dim=1) if cand_iou.shape[1] > 1 else \
            torch.zeros_like(cand_iou[:, 0])
        t = cand_iou.mean(dim=1) + std  # [G]
        d = pairwise_diou(gts, all_anchors, "iou" if diou == "paper" else "over_area2")
        band = (d >= low * t[:, None]) & (d < t[:, None])  # [G, R]
        claimed = torch.where(band, iou, torch.full_like(iou, -1.0))
        best.scatter_reduce_(0, image[:, None].expand_as(claimed), claimed, "amax")
    in_region = best >= 0
    return in_region, torch.where(in_region, best, torch.zeros_like(best))


#: ``MODEL.DISTILL.LD.SOFTMAX_OVER`` values: one softmax per box side over its ``n + 1`` bins (the
#: paper, the released GFL head) or one over an anchor's ``4 (n + 1)`` logits (the released
#: RetinaNet head)
SOFTMAX_OVER = ("side", "anchor")
#: ``MODEL.DISTILL.LD.KD_NORMALIZER`` values: per level by its positives, levels summed (released
#: code), or all levels by all positives
KD_NORMALIZERS = ("level", "all")
#: ``MODEL.DISTILL.LD.VLR_DIOU`` values: the paper's DIoU, or the released helper's
VLR_DIOUS = ("paper", "released")


@register_distiller("LD")
class LDDistiller(Distiller):
    """LD's main LD, VLR LD and main KD (module docstring), between two
    ``DistributionRetinaNet`` s with the same anchors and bins. LD has no parameters."""

    required_outputs = {"student": ("cls_logits", "box_deltas", "anchors", "anchor_labels",
                                    "anchor_gt_boxes"),
                        "teacher": ("cls_logits", "box_deltas")}
    loss_weight_keys = {"loss_ld_vlr": "MODEL.DISTILL.LD.VLR_WEIGHT",
                        "loss_ld_kd": "MODEL.DISTILL.LD.KD_WEIGHT",
                        "loss_ld": "MODEL.DISTILL.LD.LD_WEIGHT"}
    benchmark_variants = {
        "CSGR+LD": Variant(("MODEL.DISTILL.METHODS", ("CSGR", "LD")), parts=("gain",)),
        "FGD+LD": Variant(("MODEL.DISTILL.METHODS", ("FGD", "LD")), parts=("gain",)),
    }

    @classmethod
    def add_config(cls, node) -> None:
        # Defaults: the GFL recipe (the paper's and the released LDHead's;
        # configs/LD-RetinaNet-R50-GFL-recipe.yaml); configs/LD-RetinaNet-R50.yaml sets the
        # released RetinaNet recipe (LDRetinaHead, configs/ld/ld_retina_r50_1x.py there).
        #
        # Main-region LD on the student's positives (released configs, GFL recipe: weight 0.25,
        # T 10; RetinaNet recipe: 5, T 10). Divided by 4 (released code's avg_factor in both
        # heads).
        node.LD_WEIGHT = 0.25
        node.LD_TEMPERATURE = 10.0
        # The softmax of both LD terms: "side", one per box side over its REG_MAX + 1 bins, the
        # KLs of the 4 sides summed (paper, released GFL head); "anchor", one over an anchor's
        # 4 (REG_MAX + 1) logits (released RetinaNet head).
        node.SOFTMAX_OVER = "side"
        # Valuable-localization-region LD, same temperature (GFL recipe 0.25 with the positives;
        # RetinaNet recipe 0.03 x 5 = 0.15 without them). Its normaliser is the released code's:
        # 16 in the GFL head, 4 in the RetinaNet head.
        node.VLR_WEIGHT = 0.25
        node.VLR_EXCLUDE_POSITIVES = False
        node.VLR_NORMALIZER = 16.0
        # ATSS candidates per level and GT (9), and the DIoU band's lower factor [0.25 t_g, t_g)
        # (released assigners).
        node.VLR_TOPK = 9
        node.VLR_LOW = 0.25
        # The band's DIoU: "paper", the true DIoU (the paper's definition); "released", what the
        # released helper computes (intersection over the anchor's area, not the union, minus
        # the distance term: its bbox_overlaps 'diou' mode keeps area1 as the union). Ours: the
        # paper's, the released one being a bug of that call; the two regions share only 37 % of
        # the true one on RetinaNet anchors (docs/methods/LD.md).
        node.VLR_DIOU = "paper"
        # Main KD on the positives' class logits (GFL recipe: weight 10, T 2; RetinaNet recipe:
        # 10, T 8). KD_NORMALIZER "level": each FPN level's sum divided by that level's
        # positives, the levels summed (released code, both heads); "all": the sum over all
        # levels divided by all positives (this project's formula before 2026-12-05; about 1/L
        # of "level" when the positives spread over L levels).
        node.KD_WEIGHT = 10.0
        node.KD_TEMPERATURE = 2.0
        node.KD_NORMALIZER = "level"

    @configurable
    def __init__(self, *, num_classes: int, reg_max: int, ld_weight: float,
                 ld_temperature: float, vlr_weight: float, vlr_exclude_positives: bool,
                 vlr_topk: int, vlr_low: float, kd_weight: float, kd_temperature: float,
                 softmax_over: str = "side", vlr_normalizer: float = 16.0,
                 kd_normalizer: str = "level", vlr_diou: str = "paper"):
        """
        Args:
            num_classes: K; reg_max: n (``n + 1`` bins per side).
            ld_weight / ld_temperature: main LD; vlr_weight: VLR LD (same temperature);
            vlr_exclude_positives: leave the positives out of the VLR (the RetinaNet recipe);
            vlr_topk / vlr_low: ATSS candidates per level, the band's lower factor;
            kd_weight / kd_temperature: main KD;
            softmax_over: ``"side"`` or ``"anchor"`` (:data:`SOFTMAX_OVER`), for both LD terms;
            vlr_normalizer: the VLR term's divisor; kd_normalizer: ``"level"`` or ``"all"``;
            vlr_diou: the VLR band's DIoU, ``"paper"`` or ``"released"`` (:func:`vlr_region`).
        """
        super().__init__()
        node = "MODEL.DISTILL.LD"
        for key, value in (("LD_WEIGHT", ld_weight), ("VLR_WEIGHT", vlr_weight),
                           ("KD_WEIGHT", kd_weight)):
            if value < 0:
                raise ValueError(f"{node}.{key} must be >= 0, got {value}")
        for key, value in (("LD_TEMPERATURE", ld_temperature),
                           ("KD_TEMPERATURE", kd_temperature),
                           ("VLR_NORMALIZER", vlr_normalizer)):
            if value <= 0:
                raise ValueError(f"{node}.{key} must be > 0, got {value}")
        if vlr_topk < 1 or not 0 <= vlr_low < 1:
            raise ValueError(f"{node}.VLR_TOPK must be >= 1 and VLR_LOW in [0, 1), got "
                             f"{vlr_topk} and {vlr_low}")
        for key, value, allowed in (("SOFTMAX_OVER", softmax_over, SOFTMAX_OVER),
                                    ("KD_NORMALIZER", kd_normalizer, KD_NORMALIZERS),
                                    ("VLR_DIOU", vlr_diou, VLR_DIOUS)):
            if value not in allowed:
                raise ValueError(f"{node}.{key} must be one of {list(allowed)}, got {value!r}")
        self.num_classes, self.bins = int(num_classes), int(reg_max) + 1
        self.ld_weight, self.ld_temperature = float(ld_weight), float(ld_temperature)
        self.vlr_weight, self.vlr_exclude_positives = float(vlr_weight), bool(vlr_exclude_positives)
        self.vlr_topk, self.vlr_low = int(vlr_topk), float(vlr_low)
        self.kd_weight, self.kd_temperature = float(kd_weight), float(kd_temperature)
        self.softmax_over, self.vlr_normalizer = softmax_over, float(vlr_normalizer)
        self.kd_normalizer, self.vlr_diou = kd_normalizer, vlr_diou

    @classmethod
    def from_config(cls, cfg, student, teacher):
        for role, spec in (("student", student), ("teacher", teacher)):
            if not issubclass(spec.model_type, DistributionRetinaNet):
                raise ValueError(
                    f"MODEL.DISTILL.METHODS 'LD' distils box-side distributions: the {role} must "
                    f"be a DistributionRetinaNet (or DistillDistributionRetinaNet), not "
                    f"{spec.name}. Use configs/teachers/RetinaNet-Dist-R101-SODA10M.yaml and "
                    "configs/LD-RetinaNet-R50.yaml (or drop LD)")
        scfg, tcfg = student.cfg, teacher.cfg
        if scfg.MODEL.RETINANET.REG_MAX != tcfg.MODEL.RETINANET.REG_MAX:
            raise ValueError(
                f"LD: MODEL.RETINANET.REG_MAX is {scfg.MODEL.RETINANET.REG_MAX} in the student and "
                f"{tcfg.MODEL.RETINANET.REG_MAX} in the teacher; LD compares the distributions "
                "bin by bin: use the same value")
        for key in ("SIZES", "ASPECT_RATIOS"):
            if scfg.MODEL.ANCHOR_GENERATOR[key] != tcfg.MODEL.ANCHOR_GENERATOR[key]:
                raise ValueError(
                    f"LD: MODEL.ANCHOR_GENERATOR.{key} differs between student and teacher; LD "
                    "pairs the two heads anchor by anchor: give the teacher the student's anchors")
        c = cfg.MODEL.DISTILL.LD
        return {"num_classes": student.num_classes,
                "reg_max": cfg.MODEL.RETINANET.REG_MAX, "ld_weight": c.LD_WEIGHT,
                "ld_temperature": c.LD_TEMPERATURE, "vlr_weight": c.VLR_WEIGHT,
                "vlr_exclude_positives": c.VLR_EXCLUDE_POSITIVES, "vlr_topk": c.VLR_TOPK,
                "vlr_low": c.VLR_LOW, "kd_weight": c.KD_WEIGHT,
                "kd_temperature": c.KD_TEMPERATURE, "softmax_over": c.SOFTMAX_OVER,
                "vlr_normalizer": c.VLR_NORMALIZER, "kd_normalizer": c.KD_NORMALIZER,
                "vlr_diou": c.VLR_DIOU}

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

    def anchor_levels(self, out) -> Tensor:
        """``[R]`` the level index of each anchor of a record (head order), from its class
        logits ``[N, A K, H_l, W_l]`` per level."""
        sizes = [x.shape[1] // self.num_classes * x.shape[2] * x.shape[3] for x in out.cls_logits]
        device = out.cls_logits[0].device
        return torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                       torch.tensor(sizes, device=device))

    def reference_losses(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """:func:`straightforward_ld`."""
        return straightforward_ld(self, student, teacher, gt_instances)

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
        out = {}
        if self.ld_weight > 0:
            weight = torch.sigmoid(s_cls[pos].detach()).max(dim=1).values if pos.any() else \
                s_cls.new_zeros(0)
            kl = self.box_kl(s_box[pos], t_box[pos])  # [P]
            out["loss_ld"] = self.ld_weight * (kl * weight).sum() / 4.0
        if self.vlr_weight > 0:
            # boxes in the logits' precision, at least float32 (detectron2's Boxes hold float32)
            dtype = torch.promote_types(s_box.dtype, torch.float32)
            anchors = [a.tensor.to(dtype) for a in student.anchors]
            region, value = vlr_regions(
                anchors, [inst.gt_boxes.tensor.to(s_box.device, dtype) for inst in gt_instances],
                self.vlr_topk, self.vlr_low, self.vlr_diou)  # [N, R]
            if self.vlr_exclude_positives:
                region = region & ~pos
            kl = self.box_kl(s_box[region], t_box[region])  # [V]
            out["loss_ld_vlr"] = self.vlr_weight * (kl * value[region]).sum() / self.vlr_normalizer
        if self.kd_weight > 0:
            kd = bin_kl(s_cls[pos], t_cls[pos], self.kd_temperature)  # [P]
            if self.kd_normalizer == "all":
                out["loss_ld_kd"] = self.kd_weight * kd.sum() / max(int(pos.sum()), 1)
            else:
                level = self.anchor_levels(student).expand_as(pos)[pos]  # [P]
                num_levels = len(student.cls_logits)
                sums = kd.new_zeros(num_levels).index_add(0, level, kd)
                counts = torch.bincount(level, minlength=num_levels).clamp_min(1)
                out["loss_ld_kd"] = self.kd_weight * (sums / counts).sum()
        return out

    def region_details(self, student, teacher, gt_instances, image: int = 0) -> Dict[str, Tensor]:
        """What the terms see on one image, for pictures (no grad): ``anchors`` ``[R, 4]``,
        ``positive`` ``[R]`` (the main region) with ``weight`` (the student's max class score),
        ``vlr`` ``[R]`` with ``vlr_iou`` (after the positives' exclusion when it applies), the
        side distributions at temperature 1 ``s_prob``/``t_prob`` ``[R, 4, n + 1]`` (per side,
        as the box is decoded, whatever ``SOFTMAX_OVER``) and each anchor's matched GT box
        ``gt_boxes`` ``[R, 4]``."""
        with torch.no_grad():
            s_cls, s_box = self.flat(student, "student")
            _, t_box = self.flat(teacher, "teacher")
            labels = student.anchor_labels[image]
            positive = (labels >= 0) & (labels != self.num_classes)
            anchors = [a.tensor for a in student.anchors]
            vlr, iou = vlr_region(anchors, gt_instances[image].gt_boxes.tensor.to(s_box.device),
                                  self.vlr_topk, self.vlr_low, self.vlr_diou)
            if self.vlr_exclude_positives:
                vlr = vlr & ~positive
            shape = (s_box.shape[1], 4, self.bins)
            return {"anchors": cat(anchors), "positive": positive,
                    "weight": torch.sigmoid(s_cls[image]).max(dim=1).values,
                    "vlr": vlr, "vlr_iou": torch.where(vlr, iou, torch.zeros_like(iou)),
                    "s_prob": F.softmax(s_box[image].reshape(shape), dim=-1),
                    "t_prob": F.softmax(t_box[image].reshape(shape), dim=-1),
                    "gt_boxes": student.anchor_gt_boxes[image]}

    def box_kl(self, s_box: Tensor, t_box: Tensor) -> Tensor:
        """``[M, 4 (n + 1)]`` twice -> ``[M]`` each anchor's KL at the LD temperature
        (:func:`bin_kl`): the sum of its 4 sides' KLs (``SOFTMAX_OVER "side"``) or one KL over
        its ``4 (n + 1)`` logits (``"anchor"``)."""
        if self.softmax_over == "anchor":
            return bin_kl(s_box, t_box, self.ld_temperature)
        m = s_box.shape[0]
        return bin_kl(s_box.reshape(-1, self.bins), t_box.reshape(-1, self.bins),
                      self.ld_temperature).reshape(m, 4).sum(dim=1)


# ------------------------------------------------------------------------------------------------
# straightforward reference (Distiller.reference_losses; tools/benchmark.py kernels)
# ------------------------------------------------------------------------------------------------
def _plain_bin_kl(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """``tau^2 mean_b p_b (log p_b - log q_b)`` over the last axis, explicit softmaxes."""
    p, q = plain_softmax(t.detach() / tau), plain_softmax(s / tau)
    return plain_kl(p, q) / p.shape[-1] * tau * tau


def _plain_vlr_region(anchors: List[Tensor], gt: Tensor, topk: int, low: float, diou: str = "paper"):
    """LD's VLR of one image, GT by GT: ATSS candidates per level by centre distance, threshold
    mean + unbiased std of their IoUs, the DIoU band ``[low t, t)`` (``diou "released"``: the
    intersection over the anchor's area in place of the IoU); an anchor claimed by several GTs
    keeps the largest IoU. ``(in_region [R] bool, iou [R])``."""
    all_anchors = torch.cat(anchors)
    best = torch.full((all_anchors.shape[0],), -1.0, device=all_anchors.device)
    centres = (all_anchors[:, :2] + all_anchors[:, 2:]) / 2
    for g in gt:
        iou = plain_iou(g, all_anchors)
        c = (g[:2] + g[2:]) / 2
        candidates, start = [], 0
        for level in anchors:
            dist = ((centres[start:start + len(level)] - c) ** 2).sum(-1).sqrt()
            candidates.append(dist.argsort()[:min(topk, len(level))] + start)
            start += len(level)
        cand_iou = iou[torch.cat(candidates)]
        t = cand_iou.mean() + (cand_iou.std() if len(cand_iou) > 1 else 0.0)
        enclosing = (torch.maximum(g[2:], all_anchors[:, 2:])
                     - torch.minimum(g[:2], all_anchors[:, :2])) ** 2
        overlap = iou
        if diou == "released":
            inter = (torch.minimum(g[2:], all_anchors[:, 2:])
                     - torch.maximum(g[:2], all_anchors[:, :2])).clamp_min(0).prod(-1)
            overlap = inter / (all_anchors[:, 2:] - all_anchors[:, :2]).prod(-1)
        d = overlap - ((centres - c) ** 2).sum(-1) / enclosing.sum(-1).clamp_min(1e-12)
        band = (d >= low * t) & (d < t)
        best = torch.where(band & (iou > best), iou, best)
    in_region = best >= 0
    return in_region, torch.where(in_region, best, torch.zeros_like(best))


def straightforward_ld(distiller, student, teacher, gt_instances) -> Dict[str, Tensor]:
    """docs/methods/LD.md written plainly, level by level as the released heads: the heads'
    outputs laid out per anchor, main LD on the student's positives weighted by its max class
    score (/ 4), VLR LD weighted by the claiming GT's IoU (/ ``vlr_normalizer``), the KL per side
    summed over the sides or one KL over the anchor's ``4 (n + 1)`` logits
    (``softmax_over``); main KD over the positives' classes, each level by its own positives
    (``kd_normalizer "level"``) or all levels by all positives (``"all"``)."""
    k, b = distiller.num_classes, distiller.bins

    def per_level(rec):
        cls = [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, k) for x in rec.cls_logits]
        box = [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4 * b) for x in rec.box_deltas]
        return cls, box

    def box_kl(s: Tensor, t: Tensor) -> Tensor:  # [..., 4 b] -> [...]
        if distiller.softmax_over == "anchor":
            return _plain_bin_kl(s, t, distiller.ld_temperature)
        shape = s.shape[:-1] + (4, b)
        return _plain_bin_kl(s.reshape(shape), t.reshape(shape), distiller.ld_temperature).sum(-1)

    s_cls, s_box = per_level(student)
    t_cls, t_box = per_level(teacher)
    sizes = [x.shape[1] for x in s_cls]
    labels = torch.stack(student.anchor_labels).split(sizes, dim=1)
    regions = []
    if distiller.vlr_weight > 0:
        anchors = [a.tensor for a in student.anchors]
        for i, inst in enumerate(gt_instances):
            region, iou = _plain_vlr_region(anchors, inst.gt_boxes.tensor, distiller.vlr_topk,
                                     distiller.vlr_low, distiller.vlr_diou)
            regions.append((region, iou))
    ld = vlr = kd_level = kd_all = 0.0
    num_pos = 0
    for level in range(len(sizes)):
        pos = (labels[level] >= 0) & (labels[level] != k)
        num_pos += int(pos.sum())
        sc, tc, sb, tb = s_cls[level], t_cls[level], s_box[level], t_box[level]
        score = plain_sigmoid(sc[pos].detach()).max(dim=-1).values
        ld = ld + (box_kl(sb[pos], tb[pos]) * score).sum() / 4
        kd = _plain_bin_kl(sc[pos], tc[pos], distiller.kd_temperature).sum()
        kd_all = kd_all + kd
        kd_level = kd_level + kd / max(int(pos.sum()), 1)
        start = sum(sizes[:level])
        for i, (region, iou) in enumerate(regions):
            r = region[start:start + sizes[level]]
            if distiller.vlr_exclude_positives:
                r = r & ~pos[i]
            v = iou[start:start + sizes[level]][r]
            vlr = vlr + (box_kl(sb[i][r], tb[i][r]) * v).sum() / distiller.vlr_normalizer
    out = {}
    if distiller.ld_weight > 0:
        out["loss_ld"] = distiller.ld_weight * ld
    if distiller.vlr_weight > 0:
        out["loss_ld_vlr"] = distiller.vlr_weight * vlr
    if distiller.kd_weight > 0:
        kd = kd_level if distiller.kd_normalizer == "level" else kd_all / max(num_pos, 1)
        out["loss_ld_kd"] = distiller.kd_weight * kd
    return out
