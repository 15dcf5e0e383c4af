"""Padding masks of a batch and of its feature maps, as DETR-family transformers read them."""
import torch
from detectron2.structures import ImageList
from torch import Tensor
from torch.nn import functional as F

__all__ = ["padding_mask", "level_mask"]


def padding_mask(images: ImageList) -> Tensor:
    """``[N, H, W]`` bool, True on the padding of each image of the padded batch (DETR's
    convention; the Hugging Face models take its negation, 1 = a real pixel)."""
    n, _, h, w = images.tensor.shape
    mask = torch.ones(n, h, w, dtype=torch.bool, device=images.tensor.device)
    for i, (ih, iw) in enumerate(images.image_sizes):
        mask[i, :ih, :iw] = False
    return mask


def level_mask(mask: Tensor, size) -> Tensor:
    """The image-level mask ``[N, H, W]`` brought to a feature map's ``(h, w)`` by nearest
    interpolation, as DETR's backbone does."""
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]
