"""TAR: Distilling Object Detectors with Task Adaptive Regularization (Sun et al., arXiv
2006.13108, 2020; ``docs/methods/TAR.md``). The paper has no public code.

Three terms, each with its own weight (a weight of 0 turns the term off and its records are
not computed, so the feature term alone runs on any detector, e.g. RetinaNet):

* ``loss_tar_feat_<level>``: Gaussian-mask feature imitation (:func:`gaussian_masks`), per level
  ``sum M (r(S) - T)^2 / sum M``;
* ``loss_tar_cls``: classification-head KD on the shared RoIs, ``tau^2 KL(p_t || p_s)`` over the
  K + 1 classes, averaged over RoIs;
* ``loss_tar_reg``: adaptive regression distillation on the positive shared RoIs, smooth-L1
  between the student's deltas and the teacher's box (re-encoded in the student's box
  transform) where the teacher's box is the better one, divided by the number of positives.

Region proposal sharing (``PROPOSALS``): both box heads answer for the same RoIs, pooled from
each network's own FPN maps: the student's sampled RoIs (default), the teacher's own (sampled
by its ROI heads against the same ground truth) or their union. TAR's default schedule is the
linear distillation decay ``1 - iter / max_iter`` (``MODEL.DISTILL.TAR.DECAY``).
"""
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.structures import Boxes, Instances
from detectron2.structures.boxes import matched_pairwise_iou
from torch import Tensor
from torch.nn import functional as F

from ..config import decay_node
from ..layers.reference import (GroundTruth, plain_box_decode, plain_box_encode, plain_iou,
                               plain_kl, plain_softmax)
from .base import Variant
from .level_pairs import (LevelPairDistiller, boxes_by_image, channels_of, level_cells,
                          max_over_boxes)
from .registry import register_distiller

__all__ = ["TARDistiller", "gaussian_masks", "gaussian_masks_levels", "tar_cls_kd",
           "adaptive_regression_targets", "PROPOSAL_SOURCES", "REG_COMPARISONS"]

#: ``MODEL.DISTILL.TAR.PROPOSALS``: which RoIs both heads answer for
PROPOSAL_SOURCES = ("student", "teacher", "union")
#: ``MODEL.DISTILL.TAR.REG_COMPARE``: what the teacher's box must beat (IoU with the matched GT)
REG_COMPARISONS = ("student", "proposal")


def gaussian_masks(boxes: Sequence[Tensor], grid: Tuple[int, int], padded_size: tuple,
                   sigma_scale: float = 0.5) -> Tensor:
    """TAR's Gaussian object masks of one level, ``[N, H, W]``.

    Args:
        boxes: per image, ground-truth boxes ``[B_i, 4]`` (x1, y1, x2, y2 in input pixels;
            ``B_i`` may be 0).
        grid: the level's ``(H, W)``; it covers the padded batch ``padded_size`` ``(H_in, W_in)``,
            so a pixel x lies at ``x * W / W_in`` in grid units.
        sigma_scale: ``sigma_x = sigma_scale * w``, ``sigma_y = sigma_scale * h`` of the box in
            grid units (0.5: sigma = half the box size, the spec's default).

    The cell ``(i, j)`` sits at its centre ``(j + 0.5, i + 0.5)``; a box with centre
    ``(x0, y0)`` gives it ``exp(-((x - x0)^2 / (2 sx^2) + (y - y0)^2 / (2 sy^2)))`` (1 at the
    centre) and the mask is the maximum over the image's boxes (0 without boxes). A degenerate
    box (zero width or height) covers nothing off its centre line instead of dividing by 0.
    One level of :func:`gaussian_masks_levels`.
    """
    return gaussian_masks_levels(boxes, [grid], padded_size, sigma_scale)[0]


@torch.compiler.disable  # data-dependent box counts: constants computed eagerly
def gaussian_masks_levels(boxes: Sequence[Tensor], grids: Sequence[Tuple[int, int]],
                          padded_size: tuple, sigma_scale: float = 0.5) -> List[Tensor]:
    """:func:`gaussian_masks` of every level of ``grids`` (``[(H_l, W_l)]``), per level
    ``[N, H_l, W_l]``, for all boxes, images and levels at once: each box's Gaussian along x
    on the columns of every level end to end (``[B, sum_l W_l]``), along y on the rows
    (``[B, sum_l H_l]``), their product on every cell of every level (``[B, sum_l H_l W_l]``,
    :class:`~csgr_distill.distillers.level_pairs.LevelCells`) and the maximum over each image's
    boxes: the same float32 operations as the formula level by level, box by box."""
    n = len(boxes)
    device = boxes[0].device if n else torch.device("cpu")
    cells = level_cells(grids, device)
    with torch.no_grad():
        out = torch.zeros(n, sum(cells.sizes), device=device)
        if n and sum(len(b) for b in boxes):
            flat, image, counts = boxes_by_image(boxes)
            # per row and column of every level: its scale from input pixels
            y_scale, x_scale = cells.scales(padded_size)

            def along(lo, hi, scale, centres):  # [B], [B] -> [B, len(centres)]
                a, b = lo[:, None] * scale, hi[:, None] * scale
                sigma = ((b - a) * sigma_scale).clamp_min(1e-6)
                offset = centres - (a + b) / 2
                var2 = sigma * sigma  # 2 sigma^2 below: x * x and x + x are x ** 2 and 2 x
                return torch.exp((offset * offset).neg_() / (var2 + var2))

            gx = along(flat[:, 0], flat[:, 2], x_scale, cells.col_centres)
            gy = along(flat[:, 1], flat[:, 3], y_scale, cells.row_centres)
            max_over_boxes(out, cells, gy, gx, image, counts)
    return cells.split(out)


def tar_cls_kd(s_logits: Tensor, t_logits: Tensor, temperature: float) -> Tensor:
    """``tau^2 * mean_r KL(softmax(z_t / tau) || softmax(z_s / tau))`` over the K + 1 classes.

    Args:
        s_logits, t_logits: ``[R, K+1]`` class logits of the same RoIs (teacher detached).
    Returns a scalar (0 for R = 0, keeping the graph).
    """
    if s_logits.shape[0] == 0:
        return s_logits.sum() * 0.0
    tau = float(temperature)
    log_ps = F.log_softmax(s_logits / tau, dim=1)
    log_pt = F.log_softmax(t_logits.detach() / tau, dim=1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * tau * tau


def _class_deltas(deltas: Tensor, classes: Tensor) -> Tensor:
    """``[R, 4]`` deltas of each RoI's class from ``[R, 4K]`` (or ``[R, 4]`` class-agnostic)."""
    if deltas.shape[1] == 4:
        return deltas
    idx = classes[:, None] * 4 + torch.arange(4, device=deltas.device)
    return deltas.gather(1, idx)


def adaptive_regression_targets(
    proposals: Tensor, gt_boxes: Tensor, gt_classes: Tensor, num_classes: int, s_deltas: Tensor,
    t_deltas: Tensor, s_transform, t_transform, compare: str = "student",
) -> Tuple[Tensor, Tensor, Tensor]:
    """Which positive RoIs take the teacher's box as a regression target, and that target.

    Args:
        proposals: ``[R, 4]`` RoI boxes; gt_boxes: ``[R, 4]`` their matched GT boxes;
        gt_classes: ``[R]`` labels, ``num_classes`` (K) = background.
        s_deltas / t_deltas: ``[R, 4K]`` or ``[R, 4]`` box deltas of student and teacher.
        s_transform / t_transform: their ``Box2BoxTransform`` (to decode each one's deltas).
        compare: ``"student"``: the teacher's decoded box must have a higher IoU with the GT than
            the student's; ``"proposal"``: than the RoI itself.

    Returns:
        ``(positive [R] bool, selected [R] bool, target [R, 4])``: ``selected`` is a subset of
        ``positive``; ``target`` is the teacher's box encoded relative to the RoI with the
        *student's* transform (detached; rows outside ``selected`` are meaningless).
    """
    if compare not in REG_COMPARISONS:
        raise ValueError(f"MODEL.DISTILL.TAR.REG_COMPARE is {compare!r}; use one of "
                         f"{list(REG_COMPARISONS)}")
    positive = (gt_classes >= 0) & (gt_classes < num_classes)
    classes = gt_classes.clamp(0, num_classes - 1)
    with torch.no_grad():
        t_box = t_transform.apply_deltas(_class_deltas(t_deltas.detach(), classes), proposals)
        gt = Boxes(gt_boxes)
        t_iou = matched_pairwise_iou(Boxes(t_box), gt)
        if compare == "student":
            s_box = s_transform.apply_deltas(_class_deltas(s_deltas.detach(), classes), proposals)
            other = matched_pairwise_iou(Boxes(s_box), gt)
        else:
            other = matched_pairwise_iou(Boxes(proposals), gt)
        selected = positive & (t_iou > other)
        target = s_transform.get_deltas(proposals, t_box)
    return positive, selected, target


@register_distiller("TAR")
class TARDistiller(LevelPairDistiller):
    """TAR's three terms (module docstring). The feature term's adapters map the student's
    channels to the teacher's per level (:class:`LevelPairDistiller`)."""

    #: the paper's ablation on Faster R-CNN (features, + class head, + regression head, each
    #: without decay; "TAR" itself adds the decay) and CSGR with TAR's head terms
    benchmark_variants = {
        "TAR features, no decay": Variant(
            ("MODEL.DISTILL.TAR.CLS_WEIGHT", 0.0, "MODEL.DISTILL.TAR.REG_WEIGHT", 0.0,
             "MODEL.DISTILL.TAR.DECAY.TYPE", "none"), families=("rcnn",), parts=("gain",)),
        "TAR features + cls, no decay": Variant(
            ("MODEL.DISTILL.TAR.REG_WEIGHT", 0.0, "MODEL.DISTILL.TAR.DECAY.TYPE", "none"),
            families=("rcnn",), parts=("gain",)),
        "TAR features + cls + reg, no decay": Variant(
            ("MODEL.DISTILL.TAR.DECAY.TYPE", "none"), families=("rcnn",), parts=("gain",)),
        "CSGR+TAR heads": Variant(
            ("MODEL.DISTILL.METHODS", ("CSGR", "TAR"), "MODEL.DISTILL.TAR.FEAT_WEIGHT", 0.0),
            families=("rcnn",), parts=("gain",)),
    }

    @classmethod
    def add_config(cls, node) -> None:
        # The paper gives none of its loss weights or hyperparameters and has no public code:
        # every value not marked "paper" is ours (docs/methods/TAR.md says how each was chosen).
        # A weight of 0 turns its term off; configs/Base-RetinaNet-SODA10M.yaml (and the demo
        # RetinaNets, which inherit it) turns the RoI terms off (a dense detector has no RoIs).
        #
        # Gaussian-mask feature imitation, per level sum M (r(S) - T)^2 / sum M (paper). The sum
        # runs over the channels too, so a level's term is about C times a per-channel squared
        # difference: 4e-3 ~ 1/256 makes it the mean squared difference inside the mask, MIMIC's
        # scale (ours).
        node.FEAT_WEIGHT = 4e-3
        # sigma = SIGMA_SCALE x box size, in grid units (paper default: half the box size).
        node.SIGMA_SCALE = 0.5
        # Levels of the feature term (present in both networks with equal strides); R-CNN
        # configs: p2-p5.
        node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
        # Classification-head KD on the shared RoIs, tau^2 KL(p_t || p_s) over K + 1 classes
        # (paper). Weight 1: the scale of the box head's own cross-entropy (ours); tau 1 (the
        # paper's start).
        node.CLS_WEIGHT = 1.0
        node.TEMPERATURE = 1.0
        # Adaptive regression distillation on the positive shared RoIs (paper), divided by the
        # positive count (paper), whereas the box head's own loss is divided by all sampled RoIs:
        # with P positives of R RoIs, equal weights give the term R/P times that loss's gradient
        # per positive (14-25x in the demo: 5-9 of 128). 0.1 (ours, paper value unknown): weight
        # 1 made a demo Faster R-CNN student diverge at iteration ~80; 0.1 trained all three
        # seeds and gained more (docs/methods/TAR.md). Smooth-L1 beta 1.0, Fast R-CNN's smooth
        # L1 (the paper names smooth L1 without a beta; 0 gives L1).
        node.REG_WEIGHT = 0.1
        node.REG_BETA = 1.0
        # The teacher's box is a target where its IoU with the matched GT beats the student's box
        # ("student", paper default) or the RoI's own ("proposal").
        node.REG_COMPARE = "student"
        # Region proposal sharing: both box heads answer for the student's sampled RoIs
        # ("student", paper default), the teacher's own RoIs sampled by its ROI heads
        # ("teacher"), or both ("union"). "teacher" runs the student's box head a second time on
        # the teacher's RoIs; "union" runs both heads a second time on all of them.
        node.PROPOSALS = "student"
        # TAR's distillation decay (paper): linear from 1 at iteration 0 to 0 at SOLVER.MAX_ITER.
        node.DECAY = decay_node("linear")

    config_node = "TAR"

    @configurable
    def __init__(self, *, in_features: List[str], student_channels: Dict[str, int],
                 teacher_channels: Dict[str, int], feat_weight: float, sigma_scale: float,
                 cls_weight: float, temperature: float, reg_weight: float, reg_compare: str,
                 reg_beta: float, proposals: str):
        """
        Args:
            in_features, student_channels, teacher_channels: the feature term's levels and the
                channels of both networks there.
            feat_weight / cls_weight / reg_weight: the three terms' weights (0: term off).
            sigma_scale: Gaussian sigma as a fraction of the box size (:func:`gaussian_masks`).
            temperature: the classification KD's tau.
            reg_compare: ``"student"`` or ``"proposal"`` (:func:`adaptive_regression_targets`).
            reg_beta: smooth-L1 beta of the regression term (0: L1).
            proposals: ``"student"``, ``"teacher"`` or ``"union"``: the shared RoIs.
        """
        super().__init__(in_features=in_features, student_channels=student_channels,
                         teacher_channels=teacher_channels)
        node = "MODEL.DISTILL.TAR"
        for key, value in (("FEAT_WEIGHT", feat_weight), ("CLS_WEIGHT", cls_weight),
                           ("REG_WEIGHT", reg_weight), ("REG_BETA", reg_beta)):
            if value < 0:
                raise ValueError(f"{node}.{key} must be >= 0, got {value}")
        if feat_weight == 0 and cls_weight == 0 and reg_weight == 0:
            raise ValueError(f"{node}: FEAT_WEIGHT, CLS_WEIGHT and REG_WEIGHT are all 0; give "
                             "at least one term a weight or drop 'TAR' from MODEL.DISTILL.METHODS")
        if sigma_scale <= 0:
            raise ValueError(f"{node}.SIGMA_SCALE must be > 0, got {sigma_scale}")
        if temperature <= 0:
            raise ValueError(f"{node}.TEMPERATURE must be > 0, got {temperature}")
        if reg_compare not in REG_COMPARISONS:
            raise ValueError(f"{node}.REG_COMPARE is {reg_compare!r}; use one of "
                             f"{list(REG_COMPARISONS)}")
        if proposals not in PROPOSAL_SOURCES:
            raise ValueError(f"{node}.PROPOSALS is {proposals!r}; use one of "
                             f"{list(PROPOSAL_SOURCES)}")
        self.feat_weight, self.sigma_scale = float(feat_weight), float(sigma_scale)
        self.cls_weight, self.temperature = float(cls_weight), float(temperature)
        self.reg_weight, self.reg_compare, self.reg_beta = (float(reg_weight), reg_compare,
                                                            float(reg_beta))
        self.proposals = proposals
        self.required_outputs = self._required_outputs()
        self.loss_weight_keys = {"loss_tar_feat": f"{node}.FEAT_WEIGHT",
                                 "loss_tar_cls": f"{node}.CLS_WEIGHT",
                                 "loss_tar_reg": f"{node}.REG_WEIGHT"}

    @property
    def uses_rois(self) -> bool:
        return self.cls_weight > 0 or self.reg_weight > 0

    def _required_outputs(self) -> Dict[str, Tuple[str, ...]]:
        student, teacher = ["features"], ["features"]
        if self.uses_rois:
            # roi_head also carries the box transform and class count
            own = ["rois", "roi_cls_logits", "roi_box_deltas", "roi_head"]
            if self.proposals == "student":
                student, teacher = student + own, teacher + ["roi_head"]
            elif self.proposals == "teacher":
                student, teacher = student + ["roi_head"], teacher + own
            else:
                student, teacher = student + ["rois", "roi_head"], teacher + ["rois", "roi_head"]
        return {"student": tuple(student), "teacher": tuple(teacher)}

    @classmethod
    def from_config(cls, cfg, student, teacher):
        node = cfg.MODEL.DISTILL.TAR
        return {"in_features": list(node.IN_FEATURES), "feat_weight": node.FEAT_WEIGHT,
                "sigma_scale": node.SIGMA_SCALE, "cls_weight": node.CLS_WEIGHT,
                "temperature": node.TEMPERATURE, "reg_weight": node.REG_WEIGHT,
                "reg_compare": node.REG_COMPARE, "reg_beta": node.REG_BETA,
                "proposals": node.PROPOSALS,
                **channels_of(student, teacher)}

    # ---- the three terms -------------------------------------------------------------------
    def feature_losses(self, student, teacher, gt_instances) -> Dict[str, Tensor]:
        """``loss_tar_feat_<level> = FEAT_WEIGHT * sum M (r(S) - T)^2 / sum M`` (0 when the
        batch has no boxes); the masks of all levels in one step (:func:`gaussian_masks_levels`),
        their normalisers in one reduction."""
        boxes = self.gt_boxes(gt_instances, len(student.image_sizes))
        pairs = list(self.level_pairs(student, teacher))
        masks = gaussian_masks_levels(boxes, [s.shape[-2:] for _, s, _ in pairs],
                                      student.padded_size, self.sigma_scale)
        # FEAT_WEIGHT / sum M of every level at once (the masks are constants)
        scales = self.feat_weight / torch.stack([m.sum() for m in masks]).clamp_min(1e-12)
        out = {}
        for (level, s_feat, t_feat), mask, scale in zip(pairs, masks, scales):
            diff = self.adapters[level](s_feat) - t_feat
            out[f"loss_tar_feat_{level}"] = (diff * diff * mask[:, None]).sum() * scale
        return out

    def shared_predictions(self, student, teacher) -> Tuple[List[Instances], Tuple[Tensor, Tensor],
                                                            Tuple[Tensor, Tensor]]:
        """The shared RoIs and both heads' ``(cls_logits, box_deltas)`` on them."""
        if self.proposals == "student":
            rois = student.rois
            s_pred = (student.roi_cls_logits, student.roi_box_deltas)
            t_pred = teacher.roi_head([r.proposal_boxes for r in rois])
        elif self.proposals == "teacher":
            rois = teacher.rois
            s_pred = student.roi_head([r.proposal_boxes for r in rois])
            t_pred = (teacher.roi_cls_logits, teacher.roi_box_deltas)
        else:
            rois = [Instances.cat([s, t]) for s, t in zip(
                _roi_fields(student.rois), _roi_fields(teacher.rois))]
            boxes = [r.proposal_boxes for r in rois]
            s_pred, t_pred = student.roi_head(boxes), teacher.roi_head(boxes)
        return rois, s_pred, t_pred

    def head_losses(self, student, teacher) -> Dict[str, Tensor]:
        rois, (s_cls, s_deltas), (t_cls, t_deltas) = self.shared_predictions(student, teacher)
        if s_cls.shape[1] != t_cls.shape[1]:
            raise ValueError(
                f"TAR: the student's box head scores {s_cls.shape[1]} classes and the "
                f"teacher's {t_cls.shape[1]} (K + 1 each); classification and regression "
                "distillation need the same classes (MODEL.ROI_HEADS.NUM_CLASSES of both "
                "configs), or set MODEL.DISTILL.TAR.CLS_WEIGHT and REG_WEIGHT to 0")
        out = {}
        if self.cls_weight > 0:
            out["loss_tar_cls"] = self.cls_weight * tar_cls_kd(s_cls, t_cls, self.temperature)
        if self.reg_weight > 0:
            out["loss_tar_reg"] = self.reg_weight * self.regression_loss(
                rois, s_deltas, t_deltas, student, teacher)
        return out

    def regression_loss(self, rois: List[Instances], s_deltas: Tensor, t_deltas: Tensor,
                        student, teacher) -> Tensor:
        """Smooth-L1 towards the teacher's box on the selected positive RoIs, divided by the
        number of positive RoIs (0 without positives)."""
        proposals = cat([r.proposal_boxes.tensor for r in rois])
        gt_classes = cat([r.gt_classes for r in rois])
        gt_boxes = cat([_gt_boxes(r) for r in rois])
        s_head, t_head = student.roi_head, teacher.roi_head
        positive, selected, target = adaptive_regression_targets(
            proposals, gt_boxes, gt_classes, s_head.num_classes, s_deltas, t_deltas,
            s_head.box_transform, t_head.box_transform, self.reg_compare)
        num_pos = int(positive.sum())
        if not selected.any():
            return s_deltas.sum() * 0.0
        classes = gt_classes.clamp(0, s_head.num_classes - 1)
        pred = _class_deltas(s_deltas, classes)[selected]
        loss = F.smooth_l1_loss(pred, target[selected], beta=self.reg_beta, reduction="sum") \
            if self.reg_beta > 0 else F.l1_loss(pred, target[selected], reduction="sum")
        return loss / max(num_pos, 1)

    def roi_details(self, student, teacher) -> Dict[str, Tensor]:
        """What the head terms see, for pictures (no grad): over the shared RoIs of all images
        (``R`` rows; ``image``: each row's image index), ``proposals``, ``gt_boxes``
        ``[R, 4]``, ``gt_classes`` ``[R]``, the class probabilities at the KD temperature
        ``s_prob``/``t_prob`` ``[R, K+1]``, the decoded boxes of each RoI's class
        ``s_box``/``t_box`` ``[R, 4]``, and the adaptive rule's ``positive``/``selected``
        ``[R]``."""
        with torch.no_grad():
            rois, (s_cls, s_deltas), (t_cls, t_deltas) = self.shared_predictions(student, teacher)
            s_head, t_head = student.roi_head, teacher.roi_head
            proposals = cat([r.proposal_boxes.tensor for r in rois])
            gt_classes = cat([r.gt_classes for r in rois])
            positive, selected, _ = adaptive_regression_targets(
                proposals, cat([_gt_boxes(r) for r in rois]), gt_classes, s_head.num_classes,
                s_deltas, t_deltas, s_head.box_transform, t_head.box_transform, self.reg_compare)
            classes = gt_classes.clamp(0, s_head.num_classes - 1)
            return {
                "image": cat([torch.full((len(r),), i, dtype=torch.long, device=proposals.device)
                              for i, r in enumerate(rois)]),
                "proposals": proposals, "gt_boxes": cat([_gt_boxes(r) for r in rois]),
                "gt_classes": gt_classes,
                "s_prob": F.softmax(s_cls / self.temperature, dim=1),
                "t_prob": F.softmax(t_cls / self.temperature, dim=1),
                "s_box": s_head.box_transform.apply_deltas(_class_deltas(s_deltas, classes),
                                                           proposals),
                "t_box": t_head.box_transform.apply_deltas(_class_deltas(t_deltas, classes),
                                                           proposals),
                "positive": positive, "selected": selected,
            }

    def reference_losses(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """:func:`straightforward_tar_heads` (its feature term :func:`straightforward_tar`)."""
        return straightforward_tar_heads(self, student, teacher, gt_instances)

    def forward(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """``(DetectorOutputs, DetectorOutputs, list[Instances]) -> {loss name: weighted
        loss}``: the feature term per level, ``loss_tar_cls`` and ``loss_tar_reg``, for the terms
        whose weight is > 0."""
        out = {}
        if self.feat_weight > 0:
            out.update(self.feature_losses(student, teacher, gt_instances))
        if self.uses_rois:
            out.update(self.head_losses(student, teacher))
        return out


def _gt_boxes(rois: Instances) -> Tensor:
    """``[R, 4]`` matched GT boxes (zeros for an image without ground truth, whose RoIs are all
    background and never positive)."""
    if rois.has("gt_boxes"):
        return rois.gt_boxes.tensor
    return rois.proposal_boxes.tensor.new_zeros((len(rois), 4))


def _roi_fields(rois: Sequence[Instances]) -> List[Instances]:
    """The RoIs reduced to the fields both detectors' samplings have (for the union)."""
    return [Instances(r.image_size, proposal_boxes=r.proposal_boxes, gt_classes=r.gt_classes,
                      gt_boxes=Boxes(_gt_boxes(r))) for r in rois]


# ------------------------------------------------------------------------------------------------
# straightforward reference (Distiller.reference_losses; tools/benchmark.py kernels)
# ------------------------------------------------------------------------------------------------
def straightforward_tar(distiller, student: Dict[str, Tensor], teacher: Dict[str, Tensor],
                        gt: "GroundTruth" = None):
    """TAR.md's feature term written plainly: per image, per box a full Gaussian over the grid
    from a meshgrid of cell centres, the mask as the running maximum, then ``sum M (r(S) - T)^2 /
    sum M`` per level. (Its RoI terms read box-head outputs, not the maps this harness feeds.)"""
    if gt is None:
        raise ValueError("straightforward_tar needs the batch's ground truth (gt)")
    losses = {}
    for level in distiller.in_features:
        s = distiller.adapters[level](student[level])
        t = teacher[level].detach()
        n, _, h, w = t.shape
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        mask = torch.zeros(n, h, w)
        for i, boxes in enumerate(gt.boxes):
            for x1, y1, x2, y2 in boxes.tolist():
                x1, x2 = x1 * w / gt.padded_size[1], x2 * w / gt.padded_size[1]
                y1, y2 = y1 * h / gt.padded_size[0], y2 * h / gt.padded_size[0]
                sx = max((x2 - x1) * distiller.sigma_scale, 1e-6)
                sy = max((y2 - y1) * distiller.sigma_scale, 1e-6)
                g = torch.exp(-((xs - (x1 + x2) / 2) ** 2 / (2 * sx * sx)
                                + (ys - (y1 + y2) / 2) ** 2 / (2 * sy * sy)))
                mask[i] = torch.maximum(mask[i], g)
        mask = mask.to(t.device)[:, None]
        value = ((s - t) ** 2 * mask).sum() / mask.sum().clamp_min(1e-12)
        losses[f"loss_tar_feat_{level}"] = distiller.feat_weight * value
    return losses


def straightforward_tar_heads(distiller, student, teacher, gt_instances) -> Dict[str, Tensor]:
    """TAR.md written plainly on Faster R-CNN records with the student's RoIs shared: the
    feature term (:func:`~csgr_distill.benchmark.references.straightforward_tar`), the class KD
    from explicit softmaxes averaged over RoIs, the regression term RoI by RoI: decode both
    heads' boxes of the RoI's GT class, keep the positives whose teacher box has the larger IoU
    with the GT, smooth-L1 to the teacher box re-encoded, summed, / positives."""
    out = {}
    if distiller.feat_weight > 0:
        out.update(straightforward_tar(distiller, student.features, teacher.features,
                                       GroundTruth.of(student, gt_instances)))
    if not distiller.uses_rois:
        return out
    if distiller.proposals != "student":
        raise ValueError("straightforward_tar_heads writes out the default PROPOSALS 'student'")
    rois = student.rois
    s_cls, s_deltas = student.roi_cls_logits, student.roi_box_deltas
    t_cls, t_deltas = teacher.roi_head([r.proposal_boxes for r in rois])
    tau = distiller.temperature
    if distiller.cls_weight > 0:
        kl = plain_kl(plain_softmax(t_cls.detach() / tau), plain_softmax(s_cls / tau))
        out["loss_tar_cls"] = distiller.cls_weight * kl.mean() * tau * tau
    if distiller.reg_weight > 0:
        s_head, t_head = student.roi_head, teacher.roi_head
        k = s_head.num_classes
        proposals = torch.cat([r.proposal_boxes.tensor for r in rois])
        gt_classes = torch.cat([r.gt_classes for r in rois])
        gt_boxes = torch.cat([r.gt_boxes.tensor for r in rois])
        positive = (gt_classes >= 0) & (gt_classes < k)
        cls = gt_classes.clamp(0, k - 1)
        rows = torch.arange(len(cls))

        def class_deltas(d):
            return d if d.shape[1] == 4 else d.reshape(len(d), -1, 4)[rows, cls]

        st, tt = s_head.box_transform, t_head.box_transform
        t_box = plain_box_decode(class_deltas(t_deltas.detach()), proposals, tt.weights, tt.scale_clamp)
        s_box = plain_box_decode(class_deltas(s_deltas.detach()), proposals, st.weights, st.scale_clamp)
        t_iou = plain_iou(t_box, gt_boxes)
        o_iou = plain_iou(s_box if distiller.reg_compare == "student" else proposals, gt_boxes)
        selected = positive & (t_iou > o_iou)
        diff = (class_deltas(s_deltas) - plain_box_encode(t_box, proposals, st.weights))[selected]
        beta = distiller.reg_beta
        loss = torch.where(diff.abs() < beta, 0.5 * diff ** 2 / max(beta, 1e-12),
                           diff.abs() - 0.5 * beta) if beta > 0 else diff.abs()
        out["loss_tar_reg"] = distiller.reg_weight * loss.sum() / max(int(positive.sum()), 1)
    return out
