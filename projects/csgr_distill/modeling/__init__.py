"""Detectors the methods need that detectron2 lacks, registered in ``META_ARCH_REGISTRY`` on
import (the DETR family lives in :mod:`csgr_distill.detr_port`)."""
from .distribution_retinanet import DistributionRetinaNet

__all__ = ["DistributionRetinaNet"]
