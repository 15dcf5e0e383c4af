"""DETR-family detectors as detectron2 meta-architectures: ``Detr`` (on the python-detr package)
and ``DeformableDetr`` (on Hugging Face transformers). Never named ``detr``: that would shadow
the python-detr package."""
from .deformable_detr import DeformableDetr
from .detr import Detr

__all__ = ["DeformableDetr", "Detr"]
