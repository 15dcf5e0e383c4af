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

    ``mu_c = mean_{n,h,w} x``, ``sigma_c = std_{n,h,w} x`` (unbiased, N*H*W - 1 dof),
    ``x_hat = (x - mu_c) / (sigma_c + eps)``. ``[N, C, H, W] -> [N, C, H, W]``.
    Gradients flow through mu and sigma.
    """
    if x.dim() != 4:
        raise ValueError(f"channel_standardize expects [N, C, H, W], got {tuple(x.shape)}")
    std, mean = torch.std_mean(x, dim=(0, 2, 3), keepdim=True, correction=1)
    return (x - mean) / (std + eps)
