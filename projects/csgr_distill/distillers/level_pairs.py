"""The shared part of the feature distillers that compare student and teacher FPN maps level by
level (MIMIC, PKD, FGD): the level list and its checks, one channel adapter per level, and the
per-level pairing of the two records with their shape checks."""
from typing import Dict, Iterator, List, Tuple

from torch import Tensor, nn

from ..layers.adapters import build_channel_adapter

__all__ = ["LevelPairDistiller"]


class LevelPairDistiller(nn.Module):
    """Base of the per-level feature distillers.

    Subclasses set :attr:`config_node` (``MODEL.DISTILL.<node>`` holds ``IN_FEATURES``) and
    implement ``forward``, iterating :meth:`level_pairs`. ``self.adapters[level]`` maps the
    student's channels to the teacher's: a 1x1 conv with bias where they differ
    (:func:`build_channel_adapter`), the identity otherwise.
    """

    #: ``MODEL.DISTILL.<config_node>`` holds this method's keys
    config_node = ""
    required_outputs = {"student": ("features",), "teacher": ("features",)}

    def __init__(self, *, in_features: List[str], student_channels: Dict[str, int],
                 teacher_channels: Dict[str, int]):
        """
        Args:
            in_features: distilled level names, e.g. ``["p3", ..., "p7"]``.
            student_channels / teacher_channels: level -> channels (must cover ``in_features``).
        """
        super().__init__()
        key = f"MODEL.DISTILL.{self.config_node}.IN_FEATURES"
        in_features = list(in_features)
        if not in_features:
            raise ValueError(f"{key} is empty; name at least one level")
        if len(set(in_features)) != len(in_features):
            raise ValueError(f"{key} lists a level twice: {in_features}")
        for role, chans in (("student", student_channels), ("teacher", teacher_channels)):
            missing = [f for f in in_features if f not in chans]
            if missing:
                raise ValueError(f"{key} names levels {missing} that the {role} does not "
                                 f"produce (it has {sorted(chans)})")
        self.in_features = in_features
        self.adapters = nn.ModuleDict({
            f: build_channel_adapter(int(student_channels[f]), int(teacher_channels[f]))
            for f in in_features
        })

    @staticmethod
    def channels_from_shapes(student_shapes, teacher_shapes) -> dict:
        """``from_config`` helper: the channel kwargs from the two ``ShapeSpec`` dicts."""
        return {"student_channels": {f: s.channels for f, s in student_shapes.items()},
                "teacher_channels": {f: t.channels for f, t in teacher_shapes.items()}}

    def level_pairs(self, student, teacher) -> Iterator[Tuple[str, Tensor, Tensor]]:
        """``(level, S, T)`` for every level of ``in_features``: the student map ``[N, Cs, H, W]``
        as recorded (not adapted) and the teacher map ``[N, C, H, W]`` detached. Errors naming
        ``IN_FEATURES`` when a record lacks the level or the two maps differ in batch or grid."""
        node = self.config_node
        for level in self.in_features:
            for role, out in (("student", student), ("teacher", teacher)):
                if level not in out.features:
                    raise KeyError(
                        f"{node}: the {role} outputs have no feature {level!r} (have "
                        f"{sorted(out.features)}); check MODEL.DISTILL.{node}.IN_FEATURES")
            s_feat, t_feat = student.features[level], teacher.features[level].detach()
            if s_feat.shape[0] != t_feat.shape[0] or s_feat.shape[-2:] != t_feat.shape[-2:]:
                raise ValueError(
                    f"{node} level {level!r}: student map {tuple(s_feat.shape)} and teacher map "
                    f"{tuple(t_feat.shape)} differ in batch or spatial size; both must see the "
                    "same padded images and levels of equal stride "
                    f"(MODEL.DISTILL.{node}.IN_FEATURES)")
            yield level, s_feat, t_feat
