"""CSGR: category semantic + global relation distillation (``docs/methods/CSGR.md``).

Liang, Ma, Wang, Li, "Category semantic and global relation distillation for object detection",
Chinese Journal of Engineering, 2025. No public code: this follows the paper's text.
"""
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers.adapters import build_channel_adapter, channel_standardize
from ..layers.criss_cross import CrissCrossAttention
from ..layers.csgr_level import csgr_level_losses
from ..layers.reference import naive_criss_cross_pass
from .base import Distiller, Variant
from .level_pairs import channels_of, check_levels, level_pair
from .registry import register_distiller

__all__ = ["CSGRDistiller", "category_vectors", "spatial_softmax"]

_ATTENTIONS = ("learned", "teacher_head")
_RECURRENCES = (1, 2)


def spatial_softmax(logits: Tensor) -> Tensor:
    """``[N, K, H, W] -> [N, K, H, W]``: softmax over the H*W positions of each (n, k)."""
    n, k, h, w = logits.shape
    return F.softmax(logits.reshape(n, k, h * w), dim=2).view(n, k, h, w)


def category_vectors(attention: Tensor, feat: Tensor) -> Tensor:
    """Category semantic vectors ``V[n, k, c] = sum_p A[n, k, p] * X_hat[n, c, p]``.

    Args:
        attention: ``A`` ``[N, K, H, W]`` (each (n, k) sums to 1 over positions).
        feat: ``X_hat`` ``[N, C, H, W]``.
    Returns:
        ``V`` ``[N, K, C]``.
    """
    n, k, h, w = attention.shape
    return torch.bmm(attention.reshape(n, k, h * w), feat.reshape(n, feat.shape[1], h * w).transpose(1, 2))


class _CSGRLevel(nn.Module):
    """The independent learnable parts of one FPN level: adapter, classifier W, CCA block."""

    def __init__(self, student_channels: int, teacher_channels: int, num_classes: int,
                 learned_attention: bool, recurrence: int):
        super().__init__()
        self.adapter = build_channel_adapter(student_channels, teacher_channels)
        # W: 1x1 conv C -> K without bias, shared by student and teacher branches. Only built
        # for "learned" attention, so that no parameter goes unused (DDP).
        self.classifier = (
            nn.Conv2d(teacher_channels, num_classes, kernel_size=1, bias=False)
            if learned_attention else None
        )
        self.cca = CrissCrossAttention(teacher_channels, recurrence=recurrence)


@register_distiller("CSGR")
class CSGRDistiller(Distiller):
    r"""Category semantic + global relation distillation, one independent module per FPN level.

    Per level, with student map ``S`` ``[N, Cs, H, W]`` and teacher map ``T`` ``[N, C, H, W]``
    (teacher detached: it carries no gradient):

    1. ``S <- adapter(S)``: 1x1 conv Cs -> C (with bias) if Cs != C, identity otherwise.
    2. ``X_hat = (X - mu_c) / (sigma_c + 1e-6)`` per channel c, mu/sigma (unbiased) over
       (n, h, w), for X in {S, T}.
    3. Category semantic attention: ``M = W * X_hat`` ``[N, K, H, W]`` (W: 1x1 conv C -> K, no
       bias, shared by both networks), ``A_k = softmax_{h,w}(M_k)`` (temperature 1);
       ``V[n, k, :] = sum_p A[n, k, p] X_hat[n, :, p]`` ``[N, K, C]`` (each network with its own
       A); ``L_cs = (1/N) sum_{n,k,c} (V_T - V_S)^2``.
       With ``attention="teacher_head"`` A comes from the teacher's class logits of the level
       ``[N, A*K, H, W] -> [N, A, K, H, W] -> max over A -> softmax over (h, w)`` and pools both
       ``S_hat`` and ``T_hat``.
    4. Global relation: ``L_gr = (1/N) sum_{n,c,h,w} (CCA(T_hat) - CCA(S_hat))^2`` with one
       criss-cross block (shared by both networks, ``recurrence`` passes).
    5. Returned per level: ``loss_csgr_cs_<level> = alpha * L_cs`` and
       ``loss_csgr_gr_<level> = beta * L_gr``.

    The classifier W and the CCA block get gradients through both branches.
    """

    loss_weight_keys = {"loss_csgr_cs": "MODEL.DISTILL.CSGR.ALPHA",
                        "loss_csgr_gr": "MODEL.DISTILL.CSGR.BETA"}
    benchmark_variants = {
        "CSGR teacher_head": Variant(("MODEL.DISTILL.CSGR.ATTENTION", "teacher_head")),
        "CSGR recurrence 2": Variant(("MODEL.DISTILL.CSGR.RECURRENCE", 2)),
    }

    @classmethod
    def add_config(cls, node) -> None:
        # Weight of the category-semantic loss L_cs (sum over N,K,C of squared differences / N);
        # the paper's 5e-4.
        node.ALPHA = 5e-4
        # Weight of the global-relation loss L_gr (sum over N,C,H,W of squared differences / N);
        # the paper's 1e-5.
        node.BETA = 1e-5
        # Student/teacher feature levels distilled, one independent loss module per level (the
        # paper: every FPN output level).
        node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
        # Category attention source: "learned" (the paper: a shared 1x1 classifier C->K) or
        # "teacher_head" (ours: the teacher's own class logits, max over anchors, softmax over
        # positions).
        node.ATTENTION = "learned"
        # Criss-cross passes: 1 (the paper) or 2 (CCNet's choice: every pixel sees the whole map).
        node.RECURRENCE = 1

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        student_channels: Dict[str, int],
        teacher_channels: Dict[str, int],
        num_classes: int,
        alpha: float = 5e-4,
        beta: float = 1e-5,
        attention: str = "learned",
        recurrence: int = 1,
    ):
        """
        Args:
            in_features: distilled level names, e.g. ``["p3", ..., "p7"]``.
            student_channels / teacher_channels: level -> channels (must cover ``in_features``).
            num_classes: K.
            alpha, beta: weights of L_cs and L_gr.
            attention: "learned" (the paper) or "teacher_head".
            recurrence: criss-cross passes, 1 or 2.
        """
        super().__init__()
        if attention not in _ATTENTIONS:
            raise ValueError(
                f"MODEL.DISTILL.CSGR.ATTENTION must be one of {_ATTENTIONS}, got {attention!r}"
            )
        if int(recurrence) not in _RECURRENCES:
            raise ValueError(
                f"MODEL.DISTILL.CSGR.RECURRENCE must be one of {_RECURRENCES}, got {recurrence!r}"
            )
        in_features = check_levels("CSGR", in_features, student_channels, teacher_channels)
        if int(num_classes) < 1:
            raise ValueError(f"CSGR needs num_classes >= 1, got {num_classes}")
        self.in_features = in_features
        self.num_classes = int(num_classes)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.attention = attention
        self.recurrence = int(recurrence)
        if attention == "teacher_head":
            # only the teacher's class logits are read: any student family works
            self.required_outputs = {"student": ("features",),
                                     "teacher": ("features", "cls_logits")}
        self.levels = nn.ModuleDict(
            {
                f: _CSGRLevel(int(student_channels[f]), int(teacher_channels[f]), self.num_classes,
                              attention == "learned", self.recurrence)
                for f in in_features
            }
        )

    @classmethod
    def from_config(cls, cfg, student, teacher):
        c = cfg.MODEL.DISTILL.CSGR
        # __init__ reports levels a network lacks; strides and level provenance of the pair are
        # checked by build_distillers
        return {"in_features": list(c.IN_FEATURES), **channels_of(student, teacher),
                "num_classes": student.num_classes, "alpha": c.ALPHA, "beta": c.BETA,
                "attention": c.ATTENTION, "recurrence": c.RECURRENCE}

    # ------------------------------------------------------------------ pieces
    def normalized(self, feat: Tensor, level: str, role: str = "student") -> Tensor:
        """``X_hat`` ``[N, C, H, W]`` of a raw level map; the student map goes through the adapter."""
        if role not in ("student", "teacher"):
            raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
        if role == "student":
            feat = self.levels[level].adapter(feat)
        return channel_standardize(feat)

    def _teacher_head_attention(self, logits: Tensor, level: str) -> Tensor:
        """Teacher class logits ``[N, A*K, H, W]`` -> attention ``[N, K, H, W]``."""
        n, ak, h, w = logits.shape
        k = self.num_classes
        if ak % k != 0:
            raise ValueError(
                f"CSGR teacher_head attention: teacher logits of level {level!r} have {ak} "
                f"channels, not a multiple of num_classes={k}"
            )
        per_class = logits.detach().view(n, ak // k, k, h, w).amax(dim=1)
        return spatial_softmax(per_class)

    def _category_attention(self, x_hat: Tensor, level: str) -> Tensor:
        """Learned attention ``A = softmax_{h,w}(W * X_hat)`` ``[N, K, H, W]``."""
        return spatial_softmax(self.levels[level].classifier(x_hat))

    def level_losses(self, s_feat: Tensor, t_feat: Tensor, level: str,
                     t_logits: Optional[Tensor] = None, weights: Tuple[float, float] = (1.0, 1.0)
                     ) -> Dict[str, Tensor]:
        """``{"cs": w_cs * L_cs, "gr": w_gr * L_gr}`` of one level (``weights``: ``(w_cs, w_gr)``,
        unweighted by default), computed by :func:`~csgr_distill.layers.csgr_level.
        csgr_level_losses` (both networks as one batch, a hand-written backward).

        Args:
            s_feat: student ``[N, Cs, H, W]``; t_feat: teacher ``[N, C, H, W]`` (no gradient
                reaches it); t_logits: teacher class logits ``[N, A*K, H, W]`` (teacher_head
                attention only).
        """
        mod = self.levels[level]
        s = mod.adapter(s_feat)
        if s.shape[1] != t_feat.shape[1]:
            raise ValueError(
                f"CSGR level {level!r}: student maps to {s.shape[1]} channels but the teacher "
                f"has {t_feat.shape[1]}; the distiller was built for other channel counts"
            )
        n = s.shape[0]
        attention = None
        if self.attention == "teacher_head":
            if t_logits is None:
                raise ValueError("CSGR teacher_head attention needs the teacher's cls_logits")
            if t_logits.shape[0] != n or t_logits.shape[-2:] != t_feat.shape[-2:]:
                raise ValueError(
                    f"CSGR level {level!r}: teacher logits {tuple(t_logits.shape)} do not match "
                    f"the feature map {tuple(t_feat.shape)}"
                )
            attention = self._teacher_head_attention(t_logits, level).flatten(2).transpose(1, 2)
        classifier = mod.classifier.weight if self.attention == "learned" else None
        l_cs, l_gr = csgr_level_losses(s, t_feat, classifier, mod.cca, weights[0] / n,
                                       weights[1] / n, attention)
        return {"cs": l_cs, "gr": l_gr}

    def reference_losses(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """:func:`straightforward_csgr` on the two records' maps (the paper's learned
        attention; None for ``teacher_head``)."""
        if self.attention != "learned":
            return None
        return straightforward_csgr(self, student.features, teacher.features)

    def forward(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """``(DetectorOutputs, DetectorOutputs, list[Instances]) -> {loss name: weighted loss}``.

        Keys ``loss_csgr_cs_<level>`` (= alpha * L_cs) and ``loss_csgr_gr_<level>``
        (= beta * L_gr) for every level of ``in_features``. ``gt_instances`` is unused.
        """
        losses = {}
        for level in self.in_features:
            s_feat, t_feat = level_pair("CSGR", level, student, teacher)
            t_logits = teacher.level_logits(level) if self.attention == "teacher_head" else None
            l = self.level_losses(s_feat, t_feat, level, t_logits, (self.alpha, self.beta))
            losses[f"loss_csgr_cs_{level}"] = l["cs"]
            losses[f"loss_csgr_gr_{level}"] = l["gr"]
        return losses

    # ------------------------------------------------------------------ visualisation
    @torch.no_grad()
    def attention_maps(self, features: Dict[str, Tensor], level: str, role: str = "student",
                       teacher_logits: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """Category attention of one level, for drawing.

        Args:
            features: level -> raw map of one network (student maps pass the adapter).
            role: "student" or "teacher".
            teacher_logits: ``[N, A*K, H, W]``, required for "teacher_head" attention.
        Returns:
            ``{"normalized": X_hat [N, C, H, W], "category": A [N, K, H, W],
            "vectors": V [N, K, C]}``.
        """
        x_hat = self.normalized(features[level], level, role)
        if self.attention == "learned":
            att = self._category_attention(x_hat, level)
        else:
            if teacher_logits is None:
                raise ValueError("teacher_head attention maps need teacher_logits")
            att = self._teacher_head_attention(teacher_logits, level)
        return {"normalized": x_hat, "category": att, "vectors": category_vectors(att, x_hat)}

    @torch.no_grad()
    def pixel_attention(self, features: Dict[str, Tensor], level: str, i: int, j: int,
                        role: str = "student", step: int = 0) -> Tensor:
        """Criss-cross attention ``[N, H, W]`` of pixel (i, j) on the normalised map of a level
        (see :meth:`CrissCrossAttention.attention_for_pixel`)."""
        x_hat = self.normalized(features[level], level, role)
        return self.levels[level].cca.attention_for_pixel(x_hat, i, j, step=step)


# ------------------------------------------------------------------------------------------------
# straightforward reference (Distiller.reference_losses; tools/benchmark.py kernels)
# ------------------------------------------------------------------------------------------------
def straightforward_csgr(distiller, student: Dict[str, Tensor], teacher: Dict[str, Tensor],
                         gt=None):
    """CSGR.md written plainly: teacher and student branches separately, einsum pooling, the
    naive criss-cross applied to each branch, ``sum / N`` reductions."""
    losses = {}
    for level in distiller.in_features:
        mod = distiller.levels[level]
        s_hat = channel_standardize(mod.adapter(student[level]))
        t_hat = channel_standardize(teacher[level].detach())
        n = s_hat.shape[0]
        vectors = []
        for x in (s_hat, t_hat):
            logits = mod.classifier(x).flatten(2)  # [N, K, HW]
            att = F.softmax(logits, dim=2)
            vectors.append(torch.einsum("nkp,ncp->nkc", att, x.flatten(2)))
        l_cs = ((vectors[1] - vectors[0]) ** 2).sum() / n
        outs = []
        for x in (s_hat, t_hat):
            for _ in range(mod.cca.recurrence):
                x = naive_criss_cross_pass(mod.cca, x)
            outs.append(x)
        l_gr = ((outs[1] - outs[0]) ** 2).sum() / n
        losses[f"loss_csgr_cs_{level}"] = distiller.alpha * l_cs
        losses[f"loss_csgr_gr_{level}"] = distiller.beta * l_gr
    return losses
