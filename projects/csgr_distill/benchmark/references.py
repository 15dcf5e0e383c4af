"""Straightforward implementations of each distiller's loss, the yardstick of ``kernels``.

Each one is the method's formula written the plain way (per branch, per level, CCNet-style
criss-cross with a per-call ``-inf`` diagonal), sharing the distiller's parameters so that both
compute the same numbers. CSGR's standardisation is the project's one ``channel_standardize`` (it
is not what the kernels compare); PKD's, being the whole of its formula, is written the way its
official code writes it. Register one per distiller name in ``REFERENCE_LOSSES``: a function
``(distiller, student_features, teacher_features, gt=None) -> losses``, ``gt`` the ground truth of
the batch for the methods that read it (:class:`GroundTruth`).
"""
import math
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from ..layers.adapters import channel_standardize
from ..layers.reference import naive_criss_cross_pass


class GroundTruth(NamedTuple):
    """The ground truth of a batch as the references read it: per image the boxes ``[B_i, 4]``
    (x1, y1, x2, y2 in input pixels), the resized image sizes ``(h, w)`` and the padded batch
    size ``(H_in, W_in)``."""

    boxes: List[Tensor]
    image_sizes: List[Tuple[int, int]]
    padded_size: Tuple[int, int]


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


def straightforward_mimic(distiller, student: Dict[str, Tensor], teacher: Dict[str, Tensor],
                          gt=None):
    """MIMIC written plainly: per level, the summed squared difference of the adapted student
    and the teacher map divided by its element count, times the weight."""
    losses = {}
    for level in distiller.in_features:
        diff = distiller.adapters[level](student[level]) - teacher[level].detach()
        losses[f"loss_mimic_{level}"] = distiller.weight * (diff ** 2).sum() / diff.numel()
    return losses


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


def _fgd_mask(boxes: Tensor, h: int, w: int, ref_h: float, ref_w: float) -> Tensor:
    """FGD's foreground mask of one image, box by box as the official code writes it (slices of
    the map set to ``max(current, 1 / cells)``), with the cell count taken after clipping."""
    mask = torch.zeros(h, w)
    for x1, y1, x2, y2 in boxes.tolist():
        c0, c1 = math.floor(x1 * (w / ref_w)), math.ceil(x2 * (w / ref_w))
        r0, r1 = math.floor(y1 * (h / ref_h)), math.ceil(y2 * (h / ref_h))
        c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, w - 1), min(r1, h - 1)
        if c1 < c0 or r1 < r0:
            continue
        area = 1.0 / ((r1 - r0 + 1) * (c1 - c0 + 1))
        block = mask[r0:r1 + 1, c0:c1 + 1]
        mask[r0:r1 + 1, c0:c1 + 1] = torch.clamp(block, min=area)
    return mask


def _gc_block(block, x: Tensor) -> Tensor:
    """A :class:`GlobalContextBlock` written with matrix products on ``[C, H*W]`` per image."""
    out = []
    for f in x:  # [C, H, W]
        c = f.shape[0]
        flat = f.reshape(c, -1)
        logits = block.context.weight.reshape(1, c) @ flat + block.context.bias[:, None]
        context = flat @ torch.softmax(logits[0], dim=0)  # [C]
        conv1, norm, _, conv2 = block.transform
        hidden = conv1.weight.reshape(-1, c) @ context + conv1.bias
        hidden = (hidden - hidden.mean()) / torch.sqrt(hidden.var(unbiased=False) + norm.eps)
        hidden = torch.relu(hidden * norm.weight.reshape(-1) + norm.bias.reshape(-1))
        add = conv2.weight.reshape(c, -1) @ hidden + conv2.bias
        out.append(f + add[:, None, None])
    return torch.stack(out)


def straightforward_fgd(distiller, student: Dict[str, Tensor], teacher: Dict[str, Tensor],
                        gt: "GroundTruth" = None):
    """FGD.md written plainly, as its official code computes the focal term: masks box by box
    (:func:`_fgd_mask`), attention from explicit exponentials, the features multiplied by the
    square roots of the teacher's attention and of each mask and compared by a summed MSE, the GC
    blocks as matrix products (:func:`_gc_block`); every sum divided by N."""
    if gt is None:
        raise ValueError("straightforward_fgd needs the batch's ground truth (gt)")
    losses = {}
    temp = distiller.temperature
    for level in distiller.in_features:
        s = distiller.adapters[level](student[level])
        t = teacher[level].detach()
        n, c, h, w = t.shape
        fg = torch.zeros(n, h, w)
        for i, boxes in enumerate(gt.boxes):
            ref_h, ref_w = (gt.padded_size if distiller.box_scaling == "padded"
                            else gt.image_sizes[i])
            fg[i] = _fgd_mask(boxes, h, w, ref_h, ref_w)
        bg = (fg == 0).float()
        for i in range(n):
            if bg[i].sum() > 0:
                bg[i] = bg[i] / bg[i].sum()
        fg, bg = fg.to(t.device), bg.to(t.device)

        def attention(x):
            g_s = x.abs().mean(dim=1).reshape(n, -1) / temp
            e_s = torch.exp(g_s - g_s.max(dim=1, keepdim=True).values)
            a_s = h * w * e_s / e_s.sum(dim=1, keepdim=True)
            g_c = x.abs().mean(dim=(2, 3)) / temp
            e_c = torch.exp(g_c - g_c.max(dim=1, keepdim=True).values)
            return a_s.reshape(n, h, w), c * e_c / e_c.sum(dim=1, keepdim=True)

        s_sp, s_ch = attention(s)
        t_sp, t_ch = attention(t)
        scale = torch.sqrt(t_sp)[:, None] * torch.sqrt(t_ch)[:, :, None, None]
        terms = {}
        for name, mask in (("fg", fg), ("bg", bg)):
            m = torch.sqrt(mask)[:, None]
            terms[name] = F.mse_loss(s * scale * m, t * scale * m, reduction="sum") / n
        terms["at"] = ((s_ch - t_ch).abs().sum() + (s_sp - t_sp).abs().sum()) / n
        terms["gl"] = F.mse_loss(_gc_block(distiller.student_context[level], s),
                                 _gc_block(distiller.teacher_context[level], t),
                                 reduction="sum") / n
        weights = {"fg": distiller.alpha, "bg": distiller.beta, "at": distiller.gamma,
                   "gl": distiller.lambda_gl}
        for name, value in terms.items():
            losses[f"loss_fgd_{name}_{level}"] = weights[name] * value
    return losses


def straightforward_tar(distiller, student: Dict[str, Tensor], teacher: Dict[str, Tensor],
                        gt: "GroundTruth" = None):
    """TAR.md's feature term written plainly: per image, per box a full Gaussian over the grid
    from a meshgrid of cell centres, the mask as the running maximum, then ``sum M (r(S) - T)^2 /
    sum M`` per level. (Its RoI terms read box-head outputs, not the maps this harness feeds.)"""
    if gt is None:
        raise ValueError("straightforward_tar needs the batch's ground truth (gt)")
    losses = {}
    for level in distiller.in_features:
        s = distiller.adapters[level](student[level])
        t = teacher[level].detach()
        n, _, h, w = t.shape
        ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        mask = torch.zeros(n, h, w)
        for i, boxes in enumerate(gt.boxes):
            for x1, y1, x2, y2 in boxes.tolist():
                x1, x2 = x1 * w / gt.padded_size[1], x2 * w / gt.padded_size[1]
                y1, y2 = y1 * h / gt.padded_size[0], y2 * h / gt.padded_size[0]
                sx = max((x2 - x1) * distiller.sigma_scale, 1e-6)
                sy = max((y2 - y1) * distiller.sigma_scale, 1e-6)
                g = torch.exp(-((xs - (x1 + x2) / 2) ** 2 / (2 * sx * sx)
                                + (ys - (y1 + y2) / 2) ** 2 / (2 * sy * sy)))
                mask[i] = torch.maximum(mask[i], g)
        mask = mask.to(t.device)[:, None]
        value = ((s - t) ** 2 * mask).sum() / mask.sum().clamp_min(1e-12)
        losses[f"loss_tar_feat_{level}"] = distiller.feat_weight * value
    return losses


#: distiller name -> fn(distiller, student_features, teacher_features) -> losses. KD is absent:
#: it reads head logits, not the feature maps this harness feeds (tests/test_baselines.py checks
#: it against its direct formula).
REFERENCE_LOSSES: Dict[str, Callable] = {"CSGR": straightforward_csgr,
                                         "MIMIC": straightforward_mimic,
                                         "PKD": straightforward_pkd,
                                         "FGD": straightforward_fgd,
                                         "TAR": straightforward_tar}
