"""DistillRetinaNet: detectron2's RetinaNet with a teacher and distillers during training."""
from typing import List, Optional, Tuple

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from torch import Tensor, nn

from ..outputs import DetectorOutputs
from .base import DistillMixin, distill_init_kwargs

__all__ = ["DistillRetinaNet", "dense_outputs"]


def dense_outputs(
    model, images, features: List[Tensor], predictions: Optional[List[List[Tensor]]],
    fields: Tuple[str, ...],
) -> DetectorOutputs:
    """A dense detector's record: head-input features, per-level logits/deltas, anchors.

    Args:
        images: the ``ImageList`` the model saw.
        features: per level ``[N, C, H_l, W_l]`` in ``model.head_in_features`` order.
        predictions: ``[cls_logits, box_deltas]`` per level as ``model.head`` returns them, or
            None to compute them here (only when a field asks for them).
    """
    names = list(model.head_in_features)
    out = DetectorOutputs(
        image_sizes=list(images.image_sizes),
        padded_size=tuple(images.tensor.shape[-2:]),
        features=dict(zip(names, features)),
        feature_names=names,
    )
    if "cls_logits" in fields or "box_deltas" in fields:
        if predictions is None:
            predictions = model.head(features)
        out.cls_logits, out.box_deltas = predictions[0], predictions[1]
    if "anchors" in fields:
        out.anchors = model.anchor_generator(features)
    return out


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillMixin, RetinaNet):
    """RetinaNet student. In training with ``MODEL.DISTILL.ENABLED`` the total loss is
    detection losses + decay factor x the losses of every distiller in ``MODEL.DISTILL.METHODS``.
    At inference (and with distillation off) it is exactly :class:`RetinaNet`.
    """

    @configurable
    def __init__(self, *, distillers: Optional[nn.ModuleDict] = None, distill_cfg=None, **kwargs):
        super().__init__(**kwargs)
        self.init_distill(distillers, distill_cfg)

    @classmethod
    def from_config(cls, cfg):
        ret = RetinaNet.from_config(cfg)
        ret.update(distill_init_kwargs(cfg, ret["backbone"].output_shape()))
        return ret

    def forward(self, batched_inputs):
        # Keep the inputs for the teacher; forward_training only receives the student's tensors.
        self._distill_inputs = batched_inputs if self.training and self.distill_enabled else None
        try:
            return super().forward(batched_inputs)
        finally:
            self._distill_inputs = None

    def forward_training(self, images, features, predictions, gt_instances):
        losses = super().forward_training(images, features, predictions, gt_instances)
        if self._distill_inputs is None:
            return losses
        student = dense_outputs(self, images, features, predictions, self.distill_fields)
        return self.add_distill_losses(losses, student, self._distill_inputs, gt_instances)

    def teacher_outputs(self, teacher, batched_inputs, fields) -> DetectorOutputs:
        images = self.teacher_images(teacher, batched_inputs)
        feats = teacher.backbone(images.tensor)
        return dense_outputs(teacher, images, [feats[f] for f in teacher.head_in_features],
                             None, fields)
