"""csgr_distill: knowledge distillation for Detectron2 detectors (CSGR and peer methods).

Importing the package registers the Distill* meta-architectures, the distillers and the
datasets, so a config naming them works after ``import csgr_distill``.
"""
from . import data  # noqa: F401  (registers datasets)
from . import distillers  # noqa: F401  (registers distillers)
from . import detr_port  # noqa: F401  (registers Detr, DeformableDetr)
from . import modeling  # noqa: F401  (registers DistributionRetinaNet)
from . import meta_arch  # noqa: F401  (registers meta-architectures)
from .config import add_distill_config

__all__ = ["add_distill_config"]
