"""Two-stage detectors (detectron2's ``GeneralizedRCNN``: Faster / Mask R-CNN)."""
from typing import Dict, List, Tuple

import torch
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import Tensor, nn

from ..outputs import DetectorOutputs
from .base import COMMON_FIELDS, Recorder, register_recorder

__all__ = ["RCNNRecorder", "RoIHead"]

#: fields that need the student's sampled RoIs (captured from ``label_and_sample_proposals``)
_ROI_FIELDS = ("rois", "roi_cls_logits", "roi_box_deltas")


class RoIHead:
    """A detector's box branch bound to the FPN maps of one batch: ``head(boxes)`` pools
    ``boxes`` (list over images of ``Boxes`` in input pixels) from those maps and runs the box
    head and predictor, returning ``(cls_logits [R, K+1], box_deltas [R, 4K] or [R, 4])`` for the
    ``R = sum_i len(boxes[i])`` boxes in image order.

    The student's is differentiable (its recorded maps, its modules); the teacher's runs under
    ``no_grad``. So a method can ask either detector about the *same* regions (TAR's proposal
    sharing) without a second backbone pass.

    Attributes:
        box_transform: the predictor's ``Box2BoxTransform`` (to decode ``box_deltas``).
        num_classes: K (foreground classes; index K is background).
    """

    def __init__(self, roi_heads: nn.Module, features: Dict[str, Tensor], grad: bool):
        self._roi_heads = roi_heads
        self._features = [features[f] for f in roi_heads.box_in_features]
        self._grad = grad
        self.box_transform = roi_heads.box_predictor.box2box_transform
        self.num_classes = int(roi_heads.num_classes)

    def __call__(self, boxes: List[Boxes]) -> Tuple[Tensor, Tensor]:
        with torch.set_grad_enabled(self._grad and torch.is_grad_enabled()):
            h = self._roi_heads
            x = h.box_head(h.box_pooler(self._features, list(boxes)))
            scores, deltas = h.box_predictor(x)[:2]
        return scores, deltas


@register_recorder
class RCNNRecorder(Recorder):
    """Records the FPN maps (p2-p6 for the standard Faster R-CNN FPN) and, when asked, the RPN's
    outputs and the box branch on the sampled RoIs. The RoI fields need ``StandardROIHeads``-like
    heads (``label_and_sample_proposals``, ``box_pooler``, ``box_head``, ``box_predictor``)."""

    family = "rcnn"
    model_types = (GeneralizedRCNN,)
    fields: Dict[str, str] = dict(
        COMMON_FIELDS,
        rpn_objectness_logits="dict RPN level (MODEL.RPN.IN_FEATURES) -> [N, A, H_l, W_l] "
                              "objectness logits (A anchors/cell)",
        rpn_anchor_deltas="dict RPN level -> [N, A*4, H_l, W_l] anchor deltas",
        rois="list over images of Instances: the RoIs the box head trained on, as "
             "label_and_sample_proposals returned them (proposal_boxes; gt_classes, K = "
             "background; gt_boxes, meaningful where gt_classes < K). The teacher's: its own "
             "proposals, sampled by its own ROI heads for this batch's ground truth",
        roi_cls_logits="[R, K+1] the box predictor's class logits on `rois` (images "
                       "concatenated in order)",
        roi_box_deltas="[R, 4K] (or [R, 4] class-agnostic) its box deltas on `rois`",
        roi_head="RoIHead: the box branch on this batch's maps, callable on any boxes "
                 "(differentiable for the student, no_grad for the teacher)",
    )

    def hook_modules(self, model, fields) -> Dict[str, nn.Module]:
        modules = {"backbone": model.backbone}
        if "rpn_objectness_logits" in fields or "rpn_anchor_deltas" in fields:
            modules["rpn_head"] = _rpn(model).rpn_head
        if "roi_cls_logits" in fields or "roi_box_deltas" in fields:
            modules["box_predictor"] = _box_heads(model).box_predictor
        return modules

    def capture_methods(self, model, fields) -> Dict[str, Tuple[object, str]]:
        if any(f in fields for f in _ROI_FIELDS):
            return {"rois": (_box_heads(model), "label_and_sample_proposals")}
        return {}

    def from_hooks(self, model, record, batched_inputs, fields) -> DetectorOutputs:
        features = record["backbone"]
        out = DetectorOutputs("rcnn", [tuple(x["image"].shape[-2:]) for x in batched_inputs],
                              record["backbone_input"].shape[-2:], features=features,
                              feature_names=list(features))
        if "rpn_objectness_logits" in fields or "rpn_anchor_deltas" in fields:
            # StandardRPNHead returns (objectness logits per level, anchor deltas per level)
            names = _rpn(model).in_features
            out["rpn_objectness_logits"] = dict(zip(names, record["rpn_head"][0]))
            out["rpn_anchor_deltas"] = dict(zip(names, record["rpn_head"][1]))
        if any(f in fields for f in _ROI_FIELDS):
            # fresh Instances: ROI heads with train_on_pred_boxes overwrite proposal_boxes later
            out["rois"] = [Instances(p.image_size, **p.get_fields()) for p in record["rois"]]
        if "roi_cls_logits" in fields or "roi_box_deltas" in fields:
            scores, deltas = record["box_predictor"][:2]
            out["roi_cls_logits"], out["roi_box_deltas"] = scores, deltas
        if "roi_head" in fields:
            out["roi_head"] = RoIHead(_box_heads(model), features, grad=True)
        return out

    def record(self, model, images, batched_inputs, fields, student=None) -> DetectorOutputs:
        features = model.backbone(images.tensor)
        out = DetectorOutputs("rcnn", images.image_sizes, images.tensor.shape[-2:],
                              features=features, feature_names=list(features))
        rpn = None
        if "rpn_objectness_logits" in fields or "rpn_anchor_deltas" in fields:
            rpn = _rpn(model)
            maps = [features[f] for f in rpn.in_features]
            if "rpn_anchor_deltas" in fields:
                logits, deltas = rpn.rpn_head(maps)[:2]
                out["rpn_anchor_deltas"] = dict(zip(rpn.in_features, deltas))
            else:
                logits = rpn_objectness(rpn.rpn_head, maps)
            out["rpn_objectness_logits"] = dict(zip(rpn.in_features, logits))
        if any(f in fields for f in _ROI_FIELDS) or "roi_head" in fields:
            head = RoIHead(_box_heads(model), features, grad=False)
            out["roi_head"] = head
        if any(f in fields for f in _ROI_FIELDS):
            out["rois"] = own_sampled_rois(model, images, features, batched_inputs)
            scores, deltas = head([r.proposal_boxes for r in out["rois"]])
            out["roi_cls_logits"], out["roi_box_deltas"] = scores, deltas
        return out


def own_sampled_rois(model, images, features: Dict[str, Tensor],
                     batched_inputs: List[dict]) -> List[Instances]:
    """A detector's own RPN proposals (its inference settings: top-k after NMS), labelled and
    sampled by its own ROI heads against the batch's ground truth, as in its training step.
    ``[Instances]`` per image with ``proposal_boxes``, ``gt_classes``, ``gt_boxes``."""
    device = images.tensor.device
    targets = [x["instances"].to(device) for x in batched_inputs]
    proposals, _ = _rpn(model)(images, features, None)
    # the sampler logs its fg/bg counts to the current event storage: a storage of its own, so
    # a teacher's counts never enter the student's metrics (and pictures need none)
    with EventStorage(0):
        return _box_heads(model).label_and_sample_proposals(proposals, targets)


def _rpn(model) -> nn.Module:
    """The model's RPN (a proposal generator with ``rpn_head`` and ``in_features``)."""
    rpn = getattr(model, "proposal_generator", None)
    if rpn is None or not hasattr(rpn, "rpn_head"):
        raise ValueError(
            f"{type(model).__name__} has no RPN (proposal generator "
            f"{type(rpn).__name__ if rpn is not None else None}), so it has no RPN objectness "
            "logits to record; use MODEL.PROPOSAL_GENERATOR.NAME 'RPN' or another method")
    return rpn


def _box_heads(model) -> nn.Module:
    """The model's ROI heads, checked to have one box branch (``StandardROIHeads``-like)."""
    heads = getattr(model, "roi_heads", None)
    needed = ("label_and_sample_proposals", "box_pooler", "box_head", "box_predictor",
              "box_in_features")
    if heads is None or not all(hasattr(heads, a) for a in needed) or isinstance(
            getattr(heads, "box_predictor", None), nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}'s ROI heads ({type(heads).__name__}) are not a single box "
            "branch (StandardROIHeads: box_pooler, box_head, box_predictor); RoI-level "
            "distillation needs one. Use MODEL.ROI_HEADS.NAME 'StandardROIHeads' or a method "
            "that reads FPN features only")
    return heads


def rpn_objectness(head: nn.Module, features: List[Tensor]) -> List[Tensor]:
    """Objectness logits ``[N, A, H_l, W_l]`` per level; a ``StandardRPNHead`` runs only its
    shared conv and objectness branch (not the anchor deltas), any other head runs whole."""
    if hasattr(head, "conv") and hasattr(head, "objectness_logits"):
        return [head.objectness_logits(head.conv(f)) for f in features]
    return head(features)[0]
