"""Two-stage detectors (detectron2's ``GeneralizedRCNN``: Faster / Mask R-CNN)."""
from typing import Dict

from detectron2.modeling import GeneralizedRCNN

from ..outputs import DetectorOutputs
from .base import COMMON_FIELDS, Recorder, register_recorder

__all__ = ["RCNNRecorder"]


@register_recorder
class RCNNRecorder(Recorder):
    """Records the FPN maps (p2-p6 for the standard Faster R-CNN FPN). Head-level fields (RPN
    outputs, sampled RoIs and their box-head outputs) are added by the methods that read them."""

    family = "rcnn"
    model_types = (GeneralizedRCNN,)
    fields: Dict[str, str] = dict(COMMON_FIELDS)

    def from_hooks(self, model, record, batched_inputs, fields) -> DetectorOutputs:
        features = record["backbone"]
        return DetectorOutputs("rcnn", [tuple(x["image"].shape[-2:]) for x in batched_inputs],
                               record["backbone_input"].shape[-2:], features=features,
                               feature_names=list(features))

    def record(self, model, images, batched_inputs, fields, student=None) -> DetectorOutputs:
        features = model.backbone(images.tensor)
        return DetectorOutputs("rcnn", images.image_sizes, images.tensor.shape[-2:],
                               features=features, feature_names=list(features))
