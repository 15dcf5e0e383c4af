"""Deformable DETR (Zhu et al., ICLR 2021) as a detectron2 meta-architecture, on Hugging Face
``transformers``' ``DeformableDetrForObjectDetection`` (its pure-PyTorch multi-scale deformable
attention, encoder, decoder, heads, Hungarian matcher and focal set criterion). This file is the
glue: the library's backbone is replaced by a detectron2 backbone (ImageNet ``.pkl`` weights,
frozen BN, like the CNN detectors), its config is built from ``MODEL.DETR`` (no hub look-up),
detectron2's batched inputs go in, ``Instances`` come out, and where transformers 5.23 departs
from the official code (fundamentalvision/Deformable-DETR) the official behaviour is restored:
one class head per decoder layer with box refinement, the two-stage encoder losses and proposal
count, dropout placement and the initialisation (``docs/detr_port.md`` lists each).

State-dict layout: ``backbone.*`` (the detectron2 ResNet, once) and ``detector.*`` (the
library's model without its backbone: ``detector.model.input_proj``, ``.encoder``,
``.decoder``, ``detector.class_embed``, ...).
"""
import copy
import math
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList, Instances
from detectron2.utils import comm
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
    replaced, only has to give those channels).

    Dropout as the official layers place ``DROPOUT``: on every residual branch's output (the
    library's ``dropout``), on the feed-forward activations (``activation_dropout``) and on the
    decoder self-attention's probabilities (``attention_dropout``; the official
    ``nn.MultiheadAttention(dropout=...)``). The library also drops the encoder's input with
    ``dropout``, which the official encoder does not: :class:`DeformableDetr` turns that off.
    Two-stage keeps ``NUM_QUERIES`` proposals (the official ``two_stage_num_proposals``)."""
    from transformers import DeformableDetrConfig, ResNetConfig

    d = cfg.MODEL.DETR
    if d.TWO_STAGE and not d.WITH_BOX_REFINE:
        raise ValueError("MODEL.DETR.TWO_STAGE True needs MODEL.DETR.WITH_BOX_REFINE True: "
                         "two-stage Deformable DETR predicts its proposals and refines them with "
                         "the per-layer box heads of box refinement (the official code's "
                         "two-stage reads them too); set both, as the official two-stage recipe")
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
        dropout=d.DROPOUT, attention_dropout=d.DROPOUT, activation_dropout=d.DROPOUT,
        num_feature_levels=d.NUM_FEATURE_LEVELS,
        encoder_n_points=d.ENC_N_POINTS, decoder_n_points=d.DEC_N_POINTS,
        two_stage=d.TWO_STAGE, two_stage_num_proposals=d.NUM_QUERIES,
        with_box_refine=d.WITH_BOX_REFINE, auxiliary_loss=d.AUX_LOSS,
        class_cost=costs["CLASS_WEIGHT"], bbox_cost=costs["L1_WEIGHT"],
        giou_cost=costs["GIOU_WEIGHT"], bbox_loss_coefficient=costs["L1_WEIGHT"],
        giou_loss_coefficient=costs["GIOU_WEIGHT"],
        focal_alpha=d.FOCAL_ALPHA, position_embedding_type="sine")


def official_transformer_init(detector: nn.Module) -> None:
    """The official Deformable DETR initialisation of everything but the heads, where
    transformers 5.23 draws every linear and conv weight from N(0, 0.02) with zero biases and the
    object queries from N(0, 0.02):

    * encoder and decoder layers, reference points, two-stage's ``enc_output`` / ``pos_trans``:
      torch's default linear init, then every weight matrix xavier-uniform (the official
      ``DeformableTransformer._reset_parameters``); the decoder self-attention's q / k / v as one
      ``[3D, D]`` matrix with zero biases and a zero output bias (``nn.MultiheadAttention``'s
      ``in_proj``); the deformable attentions keep the library's init, which is the official
      ``MSDeformAttn._reset_parameters``; reference-point bias 0; level embeddings N(0, 1);
    * object queries N(0, 1) (``nn.Embedding``'s default);
    * input projections: xavier-uniform convs, zero biases (GroupNorm at its default)."""
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention, DeformableDetrSelfAttention)

    model = detector.model
    parts = [model.encoder.layers, model.decoder.layers] + [
        getattr(model, name) for name in ("reference_points", "enc_output", "pos_trans")
        if hasattr(model, name)]
    deformable = {id(m) for part in parts for a in part.modules()
                  if isinstance(a, DeformableDetrMultiscaleDeformableAttention)
                  for m in a.modules()}
    with torch.no_grad():
        for part in parts:
            for m in part.modules():
                if isinstance(m, nn.Linear) and id(m) not in deformable:
                    m.reset_parameters()
                    nn.init.xavier_uniform_(m.weight)
        for part in parts:  # after the loop above, which reaches their linears after them
            for m in part.modules():
                if isinstance(m, DeformableDetrSelfAttention):
                    d = m.q_proj.weight.shape[1]
                    in_proj = nn.init.xavier_uniform_(torch.empty(3 * d, d))
                    for proj, weight in zip((m.q_proj, m.k_proj, m.v_proj), in_proj.chunk(3)):
                        proj.weight.copy_(weight)
                        proj.bias.zero_()
                    m.o_proj.bias.zero_()
        if hasattr(model, "reference_points"):
            model.reference_points.bias.zero_()
        if hasattr(model, "query_position_embeddings"):
            model.query_position_embeddings.reset_parameters()
        model.level_embed.normal_()
        for proj in model.input_proj:
            nn.init.xavier_uniform_(proj[0].weight)
            proj[0].bias.zero_()


def official_heads(detector: nn.Module, prior_prob: float = 0.01) -> None:
    """The official Deformable DETR heads, initialised and shared as its code does.

    One class head (torch's default linear init, biases ``-log((1 - p) / p)``, p = 0.01: the
    focal-loss prior) and one 3-layer box MLP (torch's default init, the last layer zero):
    without box refinement that one pair serves every decoder layer (the bias of its box output
    ``(0, 0, -2, -2)``: small initial boxes); with box refinement every decoder layer, and in
    two-stage the encoder's proposals (the last pair), gets its own copy (``_get_clones``): the
    box bias ``(0, 0, -2, -2)`` for layer 0 only, 0 for all in two-stage, and the decoder refines
    its reference boxes with the same box heads (two-stage: scores its proposals with the last
    class head). transformers 5.23 ties the class heads of box refinement without two-stage to
    layer 0's; here they are separate parameters, as in the official model."""
    refine, two_stage = detector.config.with_box_refine, detector.config.two_stage
    count = len(detector.class_embed)
    class_head, box_head = detector.class_embed[0], detector.bbox_embed[0]
    with torch.no_grad():
        class_head.reset_parameters()
        class_head.bias.fill_(-math.log((1 - prior_prob) / prior_prob))
        for layer in box_head.layers:
            layer.reset_parameters()
        box_head.layers[-1].weight.zero_()
        box_head.layers[-1].bias.zero_()
    if refine:
        classes = [class_head] + [copy.deepcopy(class_head) for _ in range(count - 1)]
        boxes = [box_head] + [copy.deepcopy(box_head) for _ in range(count - 1)]
    else:
        classes, boxes = [class_head] * count, [box_head] * count
    if not two_stage:
        with torch.no_grad():
            box_head.layers[-1].bias[2:] = -2.0
    detector.class_embed = nn.ModuleList(classes)
    detector.bbox_embed = nn.ModuleList(boxes)
    tied = {}  # what transformers' save_pretrained / tie_weights may treat as one tensor
    if refine:
        detector.model.decoder.bbox_embed = detector.bbox_embed
        tied["bbox_embed"] = "model.decoder.bbox_embed"
        if two_stage:
            detector.model.decoder.class_embed = detector.class_embed
            tied["class_embed"] = "model.decoder.class_embed"
    else:
        tied.update({r"bbox_embed.(?![0])\d+": "bbox_embed.0",
                     r"class_embed.(?![0])\d+": "class_embed.0"})
    detector._tied_weights_keys = tied


def _inverse_sigmoid(x: Tensor) -> Tensor:
    from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

    return inverse_sigmoid(x)


@META_ARCH_REGISTRY.register()
class DeformableDetr(DetrFamily):
    """Deformable DETR: backbone levels ``MODEL.DETR.IN_FEATURES`` (+ strided-conv levels up to
    ``NUM_FEATURE_LEVELS``) -> deformable encoder-decoder -> sigmoid class scores (focal loss) and
    boxes at every decoder layer. Loss weights: ``CLASS_WEIGHT`` (official 2), ``L1_WEIGHT``,
    ``GIOU_WEIGHT``, at every layer with ``AUX_LOSS``. ``WITH_BOX_REFINE``: every layer refines
    the previous layer's boxes with its own heads; ``TWO_STAGE`` (with box refinement): the
    queries are the encoder's ``NUM_QUERIES`` best proposals, trained by the encoder losses
    ``loss_{ce,bbox,giou}_enc`` (class-agnostic, with ``AUX_LOSS``, as the official code)."""

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
        self.detector.model.encoder.dropout = 0.0  # the official encoder keeps its input
        official_transformer_init(self.detector)
        official_heads(self.detector)
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
                             "(transformers 5.23 cannot build one decoder layer: it ties the heads "
                             "of layers 1.. to layer 0's)")
        if d.NUM_FEATURE_LEVELS < len(d.IN_FEATURES):
            raise ValueError(f"MODEL.DETR.NUM_FEATURE_LEVELS ({d.NUM_FEATURE_LEVELS}) is below the "
                             f"number of IN_FEATURES ({len(d.IN_FEATURES)})")
        weights = {"loss_ce": d.CLASS_WEIGHT, "loss_bbox": d.L1_WEIGHT,
                   "loss_giou": d.GIOU_WEIGHT}
        if d.AUX_LOSS:  # the official weight dict: every other decoder layer, two-stage's encoder
            suffixes = [f"_{i}" for i in range(d.DEC_LAYERS - 1)] + (["_enc"] if d.TWO_STAGE
                                                                     else [])
            weights.update({k + s: v for s in suffixes for k, v in list(weights.items())})
        return {"backbone": backbone, "in_features": list(d.IN_FEATURES),
                "hf_config": hf_deformable_config(cfg, [shapes[f].channels
                                                        for f in d.IN_FEATURES]),
                "weight_dict": weights, "num_queries_test": cfg.TEST.DETECTIONS_PER_IMAGE,
                "pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD,
                "input_format": cfg.INPUT.FORMAT}

    def _check_proposal_count(self, features: Dict[str, Tensor], padded_size) -> None:
        """Two-stage keeps the encoder's ``NUM_QUERIES`` best proposals: refuse a batch with
        fewer encoder tokens (one per position of every level) than that."""
        config = self.detector.config
        sizes = [tuple(features[f].shape[-2:]) for f in self.in_features]
        for _ in range(config.num_feature_levels - len(sizes)):  # 3x3 stride-2 convs
            h, w = sizes[-1]
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        tokens = sum(h * w for h, w in sizes)
        if tokens < config.two_stage_num_proposals:
            raise ValueError(
                f"two-stage Deformable DETR keeps the encoder's MODEL.DETR.NUM_QUERIES "
                f"({config.two_stage_num_proposals}) best proposals, but this batch (padded to "
                f"{tuple(padded_size)} px) has only {tokens} encoder positions over its levels "
                f"{sizes}; use larger images (INPUT.MIN_SIZE_*) or fewer NUM_QUERIES")

    def predict(self, images: ImageList, labels=None):
        """The library's output for a preprocessed batch (``logits`` ``[N, Q, K]``,
        ``pred_boxes`` normalised cxcywh, ``intermediate_hidden_states``, ``loss_dict`` when
        ``labels`` are given, two-stage's ``enc_outputs_class`` ``[N, S, K]`` and
        ``enc_outputs_coord_logits`` ``[N, S, 4]``, ...) and, for records and :meth:`decode`,
        ``encoder_inputs``, ``features``, ``padded_size`` and ``decoder_inputs`` (the keyword
        arguments the library gave its decoder)."""
        pixel_mask = (~padding_mask(images)).long()
        encoder = self.detector.model.backbone
        features = self.backbone(images.tensor)
        if self.detector.config.two_stage:
            self._check_proposal_count(features, images.tensor.shape[-2:])
        encoder.precomputed = features  # the library's call reads them instead of recomputing
        sources = []  # the projected levels the encoder reads (input_proj outputs, in order)
        decoder_inputs = {}
        hooks = [m.register_forward_hook(lambda _m, _i, o: sources.append(o))
                 for m in self.detector.model.input_proj]
        hooks.append(self.detector.model.decoder.register_forward_pre_hook(
            lambda _m, _a, kwargs: decoder_inputs.update(kwargs), with_kwargs=True))
        try:
            out = self.detector(pixel_values=images.tensor, pixel_mask=pixel_mask, labels=labels)
        finally:
            encoder.precomputed = None
            for h in hooks:
                h.remove()
        out["encoder_inputs"] = {f"enc{i}": x for i, x in enumerate(sources)}
        out["features"] = {f: features[f] for f in self.in_features}
        out["padded_size"] = tuple(images.tensor.shape[-2:])
        out["decoder_inputs"] = decoder_inputs
        return out

    def proposals(self, out) -> Tensor:
        """Two-stage: the encoder proposals the decoder started from, ``[N, Q, 4]`` (cx, cy, w,
        h) before the sigmoid, detached: the ``NUM_QUERIES`` best-scored by the last class head
        (its first class), as the library selects them."""
        index = out.enc_outputs_class[..., 0].topk(self.detector.config.two_stage_num_proposals,
                                                   dim=1)[1]
        return out.enc_outputs_coord_logits.gather(
            1, index.unsqueeze(-1).expand(-1, -1, 4)).detach()

    def _layer_outputs(self, hidden: Tensor, init_reference: Tensor, references: Tensor):
        """Every decoder layer's class logits and boxes ``[L, N, Q, .]`` from its hidden states
        ``[N, L, Q, D]``, its initial reference points and every layer's refined references
        ``[N, L, Q, 2 or 4]``, with that layer's own heads (as the library's forward does)."""
        logits, boxes = [], []
        for level in range(hidden.shape[1]):
            ref = _inverse_sigmoid(init_reference if level == 0 else references[:, level - 1])
            delta = self.detector.bbox_embed[level](hidden[:, level])
            if ref.shape[-1] == 4:
                delta = delta + ref
            else:
                delta = torch.cat([delta[..., :2] + ref, delta[..., 2:]], dim=-1)
            logits.append(self.detector.class_embed[level](hidden[:, level]))
            boxes.append(delta.sigmoid())
        return torch.stack(logits), torch.stack(boxes)

    def decode(self, out, queries: Tensor) -> Dict[str, Tensor]:
        """An extra decoder pass over the encoder output of :meth:`predict`'s ``out`` with other
        object queries, as :meth:`decoder_outputs`' ``object_queries`` give them (e.g. a
        teacher's, for DETRDistill's query-prior assignment): ``[Q', 2D]`` learned queries
        (query position + target; their reference points from this model's
        ``reference_points``) or, two-stage, ``[N, Q', 4]`` proposals (this model's
        ``pos_trans`` makes the queries, their sigmoid is the reference boxes). Runs the
        library's decoder with the inputs it got in :meth:`predict` (neither the backbone nor the
        encoder runs again). Returns ``pred_logits``, ``pred_boxes``, ``query_embeds`` as
        :meth:`decoder_outputs`; differentiable in training. With this model's own queries it
        reproduces :meth:`predict`."""
        model = self.detector.model
        inputs = dict(out["decoder_inputs"])
        n, d = inputs["encoder_hidden_states"].shape[0], self.detector.config.d_model
        if self.detector.config.two_stage:
            if queries.dim() != 3 or queries.shape[0] != n or queries.shape[-1] != 4:
                raise ValueError(
                    f"decode: a two-stage Deformable DETR takes proposals [N={n}, Q, 4] as "
                    f"queries, got {tuple(queries.shape)} (learned queries of a single-stage "
                    "model?); teacher and student need the same MODEL.DETR.TWO_STAGE")
            reference = queries.sigmoid()
            position, target = model.pos_trans_norm(model.pos_trans(
                model.get_proposal_pos_embed(queries))).split(d, dim=2)
        else:
            if queries.dim() != 2 or queries.shape[-1] != 2 * d:
                raise ValueError(
                    f"decode: this Deformable DETR takes learned queries [Q, 2D={2 * d}], got "
                    f"{tuple(queries.shape)} (two-stage proposals?); teacher and student need "
                    "the same MODEL.DETR.TWO_STAGE and HIDDEN_DIM")
            position, target = (x.unsqueeze(0).expand(n, -1, -1) for x in queries.split(d, 1))
            reference = model.reference_points(position).sigmoid()
        inputs.update(inputs_embeds=target, object_queries_position_embeddings=position,
                      reference_points=reference)
        decoded = model.decoder(**inputs)
        logits, boxes = self._layer_outputs(decoded.intermediate_hidden_states, reference,
                                            decoded.intermediate_reference_points)
        return {"pred_logits": logits, "pred_boxes": boxes,
                "query_embeds": decoded.intermediate_hidden_states.transpose(0, 1)}

    def decoder_outputs(self, out) -> Dict[str, object]:
        """The family-wide view of :meth:`predict`'s output (see :meth:`Detr.decoder_outputs`):
        every decoder layer's ``pred_logits`` ``[L, N, Q, K]`` (sigmoid classes, ``softmax``
        False) and ``pred_boxes``, computed from the library's per-layer hidden states and
        reference points with each layer's own heads, as its forward does for the last layer;
        ``object_queries``: the learned ``[Q, 2D]`` queries or, two-stage, the ``[N, Q, 4]``
        proposals the queries were made from (:meth:`proposals`)."""
        hidden = out.intermediate_hidden_states  # [N, L, Q, D]
        logits, boxes = self._layer_outputs(hidden, out.init_reference_points,
                                            out.intermediate_reference_points)
        queries = (self.proposals(out) if self.detector.config.two_stage
                   else self.detector.model.query_position_embeddings.weight)
        return {"features": out["features"], "pred_logits": logits, "pred_boxes": boxes,
                "query_embeds": hidden.transpose(0, 1), "object_queries": queries,
                "memory": out.encoder_last_hidden_state,
                "encoder_inputs": out.get("encoder_inputs"), "softmax": False}

    def _criterion(self, losses=("labels", "boxes")):
        from transformers.loss.loss_deformable_detr import (DeformableDetrHungarianMatcher,
                                                            DeformableDetrImageLoss)

        c = self.detector.config
        matcher = DeformableDetrHungarianMatcher(class_cost=c.class_cost, bbox_cost=c.bbox_cost,
                                                 giou_cost=c.giou_cost)
        return DeformableDetrImageLoss(matcher=matcher, num_classes=self.num_classes,
                                       focal_alpha=c.focal_alpha, losses=list(losses))

    def set_losses(self, logits: Tensor, boxes: Tensor, targets, indices,
                   suffix: str = "") -> Dict[str, Tensor]:
        """Deformable DETR's weighted set losses (focal class, L1, GIoU) of one layer's
        predictions under a *given* assignment (see :meth:`Detr.set_losses`), by the library's
        criterion."""
        criterion = self._criterion()
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
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        return self._criterion().matcher({"logits": logits, "pred_boxes": boxes}, labels)

    def encoder_losses(self, out, labels) -> Dict[str, Tensor]:
        """Two-stage's encoder losses (the official criterion's ``enc_outputs``, which
        transformers 5.23 does not compute): every encoder position's proposal (the last class
        head's logits ``[N, S, K]``, the sigmoid of the last box head's output + its anchor)
        matched to the ground truth with every label 0 (class-agnostic: a proposal is scored by
        the first class), then focal, L1 and GIoU on the matches, normalised by the number of
        boxes as the decoder's; unweighted ``loss_ce_enc``, ``loss_bbox_enc``,
        ``loss_giou_enc``."""
        agnostic = [{"class_labels": torch.zeros_like(t["class_labels"]), "boxes": t["boxes"]}
                    for t in labels]
        proposals = {"logits": out.enc_outputs_class,
                     "pred_boxes": out.enc_outputs_coord_logits.sigmoid()}
        return {k + "_enc": v for k, v in self._criterion()(proposals, agnostic).items()}

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
        losses = dict(out.loss_dict)
        if self.detector.config.two_stage and any(k.endswith("_enc") for k in self.weight_dict):
            losses.update(self.encoder_losses(out, labels))
        scale = self._box_count_scale(labels)  # the logged cardinality error is not scaled
        return {k: v * scale for k, v in weighted_losses(losses, self.weight_dict).items()}

    def _box_count_scale(self, labels) -> float:
        """The library's criterion divides each loss by this process's number of GT boxes (it
        averages it over processes only under ``accelerate``); the official criterion by their
        mean over all processes (each at least 1). The factor from the one to the other: 1 on
        one process."""
        from transformers.utils import is_accelerate_available

        world = comm.get_world_size()
        if world == 1:
            return 1.0
        if is_accelerate_available():
            from accelerate import PartialState

            if PartialState._shared_state != {}:  # the library averaged it already
                return 1.0
        local = float(sum(len(t["class_labels"]) for t in labels))
        total = torch.tensor([local], device=self.device)
        torch.distributed.all_reduce(total)
        return max(local, 1.0) / max(float(total) / world, 1.0)

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
