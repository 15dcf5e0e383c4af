"""DistributionRetinaNet: detectron2's RetinaNet with a distribution box branch (GFL's box
representation, which LD distils; ``docs/methods/LD.md``). Its distillation variant is
:class:`csgr_distill.meta_arch.distribution_retinanet.DistillDistributionRetinaNet`.

Only the box branch changes: the head's ``bbox_pred`` predicts ``4 (n + 1)`` logits per anchor
(``n = MODEL.RETINANET.REG_MAX``) instead of 4 deltas, and the model's ``box2box_transform`` is a
:class:`~csgr_distill.layers.box_distribution.DistributionBoxTransform`, through which RetinaNet's
own GIoU loss and inference decode boxes. Anchors, matching, the class branch, the focal loss,
the loss normaliser and inference are RetinaNet's. Distribution Focal Loss is added as
``loss_dfl`` when ``MODEL.RETINANET.DFL_WEIGHT > 0``.

The exported student of a ``DistillDistributionRetinaNet`` is a ``DistributionRetinaNet``: it
loads wherever ``csgr_distill`` is imported (plain detectron2 has no such meta-architecture).
"""
import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from torch import nn

from ..layers.box_distribution import DistributionBoxTransform, distribution_focal_loss

__all__ = ["DistributionRetinaNet", "distribution_box_predictor"]


@META_ARCH_REGISTRY.register()
class DistributionRetinaNet(RetinaNet):
    """RetinaNet whose box branch predicts a distribution over each side's distance.

    Attributes:
        reg_max: n (``MODEL.RETINANET.REG_MAX``); ``n + 1`` bins per side.
        dfl_weight: weight of ``loss_dfl`` (0: not computed).
    """

    @configurable
    def __init__(self, *, reg_max: int, dfl_weight: float, **kwargs):
        super().__init__(**kwargs)
        self.reg_max = int(reg_max)
        self.dfl_weight = float(dfl_weight)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        node = cfg.MODEL.RETINANET
        if node.BBOX_REG_LOSS_TYPE != "giou":
            raise ValueError(
                f"{cfg.MODEL.META_ARCHITECTURE} regresses boxes through their distributions with "
                f"GIoU: set MODEL.RETINANET.BBOX_REG_LOSS_TYPE 'giou' (it is "
                f"{node.BBOX_REG_LOSS_TYPE!r})")
        if node.DFL_WEIGHT < 0:
            raise ValueError(f"MODEL.RETINANET.DFL_WEIGHT must be >= 0, got {node.DFL_WEIGHT}")
        shapes = ret["backbone"].output_shape()
        strides = [shapes[f].stride for f in node.IN_FEATURES]
        sizes = cfg.MODEL.ANCHOR_GENERATOR.SIZES
        if len(sizes) == 1:  # detectron2 broadcasts one size list to every level
            sizes = sizes * len(strides)
        ret["box2box_transform"] = DistributionBoxTransform(node.REG_MAX, sizes, strides)
        ret["head"].bbox_pred = distribution_box_predictor(ret["head"].bbox_pred, node.REG_MAX)
        ret.update(reg_max=node.REG_MAX, dfl_weight=node.DFL_WEIGHT)
        return ret

    def _transpose_dense_predictions(self, predictions, dims_per_anchor):
        # RetinaNet asks for [K, 4] values per anchor; the box branch gives 4 (n + 1)
        dims = list(dims_per_anchor)
        if dims == [self.num_classes, 4]:
            dims = [self.num_classes, 4 * (self.reg_max + 1)]
        return super()._transpose_dense_predictions(predictions, dims)

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        """RetinaNet's focal and GIoU losses, plus ``loss_dfl`` (Distribution Focal Loss of the
        positive anchors' sides, mean over the 4 sides, summed over positives and divided by
        RetinaNet's own normaliser, as ``loss_box_reg``)."""
        losses = super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        if self.dfl_weight > 0:
            labels = torch.stack(gt_labels)
            pos = (labels >= 0) & (labels != self.num_classes)
            all_anchors = type(anchors[0]).cat(anchors).tensor
            logits = cat(pred_anchor_deltas, dim=1)[pos]  # [P, 4 (n + 1)]
            targets = self.box2box_transform.side_targets(
                all_anchors[None].expand(len(gt_labels), -1, -1)[pos],
                torch.stack(gt_boxes)[pos])  # [P, 4]
            dfl = distribution_focal_loss(logits.reshape(-1, self.reg_max + 1),
                                          targets.reshape(-1)).reshape(-1, 4).mean(dim=1)
            losses["loss_dfl"] = self.dfl_weight * dfl.sum() / self.loss_normalizer
        return losses


def distribution_box_predictor(delta_conv: nn.Conv2d, reg_max: int) -> nn.Conv2d:
    """A conv like RetinaNet's ``bbox_pred`` (same input, kernel, stride, padding; normal(0,
    0.01) weights, zero bias, as detectron2 initialises it) with ``4 (n + 1)`` outputs per anchor
    instead of 4."""
    anchors = delta_conv.out_channels // 4
    conv = nn.Conv2d(delta_conv.in_channels, anchors * 4 * (reg_max + 1),
                     kernel_size=delta_conv.kernel_size, stride=delta_conv.stride,
                     padding=delta_conv.padding)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, 0.0)
    return conv
