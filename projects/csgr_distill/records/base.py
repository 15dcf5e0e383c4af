"""Recorder: how to record one detector family, for either role.

A recorder is chosen by the model's type (:func:`recorder_for`), never by the role: the same
object records a RetinaNet whether it is the student or the teacher.

* **student role** (:meth:`Recorder.hook_modules`, :meth:`Recorder.capture_methods` +
  :meth:`Recorder.from_hooks`): the student runs detectron2's own training ``forward``
  unchanged; forward hooks on the modules the recorder names (and wrappers around the few
  methods it names, such as the R-CNN's RoI sampling) capture what the fields need, and the
  recorder turns the captures into a
  :class:`~csgr_distill.outputs.DetectorOutputs`. No second student forward.
* **teacher role** (:meth:`Recorder.record`, also used to draw any model's record): under
  ``no_grad`` the recorder runs only the
  parts of the teacher that the asked fields need (down to the branch: class logits do not run the
  box branch), on images already preprocessed with the teacher's own channel order, pixel
  mean/std and padded to the student's grid. It receives the student's record, so a method whose
  teacher must answer for the student's regions or queries (TAR's proposal sharing, DETRDistill's
  matching) has one general path.

A family documents the fields it can fill in ``fields`` (name -> shape); distillers declare per
role which of them they read (``required_outputs``), and the build-time check asks each role's
recorder.
"""
from typing import Dict, List, Optional, Tuple, Type

from torch import nn

from ..outputs import DetectorOutputs

__all__ = ["Recorder", "register_recorder", "recorder_for", "level_provenance"]

#: fields every recorder fills
COMMON_FIELDS = {
    "features": "dict level -> [N, C, H_l, W_l]: the backbone's output maps (FPN levels)",
    "feature_names": "list of level names, in the order the detector's head reads them",
}


class Recorder:
    """Base class of the per-family recorders (stateless; one instance per family).

    Attributes:
        family: short name written into every record (``DetectorOutputs.family``).
        model_types: the detectron2 meta-architecture classes this family covers (subclasses
            included, so ``DistillRetinaNet`` is recorded like ``RetinaNet``).
        fields: name -> description with shape, of every field this family can fill.
    """

    family: str = ""
    model_types: Tuple[type, ...] = ()
    fields: Dict[str, str] = dict(COMMON_FIELDS)

    # ---- student role --------------------------------------------------------------------
    def hook_modules(self, model: nn.Module, fields: Tuple[str, ...]) -> Dict[str, nn.Module]:
        """Submodules whose outputs the student's training forward must keep, by capture key.
        The capture ``record[key]`` is the module's output, ``record[key + "_input"]`` its first
        positional input (of its last call), ``record[key + "_calls"]`` the outputs of every
        call in order (a module called once per level). Default: the backbone."""
        return {"backbone": model.backbone}

    def capture_methods(self, model: nn.Module,
                        fields: Tuple[str, ...]) -> Dict[str, Tuple[object, str]]:
        """Methods (not modules) whose return value the student's training forward must keep:
        capture key -> ``(object, method name)``; ``record[key]`` is the value the method
        returned during the forward (e.g. the R-CNN's sampled RoIs). Default: none."""
        return {}

    def from_hooks(self, model: nn.Module, record: dict, batched_inputs: List[dict],
                   fields: Tuple[str, ...]) -> DetectorOutputs:
        """The student's record from the captures of its training forward."""
        raise NotImplementedError

    # ---- teacher role (and pictures) -----------------------------------------------------
    def record(self, model: nn.Module, images, batched_inputs: List[dict],
               fields: Tuple[str, ...],
               student: Optional[DetectorOutputs] = None) -> DetectorOutputs:
        """A record from a pass of its own (the teacher's, under ``no_grad`` by the caller).

        Args:
            images: ``ImageList`` preprocessed for this model (its channel order, pixel mean/std)
                and padded to the student's grid.
            batched_inputs: the batch as the data loader gave it (ground truth included).
            student: the student's record of the same step (None where no student exists, e.g.
                when drawing pictures).
        """
        raise NotImplementedError

    # ---- shared ------------------------------------------------------------------------------
    def check_fields(self, fields, role: str, who: str) -> None:
        """Raise a clear error if ``fields`` asks for something this family cannot record."""
        missing = [f for f in fields if f not in self.fields]
        if missing:
            raise ValueError(
                f"{who} needs {missing} from the {role}, a {self.family} detector "
                f"({', '.join(t.__name__ for t in self.model_types)}), which records only "
                f"{sorted(self.fields)}. Choose a method/option that reads what the {role} has "
                "(MODEL.DISTILL.METHODS and the method's keys), or a "
                f"{'teacher' if role == 'teacher' else 'student'} of another family.")


_RECORDERS: List[Recorder] = []


def register_recorder(cls: Type[Recorder]) -> Type[Recorder]:
    """Class decorator: make a family known to :func:`recorder_for` (later ones win ties)."""
    _RECORDERS.insert(0, cls())
    return cls


def recorder_for(model_type: type) -> Recorder:
    """The recorder of a meta-architecture class (or of an instance's class)."""
    if not isinstance(model_type, type):
        model_type = type(model_type)
    for r in _RECORDERS:
        if issubclass(model_type, r.model_types):
            return r
    known = ", ".join(f"{r.family} ({', '.join(t.__name__ for t in r.model_types)})"
                      for r in _RECORDERS)
    raise ValueError(
        f"No recorder for the detector {model_type.__name__}: csgr_distill records {known}. "
        "Use a teacher/student of one of these families, or add a Recorder for this one "
        "(csgr_distill/records/).")


def level_provenance(backbone: nn.Module) -> Dict[str, str]:
    """level -> how the backbone computes it, so two detectors that give one level name
    different maps can be told apart (R-CNN's p6 is a max-pool of p5, RetinaNet's a stride-2
    conv on res5 or p5). FPN levels made by its ``top_block`` are named after the block and its
    input; the others are plain FPN outputs."""
    names = list(backbone.output_shape())
    top = getattr(backbone, "top_block", None)
    if top is None:
        return {n: f"{type(backbone).__name__} output" for n in names}
    extra = int(getattr(top, "num_levels", 0))
    out = {n: "FPN lateral + output conv" for n in names[: len(names) - extra]}
    source = getattr(top, "in_feature", "?")
    for n in names[len(names) - extra:]:
        out[n] = f"{type(top).__name__} on {source}"
    return out

