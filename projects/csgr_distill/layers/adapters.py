"""Channel adapters and per-channel standardisation shared by feature distillers."""
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .constants import constant

__all__ = ["build_channel_adapter", "channel_standardize", "standardize", "standardize_backward",
           "Standardized"]


def build_channel_adapter(in_channels: int, out_channels: int) -> nn.Module:
    """Map student channels to teacher channels: a 1x1 conv (with bias) ``[N, Cs, H, W] ->
    [N, C, H, W]`` when ``in_channels != out_channels``, ``nn.Identity`` otherwise."""
    if int(in_channels) == int(out_channels):
        return nn.Identity()
    return nn.Conv2d(int(in_channels), int(out_channels), kernel_size=1, bias=True)


def channel_standardize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Standardise each channel with statistics pooled over the batch and all positions.

    ``mu_c = mean_{n,h,w} x``, ``sigma_c = std_{n,h,w} x`` (unbiased: ``M - 1`` degrees of
    freedom for ``M = N*H*W`` values), ``x_hat = (x - mu_c) / (sigma_c + eps)``.
    ``[N, C, H, W] -> [N, C, H, W]``. Gradients flow through mu and sigma.

    Degenerate cases are finite, forward and backward: a level with a single position
    (``M = 1``: batch 1 at p7 of a small image) has no spread, so its variance is taken as 0
    (``max(M - 1, 1)`` degrees of freedom) and ``x_hat = 0``; a constant channel has
    ``sigma = 0`` and ``x_hat = 0``, with zero (not NaN) gradient through ``sigma``.
    """
    if x.dim() != 4:
        raise ValueError(f"channel_standardize expects [N, C, H, W], got {tuple(x.shape)}")
    m = x.shape[0] * x.shape[2] * x.shape[3]
    centered = x - x.mean(dim=(0, 2, 3), keepdim=True)
    var = (centered * centered).sum(dim=(0, 2, 3), keepdim=True) / max(m - 1, 1)
    return centered / (_std(var) + eps)


def _std(var: Tensor) -> Tensor:
    """``sqrt(var)``, with a zero gradient where ``var`` is 0 (sqrt's derivative is infinite
    there): below the smallest normal float the variance is taken as that float, whose root
    (``1.1e-19`` in float32) vanishes next to the 1e-6 added to sigma. Exactly the root of every
    variance at or above it."""
    return var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()


class Standardized(NamedTuple):
    """:func:`standardize`'s result ``x_hat`` ``[N, C, H, W]`` and what
    :func:`standardize_backward` needs: ``centered`` ``[N, C, H, W]``, ``den`` (``sigma + eps``)
    and ``std`` ``[1, C, 1, 1]``."""

    x_hat: Tensor
    centered: Tensor
    den: Tensor
    std: Tensor


def standardize(x: Tensor, eps: float = 1e-6, need_x_hat: bool = True) -> Standardized:
    """:func:`channel_standardize` without autograd, keeping what its gradient needs, for the
    hand-written backward of a fused loss (:func:`standardize_backward`): the same operations
    on the same tensor, so the same float32 result on any number of threads. (Its gradient is
    sensitive to the summation order of these reductions at the 1e-5 level in float32: the maps
    of two networks are standardised one by one, not stacked. The mean is ``x.mean``'s sum and
    division, and the numbers are :func:`~csgr_distill.layers.constants.constant` s: the same
    values, fewer operators. ``need_x_hat=False``: ``x_hat`` is None, for a caller that
    divides ``centered`` by ``den`` inside another operation.)"""
    m = x.shape[0] * x.shape[2] * x.shape[3]
    centered = x - x.sum(dim=(0, 2, 3), keepdim=True) / constant(m, x)
    std = _std((centered * centered).sum(dim=(0, 2, 3), keepdim=True)
               / constant(max(m - 1, 1), x))
    den = std + constant(eps, x)
    return Standardized(centered / den if need_x_hat else None, centered, den, std)


def standardize_backward(d_xh: Tensor, saved: Standardized) -> Tensor:
    """The gradient ``[N, C, H, W]`` at :func:`standardize`'s input given the gradient ``d_xh``
    ``[N, C, H, W]`` at its output: what autograd computes for :func:`channel_standardize`,
    operation by operation in its order and layout.

    With ``c = x - mu``, ``d = sigma + eps``, ``x_hat = c / d``: ``dc = dx_hat / d +
    (dvar / (M - 1)) 2 c`` with ``dvar = -sum(dx_hat x_hat / d) / (2 sigma)``, and
    ``dx = dc - mean(dc)``. A constant channel (``c = 0``) gets ``dvar = 0``: the zero gradient
    through sigma of :func:`channel_standardize`."""
    x_hat, c, den, std = saved
    m = c.shape[0] * c.shape[2] * c.shape[3]
    d_xh = d_xh.contiguous()  # the reductions below in the layout channel_standardize has
    d_den = (d_xh * (x_hat / den)).sum(dim=(0, 2, 3), keepdim=True).neg_()
    d_var = d_den / (std + std)
    d_centered = d_xh / den + (d_var / constant(max(m - 1, 1), c)) * (c + c)
    return d_centered - d_centered.sum(dim=(0, 2, 3), keepdim=True) / constant(m, c)
