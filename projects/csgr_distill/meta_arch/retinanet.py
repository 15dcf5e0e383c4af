"""DistillRetinaNet: detectron2's RetinaNet with a teacher and distillers during training."""
from typing import Dict, List, Optional, Tuple

from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from torch import Tensor, nn

from ..outputs import OUTPUT_FIELDS, DetectorOutputs
from .base import DistillMixin, image_sizes_of

__all__ = ["DistillRetinaNet", "dense_outputs"]


def dense_outputs(
    model, image_sizes, padded_size, features: Dict[str, Tensor],
    predictions: Optional[List[List[Tensor]]], fields: Tuple[str, ...],
) -> DetectorOutputs:
    """A dense detector's record: FPN features, per-level logits/deltas, anchors.

    Args:
        features: the backbone's output dict, level -> ``[N, C, H_l, W_l]``.
        predictions: ``[cls_logits, box_deltas]`` per level as ``model.head`` returns them, or
            None to compute them here (only when a field asks for them).
    """
    names = list(model.head_in_features)
    out = DetectorOutputs(image_sizes=list(image_sizes), padded_size=tuple(padded_size),
                          features=features, feature_names=names)
    if "cls_logits" in fields or "box_deltas" in fields:
        if predictions is None:
            predictions = model.head([features[f] for f in names])
        out.cls_logits, out.box_deltas = predictions[0], predictions[1]
    if "anchors" in fields:
        out.anchors = model.anchor_generator([features[f] for f in names])
    return out


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillMixin, RetinaNet):
    """RetinaNet student. In training with ``MODEL.DISTILL.ENABLED`` the total loss is
    detection losses + decay factor x the losses of every distiller in ``MODEL.DISTILL.METHODS``.
    At inference (and with distillation off) it is exactly :class:`RetinaNet`.
    """

    supported_fields = OUTPUT_FIELDS

    def recorded_modules(self, fields) -> Dict[str, nn.Module]:
        modules = {"backbone": self.backbone}
        if "cls_logits" in fields or "box_deltas" in fields:
            modules["head"] = self.head
        return modules

    def student_outputs(self, record, batched_inputs, fields) -> DetectorOutputs:
        return dense_outputs(self, image_sizes_of(batched_inputs),
                             record["backbone_input"].shape[-2:], record["backbone"],
                             record.get("head"), fields)

    def teacher_outputs(self, teacher, batched_inputs, fields) -> DetectorOutputs:
        images = self.teacher_images(teacher, batched_inputs)
        features = teacher.backbone(images.tensor)
        return dense_outputs(teacher, images.image_sizes, images.tensor.shape[-2:], features,
                             None, fields)
