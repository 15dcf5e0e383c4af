"""Dense one-stage detectors (detectron2's ``DenseDetector``: RetinaNet, FCOS, ...)."""
from typing import Dict, List, Tuple

from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from torch import Tensor, nn

from ..outputs import DetectorOutputs
from .base import COMMON_FIELDS, Recorder, register_recorder

__all__ = ["DenseRecorder", "dense_head_branches"]


def dense_head_branches(head: nn.Module, features: List[Tensor], cls: bool,
                        box: bool) -> Tuple[List[Tensor], List[Tensor]]:
    """Run only the branches of a dense head that are asked for.

    RetinaNet-style heads (``cls_subnet`` + ``cls_score``, ``bbox_subnet`` + ``bbox_pred``) run
    branch by branch; any other head runs whole.

    Returns:
        ``(cls_logits, box_deltas)``: per level ``[N, A*K, H, W]`` and ``[N, A*4, H, W]``, or None
        for a branch not asked for.
    """
    branches = ("cls_subnet", "cls_score", "bbox_subnet", "bbox_pred")
    if not all(hasattr(head, b) for b in branches):
        logits, deltas = head(features)[:2]
        return (logits if cls else None), (deltas if box else None)
    logits = [head.cls_score(head.cls_subnet(f)) for f in features] if cls else None
    deltas = [head.bbox_pred(head.bbox_subnet(f)) for f in features] if box else None
    return logits, deltas


@register_recorder
class DenseRecorder(Recorder):
    family = "dense"
    model_types = (DenseDetector,)
    fields: Dict[str, str] = dict(
        COMMON_FIELDS,
        cls_logits="list over head levels of [N, A*K, H_l, W_l] class logits (A anchors/cell)",
        box_deltas="list over head levels of [N, A*4, H_l, W_l] box regression (a "
                   "DistributionRetinaNet: [N, A*4*(REG_MAX+1), H_l, W_l] side logits)",
        anchors="list over head levels of Boxes with H_l*W_l*A anchors",
        anchor_labels="list over images of [R] the detector's own anchor assignment "
                      "(label_anchors: class, K = background, -1 = ignored; R = all anchors of "
                      "all levels in head order)",
        anchor_gt_boxes="list over images of [R, 4] each anchor's matched ground-truth box",
    )

    def capture_methods(self, model, fields):
        if "anchor_labels" in fields or "anchor_gt_boxes" in fields:
            return {"label_anchors": (model, "label_anchors")}
        return {}

    def hook_modules(self, model, fields) -> Dict[str, nn.Module]:
        modules = {"backbone": model.backbone}
        if "cls_logits" in fields or "box_deltas" in fields:
            modules["head"] = model.head
        return modules

    def from_hooks(self, model, record, batched_inputs, fields) -> DetectorOutputs:
        image_sizes = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        predictions = record.get("head")
        out = self._record(model, image_sizes, record["backbone_input"].shape[-2:],
                           record["backbone"], fields,
                           predictions[0] if predictions else None,
                           predictions[1] if predictions else None)
        if "label_anchors" in record:
            out["anchor_labels"], out["anchor_gt_boxes"] = record["label_anchors"]
        return out

    def record(self, model, images, batched_inputs, fields, student=None) -> DetectorOutputs:
        features = model.backbone(images.tensor)
        names = list(model.head_in_features)
        logits, deltas = dense_head_branches(model.head, [features[f] for f in names],
                                             "cls_logits" in fields, "box_deltas" in fields)
        out = self._record(model, images.image_sizes, images.tensor.shape[-2:], features,
                           fields, logits, deltas)
        if "anchor_labels" in fields or "anchor_gt_boxes" in fields:
            anchors = out.get("anchors") or model.anchor_generator([features[f] for f in names])
            device = images.tensor.device
            out["anchor_labels"], out["anchor_gt_boxes"] = model.label_anchors(
                anchors, [x["instances"].to(device) for x in batched_inputs])
        return out

    @staticmethod
    def _record(model, image_sizes, padded_size, features, fields, logits, deltas):
        names = list(model.head_in_features)
        out = DetectorOutputs("dense", image_sizes, padded_size, features=features,
                              feature_names=names)
        if "cls_logits" in fields:
            out["cls_logits"] = logits
        if "box_deltas" in fields:
            out["box_deltas"] = deltas
        if "anchors" in fields:
            out["anchors"] = model.anchor_generator([features[f] for f in names])
        return out
