"""Dataset registration for csgr_distill.

Importing this package registers (cheaply: no file is touched until ``DatasetCatalog.get``):

* ``soda10m_{train,val,test}``  SODA10M / SSLAD-2D labeled split, with per-image domain tags
* ``coco_2017_minitrain``       MiniCOCO, COCO's builtin metadata (val: detectron2's ``coco_2017_val``)
* ``shapes_{train,val}``        synthetic shapes, generated on first use (the embedded default)

The user's own datasets (COCO json or VOC XML) are named in the config, ``DATASETS.REGISTER``, or
with a tool's ``--register-dataset``, and registered by :func:`register_from_cfg`
(:mod:`.custom`, which checks every annotation and image file then: :mod:`.checks`, image headers
read as detectron2 reads the files by :mod:`.images`); :func:`check_training_data` /
:func:`check_num_classes` (:mod:`.checks`) check a config's training data before training;
:func:`dataset_fingerprint` (:mod:`.fingerprint`) says what a set holds, for caches keyed on it.

PASCAL VOC uses detectron2's builtin names (``voc_2007_trainval``, ``voc_2007_test``, ...).
Roots live under ``$DETECTRON2_DATASETS`` (default ``./datasets``), read when registering; the
layouts are in ``datasets/README.md``.
"""
from typing import List, Optional

from detectron2.data import MetadataCatalog

from .errors import DatasetNotFoundError, check_dataset_paths, datasets_root
from .fingerprint import dataset_fingerprint
from .checks import (
    DatasetContentError,
    DatasetFileNotFoundError,
    check_boxes,
    check_num_classes,
    check_training_data,
    classes_without_boxes,
    training_class_names,
)
from .custom import (
    DatasetEntry,
    DatasetEntryError,
    add_dataset_arguments,
    apply_dataset_arguments,
    parse_dataset_argument,
    parse_register,
    pipeline_overrides,
    register_from_cfg,
)
from .minicoco import MINICOCO_SPLITS, register_all_minicoco, register_minicoco
from .shapes import (
    SHAPES_CLASSES,
    SHAPES_IMAGE_SIZE,
    SHAPES_NUM_IMAGES,
    generate_shapes,
    load_shapes,
    register_all_shapes,
    register_shapes,
)
from .soda10m import (
    SODA10M_CATEGORIES,
    SODA10M_CLASSES,
    SODA10M_DOMAIN_TAGS,
    SODA10M_SPLITS,
    load_soda10m_json,
    register_all_soda10m,
    register_soda10m,
)

__all__ = [
    "DATASET_NAMES",
    "DatasetContentError",
    "DatasetEntry",
    "DatasetEntryError",
    "DatasetFileNotFoundError",
    "add_dataset_arguments",
    "apply_dataset_arguments",
    "check_boxes",
    "check_num_classes",
    "check_training_data",
    "classes_without_boxes",
    "dataset_fingerprint",
    "parse_dataset_argument",
    "parse_register",
    "pipeline_overrides",
    "register_from_cfg",
    "training_class_names",
    "DatasetNotFoundError",
    "check_dataset_paths",
    "dataset_paths",
    "datasets_root",
    "register_all",
    "MINICOCO_SPLITS",
    "register_minicoco",
    "register_all_minicoco",
    "SHAPES_CLASSES",
    "SHAPES_IMAGE_SIZE",
    "SHAPES_NUM_IMAGES",
    "generate_shapes",
    "load_shapes",
    "register_shapes",
    "register_all_shapes",
    "SODA10M_CATEGORIES",
    "SODA10M_CLASSES",
    "SODA10M_DOMAIN_TAGS",
    "SODA10M_SPLITS",
    "load_soda10m_json",
    "register_soda10m",
    "register_all_soda10m",
]

# the names this package registers (VOC and coco_2017_val come from detectron2 itself)
DATASET_NAMES = tuple(SODA10M_SPLITS) + tuple(MINICOCO_SPLITS) + ("shapes_train", "shapes_val")


def register_all(root: Optional[str] = None) -> List[str]:
    """Register every dataset of this project under ``root`` (default ``$DETECTRON2_DATASETS``,
    else ``datasets``). Idempotent: names already in ``DatasetCatalog`` are skipped, so a second
    call with another root changes nothing. Returns the names registered by this call."""
    return register_all_soda10m(root) + register_all_minicoco(root) + register_all_shapes(root)


def dataset_paths(name: str) -> dict:
    """Where a registered dataset lives: ``{"json_file": ..., "image_root": ...}`` (COCO-style)
    or ``{"dirname": ...}`` (VOC), from its metadata."""
    meta = MetadataCatalog.get(name)
    keys = ("json_file", "image_root", "dirname")
    out = {k: meta.get(k) for k in keys if meta.get(k, None) is not None}
    if not out:
        raise KeyError(f"Dataset '{name}' has no path in its metadata; is it registered?")
    return out


register_all()
