"""Boxes as distributions over side distances (GFL, Li et al., NeurIPS 2020; the box
representation LD distils, ``docs/methods/LD.md``).

For each anchor and each side (left, top, right, bottom) a head predicts ``n + 1`` logits over the
distances ``0, 1, ..., n`` in units of the level's stride; the side length is the expectation
``sum_k k softmax(z)_k`` and the box is ``anchor centre -/+ side * stride``.
"""
from typing import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["DistributionBoxTransform", "distribution_focal_loss", "integral", "TARGET_MARGIN"]

#: side targets stop this far below n, so DFL's right bin ``floor(y) + 1`` stays <= n (GFL's eps)
TARGET_MARGIN = 0.1


def integral(logits: Tensor) -> Tensor:
    """``[..., n + 1]`` logits -> ``[...]`` expected distance ``sum_k k softmax(z)_k``."""
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=logits.dtype)
    return F.softmax(logits, dim=-1) @ bins


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """GFL's Distribution Focal Loss per side, ``[M, n + 1]``, ``[M]`` -> ``[M]``:
    ``-((y_r - y) log S_l + (y - y_l) log S_r)`` with ``y_l = floor(y)``, ``y_r = y_l + 1``
    (the target must lie in ``[0, n)``; :meth:`DistributionBoxTransform.side_targets` clamps to
    ``[0, n - 0.1]``, as GFL)."""
    left = target.floor().long()
    right = left + 1
    w_left = right.to(target.dtype) - target
    w_right = target - left.to(target.dtype)
    log_p = F.log_softmax(logits, dim=-1)
    return -(w_left * log_p.gather(1, left[:, None])[:, 0]
             + w_right * log_p.gather(1, right.clamp(max=logits.shape[-1] - 1)[:, None])[:, 0])


class DistributionBoxTransform:
    """Decodes distribution logits into boxes, in the role detectron2's ``Box2BoxTransform``
    has in ``RetinaNet`` (``apply_deltas(deltas, anchors)``), so RetinaNet's own GIoU loss and
    inference decode through it unchanged.

    The stride of an anchor is found from its size: every anchor of a level has one of that
    level's ``sizes`` (aspect ratios keep the area), so ``sqrt(area)`` names the level. Two levels
    sharing a size with different strides are refused at construction.
    """

    def __init__(self, reg_max: int, sizes: Sequence[Sequence[float]], strides: Sequence[int]):
        """
        Args:
            reg_max: n, the largest distance in strides (``n + 1`` bins per side).
            sizes: per level, the anchor generator's sizes (``MODEL.ANCHOR_GENERATOR.SIZES``).
            strides: per level, its stride.
        """
        if reg_max < 1:
            raise ValueError(f"MODEL.RETINANET.REG_MAX must be >= 1, got {reg_max}")
        if len(sizes) != len(strides):
            raise ValueError(f"{len(sizes)} anchor size lists (MODEL.ANCHOR_GENERATOR.SIZES) for "
                             f"{len(strides)} levels")
        table = {}
        for level_sizes, stride in zip(sizes, strides):
            for size in level_sizes:
                key = round(float(size), 3)
                if table.get(key, stride) != stride:
                    raise ValueError(
                        f"anchor size {size} is used on levels of stride {table[key]} and "
                        f"{stride}: the distribution head finds an anchor's stride by its size; "
                        "give each level its own sizes (MODEL.ANCHOR_GENERATOR.SIZES)")
                table[key] = stride
        self.reg_max = int(reg_max)
        self._sizes = torch.tensor(sorted(table), dtype=torch.float32)
        self._strides = torch.tensor([table[k] for k in sorted(table)], dtype=torch.float32)

    @property
    def bins(self) -> int:
        return self.reg_max + 1

    def strides_of(self, anchors: Tensor) -> Tensor:
        """``[R, 4]`` anchors -> ``[R]`` the stride of each one's level."""
        size = ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])).clamp_min(0)
        size = size.sqrt()
        table = self._sizes.to(anchors.device)
        idx = (size[:, None] - table[None]).abs().argmin(dim=1)
        return self._strides.to(anchors.device, anchors.dtype)[idx]

    def sides(self, logits: Tensor) -> Tensor:
        """``[R, 4 (n + 1)]`` -> ``[R, 4]`` expected distances (left, top, right, bottom) in
        strides."""
        return integral(logits.reshape(logits.shape[0], 4, self.bins))

    def apply_deltas(self, deltas: Tensor, boxes: Tensor) -> Tensor:
        """``deltas`` ``[R, 4 (n + 1)]`` logits, ``boxes`` ``[R, 4]`` anchors -> ``[R, 4]``
        boxes ``(cx - l s, cy - t s, cx + r s, cy + b s)``."""
        if deltas.shape[-1] != 4 * self.bins:
            raise ValueError(f"distribution logits of width {deltas.shape[-1]}, expected "
                             f"4 x (REG_MAX + 1) = {4 * self.bins}")
        anchors = boxes.to(deltas.dtype)
        d = self.sides(deltas) * self.strides_of(anchors)[:, None]
        cx = (anchors[:, 0] + anchors[:, 2]) / 2
        cy = (anchors[:, 1] + anchors[:, 3]) / 2
        return torch.stack([cx - d[:, 0], cy - d[:, 1], cx + d[:, 2], cy + d[:, 3]], dim=1)

    def side_targets(self, anchors: Tensor, gt_boxes: Tensor) -> Tensor:
        """``[R, 4]`` anchors and their matched boxes -> ``[R, 4]`` distances from the anchor
        centre to each side in strides, clamped to ``[0, n - 0.1]`` (DFL's range, with GFL's
        margin: mmdet's ``bbox2distance(..., max_dis=n, eps=0.1)``)."""
        s = self.strides_of(anchors)[:, None]
        cx = (anchors[:, 0] + anchors[:, 2]) / 2
        cy = (anchors[:, 1] + anchors[:, 3]) / 2
        d = torch.stack([cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx,
                         gt_boxes[:, 3] - cy], dim=1) / s
        return d.clamp(0, self.reg_max - TARGET_MARGIN)

    def get_deltas(self, src_boxes: Tensor, target_boxes: Tensor) -> Tensor:
        raise NotImplementedError(
            "a distribution box head has no deltas to regress with smooth-L1: use "
            "MODEL.RETINANET.BBOX_REG_LOSS_TYPE 'giou' (its default for DistributionRetinaNet)")

