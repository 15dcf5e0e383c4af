"""Straightforward reference implementations, for tests and ``tools/benchmark.py``.

Nothing here is used in training. Two levels of "reference":

* :class:`NaiveCrissCrossAttention` / :func:`naive_criss_cross_pass`: the usual CCNet-style
  tensor implementation (permute + contiguous copies of q, k, v for rows and columns, and a fresh
  ``[N*W, H, H]`` ``-inf`` diagonal tensor added on every call). Same parameters as
  :class:`~csgr_distill.layers.criss_cross.CrissCrossAttention`, so state dicts are interchangeable.
* ``loop_*``: explicit Python loops over pixels / classes / channels, written for readability
  (tiny tensors only);
* ``plain_*``: textbook formulas (probabilities from explicit exponentials, IoUs and box coding
  written out) shared by the methods' straightforward references
  (:meth:`csgr_distill.distillers.Distiller.reference_losses`).
"""
import math
from typing import List, NamedTuple, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from .criss_cross import CrissCrossAttention

__all__ = [
    "NaiveCrissCrossAttention",
    "naive_criss_cross_pass",
    "loop_criss_cross_pass",
    "loop_criss_cross",
    "loop_channel_standardize",
    "loop_category_vectors",
    "GroundTruth",
    "plain_softmax",
    "plain_sigmoid",
    "plain_kl",
    "plain_iou",
    "plain_giou",
    "plain_xyxy",
    "plain_box_decode",
    "plain_box_encode",
]


def _neg_inf_diagonal(batch: int, size: int, device, dtype) -> Tensor:
    """``[batch, size, size]`` with ``-inf`` on the diagonal and 0 elsewhere (built per call)."""
    diag = torch.diag(torch.full((size,), float("inf"), device=device, dtype=dtype))
    return -diag.unsqueeze(0).repeat(batch, 1, 1)


def naive_criss_cross_pass(block: CrissCrossAttention, x: Tensor) -> Tensor:
    """One criss-cross pass of ``block``'s parameters, CCNet style. ``[N,C,H,W] -> [N,C,H,W]``."""
    n, _, h, w = x.shape
    q = block.query(x)
    k = block.key(x)
    v = block.value(x)
    q_h = q.permute(0, 3, 1, 2).contiguous().view(n * w, -1, h).permute(0, 2, 1)  # [NW, H, C']
    q_w = q.permute(0, 2, 1, 3).contiguous().view(n * h, -1, w).permute(0, 2, 1)  # [NH, W, C']
    k_h = k.permute(0, 3, 1, 2).contiguous().view(n * w, -1, h)  # [NW, C', H]
    k_w = k.permute(0, 2, 1, 3).contiguous().view(n * h, -1, w)  # [NH, C', W]
    v_h = v.permute(0, 3, 1, 2).contiguous().view(n * w, -1, h)  # [NW, C, H]
    v_w = v.permute(0, 2, 1, 3).contiguous().view(n * h, -1, w)  # [NH, C, W]
    inf = _neg_inf_diagonal(n * w, h, x.device, x.dtype)
    energy_h = (torch.bmm(q_h, k_h) + inf).view(n, w, h, h).permute(0, 2, 1, 3)  # [N,H,W,H]
    energy_w = torch.bmm(q_w, k_w).view(n, h, w, w)  # [N, H, W, W]
    concate = F.softmax(torch.cat([energy_h, energy_w], 3), dim=3)
    att_h = concate[:, :, :, 0:h].permute(0, 2, 1, 3).contiguous().view(n * w, h, h)
    att_w = concate[:, :, :, h:h + w].contiguous().view(n * h, w, w)
    out_h = torch.bmm(v_h, att_h.permute(0, 2, 1)).view(n, w, -1, h).permute(0, 2, 3, 1)
    out_w = torch.bmm(v_w, att_w.permute(0, 2, 1)).view(n, h, -1, w).permute(0, 2, 1, 3)
    return block.gamma * (out_h + out_w) + x


class NaiveCrissCrossAttention(CrissCrossAttention):
    """:class:`CrissCrossAttention` with the CCNet-style pass (benchmark baseline)."""

    def _single_pass(self, x: Tensor) -> Tensor:
        return naive_criss_cross_pass(self, x)


@torch.no_grad()
def loop_criss_cross_pass(block: CrissCrossAttention, x: Tensor) -> Tensor:
    """One pass with explicit loops over pixels, row and column (pixel excluded from column)."""
    n, c, h, w = x.shape
    q = block.query(x)
    k = block.key(x)
    v = block.value(x)
    gamma = float(block.gamma)
    out = torch.empty_like(x)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                energies, values = [], []
                for ii in range(h):  # column, the pixel itself excluded
                    if ii == i:
                        continue
                    energies.append(float(torch.dot(q[b, :, i, j], k[b, :, ii, j])))
                    values.append(v[b, :, ii, j])
                for jj in range(w):  # row, the pixel itself included
                    energies.append(float(torch.dot(q[b, :, i, j], k[b, :, i, jj])))
                    values.append(v[b, :, i, jj])
                m = max(energies)
                weights = [math.exp(e - m) for e in energies]
                z = sum(weights)
                acc = torch.zeros(c, dtype=x.dtype)
                for wt, val in zip(weights, values):
                    acc += (wt / z) * val
                out[b, :, i, j] = gamma * acc + x[b, :, i, j]
    return out


def loop_criss_cross(block: CrissCrossAttention, x: Tensor) -> Tensor:
    """``block.recurrence`` loop passes."""
    for _ in range(block.recurrence):
        x = loop_criss_cross_pass(block, x)
    return x


def loop_channel_standardize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-channel ``(x - mean) / (unbiased std + eps)`` over (n, h, w), one channel at a time."""
    out = torch.empty_like(x)
    for ch in range(x.shape[1]):
        vals = x[:, ch].reshape(-1).double()
        mu = vals.sum() / vals.numel()
        var = ((vals - mu) ** 2).sum() / max(vals.numel() - 1, 1)
        out[:, ch] = ((x[:, ch].double() - mu) / (var.sqrt() + eps)).to(x.dtype)
    return out


def loop_category_vectors(attn_logits: Tensor, feat: Tensor) -> Tensor:
    """``V[n, k, c] = sum_p softmax_p(M[n, k, :])[p] * X[n, c, p]`` with loops. ``[N, K, C]``.

    Args:
        attn_logits: ``M`` ``[N, K, H, W]``.
        feat: ``X`` ``[N, C, H, W]``.
    """
    n, kk, h, w = attn_logits.shape
    c = feat.shape[1]
    out = torch.zeros(n, kk, c, dtype=torch.float64)
    for b in range(n):
        for k in range(kk):
            logits = [float(attn_logits[b, k, i, j]) for i in range(h) for j in range(w)]
            m = max(logits)
            ex = [math.exp(v - m) for v in logits]
            z = sum(ex)
            for ch in range(c):
                acc = 0.0
                for p, (i, j) in enumerate((i, j) for i in range(h) for j in range(w)):
                    acc += ex[p] / z * float(feat[b, ch, i, j])
                out[b, k, ch] = acc
    return out.to(feat.dtype)

# ------------------------------------------------------------------------------------------------
# textbook formulas of the methods' straightforward references (``Distiller.reference_losses``)
# ------------------------------------------------------------------------------------------------
class GroundTruth(NamedTuple):
    """The ground truth of a batch as the feature references read it: per image the boxes
    ``[B_i, 4]`` (x1, y1, x2, y2 in input pixels), the resized image sizes ``(h, w)`` and the
    padded batch size ``(H_in, W_in)``."""

    boxes: List[Tensor]
    image_sizes: List[Tuple[int, int]]
    padded_size: Tuple[int, int]

    @classmethod
    def of(cls, record, gt_instances) -> "GroundTruth":
        """From a record's sizes and the batch's ``Instances``."""
        return cls([i.gt_boxes.tensor for i in gt_instances], list(record.image_sizes),
                   tuple(record.padded_size))


def plain_softmax(x: Tensor) -> Tensor:
    """Softmax over the last axis from explicit exponentials."""
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def plain_sigmoid(x: Tensor) -> Tensor:
    """``1 / (1 + exp(-x))``."""
    return 1.0 / (1.0 + torch.exp(-x))


def plain_kl(p: Tensor, q: Tensor) -> Tensor:
    """``sum p (log p - log q)`` over the last axis (``0 log 0 = 0``)."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(dim=-1)


def plain_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``[..., 4]`` (x1, y1, x2, y2) that broadcast: ``plain_iou(a[:, None], b[None])``
    is the ``[A, B]`` matrix, ``plain_iou(a, b)`` of ``[R, 4]`` pairs is ``[R]``."""
    inter = (torch.minimum(a[..., 2:], b[..., 2:])
             - torch.maximum(a[..., :2], b[..., :2])).clamp_min(0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1) - inter
    return torch.where(inter > 0, inter / union, torch.zeros_like(inter))


def plain_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU of broadcasting boxes ``[..., 4]`` (as :func:`_iou`)."""
    inter = (torch.minimum(a[..., 2:], b[..., 2:])
             - torch.maximum(a[..., :2], b[..., :2])).clamp_min(0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1) - inter
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return inter / union - (hull - union) / hull


def plain_xyxy(b: Tensor) -> Tensor:
    """``[..., 4]`` (cx, cy, w, h) -> (x1, y1, x2, y2)."""
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], dim=-1)


def plain_box_decode(deltas: Tensor, boxes: Tensor, weights, clamp: float) -> Tensor:
    """Faster R-CNN's box decoding: ``[R, 4]`` deltas relative to ``[R, 4]`` boxes."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    dx, dy = deltas[:, 0] / weights[0], deltas[:, 1] / weights[1]
    dw = (deltas[:, 2] / weights[2]).clamp(max=clamp)
    dh = (deltas[:, 3] / weights[3]).clamp(max=clamp)
    px, py, pw, ph = cx + dx * w, cy + dy * h, w * torch.exp(dw), h * torch.exp(dh)
    return torch.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], dim=1)


def plain_box_encode(target: Tensor, boxes: Tensor, weights) -> Tensor:
    """Faster R-CNN's box encoding: ``[R, 4]`` targets as deltas relative to ``[R, 4]`` boxes."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    tw, th = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    tx, ty = target[:, 0] + tw / 2, target[:, 1] + th / 2
    return torch.stack([weights[0] * (tx - cx) / w, weights[1] * (ty - cy) / h,
                        weights[2] * torch.log(tw / w), weights[3] * torch.log(th / h)], dim=1)
