"""PKD: feature distillation through the Pearson correlation coefficient (a baseline).

Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation
Coefficient", NeurIPS 2022 (official code: mmrazor's ``PKDLoss``).
"""
from typing import Dict

import torch
from torch import Tensor
from torch.nn import functional as F

from ..layers.adapters import channel_standardize, standardize
from ..layers.constants import constant
from .mimic import MIMICDistiller
from .registry import register_distiller

__all__ = ["PKDDistiller", "pearson_loss"]


def pearson_loss(student: Tensor, teacher: Tensor) -> Tensor:
    r"""``mean((S_hat - T_hat)^2) / 2`` of two ``[N, C, H, W]`` maps, a scalar.

    ``X_hat = (X - mu_c) / (sigma_c + 1e-6)``, mu and the unbiased sigma per channel c over
    (N, H, W) (:func:`channel_standardize`, the standardisation CSGR uses and mmrazor's
    ``PKDLoss.norm``). With ``M = N*H*W`` values per channel and ``r_c`` the Pearson correlation
    of channel c between student and teacher, this is ``(M - 1)/M * (1 - mean_c r_c)`` (up to
    the 1e-6): 0 for perfectly correlated maps, 1 for uncorrelated ones, whatever the scale and
    offset of either network's channels.
    """
    return F.mse_loss(channel_standardize(student), channel_standardize(teacher)) / 2


class _PearsonLoss(torch.autograd.Function):
    r"""``scale * sum (S_hat - T_hat)^2`` with a hand-written backward to the student: what
    :func:`pearson_loss` times the weight computes, in about 40 % of the operators autograd
    dispatches for it (issue 30).

    The forward standardises each map as :func:`channel_standardize` does
    (:func:`~csgr_distill.layers.adapters.standardize`: the same operations). The backward is
    the standardisation's gradient written for this loss: with ``g = 2 scale (S_hat - T_hat)``,
    ``d = sigma + eps`` and ``M`` values per channel, per channel

    ``u = g - S_hat * d * sum_{n,h,w}(g S_hat) / (sigma (M - 1))``, ``dS = (u - mean u) / d``

    (the mean over (n, h, w) is 0 in exact arithmetic, since ``sum S_hat = sum T_hat = 0``;
    subtracting it keeps the adapter's bias gradient exactly 0, as the formula's is, instead of
    rounding noise). Equal to autograd's gradient to float32 rounding
    (``tests/test_launch_bound.py``)."""

    @staticmethod
    def forward(ctx, student, teacher, scale):
        saved = standardize(student)
        t_centered, t_den = standardize(teacher, need_x_hat=False)[1:3]
        diff = torch.addcdiv(saved.x_hat, t_centered, t_den, value=-1)  # S_hat - T_hat
        ctx.kept = (diff, saved, scale)
        return (diff * diff).sum() * constant(scale, diff)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        diff, (x_hat, _, den, std), scale = ctx.kept
        m = x_hat.shape[0] * x_hat.shape[2] * x_hat.shape[3]
        g = diff * (grad * constant(2 * scale, grad))
        # per channel [1, C, 1, 1]: d sum(g S_hat) / (sigma (M - 1)); sigma >= 1.1e-19
        coef = (g * x_hat).sum(dim=(0, 2, 3), keepdim=True) * (
            den / (std * constant(max(m - 1, 1), std)))
        u = torch.addcmul(g, x_hat, coef, value=-1)
        return torch.sub(u, u.sum(dim=(0, 2, 3), keepdim=True), alpha=1 / m) / den, None, None


@register_distiller("PKD")
class PKDDistiller(MIMICDistiller):
    r"""Per FPN level, with student map ``S`` ``[N, Cs, H, W]`` and teacher map ``T``
    ``[N, C, H, W]`` (teacher detached):

    ``L = weight * (1 / (N*C*H*W)) * sum_{n,c,h,w} (S_hat - T_hat)^2 / 2``

    where ``S_hat`` standardises ``r(S)`` and ``T_hat`` standardises ``T`` channel by channel over
    (N, H, W) (:func:`pearson_loss`), ``r`` the 1x1 adapter when Cs != C (the paper's students and
    teachers share 256-channel FPNs; the adapter is this project's addition for narrower
    students). ``weight`` is 6 in the released Faster R-CNN R101 -> R50 and Mask R-CNN Swin ->
    RetinaNet R50 configs (10 in the RetinaNet X101 -> R50 one). This is MIMIC on standardised maps, halved: the level pairing,
    adapters and checks are MIMIC's. Returned per level as ``loss_pkd_<level>``.

    Unlike mmrazor, a level with a single value per channel (batch 1 at a 1x1 p7) gives 0, not
    NaN, and a grid mismatch is an error, not a bilinear resize: both see the same padded grid.
    """

    loss_prefix = "loss_pkd"

    @classmethod
    def add_config(cls, node) -> None:
        # Published: 6 in the released (mmrazor) configs of Faster R-CNN R101 -> R50 and Mask
        # R-CNN Swin -> RetinaNet R50 (the RetinaNet X101 -> R50 config uses 10).
        node.WEIGHT = 6.0
        # Levels distilled (present in both networks with equal strides); R-CNN configs: p2-p5.
        # The released RetinaNet configs distil the neck's outputs 0-3 (p3-p6); ours adds p7
        # (docs/methods/PKD.md).
        node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]

    def level_loss(self, s_feat: Tensor, t_feat: Tensor, level: str) -> Tensor:
        """Unweighted ``pearson_loss(r(S), T)`` of one level, a scalar."""
        return self.weighted_level_loss(s_feat, t_feat, level, 1.0)

    def weighted_level_loss(self, s_feat: Tensor, t_feat: Tensor, level: str,
                            weight: float) -> Tensor:
        """``weight * pearson_loss(r(S), T)`` of one level (:class:`_PearsonLoss`)."""
        s = self.adapters[level](s_feat)
        if s.shape != t_feat.shape:
            raise ValueError(f"PKD level {level!r}: the adapted student map {tuple(s.shape)} and "
                             f"the teacher map {tuple(t_feat.shape)} differ")
        return _PearsonLoss.apply(s, t_feat, weight / (2 * s.numel()))

    def reference_losses(self, student, teacher, gt_instances=None):
        """:func:`straightforward_pkd` (mmrazor's formulation) on the two records' maps."""
        return straightforward_pkd(self, student.features, teacher.features)


# ------------------------------------------------------------------------------------------------
# straightforward reference (Distiller.reference_losses; tools/benchmark.py kernels)
# ------------------------------------------------------------------------------------------------
def _pkd_norm(feat: Tensor) -> Tensor:
    """PKD's standardisation as its official code writes it (mmrazor ``PKDLoss.norm``): channels
    first, flattened, ``torch.std`` (unbiased) per channel, ``+ 1e-6``. ``[N, C, H, W]``."""
    n, c, h, w = feat.shape
    flat = feat.permute(1, 0, 2, 3).reshape(c, -1)
    mean = flat.mean(dim=-1, keepdim=True)
    std = flat.std(dim=-1, keepdim=True)
    return ((flat - mean) / (std + 1e-6)).reshape(c, n, h, w).permute(1, 0, 2, 3)


def straightforward_pkd(distiller, student: Dict[str, Tensor], teacher: Dict[str, Tensor],
                        gt=None):
    """PKD as mmrazor's ``PKDLoss``: standardise both maps (:func:`_pkd_norm`, not the project's
    ``channel_standardize``), ``F.mse_loss / 2`` per level, times the weight. Needs more than one
    value per channel (mmrazor's std is NaN otherwise; the distiller gives 0 there)."""
    losses = {}
    for level in distiller.in_features:
        s = _pkd_norm(distiller.adapters[level](student[level]))
        t = _pkd_norm(teacher[level].detach())
        losses[f"loss_pkd_{level}"] = distiller.weight * F.mse_loss(s, t) / 2
    return losses
