"""KD: logit distillation on every anchor of a dense head (a baseline).

Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531, 2015:
the student matches the teacher's temperature-softened output distribution, the loss
scaled by ``T^2`` so that its gradients keep their size when T changes. Here applied to the
dense logits of a detector, anchor by anchor.
"""
from typing import Dict

import torch
from detectron2.config import configurable
from torch import Tensor
from torch.nn import functional as F

from ..layers.reference import plain_kl, plain_sigmoid, plain_softmax
from .base import Distiller
from .registry import register_distiller

__all__ = ["KDDistiller", "sigmoid_kl", "softmax_kl", "FAMILY_LOGITS"]

_ACTIVATIONS = ("sigmoid", "softmax")

#: student family -> the record field KD distils: the class logits of dense heads, the RPN
#: objectness logits of R-CNNs (their only logits defined on every anchor)
FAMILY_LOGITS = {"dense": "cls_logits", "rcnn": "rpn_objectness_logits"}


def sigmoid_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    r"""Elementwise Bernoulli KL ``KL(sigma(t/T) || sigma(s/T))``, the shape of the inputs.

    ``p (log p - log q) + (1-p) (log(1-p) - log(1-q))`` with ``p = sigma(t/T)``, ``q = sigma(s/T)``,
    every log from ``logsigmoid`` of the logits (``log(1-q) = logsigmoid(-s/T)``): no rounding of
    probabilities near 0 or 1, exactly 0 for equal logits. The KL is second order in ``s - t``,
    so near agreement any form subtracts first-order terms; this one loses ~20x fewer digits
    there than the soft-target-BCE difference ``BCE(s/T, p) - BCE(t/T, p)`` (same gradient):
    relative error 2.4e-5 instead of 1.7e-4 in float32 for logits ~N(-3, 2) apart by ~1e-2.
    """
    if temperature != 1.0:
        student, teacher = student / temperature, teacher / temperature
    s, t = student, teacher
    p, p_bar = torch.sigmoid(t), torch.sigmoid(-t)
    return (p * (F.logsigmoid(t) - F.logsigmoid(s))
            + p_bar * (F.logsigmoid(-t) - F.logsigmoid(-s)))


def softmax_kl(student: Tensor, teacher: Tensor, num_classes: int,
               temperature: float = 1.0) -> Tensor:
    r"""Per-anchor categorical KL ``sum_k p_k log(p_k / q_k)``, ``p = softmax(t/T)``,
    ``q = softmax(s/T)`` over the K classes of each anchor.

    ``[N, A*K, H, W]`` (anchor-major, as detectron2's heads lay them out) -> ``[N, A, H, W]``.
    """
    n, ak, h, w = student.shape
    shape = (n, ak // num_classes, num_classes, h, w)
    log_q = F.log_softmax(student.reshape(shape) / temperature, dim=2)
    log_p = F.log_softmax(teacher.reshape(shape) / temperature, dim=2)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=2)


@register_distiller("KD")
class KDDistiller(Distiller):
    r"""Temperature KD between the dense logits of student and teacher, on all anchors.

    What is distilled, chosen by the student's family (its meta-architecture's recorder):

    * dense detectors (RetinaNet, FCOS, ...): the class logits ``[N, A*K, H_l, W_l]`` of every
      head level (record field ``cls_logits``), K = the class count;
    * R-CNN: the RPN objectness logits ``[N, A, H_l, W_l]`` of every RPN level (record field
      ``rpn_objectness_logits``), K = 1. They are the two-stage detector's only dense logits; its
      RoI class logits belong to proposals sampled separately in each network, with no anchor
      correspondence, so KD on R-CNN teaches objectness, not classes.

    The teacher must record the same field (same family) with the same anchors per cell and K:
    a mismatch is an error naming the shapes.

    Per anchor ``a`` (image, level, cell, anchor), with student logits ``s_a`` and teacher logits
    ``t_a`` (teacher detached), temperature T:

    * ``activation="sigmoid"`` (heads trained with sigmoid/focal losses: RetinaNet, FCOS, the RPN):
      ``KL_a = sum_k KL(Bernoulli(sigma(t_ak / T)) || Bernoulli(sigma(s_ak / T)))``;
    * ``activation="softmax"`` (heads trained with a softmax over classes; needs K >= 2):
      ``KL_a = KL(softmax(t_a / T) || softmax(s_a / T))``.

    Normalisation: the mean over all anchors of all levels and images, times ``T^2`` (Hinton's
    factor), times ``weight``:

    ``L = weight * T^2 * (1 / #anchors) * sum_a KL_a``, ``#anchors = N * sum_l A * H_l * W_l``.

    Returned per level as ``loss_kd_<level>`` = that level's share of the sum (its anchors' KL
    over the total anchor count), so the levels add up to L. Padding cells count as anchors.
    KD has no parameters.
    """

    loss_weight_keys = {"loss_kd": "MODEL.DISTILL.KD.WEIGHT"}

    @classmethod
    def add_config(cls, node) -> None:
        # KD on every anchor of the dense logits, teacher and student of the same family: dense
        # students distil their class logits, Faster R-CNN students their RPN objectness logits
        # (their only logits defined on every anchor; the RoI class logits of two networks belong
        # to differently sampled proposals). L = WEIGHT * T^2 * mean over all anchors of the KL.
        #
        # Not a published value (no paper fixes one for dense-logit KD on these detectors). 1.0,
        # the plain KL: being a mean over all anchors (most of them background, with near-zero
        # KL), the loss is small next to a focal loss normalised by the positives, so it guides
        # rather than overrides the detection loss; sweep it with
        # `tools/benchmark.py gain --variant`.
        node.WEIGHT = 1.0
        # Temperature T (Hinton's; T^2 keeps the gradient size). 1.0: the teacher's own
        # probabilities. Not a published detection value: focal-loss heads put most anchors near
        # 0, and T > 1 would pull all of them towards 0.5.
        node.TEMPERATURE = 1.0
        # "sigmoid": sum over the K classes of Bernoulli KLs per anchor (heads trained with
        # sigmoid / focal losses: RetinaNet, FCOS, the RPN); "softmax": one categorical KL over
        # the K classes per anchor (heads trained with a softmax; needs K >= 2, so not the RPN).
        node.ACTIVATION = "sigmoid"

    @configurable
    def __init__(
        self,
        *,
        field: str,
        classes_per_anchor: int,
        weight: float,
        temperature: float,
        activation: str = "sigmoid",
    ):
        """
        Args:
            field: the record field holding the logits, per level ``[N, A*K, H, W]`` (a list
                aligned with ``feature_names``, or a dict level -> tensor).
            classes_per_anchor: K (1 for RPN objectness).
            weight: multiplies the loss; temperature: T > 0.
            activation: "sigmoid" or "softmax" (see the class docstring).
        """
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MODEL.DISTILL.KD.ACTIVATION must be one of {_ACTIVATIONS}, got "
                             f"{activation!r}")
        if not float(temperature) > 0:
            raise ValueError(f"MODEL.DISTILL.KD.TEMPERATURE must be > 0, got {temperature!r}")
        if int(classes_per_anchor) < 1:
            raise ValueError(f"KD needs at least one logit per anchor, got {classes_per_anchor}")
        if activation == "softmax" and int(classes_per_anchor) < 2:
            raise ValueError(
                f"MODEL.DISTILL.KD.ACTIVATION 'softmax' needs >= 2 logits per anchor, but "
                f"{field!r} has {classes_per_anchor} (the RPN's objectness is one sigmoid logit "
                "per anchor; a softmax over one logit is constant): use 'sigmoid'")
        self.field = field
        self.classes_per_anchor = int(classes_per_anchor)
        self.weight = float(weight)
        self.temperature = float(temperature)
        self.activation = activation
        self.required_outputs = {"student": (field,), "teacher": (field,)}

    @classmethod
    def from_config(cls, cfg, student, teacher):
        family = student.family
        if family not in FAMILY_LOGITS:
            raise ValueError(
                f"MODEL.DISTILL.METHODS 'KD' distils the class logits of dense detectors or the "
                f"RPN objectness of R-CNNs; the student {student.name} is a {family!r} detector. "
                "Use a feature method (MIMIC, PKD, CSGR) for it")
        c = cfg.MODEL.DISTILL.KD
        return {
            "field": FAMILY_LOGITS[family],
            "classes_per_anchor": student.num_classes if family == "dense" else 1,
            "weight": c.WEIGHT,
            "temperature": c.TEMPERATURE,
            "activation": c.ACTIVATION,
        }

    def level_logits(self, out, role: str) -> Dict[str, Tensor]:
        """level -> logits ``[N, A*K, H, W]`` of one record."""
        value = out[self.field]
        levels = value if isinstance(value, dict) else dict(zip(out.feature_names, value))
        for level, x in levels.items():
            if x.dim() != 4 or x.shape[1] % self.classes_per_anchor:
                raise ValueError(
                    f"KD: the {role}'s {self.field} at {level!r} has shape {tuple(x.shape)}, not "
                    f"[N, A*K, H, W] with K = {self.classes_per_anchor}")
        return levels

    def anchor_kl(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Summed ``KL_a`` over the anchors of one level (a scalar); inputs ``[N, A*K, H, W]``."""
        if self.activation == "sigmoid":
            return sigmoid_kl(student, teacher, self.temperature).sum()
        return softmax_kl(student, teacher, self.classes_per_anchor, self.temperature).sum()

    def reference_losses(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """:func:`straightforward_kd`."""
        return straightforward_kd(self, student, teacher, gt_instances)

    def forward(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """``(DetectorOutputs, DetectorOutputs, list[Instances]) -> {"loss_kd_<level>": ...}``,
        which sum to ``weight * T^2 * mean over anchors of KL_a``. ``gt_instances`` is unused."""
        s_levels = self.level_logits(student, "student")
        t_levels = self.level_logits(teacher, "teacher")
        if list(s_levels) != list(t_levels):
            raise ValueError(
                f"KD: the student's {self.field} levels {list(s_levels)} differ from the "
                f"teacher's {list(t_levels)}; KD pairs the heads level by level")
        for level, s in s_levels.items():
            if s.shape != t_levels[level].shape:
                raise ValueError(
                    f"KD level {level!r}: student logits {tuple(s.shape)} and teacher logits "
                    f"{tuple(t_levels[level].shape)} differ; KD needs the same anchors per cell "
                    "(MODEL.ANCHOR_GENERATOR), classes and grid in both")
        num_anchors = sum(s.numel() // self.classes_per_anchor for s in s_levels.values())
        scale = self.weight * self.temperature ** 2 / max(num_anchors, 1)
        if self.activation == "softmax":  # a softmax over each anchor's K classes, per level
            return {f"loss_kd_{level}": scale * self.anchor_kl(s, t_levels[level].detach())
                    for level, s in s_levels.items()}
        # elementwise: every level's logits side by side, [N, sum_l A K H_l W_l], one KL for
        # all levels, then each level's sum on its own columns
        student_flat = torch.cat([s.flatten(1) for s in s_levels.values()], dim=1)
        teacher_flat = torch.cat([t.flatten(1) for t in t_levels.values()], dim=1).detach()
        kl = sigmoid_kl(student_flat, teacher_flat, self.temperature)
        sizes = [s[0].numel() for s in s_levels.values()]
        return {f"loss_kd_{level}": part.sum() * scale
                for level, part in zip(s_levels, kl.split(sizes, dim=1))}


# ------------------------------------------------------------------------------------------------
# straightforward reference (Distiller.reference_losses; tools/benchmark.py kernels)
# ------------------------------------------------------------------------------------------------
def straightforward_kd(distiller, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
    """KD on every anchor: explicit sigmoid (Bernoulli KL per logit) or softmax (KL over the K
    classes of an anchor) probabilities at temperature T, the mean over all anchors of all
    levels times ``T^2`` and the weight, each level's share returned under its name."""
    t_ = distiller.temperature
    s_levels = distiller.level_logits(student, "student")
    t_levels = distiller.level_logits(teacher, "teacher")
    k = distiller.classes_per_anchor
    sums, anchors = {}, 0
    for level, s in s_levels.items():
        t = t_levels[level].detach()
        n, ak, h, w = s.shape
        s = s.permute(0, 2, 3, 1).reshape(-1, ak // k, k) / t_
        t = t.permute(0, 2, 3, 1).reshape(-1, ak // k, k) / t_
        if distiller.activation == "sigmoid":
            p, q = plain_sigmoid(t), plain_sigmoid(s)
            kl = (plain_kl(p[..., None], q[..., None]) + plain_kl(1 - p[..., None], 1 - q[..., None]))
        else:
            kl = plain_kl(plain_softmax(t), plain_softmax(s))
        sums[level] = kl.sum()
        anchors += n * (ak // k) * h * w
    scale = distiller.weight * t_ * t_ / anchors
    return {f"loss_kd_{level}": scale * v for level, v in sums.items()}
