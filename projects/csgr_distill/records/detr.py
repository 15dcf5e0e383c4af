"""DETR-family detectors (``csgr_distill.detr_port``: ``Detr``, ``DeformableDetr``)."""
from typing import Dict

from torch import nn

from ..detr_port import DeformableDetr, Detr
from ..detr_port.detr import detr_targets
from ..outputs import DetectorOutputs
from .base import COMMON_FIELDS, Recorder, register_recorder

__all__ = ["DetrRecorder"]

_DECODER_FIELDS = ("pred_logits", "pred_boxes", "query_embeds", "object_queries", "memory",
                   "softmax", "encoder_inputs")


@register_recorder
class DetrRecorder(Recorder):
    """Records a DETR-family detector from its ``predict`` output (captured from the student's
    own training forward; the teacher's own pass): the backbone levels the transformer reads and,
    when asked, every decoder layer's predictions and queries and the matcher's assignment."""

    family = "detr"
    model_types = (Detr, DeformableDetr)
    fields: Dict[str, str] = dict(
        COMMON_FIELDS,
        pred_logits="[L, N, Q, C] class logits of every decoder layer (C = K + 1 with a softmax "
                    "for DETR, K sigmoid logits for Deformable DETR; see `softmax`)",
        pred_boxes="[L, N, Q, 4] boxes of every decoder layer, (cx, cy, w, h) normalised by "
                   "each image's unpadded size",
        query_embeds="[L, N, Q, D] the decoder's output queries of every layer",
        object_queries="[Q, D'] the learned object queries (Deformable DETR: query + position, "
                       "D' = 2D; two-stage Deformable DETR: [N, Q, 4] the encoder proposals its "
                       "queries are made from, cxcywh before the sigmoid)",
        memory="the encoder's output (DETR: [S, N, D] or its detr layout; Deformable DETR: "
               "[N, S, D])",
        softmax="bool: True when pred_logits are softmax logits over K + 1 classes",
        encoder_inputs="dict enc0, enc1, ... -> [N, D, H_l, W_l]: the projected levels the "
                       "encoder reads (input_proj outputs; Deformable DETR's extra levels too)",
        set_losses="callable (logits, boxes, targets, indices, suffix) -> the detector's weighted "
                   "set losses under a given assignment (differentiable for the student)",
        matches="list over decoder layers of the matcher's assignment to the ground truth: per "
                "image (pred_idx, gt_idx)",
        decoder="callable queries [Q', D'] -> {pred_logits, pred_boxes, query_embeds} of an extra "
                "decoder pass over this batch's encoder output (the detector's `decode`; "
                "differentiable for the student)",
    )

    def hook_modules(self, model, fields) -> Dict[str, nn.Module]:
        return {}

    def capture_methods(self, model, fields):
        return {"predict": (model, "predict")}

    def from_hooks(self, model, record, batched_inputs, fields) -> DetectorOutputs:
        images_shape = [tuple(x["image"].shape[-2:]) for x in batched_inputs]
        raw = record["predict"]
        return self._record(model, raw, images_shape, raw["padded_size"], batched_inputs, fields)

    def record(self, model, images, batched_inputs, fields, student=None) -> DetectorOutputs:
        raw = model.predict(images)
        return self._record(model, raw, images.image_sizes, images.tensor.shape[-2:],
                            batched_inputs, fields)

    @staticmethod
    def _record(model, raw, image_sizes, padded_size, batched_inputs, fields):
        view = model.decoder_outputs(raw)
        out = DetectorOutputs("detr", image_sizes, padded_size, features=view["features"],
                              feature_names=list(view["features"]))
        for name in _DECODER_FIELDS:
            if name in fields:
                out[name] = view[name]
        if "set_losses" in fields:
            out["set_losses"] = model.set_losses
        if "decoder" in fields:
            out["decoder"] = lambda queries, raw=raw: model.decode(raw, queries)
        if "matches" in fields:
            device = view["pred_boxes"].device
            targets = detr_targets([x["instances"].to(device) for x in batched_inputs],
                                   image_sizes)
            out["matches"] = [model.match(lg.detach(), bx.detach(), targets)
                              for lg, bx in zip(view["pred_logits"], view["pred_boxes"])]
        return out

