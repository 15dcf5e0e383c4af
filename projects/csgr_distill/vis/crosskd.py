"""CrossKD's pictures: on one level, the class scores of the teacher's head, of the student's own
head and of the cross head (the student's activations through the teacher's remaining head
layers, what CrossKD distils), side by side on one colour scale, and where the cross head still
differs from the teacher (:mod:`csgr_distill.vis.pictures`)."""
from typing import List

import matplotlib
import numpy as np
import torch
from torch import Tensor

from ..records.dense import dense_head_branches
from .attention import grid, labelled, level_map_to_image
from .pictures import PictureInputs, save_rgb

__all__ = ["pictures", "max_scores", "scores_on_image"]


def max_scores(logits: Tensor, num_classes: int) -> Tensor:
    """``[N, A*K, H, W]`` class logits -> ``[H, W]``: the first image's highest score over its
    anchors and classes at each cell (sigmoid)."""
    n, ak, h, w = logits.shape
    return torch.sigmoid(logits[0].reshape(ak // num_classes, num_classes, h, w)).amax(dim=(0, 1))


def scores_on_image(pic: PictureInputs, level_map: Tensor, vmax: float,
                    alpha: float = 0.55) -> np.ndarray:
    """A level map of values in ``[0, vmax]`` blended over the display image on a fixed scale
    (0 dark blue, ``vmax`` red), so that several maps compare; the grid cells stay visible."""
    heat = level_map_to_image(level_map, pic.stride, pic.image_size, pic.rgb.shape[:2],
                              smooth=False)
    colored = matplotlib.colormaps["jet"](np.clip(heat / max(vmax, 1e-12), 0, 1))[..., :3] * 255
    out = (1 - alpha) * pic.rgb.astype(np.float32) + alpha * colored
    return out.clip(0, 255).astype(np.uint8)


def pictures(pic: PictureInputs, crosskd) -> List[str]:
    """``<stem>_crosskd_scores.png``: the max class score per cell on ``pic.level`` of the
    teacher, the student's own head and the cross head, on one scale (0 to the largest of the
    three), with the ground-truth boxes; then ``|cross - teacher|`` on its own scale."""
    levels = crosskd.in_features
    index = levels.index(pic.level) if pic.level in levels else 0
    k = crosskd.num_classes
    with torch.no_grad():
        cross, _ = crosskd.cross_head(pic.student, pic.teacher)
        own, _ = dense_head_branches(pic.model.head, [pic.student.features[f] for f in levels],
                                     True, False)
        maps = {"teacher": max_scores(pic.teacher.cls_logits[index], k),
                "student (own head)": max_scores(own[index], k),
                "cross head": max_scores(cross[index], k)}
    vmax = max(float(m.max()) for m in maps.values())
    tiles = [labelled(pic.with_gt_boxes(scores_on_image(pic, m, vmax)),
                      f"{name} {levels[index]} (0-{vmax:.2f})") for name, m in maps.items()]
    gap = (maps["cross head"] - maps["teacher"]).abs()
    gmax = float(gap.max())
    tiles.append(labelled(scores_on_image(pic, gap, gmax), f"|cross - teacher| (0-{gmax:.2g})"))
    return [save_rgb(pic.stem_path + "_crosskd_scores.png", grid(tiles, cols=4))]
