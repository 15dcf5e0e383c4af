"""Deformable DETR (Zhu et al., ICLR 2021) as a detectron2 meta-architecture, on Hugging Face
``transformers``' ``DeformableDetrForObjectDetection`` (its pure-PyTorch multi-scale deformable
attention, encoder, decoder, heads, Hungarian matcher and focal set criterion). This file is the
glue: the library's backbone is replaced by a detectron2 backbone (ImageNet ``.pkl`` weights,
frozen BN, like the CNN detectors), its config is built from ``MODEL.DETR`` (no hub look-up), and
detectron2's batched inputs go in, ``Instances`` come out.

State-dict layout: ``backbone.*`` (the detectron2 ResNet, once) and ``detector.*`` (the
library's model without its backbone: ``detector.model.input_proj``, ``.encoder``,
``.decoder``, ``detector.class_embed``, ...).
"""
import math
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList, Instances
from torch import Tensor, nn

from .detr import weighted_losses
from .base import DetrFamily
from .masks import level_mask, padding_mask

__all__ = ["DeformableDetr", "hf_deformable_config"]


class _Detectron2Encoder(nn.Module):
    """Stands where the library's ``DeformableDetrConvEncoder`` stood: ``(pixel_values,
    pixel_mask) -> [(feature_map, mask)]`` for the backbone levels ``in_features``, the mask True
    on real pixels (the library's convention). The backbone is referenced, not registered (it is
    the meta-architecture's ``backbone``; registering it twice would save it twice)."""

    def __init__(self, backbone: nn.Module, in_features: List[str]):
        super().__init__()
        object.__setattr__(self, "_backbone", backbone)
        self.in_features = list(in_features)
        shapes = backbone.output_shape()
        self.intermediate_channel_sizes = [shapes[f].channels for f in self.in_features]
        #: the backbone's output for the current batch when the caller computed it already
        #: (:meth:`DeformableDetr.predict` sets it around the library call)
        self.precomputed = None

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor):
        features = self.precomputed if self.precomputed is not None else \
            self._backbone(pixel_values)
        padding = ~pixel_mask.bool()
        return [(features[f], ~level_mask(padding, features[f].shape[-2:]))
                for f in self.in_features]


def hf_deformable_config(cfg, channels: List[int]):
    """The library's ``DeformableDetrConfig`` from ``MODEL.DETR`` (``channels``: the backbone
    levels' channels; the placeholder backbone config the library builds first, and which is
    replaced, only has to give those channels)."""
    from transformers import DeformableDetrConfig, ResNetConfig

    d = cfg.MODEL.DETR
    costs = {}
    for key in ("CLASS_WEIGHT", "L1_WEIGHT", "GIOU_WEIGHT"):
        value = float(d[key])
        if not value.is_integer():
            raise ValueError(f"MODEL.DETR.{key} is {value}: DeformableDetr's matcher costs are "
                             "integers in transformers' config (the official 2 / 5 / 2 are)")
        costs[key] = int(value)
    placeholder = ResNetConfig(depths=[1] * 4, hidden_sizes=[channels[0]] * (4 - len(channels))
                               + list(channels), layer_type="bottleneck", embedding_size=8,
                               out_features=[f"stage{i}" for i in range(5 - len(channels), 5)])
    return DeformableDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=placeholder,
        num_labels=d.NUM_CLASSES, num_queries=d.NUM_QUERIES, d_model=d.HIDDEN_DIM,
        encoder_layers=d.ENC_LAYERS, decoder_layers=d.DEC_LAYERS,
        encoder_attention_heads=d.NHEADS, decoder_attention_heads=d.NHEADS,
        encoder_ffn_dim=d.DIM_FEEDFORWARD, decoder_ffn_dim=d.DIM_FEEDFORWARD,
        dropout=d.DROPOUT, num_feature_levels=d.NUM_FEATURE_LEVELS,
        encoder_n_points=d.ENC_N_POINTS, decoder_n_points=d.DEC_N_POINTS,
        two_stage=d.TWO_STAGE, with_box_refine=d.WITH_BOX_REFINE, auxiliary_loss=d.AUX_LOSS,
        class_cost=costs["CLASS_WEIGHT"], bbox_cost=costs["L1_WEIGHT"],
        giou_cost=costs["GIOU_WEIGHT"], bbox_loss_coefficient=costs["L1_WEIGHT"],
        giou_loss_coefficient=costs["GIOU_WEIGHT"],
        focal_alpha=d.FOCAL_ALPHA, position_embedding_type="sine")


def official_head_init(detector: nn.Module, prior_prob: float = 0.01) -> None:
    """The official Deformable DETR head initialisation, which transformers 5.23 does not apply:
    class biases at ``-log((1 - p) / p)`` (p = 0.01, the focal-loss prior), the box MLP's last
    layer zero with bias ``(0, 0, -2, -2)`` (small initial boxes)."""
    bias = -math.log((1 - prior_prob) / prior_prob)
    with torch.no_grad():
        for head in detector.class_embed:
            head.bias.fill_(bias)
        for mlp in detector.bbox_embed:
            last = mlp.layers[-1]
            last.weight.zero_()
            last.bias.zero_()
            last.bias[2:] = -2.0


@META_ARCH_REGISTRY.register()
class DeformableDetr(DetrFamily):
    """Deformable DETR: backbone levels ``MODEL.DETR.IN_FEATURES`` (+ strided-conv levels up to
    ``NUM_FEATURE_LEVELS``) -> deformable encoder-decoder -> sigmoid class scores (focal loss) and
    boxes at every decoder layer. Loss weights: ``CLASS_WEIGHT`` (official 2), ``L1_WEIGHT``,
    ``GIOU_WEIGHT``, at every layer with ``AUX_LOSS``."""

    @configurable
    def __init__(self, *, backbone: nn.Module, in_features: List[str], hf_config,
                 weight_dict: Dict[str, float], num_queries_test: int, pixel_mean, pixel_std,
                 input_format: str = "RGB"):
        super().__init__()
        from transformers import DeformableDetrForObjectDetection

        self.backbone = backbone
        self.in_features = list(in_features)
        self.detector = DeformableDetrForObjectDetection(hf_config)
        self.detector.model.backbone = _Detectron2Encoder(backbone, self.in_features)
        official_head_init(self.detector)
        self.weight_dict = dict(weight_dict)
        self.num_classes = hf_config.num_labels
        self.num_queries_test = int(num_queries_test)
        self._init_pixels(pixel_mean, pixel_std, input_format)

    @classmethod
    def from_config(cls, cfg):
        d = cfg.MODEL.DETR
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in d.IN_FEATURES if f not in shapes]
        if missing or not d.IN_FEATURES:
            raise ValueError(f"MODEL.DETR.IN_FEATURES {list(d.IN_FEATURES)}: the backbone gives "
                             f"{sorted(shapes)} (MODEL.RESNETS.OUT_FEATURES)")
        if d.DEC_LAYERS < 2:
            raise ValueError("MODEL.DETR.DEC_LAYERS must be >= 2 for DeformableDetr "
                             "(transformers ties the heads of layers 1.. to layer 0's)")
        if d.NUM_FEATURE_LEVELS < len(d.IN_FEATURES):
            raise ValueError(f"MODEL.DETR.NUM_FEATURE_LEVELS ({d.NUM_FEATURE_LEVELS}) is below the "
                             f"number of IN_FEATURES ({len(d.IN_FEATURES)})")
        weights = {"loss_ce": d.CLASS_WEIGHT, "loss_bbox": d.L1_WEIGHT,
                   "loss_giou": d.GIOU_WEIGHT}
        if d.AUX_LOSS:
            weights.update({f"{k}_{i}": v for i in range(d.DEC_LAYERS - 1)
                            for k, v in list(weights.items())})
        return {"backbone": backbone, "in_features": list(d.IN_FEATURES),
                "hf_config": hf_deformable_config(cfg, [shapes[f].channels
                                                        for f in d.IN_FEATURES]),
                "weight_dict": weights, "num_queries_test": cfg.TEST.DETECTIONS_PER_IMAGE,
                "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
                "input_format": cfg.INPUT.FORMAT}

    def predict(self, images: ImageList, labels=None):
        """The library's output for a preprocessed batch (``logits`` ``[N, Q, K]``,
        ``pred_boxes`` normalised cxcywh, ``intermediate_hidden_states``, ``loss_dict`` when
        ``labels`` are given, ...)."""
        pixel_mask = (~padding_mask(images)).long()
        encoder = self.detector.model.backbone
        features = self.backbone(images.tensor)
        encoder.precomputed = features  # the library's call reads them instead of recomputing
        sources = []  # the projected levels the encoder reads (input_proj outputs, in order)
        hooks = [m.register_forward_hook(lambda _m, _i, o: sources.append(o))
                 for m in self.detector.model.input_proj]
        try:
            out = self.detector(pixel_values=images.tensor, pixel_mask=pixel_mask, labels=labels)
        finally:
            encoder.precomputed = None
            for h in hooks:
                h.remove()
        out["encoder_inputs"] = {f"enc{i}": x for i, x in enumerate(sources)}
        out["features"] = {f: features[f] for f in self.in_features}
        out["padded_size"] = tuple(images.tensor.shape[-2:])
        out["inputs"] = (images.tensor, pixel_mask, features)  # for decode()
        return out

    def decode(self, out, queries: Tensor) -> Dict[str, Tensor]:
        """An extra decoder pass over the encoder output of :meth:`predict`'s ``out`` with other
        object queries ``[Q', 2D]`` (query position + target, as the library's
        ``query_position_embeddings``; e.g. a teacher's, for DETRDistill's query-prior
        assignment): the library's forward with those queries in place of its own
        (``torch.func.functional_call``) and the recorded encoder output, so neither the backbone
        nor the encoder runs again. Returns ``pred_logits``, ``pred_boxes``, ``query_embeds`` as
        :meth:`decoder_outputs`; differentiable in training. With this model's own queries it
        reproduces :meth:`predict`."""
        from torch.func import functional_call
        from transformers.modeling_outputs import BaseModelOutput

        pixels, pixel_mask, features = out["inputs"]
        encoder = self.detector.model.backbone
        encoder.precomputed = features
        try:
            again = functional_call(
                self.detector, {"model.query_position_embeddings.weight": queries}, (),
                {"pixel_values": pixels, "pixel_mask": pixel_mask,
                 "encoder_outputs": BaseModelOutput(
                     last_hidden_state=out.encoder_last_hidden_state)})
        finally:
            encoder.precomputed = None
        again["features"] = out["features"]
        view = self.decoder_outputs(again)
        return {k: view[k] for k in ("pred_logits", "pred_boxes", "query_embeds")}

    def decoder_outputs(self, out) -> Dict[str, object]:
        """The family-wide view of :meth:`predict`'s output (see :meth:`Detr.decoder_outputs`):
        every decoder layer's ``pred_logits`` ``[L, N, Q, K]`` (sigmoid classes, ``softmax``
        False) and ``pred_boxes``, computed from the library's per-layer hidden states and
        reference points with its own heads, as its forward does for the last layer."""
        from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

        hs = out.intermediate_hidden_states  # [N, L, Q, D]
        logits, boxes = [], []
        for level in range(hs.shape[1]):
            ref = out.init_reference_points if level == 0 else \
                out.intermediate_reference_points[:, level - 1]
            ref = inverse_sigmoid(ref)
            delta = self.detector.bbox_embed[level](hs[:, level])
            if ref.shape[-1] == 4:
                delta = delta + ref
            else:
                delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1)
            logits.append(self.detector.class_embed[level](hs[:, level]))
            boxes.append(delta.sigmoid())
        return {"features": out["features"], "pred_logits": torch.stack(logits),
                "pred_boxes": torch.stack(boxes), "query_embeds": hs.transpose(0, 1),
                "object_queries": self.detector.model.query_position_embeddings.weight,
                "memory": out.encoder_last_hidden_state,
                "encoder_inputs": out.get("encoder_inputs"), "softmax": False}

    def set_losses(self, logits: Tensor, boxes: Tensor, targets, indices,
                   suffix: str = "") -> Dict[str, Tensor]:
        """Deformable DETR's weighted set losses (focal class, L1, GIoU) of one layer's
        predictions under a *given* assignment (see :meth:`Detr.set_losses`), by the library's
        criterion."""
        from transformers.loss.loss_deformable_detr import DeformableDetrImageLoss

        criterion = DeformableDetrImageLoss(matcher=None, num_classes=self.num_classes,
                                            focal_alpha=self.detector.config.focal_alpha,
                                            losses=["labels", "boxes"])
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        outputs = {"logits": logits, "pred_boxes": boxes}
        num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
        losses = dict(criterion.get_loss("labels", outputs, labels, indices, num_boxes))
        losses.update(criterion.get_loss("boxes", outputs, labels, indices, num_boxes))
        return {k + suffix: v * self.weight_dict[k] for k, v in losses.items()
                if k in self.weight_dict}

    def match(self, logits: Tensor, boxes: Tensor, targets) -> list:
        """The Hungarian assignment of one layer's predictions (``[N, Q, .]``) to the targets
        (``labels``/``boxes`` dicts), by the library's matcher with this model's costs: per image
        ``(pred_idx, gt_idx)``."""
        from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher

        c = self.detector.config
        matcher = DeformableDetrHungarianMatcher(class_cost=c.class_cost, bbox_cost=c.bbox_cost,
                                                 giou_cost=c.giou_cost)
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        return matcher({"logits": logits, "pred_boxes": boxes}, labels)

    def forward(self, batched_inputs: List[dict]):
        images = self.preprocess_image(batched_inputs)
        if self.training:
            gt = [x["instances"].to(self.device) for x in batched_inputs]
            return self.losses(images, gt)
        return self.inference(self.predict(images), batched_inputs, images.image_sizes)

    def losses(self, images: ImageList, gt_instances: List[Instances]) -> Dict[str, Tensor]:
        from detr.util.box_ops import box_xyxy_to_cxcywh

        labels = []
        for inst, (h, w) in zip(gt_instances, images.image_sizes):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            labels.append({"class_labels": inst.gt_classes,
                           "boxes": box_xyxy_to_cxcywh(inst.gt_boxes.tensor / scale)})
        out = self.predict(images, labels)
        return weighted_losses(out.loss_dict, self.weight_dict)

    def inference(self, out, batched_inputs, image_sizes) -> List[Dict[str, Instances]]:
        """Deformable DETR's post-processing: sigmoid scores, the ``TEST.DETECTIONS_PER_IMAGE``
        best (query, class) pairs of each image, their boxes scaled to the input image, then to
        the requested output size."""
        prob = out.logits.sigmoid()
        n, q, k = prob.shape
        topk = min(self.num_queries_test, q * k)
        scores, index = prob.reshape(n, -1).topk(topk, dim=1)
        queries, labels = index // k, index % k
        boxes = torch.stack([out.pred_boxes[i][queries[i]] for i in range(n)])
        return self.to_results(boxes, scores, labels, batched_inputs, image_sizes)
