"""DistillMixin: the teacher, the distillers, the decay factors and the loss assembly.

Shared by every ``Distill*`` meta-architecture. A concrete class only mixes it in front of a
detectron2 meta-architecture (``class DistillRetinaNet(DistillMixin, RetinaNet)``); how to record
that detector comes from its family's recorder (``csgr_distill.records``), chosen by type, and the
teacher is recorded by *its* family's recorder, so any teacher/student pair of recorded families
works (a RetinaNet student with a Faster R-CNN teacher, and the reverse).

One training step:

1. the base class's own ``forward`` runs unchanged; forward hooks on the modules the student's
   recorder names capture what the distillers read, and the recorder builds the student's
   :class:`DetectorOutputs`;
2. the teacher (its own channel order, pixel mean/std; padded to the student's grid) runs under
   ``no_grad`` through its recorder, which receives the student's record and computes only the
   fields asked of the teacher;
3. each distiller returns named, weighted losses; each is multiplied by that method's decay
   factor and merged into the loss dict. A non-finite distillation loss stops the run with a
   message naming the loss and its weight key. Under autocast (detectron2's AMPTrainer) the
   teacher and the student run in half precision, the distillers in float32: their inputs are
   cast to float32 and autocast is off while they run, so their losses (sums over whole feature
   maps, softmaxes with temperatures) are float32.

With ``MODEL.DISTILL.ENABLED = False`` nothing of this is built and the class is its base class.
"""
import contextlib
import copy
import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn

from ..distillers import build_distillers
from ..distillers.registry import fields_by_role
from ..inherit import TeacherLayout, check_inheritable, teacher_layout
from ..outputs import ROLES, DetectorOutputs
from ..records import DetectorSpec, grid_multiple, pad_images, recorder_for
from ..teacher import FrozenTeacher, build_teacher_cfg

logger = logging.getLogger(__name__)

__all__ = ["DistillMixin", "distill_init_kwargs", "in_channel_order"]

#: a distillation loss this many times the detection losses gets a warning naming its weight key
DOMINANCE_WARNING = 1e4


def distill_init_kwargs(cfg, model_type: type, backbone) -> dict:
    """``from_config`` kwargs of a Distill* meta-architecture: distillers, teacher description,
    grid. Only configs are read (the teacher's backbone is built on the meta device), so building
    the student never needs the teacher checkpoint; every pair problem that a config shows is
    raised here, at build time, not at step N."""
    if not cfg.MODEL.DISTILL.ENABLED:
        return {"distillers": None, "distill_cfg": None}
    if not cfg.MODEL.DISTILL.METHODS:
        raise ValueError("MODEL.DISTILL.ENABLED is True but MODEL.DISTILL.METHODS is empty; "
                         "list registered distillers, e.g. ['CSGR'], or set ENABLED False")
    tcfg = build_teacher_cfg(cfg)
    student = DetectorSpec.from_backbone(cfg, model_type, backbone)
    teacher = DetectorSpec.from_cfg(tcfg)
    distillers = build_distillers(cfg, student, teacher)
    fields = {role: set() for role in ROLES}
    for d in distillers.values():
        for role, wanted in fields_by_role(d).items():
            fields[role].update(wanted)
    ret = {
        "distillers": distillers,
        "distill_cfg": cfg,
        "teacher_spec": teacher,
        "distill_fields": {r: tuple(sorted(f)) for r, f in fields.items()},
        "grid_multiple": grid_multiple(student, teacher),
    }
    if cfg.MODEL.DISTILL.get("INHERIT_TEACHER", False):
        # checked against the student's neck/head in __init__ (csgr_distill.inherit)
        ret["inherit_layout"] = teacher_layout(tcfg, cfg.MODEL.DISTILL.TEACHER.CONFIG)
    return ret


def in_channel_order(batched_inputs: List[dict], have: str, want: str) -> List[dict]:
    """``batched_inputs`` (images ``[3, H, W]`` in the channel order ``have``, an INPUT.FORMAT)
    in the channel order ``want``: the same list when they are equal, the channels flipped for
    RGB <-> BGR; a ValueError for any other pair (checked earlier, when the student is built)."""
    if have == want:
        return batched_inputs
    if {have, want} != {"RGB", "BGR"}:
        raise ValueError(f"INPUT.FORMAT {want} cannot be derived from INPUT.FORMAT {have} (only "
                         "RGB <-> BGR)")
    return [dict(x, image=x["image"].flip(0)) for x in batched_inputs]


class DistillMixin:
    """Mixed in before a detectron2 meta-architecture (``class X(DistillMixin, RetinaNet)``).

    Attributes:
        distillers: ``nn.ModuleDict`` name -> distiller (trained by the main optimizer, saved in
            checkpoints), or None when distillation is off.
        distill_factor: the default decay factor (``MODEL.DISTILL.DECAY``), set by the trainer's
            decay hook every iteration.
        distill_factors: method name -> its own factor, for methods with their own schedule
            (``MODEL.DISTILL.<METHOD>.DECAY``); methods not listed use ``distill_factor``.
        distill_fields: role -> the record fields the distillers read from that role.
        recorder: this detector's family recorder (also used for the teacher of the same family).
    """

    @configurable
    def __init__(self, *, distillers: Optional[nn.ModuleDict] = None, distill_cfg=None,
                 teacher_spec: Optional[DetectorSpec] = None,
                 distill_fields: Optional[Dict[str, Tuple[str, ...]]] = None,
                 grid_multiple: int = 1, inherit_layout: Optional[TeacherLayout] = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.distillers = distillers
        self.distill_factor = 1.0
        self.distill_factors: Dict[str, float] = {}
        # Plain objects stay out of the module tree (state_dict, optimizer, DDP).
        self._distill_cfg = distill_cfg
        self._teacher_spec = teacher_spec
        self._teacher: Optional[FrozenTeacher] = None
        self._grid_multiple = int(grid_multiple)
        self._dominance_warned = False
        #: warnings that make the trained model doubtful (repeated by the trainer at the end)
        self.training_warnings: List[str] = []
        self.recorder = recorder_for(type(self))
        self.distill_fields = distill_fields or {r: () for r in ROLES}
        self.recorder.check_fields(self.distill_fields["student"], "student",
                                   f"{type(self).__name__}'s distillers")
        if inherit_layout is not None:
            # MODEL.DISTILL.INHERIT_TEACHER: refuse a teacher whose neck/head differ now, at
            # build time; the copy itself is DistillTrainer.resume_or_load's
            check_inheritable(self, inherit_layout)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        ret.update(distill_init_kwargs(cfg, cls, ret["backbone"]))
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
        teacher = teacher or FrozenTeacher.from_teacher_cfg(self._teacher_spec.cfg)
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
        fields = self.distill_fields["student"]
        with self._recording(self.recorder.hook_modules(self, fields),
                             self.recorder.capture_methods(self, fields)) as record:
            losses = super().forward(batched_inputs)
        student = self.recorder.from_hooks(self, record, batched_inputs, fields)
        with torch.no_grad():
            teacher = self.run_teacher(batched_inputs, student)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        return self.add_distill_losses(losses, student, teacher, gt_instances)

    def preprocess_image(self, batched_inputs: List[dict]):
        """The base class's preprocessing; in distillation training the batch is padded further
        to the grid multiple both detectors accept (only when their divisibilities differ)."""
        images = super().preprocess_image(batched_inputs)
        if self.training and self.distill_enabled and self._grid_multiple > 1:
            images = pad_images(images, multiple=self._grid_multiple)
        return images

    @contextlib.contextmanager
    def _recording(self, modules: Dict[str, nn.Module],
                   methods: Optional[Dict[str, Tuple[object, str]]] = None):
        """Capture one forward pass: with forward hooks, ``record[name]`` is the module's output
        and ``record[name + "_input"]`` its first positional input (of its last call), and
        ``record[name + "_calls"]`` the outputs of all its calls in order (a module the forward
        calls once per level, like a dense head's tower layers); for ``methods`` (key ->
        ``(object, method name)``), ``record[key]`` is what that method returned (the method is
        wrapped on the instance for the duration and restored afterwards)."""
        record: Dict[str, object] = {}

        def hook(key):
            def fn(_module, inputs, output):
                record[key] = output
                record[key + "_input"] = inputs[0] if inputs else None
                record.setdefault(key + "_calls", []).append(output)
            return fn

        def wrap(key, method):
            def fn(*args, **kwargs):
                record[key] = method(*args, **kwargs)
                return record[key]
            return fn

        handles = [m.register_forward_hook(hook(key)) for key, m in modules.items()]
        wrapped = []
        try:
            for key, (obj, name) in (methods or {}).items():
                had_own = name in vars(obj)
                wrapped.append((obj, name, had_own, vars(obj).get(name)))
                setattr(obj, name, wrap(key, getattr(obj, name)))
            yield record
        finally:
            for h in handles:
                h.remove()
            for obj, name, had_own, own in reversed(wrapped):
                if had_own:
                    setattr(obj, name, own)
                else:
                    delattr(obj, name)

    def teacher_inputs(self, batched_inputs: List[dict]) -> List[dict]:
        """The batch in the teacher's channel order (its INPUT.FORMAT, RGB or BGR): what the
        teacher's own ``forward`` takes (e.g. to draw its predictions)."""
        return in_channel_order(batched_inputs, self.input_format,
                                self.teacher.model.input_format)

    def teacher_images(self, batched_inputs: List[dict], padded_size=None):
        """The batch as the teacher's backbone expects it: its channel order and pixel
        mean/std, padded to ``padded_size`` (the student's grid) when given."""
        images = self.teacher.model.preprocess_image(self.teacher_inputs(batched_inputs))
        return pad_images(images, size=padded_size) if padded_size is not None else images

    def run_teacher(self, batched_inputs: List[dict],
                    student: Optional[DetectorOutputs] = None,
                    fields: Optional[Tuple[str, ...]] = None) -> DetectorOutputs:
        """The teacher's record of this batch (call under ``no_grad``): only ``fields``
        (default: what the distillers read from the teacher), on the student's grid."""
        teacher = self.teacher.model
        fields = self.distill_fields["teacher"] if fields is None else fields
        images = self.teacher_images(batched_inputs,
                                     student.padded_size if student is not None else None)
        return recorder_for(teacher).record(teacher, images, batched_inputs, fields,
                                                  student)

    def add_distill_losses(
        self,
        losses: Dict[str, Tensor],
        student: DetectorOutputs,
        teacher: DetectorOutputs,
        gt_instances: list,
    ) -> Dict[str, Tensor]:
        """Run every distiller, scale by its decay factor, check, merge into ``losses``."""
        distill: Dict[str, Tensor] = {}
        owner: Dict[str, str] = {}
        device_type = self.device.type
        if torch.is_autocast_enabled(device_type):  # AMP: the distillers run in float32
            student, teacher = _float32_record(student), _float32_record(teacher)
        for name, distiller in self.distillers.items():
            factor = float(self.distill_factors.get(name, self.distill_factor))
            with torch.autocast(device_type, enabled=False):
                returned = distiller(student, teacher, gt_instances)
            for key, value in returned.items():
                if key in losses or key in distill:
                    raise KeyError(f"Distiller {name} returns loss {key!r}, which already exists")
                distill[key] = value * factor
                owner[key] = name
        self._check_distill_losses(losses, distill, owner)
        losses.update(distill)
        return losses

    def _check_distill_losses(self, detection: Dict[str, Tensor], distill: Dict[str, Tensor],
                              owner: Dict[str, str]) -> None:
        """Stop on a non-finite distillation loss, naming it and its weight key; warn once when
        the distillation losses dwarf the detection losses (a broken weight trains on
        otherwise). One host sync per step."""
        if not distill:
            return
        keys = list(distill)
        values = torch.stack([v.detach().float().reshape(()) for v in distill.values()]
                             + [sum(v.detach().float().reshape(()) for v in detection.values())
                                if detection else torch.zeros((), device=self.device)])
        values = values.tolist()
        det_total = values[-1]
        bad = [k for k, v in zip(keys, values) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(
                "Distillation loss became infinite or NaN: "
                + "; ".join(f"{k} = {distill[k].item()} ({self._weight_hint(owner[k], k)})"
                            for k in bad)
                + ". Check that weight, the teacher checkpoint and the input data.")
        total = sum(values[:-1])
        if (not self._dominance_warned and abs(det_total) > 0
                and abs(total) > DOMINANCE_WARNING * abs(det_total)):
            self._dominance_warned = True
            worst = max(keys, key=lambda k: abs(values[keys.index(k)]))
            message = (
                f"The distillation losses ({total:.3g}) are more than {DOMINANCE_WARNING:.0e} "
                f"times the detection losses ({det_total:.3g}); the largest is {worst} = "
                f"{values[keys.index(worst)]:.3g} ({self._weight_hint(owner[worst], worst)}). A "
                "weight this large drowns the detection loss: check it.")
            self.training_warnings.append(message)
            logger.warning(message)

    def loss_weight_hint(self, loss_name: str) -> Optional[str]:
        """``'weight MODEL.DISTILL.CSGR.ALPHA = 0.0005'`` for a distillation loss (from the first
        distiller whose ``loss_weight_keys`` has a prefix of its name); None for a loss no
        distiller names (a detection loss, or distillation off)."""
        for method, distiller in (self.distillers or {}).items():
            keys = getattr(distiller, "loss_weight_keys", {}) or {}
            if any(loss_name.startswith(prefix) for prefix in keys):
                return self._weight_hint(method, loss_name)
        return None

    def _weight_hint(self, method: str, loss_name: str) -> str:
        """``'weight MODEL.DISTILL.CSGR.ALPHA = 0.0005'`` for a loss, from the distiller's
        ``loss_weight_keys`` (loss-name prefix -> config key)."""
        keys = getattr(self.distillers[method], "loss_weight_keys", {}) or {}
        for prefix, key in keys.items():
            if loss_name.startswith(prefix):
                value = self._distill_cfg
                try:
                    for part in key.split("."):
                        value = value[part]
                except (KeyError, TypeError):
                    value = "?"
                return f"weight {key} = {value}"
        return f"method {method}"


def _float32(value):
    """``value`` with every floating-point tensor in it (also inside dicts, lists, tuples) cast to
    float32; other values as they are."""
    if isinstance(value, Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return type(value)((k, _float32(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_float32(v) for v in value)
    return value


def _float32_record(record: DetectorOutputs) -> DetectorOutputs:
    """A copy of ``record`` whose tensor fields are float32 (autograd flows through the cast)."""
    out = copy.copy(record)
    out._fields = {name: _float32(record[name]) for name in record}
    return out
