"""DETRDistill: a universal knowledge distillation framework for DETR-families (Chang et al.,
ICCV 2023, arXiv 2211.10156), as specified in ``shared/methods/DETRDistill.md``, between two
detectors of the DETR port (``DistillDetr`` / ``DistillDeformableDetr`` students).

Per decoder layer l (student and teacher with the same number of layers):

* logits distillation (``loss_detrdistill_{cls,l1,giou}_l<l>``): the student's predictions of
  layer l matched one-to-one to *all* the teacher's predictions of layer l by the Hungarian
  algorithm (cost = soft class cost + 5 L1 + 2 (-GIoU)); on the pairs, soft-target BCE (sigmoid
  heads) or a temperature KL (softmax DETR), L1 and GIoU, each averaged over the pairs;
* target-aware feature distillation (``loss_detrdistill_feat_l<l>``): the teacher's top-K
  (query, class) predictions of layer l, quality ``score x max IoU with the GT``, a mask
  ``max(sum_i c_i cos(q_i, T(x)), 0.01)`` over each encoder input level divided by its per-image
  maximum, ``mean((m T - m r(S))^2)`` summed over levels;
* query-prior assignment (``loss_detrdistill_qp_{ce,bbox,giou}_l<l>``): an extra student decoder
  pass with the teacher's learned queries (the record's ``decoder``), supervised by the GT under
  the teacher's own assignment for those queries (its last layer's), with the student's own set
  losses (the record's ``set_losses``); training only, nothing of it is in the model;
* optional contrastive query term (``loss_detrdistill_contrast``, off by default): InfoNCE
  between the last layer's matched student and teacher query embeddings.
"""
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou, generalized_box_iou_loss

from ..layers.adapters import build_channel_adapter
from .registry import register_distiller

__all__ = ["DETRDistillDistiller", "soft_class_cost", "match_predictions",
           "target_aware_mask"]


def _box_xyxy(b: Tensor) -> Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


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
    a GPU, one synchronisation instead of one per image and layer)."""
    with torch.no_grad():
        cost = (costs[0] * soft_class_cost(s_logits, t_logits, softmax)
                + costs[1] * torch.cdist(s_boxes, t_boxes, p=1)
                - costs[2] * torch.vmap(generalized_box_iou)(_box_xyxy(s_boxes),
                                                             _box_xyxy(t_boxes)))
        cost = cost.float().cpu().numpy()
    out = []
    for c in cost:
        i, j = linear_sum_assignment(c)
        out.append((torch.as_tensor(i, dtype=torch.long).to(s_logits.device),
                    torch.as_tensor(j, dtype=torch.long).to(s_logits.device)))
    return out


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


@register_distiller("DETRDistill")
class DETRDistillDistiller(nn.Module):
    """DETRDistill's components (module docstring); each switched off by a zero weight."""

    @configurable
    def __init__(self, *, student_dim: int, teacher_dim: int, logits_weight: float,
                 feature_weight: float, query_prior_weight: float, contrast_weight: float,
                 temperature: float, topk: int, mask_floor: float,
                 contrast_temperature: float, costs=(1.0, 5.0, 2.0)):
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
        if temperature <= 0 or contrast_temperature <= 0 or topk < 1:
            raise ValueError(f"{node}.TEMPERATURE and CONTRAST_TEMPERATURE must be > 0 and TOPK "
                             ">= 1")
        self.logits_weight, self.feature_weight = float(logits_weight), float(feature_weight)
        self.query_prior_weight = float(query_prior_weight)
        self.contrast_weight = float(contrast_weight)
        self.temperature, self.topk, self.mask_floor = float(temperature), int(topk), mask_floor
        self.contrast_temperature = float(contrast_temperature)
        self.costs = tuple(float(c) for c in costs)
        # the student's encoder inputs mapped to the teacher's width (identity when equal)
        self.adapter = build_channel_adapter(int(student_dim), int(teacher_dim))
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
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        from ..teacher import build_teacher_cfg

        tcfg = build_teacher_cfg(cfg)
        for role, c in (("student", cfg), ("teacher", tcfg)):
            if "Detr" not in c.MODEL.META_ARCHITECTURE:
                raise ValueError(
                    f"MODEL.DISTILL.METHODS 'DETRDistill' distils DETR-family detectors; the "
                    f"{role} is a {c.MODEL.META_ARCHITECTURE}. Use a Detr / DeformableDetr "
                    f"{role} (configs/demo/*DETR*) or another method")
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
                "contrast_temperature": c.CONTRAST_TEMPERATURE,
                "costs": (c.COST_CLASS, c.COST_L1, c.COST_GIOU)}

    # ---- 1. logits ------------------------------------------------------------------------
    def pair_losses(self, s_logits, s_boxes, t_logits, t_boxes, pairs, softmax: bool
                    ) -> Dict[str, Tensor]:
        """Class, L1 and GIoU terms on matched pairs (each averaged over the pairs)."""
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
        max IoU with the GT (score alone without GT)."""
        from detectron2.structures import Boxes, pairwise_iou

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
    def forward(self, student, teacher, gt_instances) -> Dict[str, Tensor]:
        from ..detr_port.detr import detr_targets

        out: Dict[str, Tensor] = {}
        if student.softmax != teacher.softmax:
            raise ValueError("DETRDistill: student and teacher classify differently (softmax "
                             "DETR vs sigmoid Deformable DETR); use two detectors of one variant")
        targets = detr_targets(gt_instances, student.image_sizes)
        layers = student.pred_logits.shape[0]
        matched = range(layers) if self.logits_weight else range(layers - 1, layers)
        pairs_by_layer: Dict[int, list] = {}
        if self.logits_weight or self.contrast_weight:  # every layer's matching at once
            flat = match_predictions(*(x[matched.start:].flatten(0, 1) for x in (
                student.pred_logits, student.pred_boxes, teacher.pred_logits,
                teacher.pred_boxes)), student.softmax, self.costs)
            n = student.pred_logits.shape[1]
            pairs_by_layer = {layer: flat[k * n:(k + 1) * n] for k, layer in enumerate(matched)}
        last_pairs = pairs_by_layer.get(layers - 1)
        for layer in range(layers):
            s_lg, s_bx = student.pred_logits[layer], student.pred_boxes[layer]
            t_lg, t_bx = teacher.pred_logits[layer], teacher.pred_boxes[layer]
            if layer in pairs_by_layer:
                pairs = pairs_by_layer[layer]
                if self.logits_weight:
                    for k, v in self.pair_losses(s_lg, s_bx, t_lg, t_bx, pairs,
                                                 student.softmax).items():
                        out[f"loss_detrdistill_{k}_l{layer}"] = self.logits_weight * v
            if self.feature_weight:
                gt = [_box_xyxy(t["boxes"]) for t in targets]  # normalised, as the predictions
                out[f"loss_detrdistill_feat_l{layer}"] = self.feature_weight * self.feature_loss(
                    student, teacher, layer, gt)
        if self.query_prior_weight:
            out.update(self.query_prior_losses(student, teacher, targets))
        if self.contrast_weight:
            out["loss_detrdistill_contrast"] = self.contrast_weight * self.contrastive(
                student, teacher, last_pairs)
        return out

    def query_prior_losses(self, student, teacher, targets) -> Dict[str, Tensor]:
        """The extra student decoder pass with the teacher's queries, supervised under the
        teacher's last-layer assignment, every layer, with the student's set losses."""
        extra = student.decoder(teacher.object_queries.detach())
        indices = teacher.matches[-1]
        out = {}
        for layer in range(extra["pred_logits"].shape[0]):
            losses = student.set_losses(extra["pred_logits"][layer], extra["pred_boxes"][layer],
                                        targets, indices, f"_l{layer}")
            for k, v in losses.items():
                out["loss_detrdistill_qp_" + k[len("loss_"):]] = self.query_prior_weight * v
        return out

    def contrastive(self, student, teacher, pairs) -> Tensor:
        """InfoNCE over the last layer's matched pairs: each student query embedding against all
        the teacher's of its image, the matched one the positive (temperature 0.07)."""
        s_q, t_q = student.query_embeds[-1], teacher.query_embeds[-1].detach()
        if s_q.shape[-1] != t_q.shape[-1]:
            raise ValueError("DETRDistill's contrastive term needs the same d_model in both")
        total, count = 0.0, 0
        for n, (i, j) in enumerate(pairs):
            logits = F.normalize(s_q[n][i], dim=-1) @ F.normalize(t_q[n], dim=-1).T
            total = total + F.cross_entropy(logits / self.contrast_temperature, j,
                                            reduction="sum")
            count += len(i)
        return total / max(count, 1)
