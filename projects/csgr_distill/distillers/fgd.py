"""FGD: Focal and Global Knowledge Distillation for Detectors (Yang et al., CVPR 2022,
arXiv 2111.11837; ``docs/methods/FGD.md``; released code yzd-v/FGD).

Per FPN level, with the student map adapted to the teacher's channels:

* foreground/background masks from the ground-truth boxes (:func:`fgd_masks`);
* spatial and channel attention of each map with temperature (:func:`fgd_attention`);
* focal loss: the squared difference weighted by the masks and the *teacher's* attention;
* attention loss: L1 between the two networks' attention;
* global loss: squared difference of the two maps after one GC block each
  (:class:`~csgr_distill.layers.GlobalContextBlock`).
"""
import math
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers.fgd_level import fgd_level_losses
from ..layers.gc_block import GlobalContextBlock
from ..layers.reference import GroundTruth
from .base import Variant
from .level_pairs import (LevelPairDistiller, boxes_by_image, channels_of, level_cells,
                          max_over_boxes)
from .registry import register_distiller

__all__ = ["FGDDistiller", "fgd_masks", "fgd_masks_levels", "fgd_attention", "BOX_SCALINGS"]

#: ``MODEL.DISTILL.FGD.BOX_SCALING``: what a box's input-pixel coordinates are divided by to
#: reach the level grid
BOX_SCALINGS = ("padded", "unpadded")


def fgd_masks(boxes: Sequence[Tensor], grid: Tuple[int, int], image_sizes: Sequence[tuple],
              padded_size: tuple, scaling: str = "padded") -> Tuple[Tensor, Tensor]:
    """FGD's foreground and background masks of one level, ``([N, H, W], [N, H, W])``.

    Args:
        boxes: per image, ground-truth boxes ``[B_i, 4]`` (x1, y1, x2, y2 in input pixels of the
            resized image; ``B_i`` may be 0).
        grid: the level's ``(H, W)``.
        image_sizes: per image ``(h, w)`` of the resized, unpadded input.
        padded_size: ``(H_in, W_in)`` of the padded batch the backbone saw.
        scaling: ``"padded"``: x is scaled by ``W / W_in`` and y by ``H / H_in`` (the grid covers
            the padded batch: a box lands on the cells under it); ``"unpadded"``: by ``W / w``
            and ``H / h`` of the image itself, as FGD's official code does (it stretches the
            boxes of an image smaller than the padded batch towards the padding).

    A box covers the cells ``floor(x1')..ceil(x2')`` x ``floor(y1')..ceil(y2')`` (inclusive,
    clipped to the map); each covered cell gets ``1 / (number of cells the box covers, after
    clipping)``, and where boxes overlap the larger value (the smaller box) is kept. The official
    code divides by the count before clipping, which differs only for a box reaching the right or
    bottom edge of the map. ``M_bg = 1`` where ``M_fg = 0``, divided by the image's number of
    background cells (an image without background keeps zeros; an image without boxes has
    ``M_fg = 0`` and ``M_bg = 1 / (H W)``). One level of :func:`fgd_masks_levels`.
    """
    masks = fgd_masks_levels(boxes, [grid], image_sizes, padded_size, scaling)[0]
    return masks[0], masks[1]


@torch.compiler.disable  # data-dependent box counts: constants computed eagerly
def fgd_masks_levels(boxes: Sequence[Tensor], grids: Sequence[Tuple[int, int]],
                     image_sizes: Sequence[tuple], padded_size: tuple,
                     scaling: str = "padded") -> List[Tensor]:
    """:func:`fgd_masks` of every level of ``grids`` (``[(H_l, W_l)]``), per level the two masks
    stacked ``[2 (fg, bg), N, H_l, W_l]``, for all boxes, images and levels at once: each box's
    covered columns of every level end to end (``[B, sum_l W_l]``) and rows (``[B, sum_l H_l]``),
    its cell count per level, its value on every cell of every level (``[B, sum_l H_l W_l]``,
    :class:`~csgr_distill.distillers.level_pairs.LevelCells`), the maximum over each image's
    boxes, and the background's count per image and level: the same values as the formula
    level by level, box by box (counts are exact integers in float32)."""
    if scaling not in BOX_SCALINGS:
        raise ValueError(f"MODEL.DISTILL.FGD.BOX_SCALING is {scaling!r}; use one of "
                         f"{list(BOX_SCALINGS)}")
    n = len(image_sizes)
    if len(boxes) != n:
        raise ValueError(f"fgd_masks: {len(boxes)} box lists for {n} images")
    device = boxes[0].device if n else torch.device("cpu")
    cells = level_cells(grids, device)
    with torch.no_grad():
        masks = torch.zeros(2, n, sum(cells.sizes), device=device)
        fg = masks[0]
        if n and sum(len(b) for b in boxes):
            flat, image, counts = boxes_by_image(boxes)
            if scaling == "padded":
                y_scale, x_scale = cells.scales(padded_size)
            else:  # per image: [N, sum H], [N, sum W], then per box
                per_image = [cells.scales(size) for size in image_sizes]
                y_scale = torch.stack([y for y, _ in per_image])[image]
                x_scale = torch.stack([x for _, x in per_image])[image]

            def covered(lo, hi, scale, index):  # [B], [B] -> [B, len(index)] 0/1 float
                return ((index >= torch.floor(lo[:, None] * scale))
                        & (index <= torch.ceil(hi[:, None] * scale))).float()

            in_x = covered(flat[:, 0], flat[:, 2], x_scale, cells.cols)
            in_y = covered(flat[:, 1], flat[:, 3], y_scale, cells.rows)
            # cells covered per box and level, after clipping (0 off the map)
            count = (in_y @ cells.row_onehot) * (in_x @ cells.col_onehot)
            value = 1.0 / count.clamp_min(1)  # [B, L]
            max_over_boxes(fg, cells, in_y, in_x, image, counts, value)
        bg = masks[1]
        bg.copy_(fg == 0)
        bg /= (bg @ cells.cell_onehot).clamp_min(1.0)[:, cells.cell_level]
    return cells.split(masks)


def fgd_attention(feat: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """FGD's spatial and channel attention of ``feat`` ``[N, C, H, W]``.

    ``A_S = H W softmax_{positions}(mean_c |F| / T)`` ``[N, H, W]`` and
    ``A_C = C softmax_{channels}(mean_{h,w} |F| / T)`` ``[N, C]`` (each sums to H W, resp. C:
    1 on average)."""
    n, c, h, w = feat.shape
    value = feat.abs()
    spatial = (h * w) * F.softmax((value.mean(dim=1) / temperature).view(n, -1), dim=1)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.view(n, h, w), channel


@register_distiller("FGD")
class FGDDistiller(LevelPairDistiller):
    r"""FGD per FPN level; ``S`` the adapted student map, ``T`` the teacher map (detached), both
    ``[N, C, H, W]``; masks ``M_fg``, ``M_bg`` ``[N, H, W]`` (:func:`fgd_masks`); the teacher's
    attention ``A_S^t`` ``[N, H, W]``, ``A_C^t`` ``[N, C]`` and the student's ``A_S^s``, ``A_C^s``
    (:func:`fgd_attention`, temperature ``T_att``); every sum over all its indices, divided by N:

    * ``loss_fgd_fg_<level> = alpha  * (1/N) sum M_fg A_S^t A_C^t (S - T)^2``
    * ``loss_fgd_bg_<level> = beta   * (1/N) sum M_bg A_S^t A_C^t (S - T)^2``
    * ``loss_fgd_at_<level> = gamma  * (1/N) [sum |A_C^s - A_C^t| + sum |A_S^s - A_S^t|]``
    * ``loss_fgd_gl_<level> = lambda * (1/N) sum (R_s(S) - R_t(T))^2``

    ``R_s``, ``R_t``: one :class:`GlobalContextBlock` each (learned, last conv at zero), per
    level. The adapter (1x1 conv, where the channels differ) is per level too. Gradients reach
    the student through ``S`` (all four terms) and the GC blocks through the global term; the
    teacher is detached, so its attention weighs the focal term as a constant.

    The published weights differ by detector (``MODEL.DISTILL.FGD``: RetinaNet's are the
    defaults, ``configs/Base-Distill-RCNN-FPN.yaml`` sets Faster R-CNN's).
    """

    #: term of ``loss_fgd_<term>_<level>`` -> (its weight's attribute, its config key)
    TERMS = {"fg": ("alpha", "ALPHA"), "bg": ("beta", "BETA"), "at": ("gamma", "GAMMA"),
             "gl": ("lambda_gl", "LAMBDA")}

    benchmark_variants = {"CSGR+FGD": Variant(("MODEL.DISTILL.METHODS", ("CSGR", "FGD")),
                                              parts=("gain",))}

    @classmethod
    def add_config(cls, node) -> None:
        # Attention temperature T_att (released configs: 0.5 for RetinaNet, GFL, Faster/Mask R-CNN
        # and RepPoints; 0.8 for FCOS).
        node.TEMPERATURE = 0.5
        # The four terms' weights: the released RetinaNet (and GFL) configs' alpha, beta, gamma,
        # lambda; configs/Base-Distill-RCNN-FPN.yaml sets the released Faster / Mask R-CNN ones
        # (5e-5, 2.5e-5, 5e-5, 5e-7).
        node.ALPHA = 1e-3  # foreground focal term
        node.BETA = 5e-4  # background focal term
        node.GAMMA = 5e-4  # attention term
        node.LAMBDA = 5e-6  # global (GC block) term
        # Levels distilled (present in both networks with equal strides); R-CNN configs: p2-p5.
        node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
        # How ground-truth boxes reach a level's grid: "padded" (ours) divides by the padded batch
        # size (each box covers the cells under it); "unpadded" by the image's own size, as the
        # released code scales them (boxes of an image smaller than the padded batch are
        # stretched towards the padding). Either way a box reaching the right or bottom edge is
        # normalised by the cells it covers on the map (docs/methods/FGD.md).
        node.BOX_SCALING = "padded"

    @configurable
    def __init__(self, *, in_features: List[str], student_channels: Dict[str, int],
                 teacher_channels: Dict[str, int], temperature: float, alpha: float, beta: float,
                 gamma: float, lambda_gl: float, box_scaling: str = "padded"):
        """
        Args:
            in_features / student_channels / teacher_channels: as :class:`LevelPairDistiller`.
            temperature: ``T_att`` of the attention (> 0).
            alpha, beta, gamma, lambda_gl: weights of the fg, bg, attention and global terms.
            box_scaling: ``"padded"`` or ``"unpadded"`` (:func:`fgd_masks`).
        """
        super().__init__(in_features=in_features, student_channels=student_channels,
                         teacher_channels=teacher_channels)
        if not temperature > 0:
            raise ValueError(f"MODEL.DISTILL.FGD.TEMPERATURE must be > 0, got {temperature}")
        if box_scaling not in BOX_SCALINGS:
            raise ValueError(f"MODEL.DISTILL.FGD.BOX_SCALING is {box_scaling!r}; use one of "
                             f"{list(BOX_SCALINGS)}")
        self.temperature = float(temperature)
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.lambda_gl = float(lambda_gl)
        self.box_scaling = box_scaling
        self.loss_weight_keys = {f"loss_fgd_{t}": f"MODEL.DISTILL.FGD.{key}"
                                 for t, (_, key) in self.TERMS.items()}
        self.student_context = nn.ModuleDict({f: GlobalContextBlock(teacher_channels[f])
                                              for f in self.in_features})
        self.teacher_context = nn.ModuleDict({f: GlobalContextBlock(teacher_channels[f])
                                              for f in self.in_features})

    @classmethod
    def from_config(cls, cfg, student, teacher):
        c = cfg.MODEL.DISTILL.FGD
        return {"in_features": list(c.IN_FEATURES), "temperature": c.TEMPERATURE,
                "alpha": c.ALPHA, "beta": c.BETA, "gamma": c.GAMMA, "lambda_gl": c.LAMBDA,
                "box_scaling": c.BOX_SCALING, **channels_of(student, teacher)}

    def masks(self, boxes: List[Tensor], grid: Tuple[int, int], record) -> Tuple[Tensor, Tensor]:
        """:func:`fgd_masks` of one level with this distiller's box scaling and the padded and
        image sizes of ``record`` (a ``DetectorOutputs``)."""
        return fgd_masks(boxes, grid, record.image_sizes, record.padded_size, self.box_scaling)

    def level_losses(self, s_feat: Tensor, t_feat: Tensor, level: str, fg: Tensor,
                     bg: Tensor) -> Dict[str, Tensor]:
        """The four unweighted terms of one level, ``{"fg", "bg", "at", "gl"}`` -> scalar.

        Args:
            s_feat: student ``[N, Cs, H, W]`` (adapted here); t_feat: teacher ``[N, C, H, W]``
                (detached); fg, bg: masks ``[N, H, W]``.
        """
        terms = self._level_terms(s_feat, t_feat, level, torch.stack([fg, bg]), [1.0] * 4)
        return dict(zip(self.TERMS, terms))

    def _level_terms(self, s_feat: Tensor, t_feat: Tensor, level: str, masks: Tensor,
                     weights: List[float]) -> Tuple[Tensor, ...]:
        """``(fg, bg, at, gl)`` of one level, each times its weight; ``masks`` ``[2, N, H, W]``
        (fg, bg). One fused autograd function (:func:`~csgr_distill.layers.fgd_level.
        fgd_level_losses`)."""
        s = self.adapters[level](s_feat)
        n = s.shape[0]
        return fgd_level_losses(s, t_feat, masks, self.student_context[level],
                                self.teacher_context[level], self.temperature,
                                [w / n for w in weights])

    def reference_losses(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """:func:`straightforward_fgd` on the two records' maps and the batch's boxes."""
        return straightforward_fgd(self, student.features, teacher.features,
                                   GroundTruth.of(student, gt_instances))

    def forward(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """``(DetectorOutputs, DetectorOutputs, list[Instances]) -> {loss name: weighted loss}``:
        ``loss_fgd_{fg,bg,at,gl}_<level>`` for every level of ``in_features``."""
        pairs = list(self.level_pairs(student, teacher))
        boxes = self.gt_boxes(gt_instances, pairs[0][1].shape[0])
        masks = fgd_masks_levels(boxes, [s.shape[-2:] for _, s, _ in pairs], student.image_sizes,
                                 student.padded_size, self.box_scaling)
        weights = [getattr(self, attr) for attr, _ in self.TERMS.values()]
        losses = {}
        for (level, s_feat, t_feat), level_masks in zip(pairs, masks):
            for term, value in zip(self.TERMS, self._level_terms(s_feat, t_feat, level,
                                                                   level_masks, weights)):
                losses[f"loss_fgd_{term}_{level}"] = value
        return losses

    @torch.no_grad()
    def maps(self, student, teacher, gt_instances, level: str) -> Dict[str, Tensor]:
        """What FGD weighs on one level, for pictures: ``fg``, ``bg`` (masks ``[N, H, W]``) and
        the spatial attention ``teacher_spatial`` / ``student_spatial`` ``[N, H, W]`` (the
        student's from its adapted map)."""
        s_feat = student.features[level]
        boxes = self.gt_boxes(gt_instances, s_feat.shape[0])
        fg, bg = self.masks(boxes, s_feat.shape[-2:], student)
        return {"fg": fg, "bg": bg,
                "teacher_spatial": fgd_attention(teacher.features[level], self.temperature)[0],
                "student_spatial": fgd_attention(self.adapters[level](s_feat),
                                                 self.temperature)[0]}


# ------------------------------------------------------------------------------------------------
# straightforward reference (Distiller.reference_losses; tools/benchmark.py kernels)
# ------------------------------------------------------------------------------------------------
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
