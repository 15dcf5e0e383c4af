"""DETRDistill: a universal knowledge distillation framework for DETR-families (Chang et al.,
ICCV 2023, arXiv 2211.10156; ``docs/methods/DETRDistill.md``), between two detectors of the DETR
port (``DistillDetr`` / ``DistillDeformableDetr`` students).

Per decoder layer l (student and teacher with the same number of layers):

* logits distillation (``loss_detrdistill_{cls,l1,giou}_l<l>``): the student's predictions of
  layer l matched one-to-one to *all* the teacher's predictions of layer l by the Hungarian
  algorithm (cost = soft class cost + 5 L1 + 2 (-GIoU)); on the pairs, soft-target BCE (sigmoid
  heads) or a temperature KL (softmax DETR), L1 and GIoU, each averaged over the pairs. The
  teacher's boxes are first clipped to the image (``CLIP_TEACHER_BOXES``, as the authors' code);
* target-aware feature distillation (``loss_detrdistill_feat_l<l>``): the teacher's top-K
  (query, class) predictions of layer l, quality ``score x max IoU with the GT``, a mask
  ``max(sum_i c_i cos(q_i, T(x)), 0.01)`` over each encoder input level divided by its per-image
  maximum, ``mean((m T - m r(S))^2)`` summed over levels;
* query-prior assignment (``loss_detrdistill_qp_{ce,bbox,giou}_l<l>``): an extra student decoder
  pass with the teacher's learned queries (the record's ``decoder``), supervised by the GT under
  the teacher's own assignment for those queries (``QUERY_PRIOR_ASSIGNMENT``: each layer's own,
  as the authors' code, or the last layer's for every layer), with the student's own set losses
  (the record's ``set_losses``); training only, nothing of it is in the model;
* optional contrastive query term (``loss_detrdistill_contrast_l<l>``, off by default): the
  authors' code's, per layer: the matched student and teacher query embeddings through learned
  projection heads, InfoNCE over every pair of the batch (:class:`QueryContrastHead`).
"""
from typing import Dict, List, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.structures import Boxes, pairwise_iou
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import box_convert, generalized_box_iou, generalized_box_iou_loss

from ..detr_port.base import DetrFamily
from ..detr_port.detr import detr_targets
from ..layers.adapters import build_channel_adapter
from ..layers.reference import plain_giou, plain_iou, plain_kl, plain_sigmoid, plain_softmax, plain_xyxy
from .base import Distiller, Variant
from .registry import register_distiller

__all__ = ["DETRDistillDistiller", "QueryContrastHead", "soft_class_cost", "match_predictions",
           "target_aware_mask", "clip_to_image", "QUERY_PRIOR_ASSIGNMENTS"]

#: ``MODEL.DISTILL.DETRDISTILL.QUERY_PRIOR_ASSIGNMENT``: the teacher assignment that supervises
#: layer l of the query-prior pass: layer l's own ("per_layer", the authors' code) or the
#: teacher's last layer's for every layer ("last")
QUERY_PRIOR_ASSIGNMENTS = ("per_layer", "last")


def _box_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def clip_to_image(boxes: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) normalised by the unpadded image size -> the same boxes
    clipped to the image, still (cx, cy, w, h). The authors' code clips the teacher's boxes to
    the image in pixels (corners clamped to ``[0, W] x [0, H]``) before its matching and pair
    losses; in normalised coordinates that is a clamp of the corners to ``[0, 1]``. Boxes inside
    the image come back bit for bit (no rounding through the corners: near-tied matching costs
    stay as they were)."""
    corners = _box_xyxy(boxes)
    inside = ((corners >= 0) & (corners <= 1)).all(-1, keepdim=True)
    return torch.where(inside, boxes, box_convert(corners.clamp(0.0, 1.0), "xyxy", "cxcywh"))


def soft_class_cost(s_logits: Tensor, t_logits: Tensor, softmax: bool) -> Tensor:
    """``[..., Qs, C]``, ``[..., Qt, C]`` -> ``[..., Qs, Qt]``: the class cost of pairing student
    query i with teacher query j. Sigmoid heads: the BCE of the student's logits against the
    teacher's probabilities, summed over classes; softmax heads: the cross-entropy
    ``-sum p_t log q_s``. Both are a matrix product over classes (no ``[Qs, Qt, C]`` tensor)."""
    t = t_logits.detach()
    if softmax:
        return -(F.log_softmax(s_logits, -1) @ F.softmax(t, -1).transpose(-1, -2))
    # BCE(s, p) summed over classes = sum_c softplus(s_c) - s . p
    return (F.softplus(s_logits).sum(-1, keepdim=True)
            - s_logits @ torch.sigmoid(t).transpose(-1, -2))


def match_predictions(s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor,
                      softmax: bool, costs=(1.0, 5.0, 2.0)) -> List[Tuple[Tensor, Tensor]]:
    """Per image, the Hungarian matching of the student's predictions ``[N, Qs, .]`` to the
    teacher's ``[N, Qt, .]`` (scipy's ``linear_sum_assignment``, as the detectors' matchers):
    ``(student_idx, teacher_idx)``, ``min(Qs, Qt)`` pairs. N may stack several decoder layers'
    images: every cost matrix is computed in one batched pass and copied to the host once (on
    a GPU, one synchronisation instead of one per image and layer), and the assignments come
    back to the device in one copy."""
    with torch.no_grad():
        cost = (costs[0] * soft_class_cost(s_logits, t_logits, softmax)
                + costs[1] * torch.cdist(s_boxes, t_boxes, p=1)
                - costs[2] * torch.vmap(generalized_box_iou)(_box_xyxy(s_boxes),
                                                             _box_xyxy(t_boxes)))
        cost = cost.float().cpu().numpy()
    # every image's assignment back in one host-to-device copy, then split (views)
    solved = [linear_sum_assignment(c) for c in cost]
    if not solved:
        return []
    flat = torch.as_tensor(np.concatenate([np.concatenate(p) for p in solved]),
                           dtype=torch.long).to(s_logits.device)
    sizes = [len(i) for i, _ in solved for _ in range(2)]
    parts = flat.split(sizes)
    return list(zip(parts[0::2], parts[1::2]))


def target_aware_mask(queries: Tensor, quality: Tensor, feature: Tensor,
                      floor: float = 0.01) -> Tensor:
    """DETRDistill's mask of one image on one level.

    Args:
        queries: ``[K, D]`` the teacher's selected query embeddings; quality: ``[K]``.
        feature: ``[D, H, W]`` the teacher's level.
    Returns ``[H, W]``: ``max(sum_i c_i cos(q_i, T(x)), floor)`` divided by its maximum.
    """
    q = F.normalize(queries, dim=1)
    t = F.normalize(feature.flatten(1), dim=0)  # [D, HW]
    m = (quality[:, None] * (q @ t)).sum(0).clamp_min(floor)
    return (m / m.max()).reshape(feature.shape[1:])


class QueryContrastHead(nn.Module):
    """The authors' code's contrastive term between matched query embeddings (their
    ``MoCoCLHead``, here written anew). Each side has its own head: a linear projection to
    ``dim`` and a two-layer MLP (linear, BatchNorm1d, ReLU, linear); the outputs are
    L2-normalised; the logits are teacher rows against student columns over *every* pair of the
    batch, divided by the temperature; the loss is the cross-entropy with the pair itself as the
    positive (the diagonal), averaged over the pairs. The heads are trained with the student
    (the teacher's embeddings come in detached: its head still learns)."""

    def __init__(self, student_dim: int, teacher_dim: int, dim: int = 512,
                 temperature: float = 0.07):
        super().__init__()

        def head(width: int) -> nn.Sequential:
            return nn.Sequential(nn.Linear(width, dim), nn.Linear(dim, dim), nn.BatchNorm1d(dim),
                                 nn.ReLU(inplace=True), nn.Linear(dim, dim))

        self.student_head, self.teacher_head = head(student_dim), head(teacher_dim)
        self.temperature = float(temperature)

    def forward(self, student_queries: Tensor, teacher_queries: Tensor) -> Tensor:
        """``[P, D_s]`` student and ``[P, D_t]`` teacher embeddings, row p of each one matched
        pair (all the batch's pairs) -> the scalar loss."""
        s = F.normalize(self.student_head(student_queries), dim=1)
        t = F.normalize(self.teacher_head(teacher_queries), dim=1)
        logits = t @ s.T / self.temperature  # [P teacher, P student]
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


@register_distiller("DETRDistill")
class DETRDistillDistiller(Distiller):
    """DETRDistill's components (module docstring); each switched off by a zero weight."""

    #: each component alone (the paper's ablation), the query-prior term under the teacher's
    #: last-layer assignment, and DETRDistill + CSGR
    benchmark_variants = {
        "DETRDistill logits only": Variant(
            ("MODEL.DISTILL.DETRDISTILL.FEATURE_WEIGHT", 0.0,
             "MODEL.DISTILL.DETRDISTILL.QUERY_PRIOR_WEIGHT", 0.0), parts=("gain", "overhead")),
        "DETRDistill features only": Variant(
            ("MODEL.DISTILL.DETRDISTILL.LOGITS_WEIGHT", 0.0,
             "MODEL.DISTILL.DETRDISTILL.QUERY_PRIOR_WEIGHT", 0.0), parts=("gain", "overhead")),
        "DETRDistill query prior only": Variant(
            ("MODEL.DISTILL.DETRDISTILL.LOGITS_WEIGHT", 0.0,
             "MODEL.DISTILL.DETRDISTILL.FEATURE_WEIGHT", 0.0), parts=("gain", "overhead")),
        "DETRDistill query prior only, last-layer assignment": Variant(
            ("MODEL.DISTILL.DETRDISTILL.LOGITS_WEIGHT", 0.0,
             "MODEL.DISTILL.DETRDISTILL.FEATURE_WEIGHT", 0.0,
             "MODEL.DISTILL.DETRDISTILL.QUERY_PRIOR_ASSIGNMENT", "last"), parts=("overhead",)),
        "DETRDistill+CSGR": Variant(("MODEL.DISTILL.METHODS", ("DETRDistill", "CSGR")),
                                    parts=("gain",)),
    }

    @classmethod
    def add_config(cls, node) -> None:
        # Each component's weight 0 turns it off (the paper's ablation). Sources: "paper",
        # "released code" (BIVLab-USTC/DETRDistill, its Deformable DETR config), "ours".
        #
        # Hungarian logits distillation per decoder layer: matching costs = pair-loss weights
        # (paper and released code: class 1, L1 5, GIoU 2); the component's overall weight
        # (paper 1).
        node.LOGITS_WEIGHT = 1.0
        node.COST_CLASS = 1.0
        node.COST_L1 = 5.0
        node.COST_GIOU = 2.0
        # Clip the teacher's boxes to the image before the matching and the L1/GIoU pair losses
        # (released code: True; the paper does not say). False: the boxes as predicted.
        node.CLIP_TEACHER_BOXES = True
        # Temperature of the KL for softmax DETRs (ours: the released code distils sigmoid
        # Deformable DETR only; neither publishes one: 1, the plain KL).
        node.TEMPERATURE = 1.0
        # Target-aware feature distillation per decoder layer (paper and released code: weight
        # 1, top-K 100, mask floor 0.01).
        node.FEATURE_WEIGHT = 1.0
        node.TOPK = 100
        node.MASK_FLOOR = 0.01
        # Query-prior assignment distillation: the student's own set losses on its extra decoder
        # pass with the teacher's queries, under the teacher's assignment (paper: weight 1).
        node.QUERY_PRIOR_WEIGHT = 1.0
        # Which teacher assignment supervises layer l of that pass: "per_layer" (layer l's own:
        # released code; the paper names no layer) or "last" (the teacher's last layer's for
        # every layer: ours, this project's first form).
        node.QUERY_PRIOR_ASSIGNMENT = "per_layer"
        # Contrastive query term of the released code (every layer; learned projection heads of
        # width CONTRAST_DIM, InfoNCE over the batch's matched pairs, temperature 0.07; its
        # config: weight 0.2). Not in the paper's method: off by default; 0.2 reproduces the
        # released config (configs/DETRDistill-DeformableDETR-R50-released.yaml).
        node.CONTRAST_WEIGHT = 0.0
        node.CONTRAST_TEMPERATURE = 0.07
        node.CONTRAST_DIM = 512

    @configurable
    def __init__(self, *, student_dim: int, teacher_dim: int, logits_weight: float,
                 feature_weight: float, query_prior_weight: float, contrast_weight: float,
                 temperature: float, topk: int, mask_floor: float,
                 contrast_temperature: float = 0.07, contrast_dim: int = 512,
                 costs=(1.0, 5.0, 2.0), clip_teacher_boxes: bool = True,
                 query_prior_assignment: str = "per_layer"):
        super().__init__()
        node = "MODEL.DISTILL.DETRDISTILL"
        for key, value in (("LOGITS_WEIGHT", logits_weight), ("FEATURE_WEIGHT", feature_weight),
                           ("QUERY_PRIOR_WEIGHT", query_prior_weight),
                           ("CONTRAST_WEIGHT", contrast_weight)):
            if value < 0:
                raise ValueError(f"{node}.{key} must be >= 0, got {value}")
        if not (logits_weight or feature_weight or query_prior_weight or contrast_weight):
            raise ValueError(f"{node}: every component's weight is 0; give one a weight or drop "
                             "'DETRDistill' from MODEL.DISTILL.METHODS")
        if temperature <= 0 or contrast_temperature <= 0 or topk < 1 or contrast_dim < 1:
            raise ValueError(f"{node}.TEMPERATURE and CONTRAST_TEMPERATURE must be > 0, TOPK and "
                             "CONTRAST_DIM >= 1")
        if query_prior_assignment not in QUERY_PRIOR_ASSIGNMENTS:
            raise ValueError(f"{node}.QUERY_PRIOR_ASSIGNMENT is {query_prior_assignment!r}; use "
                             f"one of {QUERY_PRIOR_ASSIGNMENTS} ('per_layer': the authors' code)")
        self.logits_weight, self.feature_weight = float(logits_weight), float(feature_weight)
        self.query_prior_weight = float(query_prior_weight)
        self.contrast_weight = float(contrast_weight)
        self.temperature, self.topk, self.mask_floor = float(temperature), int(topk), mask_floor
        self.costs = tuple(float(c) for c in costs)
        self.clip_teacher_boxes = bool(clip_teacher_boxes)
        self.query_prior_assignment = query_prior_assignment
        # the student's encoder inputs mapped to the teacher's width (identity when equal)
        self.adapter = build_channel_adapter(int(student_dim), int(teacher_dim))
        # the contrastive term's learned heads exist only when the term is on
        self.contrast_head = (QueryContrastHead(int(student_dim), int(teacher_dim),
                                                int(contrast_dim), contrast_temperature)
                              if self.contrast_weight else None)
        student = ["pred_logits", "pred_boxes", "softmax"]
        teacher = ["pred_logits", "pred_boxes", "softmax"]
        if self.feature_weight:
            student.append("encoder_inputs")
            teacher += ["encoder_inputs", "query_embeds"]
        if self.query_prior_weight:
            student += ["decoder", "set_losses"]
            teacher += ["object_queries", "matches"]
        if self.contrast_weight:
            student.append("query_embeds")
            teacher.append("query_embeds")
        self.required_outputs = {"student": tuple(dict.fromkeys(student)),
                                 "teacher": tuple(dict.fromkeys(teacher))}
        self.loss_weight_keys = {"loss_detrdistill_feat": f"{node}.FEATURE_WEIGHT",
                                 "loss_detrdistill_qp": f"{node}.QUERY_PRIOR_WEIGHT",
                                 "loss_detrdistill_contrast": f"{node}.CONTRAST_WEIGHT",
                                 "loss_detrdistill": f"{node}.LOGITS_WEIGHT"}

    @classmethod
    def from_config(cls, cfg, student, teacher):
        for role, spec in (("student", student), ("teacher", teacher)):
            if not issubclass(spec.model_type, DetrFamily):
                raise ValueError(
                    f"MODEL.DISTILL.METHODS 'DETRDistill' distils DETR-family detectors; the "
                    f"{role} is a {spec.name}. Use a Detr / DeformableDetr "
                    f"{role} (configs/demo/*DETR*) or another method")
        tcfg = teacher.cfg
        if cfg.MODEL.DETR.DEC_LAYERS != tcfg.MODEL.DETR.DEC_LAYERS:
            raise ValueError(
                f"DETRDistill pairs decoder layers stage by stage: the student has "
                f"MODEL.DETR.DEC_LAYERS {cfg.MODEL.DETR.DEC_LAYERS}, the teacher "
                f"{tcfg.MODEL.DETR.DEC_LAYERS}; give both the same number")
        c = cfg.MODEL.DISTILL.DETRDISTILL
        if c.QUERY_PRIOR_WEIGHT and cfg.MODEL.DETR.HIDDEN_DIM != tcfg.MODEL.DETR.HIDDEN_DIM:
            raise ValueError(
                f"DETRDistill's query-prior pass feeds the teacher's queries to the student's "
                f"decoder: MODEL.DETR.HIDDEN_DIM is {cfg.MODEL.DETR.HIDDEN_DIM} in the student and "
                f"{tcfg.MODEL.DETR.HIDDEN_DIM} in the teacher; use one d_model or set "
                "MODEL.DISTILL.DETRDISTILL.QUERY_PRIOR_WEIGHT 0")
        return {"student_dim": cfg.MODEL.DETR.HIDDEN_DIM, "teacher_dim": tcfg.MODEL.DETR.HIDDEN_DIM,
                "logits_weight": c.LOGITS_WEIGHT, "feature_weight": c.FEATURE_WEIGHT,
                "query_prior_weight": c.QUERY_PRIOR_WEIGHT, "contrast_weight": c.CONTRAST_WEIGHT,
                "temperature": c.TEMPERATURE, "topk": c.TOPK, "mask_floor": c.MASK_FLOOR,
                "contrast_temperature": c.CONTRAST_TEMPERATURE, "contrast_dim": c.CONTRAST_DIM,
                "costs": (c.COST_CLASS, c.COST_L1, c.COST_GIOU),
                "clip_teacher_boxes": c.CLIP_TEACHER_BOXES,
                "query_prior_assignment": c.QUERY_PRIOR_ASSIGNMENT}

    # ---- 1. logits ------------------------------------------------------------------------
    def teacher_match_boxes(self, boxes: Tensor) -> Tensor:
        """The teacher's boxes ``[..., 4]`` as the matching and the pair losses read them:
        clipped to the image with ``CLIP_TEACHER_BOXES`` (the authors' code), else as predicted."""
        return clip_to_image(boxes) if self.clip_teacher_boxes else boxes

    def match_layers(self, student, teacher) -> List[List[Tuple[Tensor, Tensor]]]:
        """Every decoder layer's student <-> teacher matching (``[layer][image] -> (student_idx,
        teacher_idx)``), all layers' costs in one batched pass."""
        layers, n = student.pred_logits.shape[:2]
        flat = match_predictions(
            student.pred_logits.flatten(0, 1), student.pred_boxes.flatten(0, 1),
            teacher.pred_logits.flatten(0, 1),
            self.teacher_match_boxes(teacher.pred_boxes).flatten(0, 1), student.softmax,
            self.costs)
        return [flat[k * n:(k + 1) * n] for k in range(layers)]

    def pair_losses(self, s_logits, s_boxes, t_logits, t_boxes, pairs, softmax: bool
                    ) -> Dict[str, Tensor]:
        """Class, L1 and GIoU terms on matched pairs (each averaged over the pairs); ``t_boxes``
        as matched (:meth:`teacher_match_boxes`)."""
        si = torch.cat([torch.full_like(i, n) for n, (i, _) in enumerate(pairs)])
        s_idx = torch.cat([i for i, _ in pairs])
        t_idx = torch.cat([j for _, j in pairs])
        s_l, t_l = s_logits[si, s_idx], t_logits[si, t_idx].detach()
        s_b, t_b = s_boxes[si, s_idx], t_boxes[si, t_idx].detach()
        count = max(len(s_idx), 1)
        if softmax:
            tau = self.temperature
            cls = F.kl_div(F.log_softmax(s_l / tau, -1), F.log_softmax(t_l / tau, -1),
                           reduction="sum", log_target=True) * tau * tau / count
        else:
            cls = F.binary_cross_entropy_with_logits(s_l, torch.sigmoid(t_l),
                                                     reduction="sum") / count
        l1 = F.l1_loss(s_b, t_b, reduction="sum") / count
        # element-wise over the pairs (not the diagonal of a [P, P] matrix)
        giou = generalized_box_iou_loss(_box_xyxy(s_b), _box_xyxy(t_b), reduction="sum") / count
        return {"cls": cls * self.costs[0], "l1": l1 * self.costs[1], "giou": giou * self.costs[2]}

    # ---- 2. target-aware features -----------------------------------------------------------
    def quality(self, t_logits: Tensor, t_boxes: Tensor, gt_boxes: Tensor, softmax: bool
                ) -> Tuple[Tensor, Tensor]:
        """One image's teacher top-K: ``(query index [K], quality [K])`` with quality = score x
        max IoU with the GT (score alone without GT); the boxes as predicted (not clipped: the
        authors' code)."""
        prob = F.softmax(t_logits, -1)[:, :-1] if softmax else torch.sigmoid(t_logits)
        k = min(self.topk, prob.numel())
        scores, index = prob.flatten().topk(k)
        queries = index // prob.shape[1]
        if gt_boxes.numel() == 0:
            return queries, scores
        iou = pairwise_iou(Boxes(_box_xyxy(t_boxes[queries])), Boxes(gt_boxes))
        return queries, scores * iou.max(dim=1).values

    def feature_loss(self, student, teacher, layer: int, gt_norm: List[Tensor]) -> Tensor:
        total = 0.0
        t_q = teacher.query_embeds[layer].detach()  # [N, Q, D]
        t_lg, t_bx = teacher.pred_logits[layer].detach(), teacher.pred_boxes[layer].detach()
        masks = []
        for n in range(t_q.shape[0]):
            masks.append(self.quality(t_lg[n], t_bx[n], gt_norm[n], teacher.softmax))
        for name, t_feat in teacher.encoder_inputs.items():
            s_feat = self.adapter(student.encoder_inputs[name])
            t_feat = t_feat.detach()
            if s_feat.shape != t_feat.shape:
                raise ValueError(f"DETRDistill: encoder input {name} is {tuple(s_feat.shape)} in "
                                 f"the student and {tuple(t_feat.shape)} in the teacher; both "
                                 "need the same levels (MODEL.DETR.NUM_FEATURE_LEVELS) on one grid")
            m = torch.stack([target_aware_mask(t_q[n][q], c, t_feat[n], self.mask_floor)
                             for n, (q, c) in enumerate(masks)])[:, None]
            total = total + F.mse_loss(m * s_feat, m * t_feat)
        return total

    # ---- forward ---------------------------------------------------------------------------
    def reference_losses(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """:func:`straightforward_detrdistill` (the published setting: no contrastive term)."""
        return straightforward_detrdistill(self, student, teacher, gt_instances)

    def forward(self, student, teacher, gt_instances) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        if student.softmax != teacher.softmax:
            raise ValueError("DETRDistill: student and teacher classify differently (softmax "
                             "DETR vs sigmoid Deformable DETR); use two detectors of one variant")
        targets = detr_targets(gt_instances, student.image_sizes)
        layers = student.pred_logits.shape[0]
        pairs_by_layer = (self.match_layers(student, teacher)
                          if self.logits_weight or self.contrast_weight else None)
        t_boxes = self.teacher_match_boxes(teacher.pred_boxes) if self.logits_weight else None
        for layer in range(layers):
            if self.logits_weight:
                for k, v in self.pair_losses(student.pred_logits[layer], student.pred_boxes[layer],
                                             teacher.pred_logits[layer], t_boxes[layer],
                                             pairs_by_layer[layer], student.softmax).items():
                    out[f"loss_detrdistill_{k}_l{layer}"] = self.logits_weight * v
            if self.feature_weight:
                gt = [_box_xyxy(t["boxes"]) for t in targets]  # normalised, as the predictions
                out[f"loss_detrdistill_feat_l{layer}"] = self.feature_weight * self.feature_loss(
                    student, teacher, layer, gt)
            if self.contrast_weight:
                out[f"loss_detrdistill_contrast_l{layer}"] = self.contrast_weight * \
                    self.contrastive(student.query_embeds[layer], teacher.query_embeds[layer],
                                     pairs_by_layer[layer])
        if self.query_prior_weight:
            out.update(self.query_prior_losses(student, teacher, targets))
        return out

    def query_prior_losses(self, student, teacher, targets) -> Dict[str, Tensor]:
        """The extra student decoder pass with the teacher's queries; layer l's predictions
        supervised by the student's set losses under the teacher's assignment of layer l
        (``per_layer``) or of its last layer (``last``)."""
        extra = student.decoder(teacher.object_queries.detach())
        out = {}
        for layer in range(extra["pred_logits"].shape[0]):
            indices = teacher.matches[layer if self.query_prior_assignment == "per_layer" else -1]
            losses = student.set_losses(extra["pred_logits"][layer], extra["pred_boxes"][layer],
                                        targets, indices, f"_l{layer}")
            for k, v in losses.items():
                out["loss_detrdistill_qp_" + k[len("loss_"):]] = self.query_prior_weight * v
        return out

    def contrastive(self, s_queries: Tensor, t_queries: Tensor, pairs) -> Tensor:
        """One layer's contrastive term: the embeddings ``[N, Q, D]`` of every matched pair of
        the batch through :class:`QueryContrastHead` (pairs in the matching's order: all the
        student's queries in order when both have as many)."""
        s = torch.cat([s_queries[n][i] for n, (i, _) in enumerate(pairs)])
        t = torch.cat([t_queries[n][j] for n, (_, j) in enumerate(pairs)]).detach()
        if len(s) < 2:  # BatchNorm1d needs two samples; no negatives anyway
            return s.sum() * 0.0
        return self.contrast_head(s, t)


# ------------------------------------------------------------------------------------------------
# straightforward reference (Distiller.reference_losses; tools/benchmark.py kernels)
# ------------------------------------------------------------------------------------------------
def straightforward_detrdistill(distiller, student, teacher, gt_instances) -> Dict[str, Tensor]:
    """docs/methods/DETRDistill.md written plainly, layer by layer: the soft class cost from
    explicit probabilities, L1 and GIoU costs from their formulas (to the teacher's boxes
    clipped to the image, with CLIP_TEACHER_BOXES), the Hungarian solver; pair losses averaged
    by pairs; the teacher's top-K (query, class) by a full sort, quality = score x max IoU with
    the GT, the mask from explicit cosines; the query-prior pass through the student's own
    decoder and set losses (the detector's, shared) under the teacher's assignment of each
    layer or of its last (QUERY_PRIOR_ASSIGNMENT)."""
    softmax = student.softmax
    targets = detr_targets(gt_instances, student.image_sizes)
    c_cls, c_l1, c_giou = distiller.costs
    out = {}
    layers = student.pred_logits.shape[0]
    for layer in range(layers):
        s_lg, s_bx = student.pred_logits[layer], student.pred_boxes[layer]
        t_lg, t_bx = teacher.pred_logits[layer].detach(), teacher.pred_boxes[layer].detach()
        if distiller.logits_weight:
            t_match = t_bx  # the teacher's boxes as matched: clipped to the image by default
            if distiller.clip_teacher_boxes:
                corners = plain_xyxy(t_bx)
                x0, y0, x1, y1 = corners.clamp(0, 1).unbind(-1)
                clipped = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
                crossing = ((corners < 0) | (corners > 1)).any(-1, keepdim=True)
                t_match = torch.where(crossing, clipped, t_bx)
            pairs = []
            for n in range(s_lg.shape[0]):
                with torch.no_grad():
                    if softmax:
                        cls_cost = -(plain_softmax(t_lg[n])[None] * torch.log(plain_softmax(s_lg[n]))[:, None]
                                     ).sum(-1)
                    else:
                        p, q = plain_sigmoid(t_lg[n])[None], plain_sigmoid(s_lg[n])[:, None]
                        cls_cost = -(p * torch.log(q) + (1 - p) * torch.log(1 - q)).sum(-1)
                    l1 = (s_bx[n][:, None] - t_match[n][None]).abs().sum(-1)
                    giou = plain_giou(plain_xyxy(s_bx[n])[:, None], plain_xyxy(t_match[n])[None])
                    cost = c_cls * cls_cost + c_l1 * l1 - c_giou * giou
                i, j = linear_sum_assignment(cost.cpu().numpy())
                pairs.append((n, torch.as_tensor(i), torch.as_tensor(j)))
            s_l = torch.cat([s_lg[n][i] for n, i, _ in pairs])
            t_l = torch.cat([t_lg[n][j] for n, _, j in pairs])
            s_b = torch.cat([s_bx[n][i] for n, i, _ in pairs])
            t_b = torch.cat([t_match[n][j] for n, _, j in pairs])
            count = max(len(s_l), 1)
            if softmax:
                tau = distiller.temperature
                cls = plain_kl(plain_softmax(t_l / tau), plain_softmax(s_l / tau)).sum() * tau * tau / count
            else:
                p, q = plain_sigmoid(t_l), plain_sigmoid(s_l)
                cls = -(p * torch.log(q) + (1 - p) * torch.log(1 - q)).sum() / count
            l1 = (s_b - t_b).abs().sum() / count
            giou = (1 - plain_giou(plain_xyxy(s_b), plain_xyxy(t_b))).sum() / count
            w = distiller.logits_weight
            out[f"loss_detrdistill_cls_l{layer}"] = w * c_cls * cls
            out[f"loss_detrdistill_l1_l{layer}"] = w * c_l1 * l1
            out[f"loss_detrdistill_giou_l{layer}"] = w * c_giou * giou
        if distiller.feature_weight:
            t_q = teacher.query_embeds[layer].detach()
            selected = []
            for n in range(t_lg.shape[0]):
                prob = plain_softmax(t_lg[n])[:, :-1] if softmax else plain_sigmoid(t_lg[n])
                order = prob.flatten().argsort(descending=True)[:min(distiller.topk, prob.numel())]
                scores, queries = prob.flatten()[order], order // prob.shape[1]
                gt = plain_xyxy(targets[n]["boxes"])
                if len(gt):
                    scores = scores * plain_iou(plain_xyxy(t_bx[n][queries])[:, None], gt[None]).max(
                        dim=1).values
                selected.append((queries, scores))
            total = 0.0
            for name, t_feat in teacher.encoder_inputs.items():
                s_feat = distiller.adapter(student.encoder_inputs[name])
                t_feat = t_feat.detach()
                masks = []
                for n, (queries, quality) in enumerate(selected):
                    q = t_q[n][queries]
                    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    f = t_feat[n].flatten(1)
                    f = f / f.norm(dim=0, keepdim=True).clamp_min(1e-12)
                    m = (quality[:, None] * (q @ f)).sum(0).clamp_min(distiller.mask_floor)
                    masks.append((m / m.max()).reshape(t_feat.shape[2:]))
                m = torch.stack(masks)[:, None]
                total = total + ((m * s_feat - m * t_feat) ** 2).mean()
            out[f"loss_detrdistill_feat_l{layer}"] = distiller.feature_weight * total
    if distiller.query_prior_weight:
        extra = student.decoder(teacher.object_queries.detach())
        for layer in range(extra["pred_logits"].shape[0]):
            losses = student.set_losses(extra["pred_logits"][layer], extra["pred_boxes"][layer],
                                        targets, teacher.matches[
                                            layer if distiller.query_prior_assignment
                                            == "per_layer" else -1], f"_l{layer}")
            for key, value in losses.items():
                out["loss_detrdistill_qp_" + key[len("loss_"):]] = \
                    distiller.query_prior_weight * value
    if distiller.contrast_weight:
        raise ValueError("straightforward_detrdistill covers the published setting "
                         "(CONTRAST_WEIGHT 0)")
    return out
