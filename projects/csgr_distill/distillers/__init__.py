"""Distillers: one method per module (or sub-package) of this package, each registered in
DISTILLER_REGISTRY (and its config section declared) when the package is imported: every module
here is imported, so adding a method is adding its file (``docs/extending.md``)."""
import importlib
import pkgutil

from .base import Distiller, Variant
from .registry import (DISTILLER_REGISTRY, build_distillers, fields_by_role, pair_problem,
                       register_distiller, registered_distillers)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["DISTILLER_REGISTRY", "Distiller", "Variant", "build_distillers", "fields_by_role",
           "pair_problem", "register_distiller", "registered_distillers"]
