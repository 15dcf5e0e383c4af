"""Distillers: one method per file, registered in DISTILLER_REGISTRY on import."""
from .registry import DISTILLER_REGISTRY, build_distillers, register_distiller, \
    registered_distillers
from . import csgr  # noqa: F401  (registers "CSGR")
# register "DETRDistill", "FGD", "KD", "LD", "MIMIC", "PKD", "TAR"
from . import detrdistill, fgd, kd, ld, mimic, pkd, tar  # noqa: F401

__all__ = ["DISTILLER_REGISTRY", "build_distillers", "register_distiller",
           "registered_distillers"]
