"""DISTILLER_REGISTRY and the builder that turns ``MODEL.DISTILL.METHODS`` into modules."""
from typing import Dict, List, Tuple

from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import nn

DISTILLER_REGISTRY = Registry("DISTILLER")
DISTILLER_REGISTRY.__doc__ = """
Registry for distillers: ``nn.Module`` s built as ``cls(cfg, student_shapes, teacher_shapes)``
(use ``@configurable``) whose ``forward(student, teacher, gt_instances)`` takes two
:class:`csgr_distill.outputs.DetectorOutputs` and the list of ground-truth ``Instances`` and
returns a dict of named, already weighted losses. A distiller declares:

* ``required_outputs``: the record fields it reads, either one tuple for both roles or a dict
  ``{"student": (...), "teacher": (...)}`` (e.g. CSGR's ``teacher_head`` option reads class
  logits of the teacher only); each role's recorder checks them at build time;
* ``in_features`` (optional): the levels it pairs between student and teacher (checked to exist
  in both with equal strides);
* ``loss_weight_keys`` (optional): loss-name prefix -> the config key of its weight, named in the
  error when such a loss becomes non-finite.

The name used in ``MODEL.DISTILL.METHODS`` is the registered name (e.g. "CSGR").
"""


def register_distiller(name: str):
    """Class decorator: register a distiller under ``name`` (the value used in METHODS)."""

    def deco(cls):
        DISTILLER_REGISTRY._do_register(name, cls)
        return cls

    return deco


def registered_distillers() -> List[str]:
    """The names usable in ``MODEL.DISTILL.METHODS``, sorted."""
    return sorted(name for name, _ in DISTILLER_REGISTRY)


def fields_by_role(distiller) -> Dict[str, Tuple[str, ...]]:
    """``{"student": fields, "teacher": fields}`` from a distiller's ``required_outputs``."""
    req = getattr(distiller, "required_outputs", ("features",))
    if isinstance(req, dict):
        unknown = set(req) - {"student", "teacher"}
        if unknown:
            raise ValueError(f"{type(distiller).__name__}.required_outputs has roles {unknown}; "
                             "use 'student' and 'teacher'")
        return {r: tuple(req.get(r, ())) for r in ("student", "teacher")}
    return {"student": tuple(req), "teacher": tuple(req)}


def build_distillers(
    cfg, student_shapes: Dict[str, ShapeSpec], teacher_shapes: Dict[str, ShapeSpec]
) -> nn.ModuleDict:
    """One distiller per name in ``cfg.MODEL.DISTILL.METHODS``, keyed by that name."""
    methods = list(cfg.MODEL.DISTILL.METHODS)
    out = nn.ModuleDict()
    for name in methods:
        if name not in DISTILLER_REGISTRY:
            raise KeyError(
                f"MODEL.DISTILL.METHODS names unknown distiller {name!r}; registered: "
                f"{registered_distillers()}"
            )
        if name in out:
            raise ValueError(f"MODEL.DISTILL.METHODS lists {name!r} twice: {methods}")
        out[name] = DISTILLER_REGISTRY.get(name)(cfg, student_shapes, teacher_shapes)
    return out
