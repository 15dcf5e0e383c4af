"""DistillRetinaNet: detectron2's RetinaNet with a teacher and distillers during training."""
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from .base import DistillMixin

__all__ = ["DistillRetinaNet"]


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillMixin, RetinaNet):
    """RetinaNet student. In training with ``MODEL.DISTILL.ENABLED`` the total loss is
    detection losses + each method's decay factor x its losses (``MODEL.DISTILL.METHODS``).
    At inference (and with distillation off) it is exactly :class:`RetinaNet`. Recorded as a
    dense detector (``records/dense.py``: FPN features, class logits, box deltas, anchors).
    """
