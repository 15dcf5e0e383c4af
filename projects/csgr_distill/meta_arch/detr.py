"""DistillDetr / DistillDeformableDetr: the DETR port's meta-architectures with a teacher and
distillers during training (recorded by ``records/detr.py``)."""
from detectron2.modeling import META_ARCH_REGISTRY

from ..detr_port import DeformableDetr, Detr
from .base import DistillMixin

__all__ = ["DistillDetr", "DistillDeformableDetr"]


@META_ARCH_REGISTRY.register()
class DistillDetr(DistillMixin, Detr):
    """DETR student: DETR's set-criterion losses + each method's decay factor x its losses; at
    inference and with distillation off exactly :class:`~csgr_distill.detr_port.Detr`."""


@META_ARCH_REGISTRY.register()
class DistillDeformableDetr(DistillMixin, DeformableDetr):
    """Deformable DETR student (see :class:`DistillDetr`)."""
