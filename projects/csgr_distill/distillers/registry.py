"""DISTILLER_REGISTRY, and the builder that turns ``MODEL.DISTILL.METHODS`` into checked modules.

:func:`register_distiller` registers a :class:`~csgr_distill.distillers.base.Distiller` under
its name and its config section under ``MODEL.DISTILL.<NODE>`` (:func:`csgr_distill.config.
register_method_config`), so that a method needs no edit outside its own file.
:func:`build_distillers` builds the configured methods from the two detectors' specs and checks
every pair problem a config can show; :func:`pair_problem` answers, from a student config
alone, whether (and why not) its pair can be distilled -- the benchmarks and the tests' method
matrix ask it instead of keeping lists of their own.
"""
import functools
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.utils.registry import Registry
from torch import nn

from ..config import register_method_config
from ..records import DetectorSpec, check_level_pairs
from ..teacher import build_teacher_cfg
from .base import Distiller

__all__ = ["DISTILLER_REGISTRY", "register_distiller", "registered_distillers", "fields_by_role",
           "build_distillers", "pair_problem", "compile_distillers", "COMPILE_MODES"]

#: ``MODEL.DISTILL.COMPILE`` values: off, and the ``torch.compile`` modes offered
COMPILE_MODES = ("", "default", "reduce-overhead")

DISTILLER_REGISTRY = Registry("DISTILLER")
DISTILLER_REGISTRY.__doc__ = """
Registry for distillers: :class:`~csgr_distill.distillers.base.Distiller` subclasses, built as
``cls(cfg, student_spec, teacher_spec)`` (``@configurable``). The name used in
``MODEL.DISTILL.METHODS`` is the registered name (e.g. "CSGR").
"""


def register_distiller(name: str):
    """Class decorator: register a :class:`Distiller` under ``name`` (the value used in
    ``MODEL.DISTILL.METHODS``) and its config section ``MODEL.DISTILL.<config_node>``
    (``config_node`` defaults to ``name.upper()``)."""

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, Distiller)):
            raise TypeError(f"register_distiller({name!r}): {cls!r} is not a Distiller subclass")
        cls.name = name
        if not cls.__dict__.get("config_node"):
            cls.config_node = name.upper()
        DISTILLER_REGISTRY._do_register(name, cls)
        register_method_config(cls.config_node, cls.add_config)
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


def build_distillers(cfg, student: DetectorSpec, teacher: DetectorSpec) -> nn.ModuleDict:
    """One distiller per name in ``cfg.MODEL.DISTILL.METHODS``, keyed by that name, built from
    the two detectors' specs; each checked: the record fields it reads per role are ones that
    role's family records, and the levels it pairs exist in both with equal strides.

    Raises:
        KeyError: an unknown method. ValueError: a method listed twice, or a pair problem
            (naming the method and the fix).
    """
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
        distiller = DISTILLER_REGISTRY.get(name)(cfg, student, teacher)
        who = f"MODEL.DISTILL.METHODS {name!r}"
        for role, spec in (("student", student), ("teacher", teacher)):
            spec.recorder.check_fields(fields_by_role(distiller)[role], role, who)
        check_level_pairs(getattr(distiller, "in_features", ()), student, teacher, who)
        out[name] = distiller
    compile_distillers(out, cfg.MODEL.DISTILL.get("COMPILE", ""), cfg.MODEL.DEVICE)
    return out


def compile_distillers(distillers: nn.ModuleDict, mode: str, device: str) -> None:
    """``MODEL.DISTILL.COMPILE``: ``torch.compile`` every distiller's forward in place
    (``nn.Module.compile``: its ``state_dict`` keys do not change), with automatic dynamic
    shapes; ``""`` leaves them as they are. A machine where compilation fails is refused now,
    with one message, not at the first training step."""
    if not mode:
        return
    if mode not in COMPILE_MODES:
        raise ValueError(f"MODEL.DISTILL.COMPILE is {mode!r}; use one of {list(COMPILE_MODES)}")
    problem = _compile_problem(str(torch.device(device)))
    if problem:
        raise ValueError(f"MODEL.DISTILL.COMPILE {mode!r}: torch.compile does not work on this "
                         f"machine ({problem}); set MODEL.DISTILL.COMPILE '' to run the distillers "
                         "uncompiled")
    for distiller in distillers.values():
        distiller.compile(mode=mode)


@functools.lru_cache(maxsize=None)
def _compile_problem(device: str) -> Optional[str]:
    """Why ``torch.compile`` fails on ``device`` (a tiny function compiled and run), or None."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except Exception as e:  # noqa: BLE001 -- any failure means "cannot compile here"
        first = str(e).strip().splitlines()
        return f"{type(e).__name__}: {first[0]}" if first else type(e).__name__
    return None


def pair_problem(cfg) -> Optional[str]:
    """Why the distillation that the student config ``cfg`` describes (its methods, its
    teacher) cannot be built, or None when it can: the build-time checks of
    :func:`build_distillers`, run on the specs of the two configs (no weights, no model)."""
    try:
        tcfg = build_teacher_cfg(cfg)
        build_distillers(cfg, DetectorSpec.from_cfg(cfg), DetectorSpec.from_cfg(tcfg))
    except (KeyError, ValueError) as e:
        return str(e.args[0]) if e.args else type(e).__name__
    return None
