"""Channel adapters and per-channel standardisation shared by feature distillers."""
import torch
from torch import Tensor, nn

__all__ = ["build_channel_adapter", "channel_standardize"]


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
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    centered = x - mean
    var = centered.pow(2).sum(dim=(0, 2, 3), keepdim=True) / max(m - 1, 1)
    # sqrt has an infinite derivative at 0: take it only where the variance is positive
    positive = var > 0
    std = torch.where(positive, var, torch.ones_like(var)).sqrt() * positive
    return centered / (std + eps)
