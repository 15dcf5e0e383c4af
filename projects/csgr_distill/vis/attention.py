"""Drawing distillation attention on images, with detectron2's Visualizer for marks and labels.

All images are ``uint8`` RGB ``[H, W, 3]`` numpy arrays.
"""
from typing import List, Sequence, Tuple

import cv2
import matplotlib
import numpy as np
import torch
from detectron2.utils.visualizer import Visualizer


def level_map_to_image(heat: torch.Tensor, stride: int, image_size: Tuple[int, int],
                       output_size: Tuple[int, int], smooth: bool = True) -> np.ndarray:
    """A level map ``[h, w]`` -> ``[H_out, W_out]`` float array aligned with the original image.

    The level grid covers the padded input (``h * stride`` x ``w * stride``); the valid region is
    the resized image ``image_size`` (h, w), which is then rescaled to ``output_size`` (h, w).
    ``smooth=False`` keeps the grid cells visible (nearest neighbour).
    """
    heat = heat.detach().float().cpu()[None, None]
    mode = "bilinear" if smooth else "nearest"
    kwargs = {"align_corners": False} if smooth else {}
    padded = torch.nn.functional.interpolate(heat, scale_factor=stride, mode=mode, **kwargs)[0, 0]
    valid = padded[: image_size[0], : image_size[1]].numpy()
    interp = cv2.INTER_LINEAR if smooth else cv2.INTER_NEAREST
    return cv2.resize(valid, (output_size[1], output_size[0]), interpolation=interp)


def heatmap_on_image(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.55,
                     cmap: str = "jet") -> np.ndarray:
    """Blend ``heat`` ``[H, W]`` (min-max normalised here) over ``rgb`` with a colour map."""
    h = heat - heat.min()
    h = h / max(float(h.max()), 1e-12)
    colored = matplotlib.colormaps[cmap](h)[..., :3] * 255.0
    out = (1 - alpha) * rgb.astype(np.float32) + alpha * colored
    return out.clip(0, 255).astype(np.uint8)


def labelled(rgb: np.ndarray, text: str, scale: float = 1.0) -> np.ndarray:
    """``rgb`` with ``text`` written at its top-left corner by detectron2's Visualizer."""
    v = Visualizer(rgb, scale=scale)
    font = max(8, int(min(rgb.shape[:2]) * scale / 22))
    v.draw_text(text, (2, 2), font_size=font, color="w", horizontal_alignment="left")
    return v.output.get_image()


def mark_pixel(rgb: np.ndarray, xy: Tuple[float, float], radius: float = 3.0) -> np.ndarray:
    """Draw a white circle at ``xy`` (x, y in image pixels)."""
    v = Visualizer(rgb)
    v.draw_circle(xy, color="w", radius=radius)
    return v.output.get_image()


def grid(images: Sequence[np.ndarray], cols: int, pad: int = 2) -> np.ndarray:
    """Tile same-height images into rows of ``cols`` (resized to the first image's size)."""
    h, w = images[0].shape[:2]
    tiles: List[np.ndarray] = [cv2.resize(im, (w, h)) if im.shape[:2] != (h, w) else im
                               for im in images]
    while len(tiles) % cols:
        tiles.append(np.full_like(tiles[0], 255))
    rows = []
    for r in range(0, len(tiles), cols):
        row = [np.pad(t, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
               for t in tiles[r: r + cols]]
        rows.append(np.concatenate(row, axis=1))
    return np.concatenate(rows, axis=0)
