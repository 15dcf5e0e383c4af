"""The one record of what a detector exposes to distillers.

Distillers read a :class:`DetectorOutputs` of the student and one of the teacher; they never reach
into a model. Each detector family has a recorder (``csgr_distill.records``) that fills a record
for either role: for the student from the captures of its own training forward, for the teacher
from its own no-grad pass. A record holds only the fields some configured distiller asked for.

The set of fields is open: a recorder documents the fields it can fill (name -> shape) in its
``fields`` attribute, and a new family adds its own without editing a closed list here.
"""
from typing import Any, Dict, Iterator, List, Optional, Tuple

from torch import Tensor

__all__ = ["DetectorOutputs", "ROLES"]

#: The two roles a record can have; distillers declare what they read per role.
ROLES = ("student", "teacher")


class DetectorOutputs:
    """What one detector computed for one batch.

    Always present:
        family: the recorder's family name (``"dense"``, ``"rcnn"``, ...).
        image_sizes: per image ``(h, w)`` of the resized, unpadded input.
        padded_size: ``(H_in, W_in)`` of the padded batch tensor the backbone saw.

    Fields (only those asked for; see the family's recorder for names and shapes), read as
    attributes or items: ``out.features`` / ``out["features"]``. Every family records
    ``features``: level name -> ``[N, C, H_l, W_l]`` (FPN outputs, or the levels a transformer
    consumes), and ``feature_names``: the levels in order.

    Reading a field that was not recorded raises an ``AttributeError`` that names the fix (the
    distiller's ``required_outputs`` for that role).
    """

    def __init__(self, family: str, image_sizes: List[Tuple[int, int]],
                 padded_size: Tuple[int, int], **fields: Any):
        self.family = family
        self.image_sizes = [tuple(int(v) for v in s) for s in image_sizes]
        self.padded_size = tuple(int(v) for v in padded_size)
        self._fields: Dict[str, Any] = {}
        for name, value in fields.items():
            self[name] = value

    # ---- field access ------------------------------------------------------------------
    def __setitem__(self, name: str, value: Any) -> None:
        self._fields[name] = value

    def __getitem__(self, name: str) -> Any:
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(
                f"The {self.family} record has no field {name!r} (it holds "
                f"{sorted(self._fields)}): add {name!r} to the distiller's required_outputs for "
                "this role, so the recorder computes it") from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def __contains__(self, name: str) -> bool:
        return name in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def get(self, name: str, default: Optional[Any] = None) -> Any:
        return self._fields.get(name, default)

    def __repr__(self) -> str:
        return (f"DetectorOutputs(family={self.family!r}, padded_size={self.padded_size}, "
                f"fields={sorted(self._fields)})")

    # ---- conveniences shared by the dense fields ---------------------------------------
    def level_logits(self, level: str) -> Tensor:
        """Class logits ``[N, A*K, H, W]`` of one level, by name (requires ``cls_logits``)."""
        names = self.feature_names
        if level not in names:
            raise KeyError(f"level {level!r} is not among the recorded levels {names}")
        return self["cls_logits"][names.index(level)]
