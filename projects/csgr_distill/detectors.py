"""What the project knows of each detector meta-architecture before building it: the config key
of its class count — one registry keyed by the meta-architecture's class (how a family is
recorded is :mod:`csgr_distill.records`' registry, keyed the same way).

A meta-architecture is looked up through detectron2's ``META_ARCH_REGISTRY`` and its method
resolution order, so a subclass (``DistillRetinaNet``, ``DistributionRetinaNet``, detectron2's
``PanopticFPN``) answers like its registered base. detectron2's RetinaNet and GeneralizedRCNN are
registered here; the DETR port registers its family where it is defined. A detector this
registry does not know is one error saying how to register it::

    from csgr_distill.detectors import register_detector
    register_detector(MyDetector, num_classes_key="MODEL.MYDET.NUM_CLASSES")
"""
from dataclasses import dataclass
from typing import Dict, Union

from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet

__all__ = ["DetectorFacts", "register_detector", "facts_of", "num_classes_key",
           "num_classes_of"]


@dataclass(frozen=True)
class DetectorFacts:
    """``num_classes_key``: the config key of its foreground class count, e.g.
    ``MODEL.RETINANET.NUM_CLASSES``."""

    num_classes_key: str


_FACTS: Dict[type, DetectorFacts] = {}


def register_detector(cls: type, *, num_classes_key: str) -> type:
    """Register the facts of meta-architecture class ``cls`` (and of its subclasses)."""
    _FACTS[cls] = DetectorFacts(num_classes_key=num_classes_key)
    return cls


def facts_of(arch: Union[str, type]) -> DetectorFacts:
    """The facts of a meta-architecture, by registered name (``cfg.MODEL.META_ARCHITECTURE``)
    or class: those of the nearest registered class in its method resolution order."""
    cls = META_ARCH_REGISTRY.get(arch) if isinstance(arch, str) else arch
    for base in cls.__mro__:
        if base in _FACTS:
            return _FACTS[base]
    raise ValueError(
        f"csgr_distill does not know the meta-architecture {cls.__name__}: it knows "
        f"{sorted(c.__name__ for c in _FACTS)} and their subclasses. Register it with "
        "csgr_distill.detectors.register_detector(cls, num_classes_key=...)")


def num_classes_key(cfg) -> str:
    """The config key of the class count of ``cfg``'s detector, e.g. ``MODEL.RETINANET.
    NUM_CLASSES``."""
    return facts_of(cfg.MODEL.META_ARCHITECTURE).num_classes_key


def num_classes_of(cfg) -> int:
    """The number of foreground classes ``cfg``'s detector trains for."""
    node = cfg
    for part in num_classes_key(cfg).split("."):
        node = node[part]
    return int(node)


register_detector(RetinaNet, num_classes_key="MODEL.RETINANET.NUM_CLASSES")
register_detector(GeneralizedRCNN, num_classes_key="MODEL.ROI_HEADS.NUM_CLASSES")
