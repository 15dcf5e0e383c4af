"""Distillers: one method per file, registered in DISTILLER_REGISTRY on import."""
from .registry import DISTILLER_REGISTRY, build_distillers, register_distiller, \
    registered_distillers
from . import csgr  # noqa: F401  (registers "CSGR")
from . import fgd, kd, mimic, pkd  # noqa: F401  (register "FGD", "KD", "MIMIC", "PKD")

__all__ = ["DISTILLER_REGISTRY", "build_distillers", "register_distiller",
           "registered_distillers"]
