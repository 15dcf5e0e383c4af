"""MIMIC: FitNet-style feature mimicking on the FPN levels (a baseline).

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (an adapter ``r`` maps the
student's hint layer to the teacher's, trained with ``1/2 ||u_h - r(v_g)||^2``); Li et al.,
"Mimicking Very Efficient Network for Object Detection", CVPR 2017 (the same L2 on detector
features). Here on whole FPN maps, one term per level.
"""
from typing import Dict, List

from detectron2.config import configurable
from torch import Tensor
from torch.nn import functional as F

from .level_pairs import LevelPairDistiller, channels_of
from .registry import register_distiller

__all__ = ["MIMICDistiller"]


@register_distiller("MIMIC")
class MIMICDistiller(LevelPairDistiller):
    r"""Mean squared error between the adapted student map and the teacher map, per FPN level.

    Per level, with student map ``S`` ``[N, Cs, H, W]`` and teacher map ``T`` ``[N, C, H, W]``
    (teacher detached):

    ``L = weight * (1 / (N*C*H*W)) * sum_{n,c,h,w} (r(S) - T)^2``

    ``r``: 1x1 conv Cs -> C with bias when Cs != C (:func:`build_channel_adapter`, one per level),
    identity otherwise. The normalisation is the mean over every element of the level (not
    FitNets' ``1/2`` sum), so the loss does not grow with image size, batch size or channels and
    a level's term is the mean squared feature difference. Returned per level as
    ``loss_<prefix>_<level>``.

    Subclasses (PKD) change what is compared (:meth:`level_loss`) and their config node; the
    level pairing, adapters and checks are shared.
    """

    #: losses are named ``<loss_prefix>_<level>``
    loss_prefix = "loss_mimic"

    @classmethod
    def add_config(cls, node) -> None:
        # Not a published value: no paper fixes one for whole-map FPN mimicking on these detectors
        # (FitNets trains a classifier stage-wise with 1/2 ||.||^2; Li et al. mimic RPN-region
        # features with their own weight). The loss here is a mean, independent of image size,
        # batch and channel count, so 1.0 makes each level's term the mean squared feature
        # difference, of the order of the detection losses for FPN maps of unit-order values;
        # sweep it with `tools/benchmark.py gain --variant`.
        node.WEIGHT = 1.0
        # Levels distilled (present in both networks with equal strides); R-CNN configs: p2-p5.
        node.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]

    @configurable
    def __init__(self, *, in_features: List[str], student_channels: Dict[str, int],
                 teacher_channels: Dict[str, int], weight: float):
        """
        Args:
            in_features: distilled level names, e.g. ``["p3", ..., "p7"]``.
            student_channels / teacher_channels: level -> channels (must cover ``in_features``).
            weight: multiplies every level's loss.
        """
        super().__init__(in_features=in_features, student_channels=student_channels,
                         teacher_channels=teacher_channels)
        self.weight = float(weight)
        self.loss_weight_keys = {self.loss_prefix: f"MODEL.DISTILL.{self.config_node}.WEIGHT"}

    @classmethod
    def from_config(cls, cfg, student, teacher):
        node = cfg.MODEL.DISTILL[cls.config_node]
        # strides and level provenance of the pair: checked by build_distillers
        return {"in_features": list(node.IN_FEATURES), "weight": node.WEIGHT,
                **channels_of(student, teacher)}

    def level_loss(self, s_feat: Tensor, t_feat: Tensor, level: str) -> Tensor:
        """Unweighted loss of one level: ``mean((r(S) - T)^2)``, a scalar.

        Args:
            s_feat: ``[N, Cs, H, W]``; t_feat: ``[N, C, H, W]`` (already detached).
        """
        return F.mse_loss(self.adapters[level](s_feat), t_feat)

    def weighted_level_loss(self, s_feat: Tensor, t_feat: Tensor, level: str,
                            weight: float) -> Tensor:
        """``weight * level_loss`` (subclasses may fold the weight into their loss)."""
        return weight * self.level_loss(s_feat, t_feat, level)

    def reference_losses(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """:func:`straightforward_mimic` on the two records' maps."""
        return straightforward_mimic(self, student.features, teacher.features)

    def forward(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """``(DetectorOutputs, DetectorOutputs, list[Instances]) -> {loss name: weighted loss}``:
        ``<loss_prefix>_<level> = weight * level_loss`` for every level of ``in_features``.
        ``gt_instances`` is unused."""
        return {f"{self.loss_prefix}_{level}": self.weighted_level_loss(s_feat, t_feat, level,
                                                                         self.weight)
                for level, s_feat, t_feat in self.level_pairs(student, teacher)}


# ------------------------------------------------------------------------------------------------
# straightforward reference (Distiller.reference_losses; tools/benchmark.py kernels)
# ------------------------------------------------------------------------------------------------
def straightforward_mimic(distiller, student: Dict[str, Tensor], teacher: Dict[str, Tensor],
                          gt=None):
    """MIMIC written plainly: per level, the summed squared difference of the adapted student
    and the teacher map divided by its element count, times the weight."""
    losses = {}
    for level in distiller.in_features:
        diff = distiller.adapters[level](student[level]) - teacher[level].detach()
        losses[f"loss_mimic_{level}"] = distiller.weight * (diff ** 2).sum() / diff.numel()
    return losses
