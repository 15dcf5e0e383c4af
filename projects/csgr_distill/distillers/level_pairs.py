"""The shared part of the feature distillers that compare student and teacher FPN maps level by
level (MIMIC, PKD, FGD, TAR's feature term; CSGR uses the two checks): the level list and its
checks (:func:`check_levels`), one channel adapter per level, and the per-level pairing of the
two records with their shape checks (:func:`level_pair`)."""
from typing import Dict, Iterator, List, Tuple

from torch import Tensor, nn

from ..layers.adapters import build_channel_adapter
from .base import Distiller

__all__ = ["LevelPairDistiller", "check_levels", "level_pair", "channels_of"]


def check_levels(node: str, in_features, student_channels: Dict[str, int],
                 teacher_channels: Dict[str, int]) -> List[str]:
    """``MODEL.DISTILL.<node>.IN_FEATURES`` as a list, checked: not empty, no level twice, every
    level produced by both networks (``*_channels``: level -> channels)."""
    key = f"MODEL.DISTILL.{node}.IN_FEATURES"
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
    return in_features


def channels_of(student, teacher) -> dict:
    """``from_config`` helper: ``{"student_channels", "teacher_channels"}`` (level -> channels)
    of two :class:`~csgr_distill.records.DetectorSpec`."""
    return {"student_channels": {f: s.channels for f, s in student.shapes.items()},
            "teacher_channels": {f: t.channels for f, t in teacher.shapes.items()}}


def level_pair(node: str, level: str, student, teacher) -> Tuple[Tensor, Tensor]:
    """``(S, T)`` of one level of two records: the student map ``[N, Cs, H, W]`` as recorded and
    the teacher map ``[N, C, H, W]`` detached. Errors naming ``MODEL.DISTILL.<node>.IN_FEATURES``
    when a record lacks the level or the two maps differ in batch or grid."""
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
    return s_feat, t_feat


class LevelPairDistiller(Distiller):
    """Base of the per-level feature distillers.

    Subclasses (registered: their ``MODEL.DISTILL.<config_node>`` holds ``IN_FEATURES``)
    implement ``forward``, iterating :meth:`level_pairs`. ``self.adapters[level]`` maps the
    student's channels to the teacher's: a 1x1 conv with bias where they differ
    (:func:`build_channel_adapter`), the identity otherwise.
    """

    def __init__(self, *, in_features: List[str], student_channels: Dict[str, int],
                 teacher_channels: Dict[str, int]):
        """
        Args:
            in_features: distilled level names, e.g. ``["p3", ..., "p7"]``.
            student_channels / teacher_channels: level -> channels (must cover ``in_features``).
        """
        super().__init__()
        self.in_features = check_levels(self.config_node, in_features, student_channels,
                                        teacher_channels)
        self.adapters = nn.ModuleDict({
            f: build_channel_adapter(int(student_channels[f]), int(teacher_channels[f]))
            for f in self.in_features
        })

    def level_pairs(self, student, teacher) -> Iterator[Tuple[str, Tensor, Tensor]]:
        """``(level, S, T)`` for every level of ``in_features`` (:func:`level_pair`)."""
        for level in self.in_features:
            yield (level, *level_pair(self.config_node, level, student, teacher))
