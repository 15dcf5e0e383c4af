"""DistillMixin: the teacher, the distillers, the decay factor and the loss assembly.

Shared by every ``Distill*`` meta-architecture. A concrete class mixes it in front of a detectron2
meta-architecture (``class DistillRetinaNet(DistillMixin, RetinaNet)``) and provides three
detector-specific pieces:

* ``recorded_modules(fields)``: the student's submodules whose outputs a training step must keep
  (e.g. ``backbone``, ``head``); they are captured with forward hooks, so the base class's own
  ``forward`` runs unchanged;
* ``student_outputs(record, batched_inputs, fields) -> DetectorOutputs`` from those captures;
* ``teacher_outputs(teacher, batched_inputs, fields) -> DetectorOutputs``: the teacher's pass.

With ``MODEL.DISTILL.ENABLED = False`` nothing of this is built and the class is its base class.
"""
import contextlib
import logging
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from ..distillers import build_distillers
from ..outputs import OUTPUT_FIELDS, DetectorOutputs
from ..teacher import FrozenTeacher, build_teacher_cfg

logger = logging.getLogger(__name__)

__all__ = ["DistillMixin", "distill_init_kwargs", "image_sizes_of", "teacher_feature_shapes"]


def teacher_feature_shapes(teacher_cfg) -> Dict[str, ShapeSpec]:
    """The teacher backbone's output shapes, built on the meta device (no memory, no weights)."""
    from detectron2.modeling import build_backbone

    with torch.device("meta"):
        backbone = build_backbone(teacher_cfg)
    return backbone.output_shape()


def distill_init_kwargs(cfg, student_shapes: Dict[str, ShapeSpec]) -> dict:
    """``from_config`` kwargs of a Distill* meta-architecture: the distillers and the student cfg.

    Only configs (no weights) are read here, so building the student for ``--eval-only`` or
    inference never needs the teacher checkpoint.
    """
    if not cfg.MODEL.DISTILL.ENABLED:
        return {"distillers": None, "distill_cfg": None}
    tcfg = build_teacher_cfg(cfg)
    if not cfg.MODEL.DISTILL.METHODS:
        raise ValueError("MODEL.DISTILL.ENABLED is True but MODEL.DISTILL.METHODS is empty; "
                         "list registered distillers, e.g. ['CSGR'], or set ENABLED False")
    distillers = build_distillers(cfg, student_shapes, teacher_feature_shapes(tcfg))
    return {"distillers": distillers, "distill_cfg": cfg}


class DistillMixin:
    """Mixed in before a detectron2 meta-architecture (``class X(DistillMixin, RetinaNet)``).

    Attributes:
        distillers: ``nn.ModuleDict`` name -> distiller (trained by the main optimizer, saved in
            checkpoints), or None when distillation is off.
        distill_factor: current decay factor; set by the trainer's decay hook every iteration.
    """

    #: DetectorOutputs fields this meta-architecture can record (subset of OUTPUT_FIELDS).
    supported_fields: Tuple[str, ...] = ("features",)

    @configurable
    def __init__(self, *, distillers: Optional[nn.ModuleDict] = None, distill_cfg=None, **kwargs):
        super().__init__(**kwargs)
        self.distillers = distillers
        self.distill_factor = 1.0
        # Not an nn.Module attribute: plain objects stay out of the module tree.
        self._distill_cfg = distill_cfg
        self._teacher: Optional[FrozenTeacher] = None
        fields = set()
        for d in (distillers or {}).values():
            fields.update(d.required_outputs)
        unsupported = fields - set(self.supported_fields)
        if unsupported:
            raise ValueError(
                f"{type(self).__name__} cannot provide {sorted(unsupported)} to the distillers "
                f"{list(distillers)} (it records {list(self.supported_fields)}); check "
                "MODEL.DISTILL.METHODS and the methods' options")
        self.distill_fields: Tuple[str, ...] = tuple(f for f in OUTPUT_FIELDS if f in fields)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(distill_init_kwargs(cfg, ret["backbone"].output_shape()))
        return ret

    @property
    def distill_enabled(self) -> bool:
        return self.distillers is not None

    # ---- teacher -------------------------------------------------------------------------
    @property
    def teacher(self) -> FrozenTeacher:
        """The frozen teacher, built and loaded on first use (training only)."""
        if self._teacher is None:
            self.attach_teacher()
        return self._teacher

    def attach_teacher(self, teacher: Optional[FrozenTeacher] = None) -> FrozenTeacher:
        """Build (or take) the teacher and move it to the student's device."""
        if not self.distill_enabled:
            raise RuntimeError("attach_teacher() needs MODEL.DISTILL.ENABLED True")
        teacher = teacher or FrozenTeacher.from_student_cfg(self._distill_cfg)
        device = self.device
        teacher.apply(lambda t: t.to(device))
        self._teacher = teacher
        return teacher

    def _apply(self, fn, *args, **kwargs):
        # .to()/.cuda()/.cpu()/.half() of the student are mirrored onto the teacher.
        super()._apply(fn, *args, **kwargs)
        if getattr(self, "_teacher", None) is not None:
            self._teacher.apply(fn)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_teacher", None) is not None:
            self._teacher.model.eval()  # the teacher is always in eval mode
        return self

    # ---- training step -------------------------------------------------------------------
    def forward(self, batched_inputs: List[dict]):
        if not (self.training and self.distill_enabled):
            return super().forward(batched_inputs)
        with self._recording(self.recorded_modules(self.distill_fields)) as record:
            losses = super().forward(batched_inputs)
        student = self.student_outputs(record, batched_inputs, self.distill_fields)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        return self.add_distill_losses(losses, student, batched_inputs, gt_instances)

    @contextlib.contextmanager
    def _recording(self, modules: Dict[str, nn.Module]):
        """Capture one forward pass with forward hooks: ``record[name]`` is the module's output,
        ``record[name + "_input"]`` its first positional input."""
        record: Dict[str, object] = {}

        def hook(key):
            def fn(_module, inputs, output):
                record[key] = output
                record[key + "_input"] = inputs[0] if inputs else None
            return fn

        handles = [m.register_forward_hook(hook(key)) for key, m in modules.items()]
        try:
            yield record
        finally:
            for h in handles:
                h.remove()

    def recorded_modules(self, fields: Tuple[str, ...]) -> Dict[str, nn.Module]:
        """Student submodules whose outputs :meth:`student_outputs` needs (default: backbone)."""
        return {"backbone": self.backbone}

    def student_outputs(self, record: dict, batched_inputs: List[dict],
                        fields: Tuple[str, ...]) -> DetectorOutputs:
        raise NotImplementedError

    def add_distill_losses(
        self,
        losses: Dict[str, Tensor],
        student: DetectorOutputs,
        batched_inputs: List[dict],
        gt_instances: list,
    ) -> Dict[str, Tensor]:
        """Run the teacher, every distiller, scale by the decay factor, merge into ``losses``."""
        with torch.no_grad():
            teacher = self.teacher_outputs(self.teacher.model, batched_inputs, self.distill_fields)
        factor = float(self.distill_factor)
        for name, distiller in self.distillers.items():
            for key, value in distiller(student, teacher, gt_instances).items():
                if key in losses:
                    raise KeyError(f"Distiller {name} returns loss {key!r}, which already exists")
                losses[key] = value * factor
        return losses

    def teacher_outputs(
        self, teacher: nn.Module, batched_inputs: List[dict], fields: Tuple[str, ...]
    ) -> DetectorOutputs:
        raise NotImplementedError

    def teacher_inputs(self, teacher: nn.Module, batched_inputs: List[dict]) -> List[dict]:
        """The batch in the teacher's channel order (INPUT.FORMAT RGB vs BGR)."""
        if teacher.input_format == self.input_format:
            return batched_inputs
        if {teacher.input_format, self.input_format} != {"RGB", "BGR"}:
            raise ValueError(f"Teacher INPUT.FORMAT {teacher.input_format} cannot be derived "
                             f"from the student's {self.input_format}")
        return [dict(x, image=x["image"].flip(0)) for x in batched_inputs]

    def teacher_images(self, teacher: nn.Module, batched_inputs: List[dict]):
        """The batch as the teacher expects it: its own channel order, pixel mean/std, padding."""
        return teacher.preprocess_image(self.teacher_inputs(teacher, batched_inputs))


def image_sizes_of(batched_inputs: List[dict]) -> List[Tuple[int, int]]:
    """``(h, w)`` of every (resized, unpadded) input image, as ``ImageList.image_sizes``."""
    return [tuple(x["image"].shape[-2:]) for x in batched_inputs]
