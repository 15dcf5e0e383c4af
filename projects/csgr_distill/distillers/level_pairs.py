"""The shared part of the feature distillers that compare student and teacher FPN maps level by
level (MIMIC, PKD, FGD, TAR's feature term; CSGR uses the two checks): the level list and its
checks (:func:`check_levels`), one channel adapter per level, and the per-level pairing of the
two records with their shape checks (:func:`level_pair`)."""
import functools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ..layers.adapters import build_channel_adapter
from .base import Distiller

__all__ = ["LevelPairDistiller", "check_levels", "level_pair", "channels_of", "LevelCells",
           "level_cells", "boxes_by_image", "box_chunks", "max_over_boxes", "MASK_CHUNK"]


def check_levels(node: str, in_features, student_channels: Dict[str, int],
                 teacher_channels: Dict[str, int]) -> List[str]:
    """``MODEL.DISTILL.<node>.IN_FEATURES`` as a list, checked: not empty, no level twice, every
    level produced by both networks (``*_channels``: level -> channels)."""
    key = f"MODEL.DISTILL.{node}.IN_FEATURES"
    in_features = list(in_features)
    if not in_features:
        raise ValueError(f"{key} is empty; name at least one level")
    if len(set(in_features)) != len(in_features):
        raise ValueError(f"{key} lists a level twice: {in_features}")
    for role, chans in (("student", student_channels), ("teacher", teacher_channels)):
        missing = [f for f in in_features if f not in chans]
        if missing:
            raise ValueError(f"{key} names levels {missing} that the {role} does not "
                             f"produce (it has {sorted(chans)})")
    return in_features


def channels_of(student, teacher) -> dict:
    """``from_config`` helper: ``{"student_channels", "teacher_channels"}`` (level -> channels)
    of two :class:`~csgr_distill.records.DetectorSpec`."""
    return {"student_channels": {f: s.channels for f, s in student.shapes.items()},
            "teacher_channels": {f: t.channels for f, t in teacher.shapes.items()}}


def level_pair(node: str, level: str, student, teacher) -> Tuple[Tensor, Tensor]:
    """``(S, T)`` of one level of two records: the student map ``[N, Cs, H, W]`` as recorded and
    the teacher map ``[N, C, H, W]`` detached. Errors naming ``MODEL.DISTILL.<node>.IN_FEATURES``
    when a record lacks the level or the two maps differ in batch or grid."""
    for role, out in (("student", student), ("teacher", teacher)):
        if level not in out.features:
            raise KeyError(
                f"{node}: the {role} outputs have no feature {level!r} (have "
                f"{sorted(out.features)}); check MODEL.DISTILL.{node}.IN_FEATURES")
    s_feat, t_feat = student.features[level], teacher.features[level].detach()
    if s_feat.shape[0] != t_feat.shape[0] or s_feat.shape[-2:] != t_feat.shape[-2:]:
        raise ValueError(
            f"{node} level {level!r}: student map {tuple(s_feat.shape)} and teacher map "
            f"{tuple(t_feat.shape)} differ in batch or spatial size; both must see the "
            "same padded images and levels of equal stride "
            f"(MODEL.DISTILL.{node}.IN_FEATURES)")
    return s_feat, t_feat


class LevelPairDistiller(Distiller):
    """Base of the per-level feature distillers.

    Subclasses (registered: their ``MODEL.DISTILL.<config_node>`` holds ``IN_FEATURES``)
    implement ``forward``, iterating :meth:`level_pairs`. ``self.adapters[level]`` maps the
    student's channels to the teacher's: a 1x1 conv with bias where they differ
    (:func:`build_channel_adapter`), the identity otherwise.
    """

    def __init__(self, *, in_features: List[str], student_channels: Dict[str, int],
                 teacher_channels: Dict[str, int]):
        """
        Args:
            in_features: distilled level names, e.g. ``["p3", ..., "p7"]``.
            student_channels / teacher_channels: level -> channels (must cover ``in_features``).
        """
        super().__init__()
        self.in_features = check_levels(self.config_node, in_features, student_channels,
                                        teacher_channels)
        self.adapters = nn.ModuleDict({
            f: build_channel_adapter(int(student_channels[f]), int(teacher_channels[f]))
            for f in self.in_features
        })

    def level_pairs(self, student, teacher) -> Iterator[Tuple[str, Tensor, Tensor]]:
        """``(level, S, T)`` for every level of ``in_features`` (:func:`level_pair`)."""
        for level in self.in_features:
            yield (level, *level_pair(self.config_node, level, student, teacher))


class LevelCells:
    """The cells of several level grids laid end to end, so that a per-cell formula runs on all
    levels at once: cell ``p`` of the ``[..., P]`` layout (``P = sum_l H_l W_l``; level by level,
    each row-major) sits in level ``cell_level[p]`` at row ``rows[cell_row[p]]`` and column
    ``cols[cell_col[p]]`` of its grid. ``rows`` ``[sum_l H_l]`` and ``cols`` ``[sum_l W_l]``
    hold every level's row and column indices end to end (float32), ``row_level`` /
    ``col_level`` the level of each, ``row_centres`` / ``col_centres`` the cell centres (index +
    0.5). Built by :func:`level_cells` (cached per grids and device)."""

    def __init__(self, grids: Sequence[Tuple[int, int]], device):
        self.grids = [(int(h), int(w)) for h, w in grids]
        self.sizes = [h * w for h, w in self.grids]
        rows, cols, row_level, col_level, cell_row, cell_col, cell_level = ([] for _ in range(7))
        row_start = col_start = 0
        for level, (h, w) in enumerate(self.grids):
            rows.append(np.arange(h)), cols.append(np.arange(w))
            row_level.append(np.full(h, level)), col_level.append(np.full(w, level))
            cell_row.append(np.repeat(np.arange(h), w) + row_start)
            cell_col.append(np.tile(np.arange(w), h) + col_start)
            cell_level.append(np.full(h * w, level))
            row_start, col_start = row_start + h, col_start + w

        def tensor(parts, dtype):
            return torch.from_numpy(np.concatenate(parts)).to(device=device, dtype=dtype)

        self.rows, self.cols = tensor(rows, torch.float32), tensor(cols, torch.float32)
        self.row_level = tensor(row_level, torch.long)
        self.col_level = tensor(col_level, torch.long)
        self.cell_row, self.cell_col = tensor(cell_row, torch.long), tensor(cell_col, torch.long)
        self.cell_level = tensor(cell_level, torch.long)
        self.row_centres, self.col_centres = self.rows + 0.5, self.cols + 0.5
        levels = len(self.grids)
        # [len, L] one-hot of each row / column / cell's level: exact counts per level by a
        # product (sums of 0/1 in float32 are exact below 2^24)
        self.row_onehot = torch.nn.functional.one_hot(self.row_level, levels).float()
        self.col_onehot = torch.nn.functional.one_hot(self.col_level, levels).float()
        self.cell_onehot = torch.nn.functional.one_hot(self.cell_level, levels).float()
        self._scales: Dict[Tuple[int, int], Tuple[Tensor, Tensor]] = {}

    def scales(self, size: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        """Per row ``[sum_l H_l]`` and per column ``[sum_l W_l]`` of every level the factor
        ``H_l / size[0]``, resp. ``W_l / size[1]`` (float32) that takes an input coordinate of an
        image of ``size`` to grid units."""
        key = (int(size[0]), int(size[1]))
        if key not in self._scales:
            if len(self._scales) >= 64:  # images of many sizes ("unpadded" box scaling)
                self._scales.clear()
            device = self.rows.device
            ys = torch.tensor([h / float(key[0]) for h, _ in self.grids], device=device)
            xs = torch.tensor([w / float(key[1]) for _, w in self.grids], device=device)
            self._scales[key] = (ys[self.row_level], xs[self.col_level])
        return self._scales[key]

    def split(self, flat: Tensor) -> List[Tensor]:
        """``[..., P]`` -> per level ``[..., H_l, W_l]`` (views)."""
        return [x.unflatten(-1, grid) for x, grid in zip(flat.split(self.sizes, dim=-1),
                                                          self.grids)]


@functools.lru_cache(maxsize=16)
def _cached_cells(grids: Tuple[Tuple[int, int], ...], device: str) -> LevelCells:
    return LevelCells(grids, device)


def level_cells(grids: Sequence[Tuple[int, int]], device) -> LevelCells:
    """:class:`LevelCells` of ``grids`` (``[(H_l, W_l)]``) on ``device``, built once per
    distinct grids and device (a multi-scale run has a handful of input sizes)."""
    return _cached_cells(tuple((int(h), int(w)) for h, w in grids), str(torch.device(device)))


def boxes_by_image(boxes: Sequence[Tensor]) -> Tuple[Tensor, Tensor, List[int]]:
    """The batch's boxes as one ``[B, 4]`` float32 tensor, the image of each ``[B]`` and the
    count per image (for masks: call under ``no_grad``)."""
    counts = [len(b) for b in boxes]
    flat = torch.cat(list(boxes)) if len(boxes) > 1 else boxes[0]
    if flat.dtype != torch.float32:
        flat = flat.float()
    image = torch.tensor([i for i, c in enumerate(counts) for _ in range(c)],
                         device=flat.device, dtype=torch.long)
    return flat, image, counts


#: the most (box, cell) pairs a box mask computes at once (64 MB of float32); more boxes are
#: taken a group of images at a time
MASK_CHUNK = 1 << 24


def max_over_boxes(out: Tensor, cells: "LevelCells", per_row: Tensor, per_col: Tensor,
                   image: Tensor, counts: List[int], per_level: Optional[Tensor] = None) -> None:
    """Into ``out`` ``[N, P]`` (cells of all levels end to end), per image the maximum over its
    boxes of ``per_row[b, row] * per_col[b, col]`` (``[B, sum_l H_l]``, ``[B, sum_l W_l]``),
    times ``per_level[b, level]`` ``[B, L]`` when given: a box's value on every cell of every
    level, :data:`MASK_CHUNK` (box, cell) pairs at a time (FGD's and TAR's box masks)."""
    for part in box_chunks(counts, out.shape[1]):
        value = per_row[part][:, cells.cell_row] * per_col[part][:, cells.cell_col]  # [b, P]
        if per_level is not None:
            value = value * per_level[part][:, cells.cell_level]
        out.scatter_reduce_(0, image[part, None].expand_as(value), value, "amax")


def box_chunks(counts: List[int], cells: int) -> List[slice]:
    """Slices of the batch's boxes (whole images, ``counts`` boxes each) of at most
    :data:`MASK_CHUNK` (box, cell) pairs each: one slice unless the batch has very many
    boxes."""
    parts, start, size = [], 0, 0
    for c in counts:
        if size and (size + c) * cells > MASK_CHUNK:
            parts.append(slice(start, start + size))
            start, size = start + size, 0
        size += c
    parts.append(slice(start, start + size))
    return parts
