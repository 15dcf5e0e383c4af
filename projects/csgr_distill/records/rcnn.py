"""Two-stage detectors (detectron2's ``GeneralizedRCNN``: Faster / Mask R-CNN)."""
from typing import Dict, List

from detectron2.modeling import GeneralizedRCNN
from torch import Tensor, nn

from ..outputs import DetectorOutputs
from .base import COMMON_FIELDS, Recorder, register_recorder

__all__ = ["RCNNRecorder"]


@register_recorder
class RCNNRecorder(Recorder):
    """Records the FPN maps (p2-p6 for the standard Faster R-CNN FPN) and, when asked, the RPN's
    objectness logits. Further head-level fields (sampled RoIs and their box-head outputs) are
    added by the methods that read them."""

    family = "rcnn"
    model_types = (GeneralizedRCNN,)
    fields: Dict[str, str] = dict(
        COMMON_FIELDS,
        rpn_objectness_logits="dict RPN level (MODEL.RPN.IN_FEATURES) -> [N, A, H_l, W_l] "
                              "objectness logits (A anchors/cell)",
    )

    def hook_modules(self, model, fields) -> Dict[str, nn.Module]:
        modules = {"backbone": model.backbone}
        if "rpn_objectness_logits" in fields:
            modules["rpn_head"] = _rpn(model).rpn_head
        return modules

    def from_hooks(self, model, record, batched_inputs, fields) -> DetectorOutputs:
        features = record["backbone"]
        out = DetectorOutputs("rcnn", [tuple(x["image"].shape[-2:]) for x in batched_inputs],
                              record["backbone_input"].shape[-2:], features=features,
                              feature_names=list(features))
        if "rpn_objectness_logits" in fields:
            # StandardRPNHead returns (objectness logits per level, anchor deltas per level)
            out["rpn_objectness_logits"] = dict(zip(_rpn(model).in_features,
                                                    record["rpn_head"][0]))
        return out

    def record(self, model, images, batched_inputs, fields, student=None) -> DetectorOutputs:
        features = model.backbone(images.tensor)
        out = DetectorOutputs("rcnn", images.image_sizes, images.tensor.shape[-2:],
                              features=features, feature_names=list(features))
        if "rpn_objectness_logits" in fields:
            rpn = _rpn(model)
            out["rpn_objectness_logits"] = dict(zip(rpn.in_features, rpn_objectness(
                rpn.rpn_head, [features[f] for f in rpn.in_features])))
        return out


def _rpn(model) -> nn.Module:
    """The model's RPN (a proposal generator with ``rpn_head`` and ``in_features``)."""
    rpn = getattr(model, "proposal_generator", None)
    if rpn is None or not hasattr(rpn, "rpn_head"):
        raise ValueError(
            f"{type(model).__name__} has no RPN (proposal generator "
            f"{type(rpn).__name__ if rpn is not None else None}), so it has no RPN objectness "
            "logits to record; use MODEL.PROPOSAL_GENERATOR.NAME 'RPN' or another method")
    return rpn


def rpn_objectness(head: nn.Module, features: List[Tensor]) -> List[Tensor]:
    """Objectness logits ``[N, A, H_l, W_l]`` per level; a ``StandardRPNHead`` runs only its
    shared conv and objectness branch (not the anchor deltas), any other head runs whole."""
    if hasattr(head, "conv") and hasattr(head, "objectness_logits"):
        return [head.objectness_logits(head.conv(f)) for f in features]
    return head(features)[0]
