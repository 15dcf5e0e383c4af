"""FGD: Focal and Global Knowledge Distillation for Detectors (Yang et al., CVPR 2022,
arXiv 2111.11837), as specified in ``shared/methods/FGD.md``.

Per FPN level, with the student map adapted to the teacher's channels:

* foreground/background masks from the ground-truth boxes (:func:`fgd_masks`);
* spatial and channel attention of each map with temperature (:func:`fgd_attention`);
* focal loss: the squared difference weighted by the masks and the *teacher's* attention;
* attention loss: L1 between the two networks' attention;
* global loss: squared difference of the two maps after one GC block each
  (:class:`~csgr_distill.layers.GlobalContextBlock`).
"""
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn
from torch.nn import functional as F

from ..layers.gc_block import GlobalContextBlock
from .level_pairs import LevelPairDistiller
from .registry import register_distiller

__all__ = ["FGDDistiller", "fgd_masks", "fgd_attention", "BOX_SCALINGS"]

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
    ``M_fg = 0`` and ``M_bg = 1 / (H W)``).
    """
    if scaling not in BOX_SCALINGS:
        raise ValueError(f"MODEL.DISTILL.FGD.BOX_SCALING is {scaling!r}; use one of "
                         f"{list(BOX_SCALINGS)}")
    h, w = int(grid[0]), int(grid[1])
    n = len(image_sizes)
    if len(boxes) != n:
        raise ValueError(f"fgd_masks: {len(boxes)} box lists for {n} images")
    device = boxes[0].device if n else torch.device("cpu")
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    fg = torch.zeros(n, h, w, device=device)
    for i, (b, size) in enumerate(zip(boxes, image_sizes)):
        if b.numel() == 0:
            continue
        ref_h, ref_w = padded_size if scaling == "padded" else size
        b = b.detach().float()
        x1 = torch.floor(b[:, 0] * (w / ref_w))
        x2 = torch.ceil(b[:, 2] * (w / ref_w))
        y1 = torch.floor(b[:, 1] * (h / ref_h))
        y2 = torch.ceil(b[:, 3] * (h / ref_h))
        in_x = (cols[None] >= x1[:, None]) & (cols[None] <= x2[:, None])  # [B, W]
        in_y = (rows[None] >= y1[:, None]) & (rows[None] <= y2[:, None])  # [B, H]
        count = in_y.sum(1) * in_x.sum(1)  # cells covered after clipping; 0 off the map
        value = 1.0 / count.clamp_min(1).float()
        cover = (in_y[:, :, None] & in_x[:, None, :]).float() * value[:, None, None]
        fg[i] = cover.amax(dim=0)
    bg = (fg == 0).float()
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
    return fg, bg


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

    config_node = "FGD"
    #: term of ``loss_fgd_<term>_<level>`` -> (its weight's attribute, its config key)
    TERMS = {"fg": ("alpha", "ALPHA"), "bg": ("beta", "BETA"), "at": ("gamma", "GAMMA"),
             "gl": ("lambda_gl", "LAMBDA")}

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
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        c = cfg.MODEL.DISTILL.FGD
        return {"in_features": list(c.IN_FEATURES), "temperature": c.TEMPERATURE,
                "alpha": c.ALPHA, "beta": c.BETA, "gamma": c.GAMMA, "lambda_gl": c.LAMBDA,
                "box_scaling": c.BOX_SCALING,
                **cls.channels_from_shapes(student_shapes, teacher_shapes)}

    @staticmethod
    def gt_boxes(gt_instances, n: int) -> List[Tensor]:
        """Per image the ``[B_i, 4]`` ground-truth boxes of ``gt_instances`` (``Instances`` with
        ``gt_boxes``, as the detectors' training forward receives them)."""
        if gt_instances is None or len(gt_instances) != n:
            got = "none" if gt_instances is None else len(gt_instances)
            raise ValueError(f"FGD needs the ground-truth instances of the {n} images of the "
                             f"batch (got {got}): it is a training-time loss")
        return [inst.gt_boxes.tensor for inst in gt_instances]

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
        s = self.adapters[level](s_feat)
        n = s.shape[0]
        s_spatial, s_channel = fgd_attention(s, self.temperature)
        t_spatial, t_channel = fgd_attention(t_feat, self.temperature)
        # sum_c A_C^t (S - T)^2 per position, then the two masks with A_S^t
        weighted = torch.einsum("nc,nchw->nhw", t_channel, (s - t_feat).pow(2)) * t_spatial
        return {
            "fg": (fg * weighted).sum() / n,
            "bg": (bg * weighted).sum() / n,
            "at": ((s_channel - t_channel).abs().sum()
                   + (s_spatial - t_spatial).abs().sum()) / n,
            "gl": (self.student_context[level](s)
                   - self.teacher_context[level](t_feat)).pow(2).sum() / n,
        }

    def forward(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """``(DetectorOutputs, DetectorOutputs, list[Instances]) -> {loss name: weighted loss}``:
        ``loss_fgd_{fg,bg,at,gl}_<level>`` for every level of ``in_features``."""
        boxes = None
        losses = {}
        for level, s_feat, t_feat in self.level_pairs(student, teacher):
            if boxes is None:
                boxes = self.gt_boxes(gt_instances, s_feat.shape[0])
            fg, bg = self.masks(boxes, s_feat.shape[-2:], student)
            for term, value in self.level_losses(s_feat, t_feat, level, fg, bg).items():
                losses[f"loss_fgd_{term}_{level}"] = getattr(self, self.TERMS[term][0]) * value
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
