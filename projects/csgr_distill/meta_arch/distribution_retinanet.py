"""DistillDistributionRetinaNet: :class:`~csgr_distill.modeling.DistributionRetinaNet` with a
teacher and distillers during training (LD's student, ``docs/methods/LD.md``)."""
from detectron2.modeling import META_ARCH_REGISTRY

from ..modeling.distribution_retinanet import DistributionRetinaNet
from .base import DistillMixin

__all__ = ["DistillDistributionRetinaNet"]


@META_ARCH_REGISTRY.register()
class DistillDistributionRetinaNet(DistillMixin, DistributionRetinaNet):
    """DistributionRetinaNet student (or teacher) of the distillation framework; exactly
    :class:`DistributionRetinaNet` at inference and with distillation off."""

