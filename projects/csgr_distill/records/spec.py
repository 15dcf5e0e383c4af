"""What is known of a detector before its weights: family, levels, grid. Used at build time to
check a teacher/student pair and to make both see the same grid."""
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from torch.nn import functional as F

from ..detectors import num_classes_of
from .base import Recorder, level_provenance, recorder_for

logger = logging.getLogger(__name__)

__all__ = ["DetectorSpec", "grid_multiple", "pad_images", "check_level_pairs"]


@dataclass
class DetectorSpec:
    """A detector as its config describes it (built without weights; what distillers are built
    from and pairs are checked against).

    Attributes:
        cfg: the detector's config.
        model_type: its meta-architecture class.
        recorder: its family's recorder.
        shapes: backbone level -> ShapeSpec (channels, stride).
        size_divisibility: the backbone pads each batch to a multiple of this (0/1: none).
        square_size: ViTDet-style square padding size (0: none).
        provenance: level -> how the backbone computes it (see ``level_provenance``).
    """

    cfg: object
    model_type: type
    recorder: Recorder
    shapes: Dict[str, ShapeSpec]
    size_divisibility: int = 0
    square_size: int = 0
    provenance: Dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The meta-architecture name (``cfg.MODEL.META_ARCHITECTURE``)."""
        return self.cfg.MODEL.META_ARCHITECTURE

    @property
    def family(self) -> str:
        """``"dense"``, ``"rcnn"`` or ``"detr"``: its recorder's family."""
        return self.recorder.family

    @property
    def num_classes(self) -> int:
        """Its foreground class count (:func:`csgr_distill.detectors.num_classes_of`)."""
        return num_classes_of(self.cfg)

    @classmethod
    def from_backbone(cls, cfg, model_type: type, backbone) -> "DetectorSpec":
        constraints = dict(getattr(backbone, "padding_constraints", {}) or {})
        div = int(constraints.get("size_divisibility", backbone.size_divisibility) or 0)
        return cls(cfg=cfg, model_type=model_type, recorder=recorder_for(model_type),
                   shapes=backbone.output_shape(), size_divisibility=div,
                   square_size=int(constraints.get("square_size", 0) or 0),
                   provenance=level_provenance(backbone))

    @classmethod
    def from_cfg(cls, cfg) -> "DetectorSpec":
        """Built on the meta device: no memory, no weights, no checkpoint needed."""
        with torch.device("meta"):
            backbone = build_backbone(cfg)
        return cls.from_backbone(cfg, META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE),
                                 backbone)

    @classmethod
    def from_shapes(cls, cfg, shapes: Dict[str, ShapeSpec]) -> "DetectorSpec":
        """A spec with given level shapes and no backbone (a distiller built on its own, e.g. in
        ``tools/benchmark.py kernels`` or a test)."""
        model_type = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        return cls(cfg=cfg, model_type=model_type, recorder=recorder_for(model_type),
                   shapes=dict(shapes))


def grid_multiple(student: DetectorSpec, teacher: DetectorSpec) -> int:
    """The multiple both detectors can pad a batch to: ``lcm`` of their size divisibilities.

    The student pads its training batches to this multiple (instead of its own divisibility when
    they differ) and the teacher's input is padded to the student's padded size, so both see one
    grid for every image size. Square padding (ViTDet) must agree exactly.
    """
    if student.square_size != teacher.square_size:
        raise ValueError(
            f"Teacher ({teacher.name}) pads every batch to a {teacher.square_size} px square and "
            f"the student ({student.name}) to {student.square_size or 'no square'}: their "
            "feature grids cannot agree. Use the same square padding for both (the backbone's "
            "square_pad) or none.")
    ds, dt = max(student.size_divisibility, 1), max(teacher.size_divisibility, 1)
    multiple = ds * dt // math.gcd(ds, dt)
    if multiple != ds:
        logger.warning(
            "The teacher pads to multiples of %d px, the student to multiples of %d: during "
            "distillation training the student's batches are padded to multiples of %d so that "
            "both see the same grid (inference is unchanged).", dt, ds, multiple)
    return multiple


def pad_images(images: ImageList, size: Optional[Tuple[int, int]] = None,
               multiple: int = 1) -> ImageList:
    """Pad an ``ImageList`` at the bottom/right with zeros (as ``ImageList.from_tensors`` pads)
    to ``size`` (h, w) or to the next multiple of ``multiple``. ``[N, C, H, W] -> [N, C, H', W']``.
    """
    h, w = images.tensor.shape[-2:]
    if size is None:
        size = (-(-h // multiple) * multiple, -(-w // multiple) * multiple)
    th, tw = int(size[0]), int(size[1])
    if (th, tw) == (h, w):
        return images
    if th < h or tw < w:
        raise ValueError(f"cannot pad a {h}x{w} batch down to {th}x{tw}: the teacher pads more "
                         "than the student's grid allows")
    return ImageList(F.pad(images.tensor, (0, tw - w, 0, th - h)), images.image_sizes)


def check_level_pairs(levels, student: DetectorSpec, teacher: DetectorSpec, who: str) -> None:
    """The levels a distiller pairs must exist in both, with equal strides; where the two
    backbones compute a level differently (another family's p6), warn once at build time."""
    for role, spec in (("student", student), ("teacher", teacher)):
        missing = [lv for lv in levels if lv not in spec.shapes]
        if missing:
            raise ValueError(
                f"{who} distils levels {missing} that the {role} ({spec.name}) does not produce "
                f"(it has {sorted(spec.shapes)}); list only levels both have")
    for lv in levels:
        ss, ts = student.shapes[lv].stride, teacher.shapes[lv].stride
        if ss is not None and ts is not None and ss != ts:
            raise ValueError(
                f"{who}: level {lv!r} has stride {ss} in the student ({student.name}) but {ts} in "
                f"the teacher ({teacher.name}); distil only levels of equal stride")
        ps, pt = student.provenance.get(lv), teacher.provenance.get(lv)
        if ps != pt:
            logger.warning(
                "%s: level %s is computed differently by the student (%s: %s) and the teacher "
                "(%s: %s); it is distilled all the same (same name and stride). Drop it from the "
                "method's IN_FEATURES if that is not intended.", who, lv, student.name, ps,
                teacher.name, pt)
