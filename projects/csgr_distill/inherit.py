"""Inheriting (``MODEL.DISTILL.INHERIT_TEACHER``): the student's neck and head start from the
teacher's weights; its bottom-up backbone stays its own.

FGD's option (its "inheriting strategy", on in FGD's official same-family configs), kept in the
shared machinery so that any method can use it.

**What is copied**: every tensor of the student's state dict outside ``backbone.bottom_up.`` (the
bottom-up network: stem and stages) and ``distillers.`` (the distillers' own parts), i.e.

* RetinaNet: the FPN (``backbone.fpn_lateral*``, ``backbone.fpn_output*``), its extra levels
  (``backbone.top_block.p6/p7``) and the whole head (``head.*``: class and box subnets, their
  norms' running statistics, the score and box layers);
* Faster R-CNN: the FPN (``backbone.fpn_*``; its ``top_block`` max-pool has no tensors), the RPN
  (``proposal_generator.*``) and the RoI heads (``roi_heads.*``: box head and predictor, a mask
  head where there is one).

**Which pairs**: teacher and student of the same family (both dense, both R-CNN) whose necks and
heads have exactly the same tensor names and shapes. There is no partial copy: a teacher with
more head convs, a wider FPN, other norms or another class count is refused, and so is a teacher
whose bottom-up has other output channels (the FPN's lateral convs read them: R101 -> R50 and
X101 -> R50 can inherit, R50 -> R18 cannot). :func:`check_inheritable` raises one message naming
the first mismatched tensor; the Distill* meta-architectures call it when they are built (the
teacher built on the meta device from its config: no weights read), and
:func:`inherit_from_teacher` again on the loaded teacher before copying.

**When** (``DistillTrainer.resume_or_load``): a run that starts at iteration 0 inherits after
``MODEL.WEIGHTS`` is loaded, before the first step. ``MODEL.WEIGHTS`` normally holds only the
bottom-up network (ImageNet weights); where it also held neck/head tensors (a full detector
checkpoint), the teacher's replace them and a warning says how many (inheriting is the explicit
request; set it False to keep them). A ``--resume`` that finds a checkpoint does not inherit: the
checkpoint holds the neck and head as trained so far (inherited at that run's start when it was
on). ``--eval-only``, ``tools/visualize.py`` and ``attach_teacher`` never inherit.
"""
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from detectron2.modeling import META_ARCH_REGISTRY
from torch import Tensor, nn

from .records import recorder_for

logger = logging.getLogger(__name__)

__all__ = ["INHERIT_KEY", "TeacherLayout", "neck_and_head_keys", "teacher_layout",
           "check_inheritable", "inherit_from_teacher", "InheritReport", "snapshot",
           "changed_since"]

INHERIT_KEY = "MODEL.DISTILL.INHERIT_TEACHER"
#: the bottom-up network: stays the student's own
BOTTOM_UP = "backbone.bottom_up."
#: state-dict prefixes never inherited: the bottom-up network, the distillers' own parts
KEPT_PREFIXES = (BOTTOM_UP, "distillers.")


def neck_and_head_keys(state: Mapping[str, Tensor]) -> List[str]:
    """The state-dict keys that inheriting copies (in state-dict order)."""
    return [k for k in state if not k.startswith(KEPT_PREFIXES)]


def _shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    state = model.state_dict()
    return OrderedDict((k, tuple(state[k].shape)) for k in neck_and_head_keys(state))


def _require_fpn(model: nn.Module, role: str, where: str) -> None:
    if not hasattr(getattr(model, "backbone", None), "bottom_up"):
        raise ValueError(
            f"{INHERIT_KEY} is True but the {role} ({type(model).__name__}{where}) has no FPN "
            "backbone with a bottom_up network, so its neck cannot be told from its bottom-up "
            f"part. Inheriting needs FPN detectors on both sides; set {INHERIT_KEY} False.")


@dataclass
class TeacherLayout:
    """What the build-time check needs of the teacher: its meta-architecture, family, config
    path, and the shapes of its neck/head tensors."""

    name: str
    family: str
    config: str
    shapes: Dict[str, Tuple[int, ...]]


def teacher_layout(tcfg, config_path: str = "") -> TeacherLayout:
    """The teacher's :class:`TeacherLayout` from its config, built on the meta device (no memory,
    no weights read)."""
    name = tcfg.MODEL.META_ARCHITECTURE
    cls = META_ARCH_REGISTRY.get(name)
    with torch.device("meta"):
        model = cls(tcfg)
    where = f", {config_path}" if config_path else ""
    _require_fpn(model, "teacher", where)
    return TeacherLayout(name=name, family=recorder_for(cls).family, config=config_path,
                         shapes=_shapes(model))


def check_inheritable(student: nn.Module, teacher: TeacherLayout) -> List[str]:
    """The keys inheriting copies into ``student`` from ``teacher``; ``ValueError`` naming the
    first mismatched tensor (and how many more) when the families differ or a neck/head tensor
    is missing on one side or shaped otherwise."""
    where = f", {teacher.config}" if teacher.config else ""
    s_family = recorder_for(type(student)).family
    if s_family != teacher.family:
        raise ValueError(
            f"{INHERIT_KEY} is True but the teacher ({teacher.name}{where}) is a "
            f"{teacher.family} detector and the student ({type(student).__name__}) a {s_family} "
            "one: their heads have no tensor in common. Inheriting needs a teacher of the "
            f"student's family; set {INHERIT_KEY} False for this pair (distillation across "
            "families works without it).")
    _require_fpn(student, "student", "")
    student_shapes = _shapes(student)
    problems = []
    for k, s in student_shapes.items():
        t = teacher.shapes.get(k)
        if t is None:
            problems.append(f"{k} {s} exists in the student but not in the teacher")
        elif t != s:
            problems.append(f"{k} has shape {s} in the student but {t} in the teacher")
    problems += [f"{k} {t} exists in the teacher but not in the student"
                 for k, t in teacher.shapes.items() if k not in student_shapes]
    if problems:
        more = (f" (and {len(problems) - 1} more mismatched tensor"
                f"{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else "")
        raise ValueError(
            f"{INHERIT_KEY} is True but the teacher's neck and head ({teacher.name}{where}) do "
            f"not match the student's ({type(student).__name__}): {problems[0]}{more}. "
            "Inheriting copies them tensor for tensor, so the teacher needs the student's FPN "
            "width (MODEL.FPN.OUT_CHANNELS), bottom-up output channels (the FPN's lateral convs "
            "read them), head depth, width and norm, and class count. Set "
            f"{INHERIT_KEY} False for this pair.")
    return list(student_shapes)


@dataclass
class InheritReport:
    """What :func:`inherit_from_teacher` copied.

    Attributes:
        keys: the student's state-dict keys copied from the teacher.
        values: their number of elements.
        kept: the number of bottom-up tensors (``backbone.bottom_up.*``) left as they were.
        replaced: those of ``keys`` that ``MODEL.WEIGHTS`` had loaded before (now the teacher's).
        config: the teacher's config path (for the log).
    """

    keys: List[str]
    values: int
    kept: int
    replaced: List[str] = field(default_factory=list)
    config: str = ""

    def modules(self) -> "OrderedDict[str, int]":
        """Module prefix (first two name components, e.g. ``head.cls_subnet``,
        ``backbone.fpn_lateral3``, ``roi_heads.box_head``) -> tensors copied."""
        out: "OrderedDict[str, int]" = OrderedDict()
        for k in self.keys:
            prefix = ".".join(k.split(".")[:2])
            out[prefix] = out.get(prefix, 0) + 1
        return out

    def summary(self) -> str:
        parts = ", ".join(f"{m} ({n})" for m, n in self.modules().items())
        source = f" of {self.config}" if self.config else ""
        return (f"{INHERIT_KEY}: the student's neck and head start from the teacher's{source}: "
                f"{len(self.keys)} tensors ({self.values} values) copied: {parts}; the bottom-up "
                f"backbone ({BOTTOM_UP}*, {self.kept} tensors) stays the student's.")


def inherit_from_teacher(student: nn.Module, teacher: nn.Module, config: str = "",
                         replaced: Sequence[str] = ()) -> InheritReport:
    """Copy the teacher's neck and head tensors into ``student`` (in place; parameters and
    buffers, e.g. BN running statistics), after :func:`check_inheritable` on the loaded teacher.
    ``replaced``: the neck/head keys that ``MODEL.WEIGHTS`` had loaded (warned about). Logs the
    list and returns an :class:`InheritReport`."""
    layout = TeacherLayout(name=type(teacher).__name__, family=recorder_for(type(teacher)).family,
                           config=config, shapes=_shapes(teacher))
    _require_fpn(teacher, "teacher", f", {config}" if config else "")
    keys = check_inheritable(student, layout)
    s_state, t_state = student.state_dict(), teacher.state_dict()
    with torch.no_grad():
        for k in keys:  # state_dict() tensors share storage with the parameters and buffers
            s_state[k].copy_(t_state[k])
    report = InheritReport(keys=keys, values=sum(int(s_state[k].numel()) for k in keys),
                           kept=sum(1 for k in s_state if k.startswith(BOTTOM_UP)),
                           replaced=[k for k in keys if k in set(replaced)], config=config)
    logger.info(report.summary())
    logger.info("%s: copied tensors: %s", INHERIT_KEY, ", ".join(keys))
    if report.replaced:
        logger.warning(
            "%s: MODEL.WEIGHTS had loaded %d of the student's neck/head tensors (e.g. %s); the "
            "teacher's replace them. Set %s False to keep the neck and head of MODEL.WEIGHTS.",
            INHERIT_KEY, len(report.replaced), report.replaced[0], INHERIT_KEY)
    return report


def snapshot(model: nn.Module) -> Dict[str, Tensor]:
    """Copies of the neck/head tensors (to tell afterwards which ones a load changed)."""
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in neck_and_head_keys(state)}


def changed_since(model: nn.Module, before: Mapping[str, Tensor]) -> List[str]:
    """The keys of ``before`` whose value in ``model`` differs now."""
    state = model.state_dict()
    return [k for k, v in before.items() if k in state and not torch.equal(state[k], v)]
