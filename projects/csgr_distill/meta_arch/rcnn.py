"""DistillGeneralizedRCNN: detectron2's GeneralizedRCNN (Faster R-CNN, ...) with a teacher and
distillers during training."""
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from .base import DistillMixin

__all__ = ["DistillGeneralizedRCNN"]


@META_ARCH_REGISTRY.register()
class DistillGeneralizedRCNN(DistillMixin, GeneralizedRCNN):
    """Two-stage student. In training with ``MODEL.DISTILL.ENABLED`` the total loss is
    RPN + RoI losses + each method's decay factor x its losses; at inference it is exactly
    :class:`GeneralizedRCNN`. Recorded as an R-CNN (``records/rcnn.py``: FPN features p2-p6)."""
