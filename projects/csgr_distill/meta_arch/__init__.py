"""Distill* meta-architectures, registered in detectron2's META_ARCH_REGISTRY on import."""
from .base import DistillMixin
from .detr import DistillDeformableDetr, DistillDetr
from .distribution_retinanet import DistillDistributionRetinaNet
from .rcnn import DistillGeneralizedRCNN
from .retinanet import DistillRetinaNet

__all__ = ["DistillMixin", "DistillDeformableDetr", "DistillDetr", "DistillDistributionRetinaNet",
           "DistillGeneralizedRCNN", "DistillRetinaNet"]
