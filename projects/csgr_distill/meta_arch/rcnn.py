"""DistillGeneralizedRCNN: detectron2's GeneralizedRCNN (Faster R-CNN, ...) with a teacher and
distillers during training. Feature distillers (CSGR on p2-p5, ...) read the FPN maps."""
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from ..outputs import DetectorOutputs
from .base import DistillMixin, image_sizes_of

__all__ = ["DistillGeneralizedRCNN"]


@META_ARCH_REGISTRY.register()
class DistillGeneralizedRCNN(DistillMixin, GeneralizedRCNN):
    """Two-stage student. In training with ``MODEL.DISTILL.ENABLED`` the total loss is
    RPN + RoI losses + decay factor x the distillation losses; at inference it is exactly
    :class:`GeneralizedRCNN`. Records FPN ``features`` (dense-head fields do not apply)."""

    def student_outputs(self, record, batched_inputs, fields) -> DetectorOutputs:
        features = record["backbone"]
        return DetectorOutputs(image_sizes=image_sizes_of(batched_inputs),
                               padded_size=tuple(record["backbone_input"].shape[-2:]),
                               features=features, feature_names=list(features))

    def teacher_outputs(self, teacher, batched_inputs, fields) -> DetectorOutputs:
        images = self.teacher_images(teacher, batched_inputs)
        features = teacher.backbone(images.tensor)
        return DetectorOutputs(image_sizes=list(images.image_sizes),
                               padded_size=tuple(images.tensor.shape[-2:]),
                               features=features, feature_names=list(features))
