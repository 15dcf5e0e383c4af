"""Detector records: one recorder per detector family, used alike for student and teacher."""
from .base import Recorder, level_provenance, recorder_for, register_recorder
from .dense import DenseRecorder, dense_head_branches
from .detr import DetrRecorder
from .rcnn import RCNNRecorder
from .spec import DetectorSpec, check_level_pairs, grid_multiple, pad_images

__all__ = ["Recorder", "DenseRecorder", "DetrRecorder", "RCNNRecorder", "DetectorSpec",
           "check_level_pairs", "dense_head_branches", "grid_multiple", "level_provenance",
           "pad_images", "recorder_for", "register_recorder"]
