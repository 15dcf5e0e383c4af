"""DETR-family detectors as detectron2 meta-architectures (``Detr``), on the python-detr
package; never named ``detr`` (that would shadow the package)."""
from .detr import Detr

__all__ = ["Detr"]
