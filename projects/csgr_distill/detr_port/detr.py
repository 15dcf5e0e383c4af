"""DETR (Carion et al., ECCV 2020) as a detectron2 meta-architecture, on the ``python-detr``
package: its transformer, sine position encoding, box MLP, Hungarian matcher and set criterion.
This file is the glue: a detectron2 backbone (so ImageNet ``.pkl`` weights and frozen BN work as
for the CNN detectors) with DETR's padding masks, detectron2's batched inputs in, ``Instances``
out.

Module names are the official checkpoint's (``transformer``, ``class_embed``, ``bbox_embed``,
``query_embed``, ``input_proj``) except the backbone, a detectron2 ResNet under ``backbone.``
(:mod:`csgr_distill.detr_port.convert` renames an official checkpoint's torchvision ResNet).
"""
import logging
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn
from torch.nn import functional as F

from detr.models.detr import MLP, SetCriterion
from detr.models.matcher import HungarianMatcher
from detr.models.position_encoding import PositionEmbeddingSine
from detr.models.transformer import Transformer
from detr.util.box_ops import box_xyxy_to_cxcywh
from detr.util.misc import NestedTensor

from .base import DetrFamily
from .masks import level_mask, padding_mask

logger = logging.getLogger(__name__)

__all__ = ["Detr", "detr_targets", "weighted_losses"]


def detr_targets(gt_instances: List[Instances], image_sizes) -> List[Dict[str, Tensor]]:
    """detectron2 ground truth -> DETR targets: ``labels`` ``[B]`` and ``boxes`` ``[B, 4]``
    (cx, cy, w, h) normalised by each image's unpadded input size."""
    out = []
    for inst, (h, w) in zip(gt_instances, image_sizes):
        scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=inst.gt_boxes.device)
        out.append({"labels": inst.gt_classes,
                    "boxes": box_xyxy_to_cxcywh(inst.gt_boxes.tensor / scale)})
    return out


def weighted_losses(loss_dict: Dict[str, Tensor], weight_dict: Dict[str, float]
                    ) -> Dict[str, Tensor]:
    """The criterion's losses times their weights; the unweighted logging values it also returns
    (``class_error``, ``cardinality_error``) go to the event storage, not into the loss."""
    out = {}
    for k, v in loss_dict.items():
        if k in weight_dict:
            out[k] = v * weight_dict[k]
        else:
            try:
                get_event_storage().put_scalar(f"detr/{k}", float(v))
            except AssertionError:  # no storage outside training loops
                pass
    return out


@META_ARCH_REGISTRY.register()
class Detr(DetrFamily):
    """DETR: backbone level ``MODEL.DETR.IN_FEATURES[0]`` -> 1x1 projection -> encoder-decoder
    transformer with ``NUM_QUERIES`` learned queries -> class (K + 1, softmax) and box (sigmoid
    cxcywh) heads at every decoder layer; trained with Hungarian matching and the set criterion
    (auxiliary losses at every layer with ``AUX_LOSS``)."""

    @configurable
    def __init__(self, *, backbone: nn.Module, in_feature: str, transformer: Transformer,
                 num_classes: int, num_queries: int, aux_loss: bool, criterion: SetCriterion,
                 pixel_mean, pixel_std, input_format: str = "RGB"):
        super().__init__()
        self.backbone = backbone
        self.in_feature = in_feature
        hidden = transformer.d_model
        self.transformer = transformer
        self.position_embedding = PositionEmbeddingSine(hidden // 2, normalize=True)
        channels = backbone.output_shape()[in_feature].channels
        self.input_proj = nn.Conv2d(channels, hidden, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, hidden)
        self.class_embed = nn.Linear(hidden, num_classes + 1)
        self.bbox_embed = MLP(hidden, hidden, 4, 3)
        self.num_classes, self.num_queries, self.aux_loss = num_classes, num_queries, aux_loss
        self.criterion = criterion
        self._init_pixels(pixel_mean, pixel_std, input_format)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        if len(d.IN_FEATURES) != 1:
            raise ValueError(f"DETR reads one backbone level; MODEL.DETR.IN_FEATURES is "
                             f"{list(d.IN_FEATURES)} (e.g. ['res5'])")
        backbone = build_backbone(cfg)
        if d.IN_FEATURES[0] not in backbone.output_shape():
            raise ValueError(f"MODEL.DETR.IN_FEATURES {list(d.IN_FEATURES)}: the backbone gives "
                             f"{sorted(backbone.output_shape())} (MODEL.RESNETS.OUT_FEATURES)")
        transformer = Transformer(d_model=d.HIDDEN_DIM, nhead=d.NHEADS,
                                  num_encoder_layers=d.ENC_LAYERS,
                                  num_decoder_layers=d.DEC_LAYERS,
                                  dim_feedforward=d.DIM_FEEDFORWARD, dropout=d.DROPOUT,
                                  normalize_before=d.PRE_NORM, return_intermediate_dec=True)
        return {"backbone": backbone, "in_feature": d.IN_FEATURES[0],
                "transformer": transformer, "num_classes": d.NUM_CLASSES,
                "num_queries": d.NUM_QUERIES, "aux_loss": d.AUX_LOSS,
                "criterion": build_criterion(cfg), "pixel_mean": cfg.MODEL.PIXEL_MEAN,
                "pixel_std": cfg.MODEL.PIXEL_STD, "input_format": cfg.INPUT.FORMAT}

    def predict(self, images: ImageList) -> Dict[str, object]:
        """DETR's outputs for a preprocessed batch: ``pred_logits`` ``[N, Q, K+1]``,
        ``pred_boxes`` ``[N, Q, 4]`` (normalised cxcywh), ``aux_outputs`` (the other layers,
        with ``AUX_LOSS``) and, for records, ``hs`` ``[L, N, Q, D]`` (every decoder layer's query
        embeddings), ``memory`` ``[N, D, h, w]``, ``src`` (the projected level) and ``mask``."""
        features = self.backbone(images.tensor)
        feature = features[self.in_feature]
        mask = level_mask(padding_mask(images), feature.shape[-2:])
        pos = self.position_embedding(NestedTensor(feature, mask)).to(feature.dtype)
        src = self.input_proj(feature)
        hs, memory = self.transformer(src, mask, self.query_embed.weight, pos)
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "hs": hs, "memory": memory,
               "src": src, "mask": mask, "pos": pos, "all_logits": logits, "all_boxes": boxes,
               "features": {self.in_feature: feature},
               "padded_size": tuple(images.tensor.shape[-2:])}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def decoder_outputs(self, out) -> Dict[str, object]:
        """The family-wide view of :meth:`predict`'s output (what DETR records hold):
        ``features`` (level -> ``[N, C, H, W]``, the backbone levels the transformer reads),
        ``pred_logits`` ``[L, N, Q, K+1]`` and ``pred_boxes`` ``[L, N, Q, 4]`` of every decoder
        layer, ``query_embeds`` ``[L, N, Q, D]`` (the decoder's output queries per layer),
        ``object_queries`` ``[Q, D]`` (the learned queries), ``memory`` (the encoder's output)
        and ``softmax`` True (DETR classifies with a softmax over K + 1)."""
        return {"features": out["features"], "pred_logits": out["all_logits"],
                "pred_boxes": out["all_boxes"], "query_embeds": out["hs"],
                "object_queries": self.query_embed.weight, "memory": out["memory"],
                "encoder_inputs": {"enc0": out["src"]}, "softmax": True}

    def set_losses(self, logits: Tensor, boxes: Tensor, targets, indices,
                   suffix: str = "") -> Dict[str, Tensor]:
        """DETR's weighted set losses (class, L1, GIoU) of one layer's predictions ``[N, Q, .]``
        under a *given* assignment ``indices`` (per image ``(pred_idx, gt_idx)``), e.g. a
        teacher's for DETRDistill's query-prior pass; keys ``loss_ce<suffix>``, ...."""
        outputs = {"pred_logits": logits, "pred_boxes": boxes}
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = dict(self.criterion.get_loss("labels", outputs, targets, indices, num_boxes,
                                              log=False))
        losses.update(self.criterion.get_loss("boxes", outputs, targets, indices, num_boxes))
        weights = self.criterion.weight_dict
        return {k + suffix: v * weights[k] for k, v in losses.items() if k in weights}

    def decode(self, out, queries: Tensor) -> Dict[str, Tensor]:
        """An extra decoder pass over the encoder memory of :meth:`predict`'s ``out`` with other
        object queries ``[Q', D]`` (e.g. a teacher's: DETRDistill's query-prior assignment);
        the encoder does not run again. Returns ``pred_logits`` ``[L, N, Q', K+1]``,
        ``pred_boxes`` ``[L, N, Q', 4]``, ``query_embeds`` ``[L, N, Q', D]``; differentiable
        in training. With this model's own queries it reproduces :meth:`predict`."""
        n = out["src"].shape[0]
        memory = out["memory"].flatten(2).permute(2, 0, 1)  # [HW, N, D]
        pos = out["pos"].flatten(2).permute(2, 0, 1)
        query_pos = queries.unsqueeze(1).repeat(1, n, 1)  # [Q', N, D]
        hs = self.transformer.decoder(torch.zeros_like(query_pos), memory,
                                      memory_key_padding_mask=out["mask"].flatten(1), pos=pos,
                                      query_pos=query_pos).transpose(1, 2)  # [L, N, Q', D]
        return {"pred_logits": self.class_embed(hs), "pred_boxes": self.bbox_embed(hs).sigmoid(),
                "query_embeds": hs}

    def match(self, logits: Tensor, boxes: Tensor, targets) -> list:
        """The Hungarian assignment of one layer's predictions (``[N, Q, .]``) to the targets
        (:func:`detr_targets`), by the criterion's own matcher: per image ``(pred_idx, gt_idx)``."""
        return self.criterion.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)

    def forward(self, batched_inputs: List[dict]):
        images = self.preprocess_image(batched_inputs)
        out = self.predict(images)
        if self.training:
            gt = [x["instances"].to(self.device) for x in batched_inputs]
            return self.losses(out, gt, images.image_sizes)
        return self.inference(out, batched_inputs, images.image_sizes)

    def losses(self, out, gt_instances, image_sizes) -> Dict[str, Tensor]:
        targets = detr_targets(gt_instances, image_sizes)
        criterion_in = {k: out[k] for k in ("pred_logits", "pred_boxes", "aux_outputs")
                        if k in out}
        return weighted_losses(self.criterion(criterion_in, targets), self.criterion.weight_dict)

    def inference(self, out, batched_inputs, image_sizes) -> List[Dict[str, Instances]]:
        """Every query as a detection (DETR's own post-processing): score and class from the
        softmax without the no-object class, the box scaled to the input image, then to the
        requested output size."""
        prob = F.softmax(out["pred_logits"], dim=-1)[..., :-1]
        scores, labels = prob.max(dim=-1)
        return self.to_results(out["pred_boxes"], scores, labels, batched_inputs, image_sizes)



def build_criterion(cfg) -> SetCriterion:
    """DETR's set criterion with its Hungarian matcher (costs = the loss weights) and, with
    ``AUX_LOSS``, the weights of every decoder layer's losses (``loss_ce_0``, ...). The
    no-object weight buffer is not saved in checkpoints (official checkpoints do not have it)."""
    d = cfg.MODEL.DETR
    matcher = HungarianMatcher(cost_class=d.CLASS_WEIGHT, cost_bbox=d.L1_WEIGHT,
                               cost_giou=d.GIOU_WEIGHT)
    weights = {"loss_ce": d.CLASS_WEIGHT, "loss_bbox": d.L1_WEIGHT, "loss_giou": d.GIOU_WEIGHT}
    if d.AUX_LOSS:
        weights.update({f"{k}_{i}": v for i in range(d.DEC_LAYERS - 1)
                        for k, v in list(weights.items())})
    criterion = SetCriterion(d.NUM_CLASSES, matcher=matcher, weight_dict=weights,
                             eos_coef=d.NO_OBJECT_WEIGHT, losses=["labels", "boxes",
                                                                  "cardinality"])
    empty = criterion.empty_weight
    del criterion._buffers["empty_weight"]
    criterion.register_buffer("empty_weight", empty, persistent=False)
    return criterion
