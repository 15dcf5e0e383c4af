"""SODA10M (SSLAD-2D, labeled split) in detectron2's dataset-dict format.

On-disk layout (see ``datasets/README.md``)::

    $DETECTRON2_DATASETS/SODA10M/SSLAD-2D/labeled/
        train/  val/  test/                       image files
        annotations/instance_{train,val,test}.json    COCO-style

The json differs from plain COCO in ways that make detectron2's ``load_coco_json`` unsuitable:
image ``width``/``height`` may be floats, and each image record carries domain tags
(``city``, ``location``, ``period``, ``weather``) that we keep in the dataset dicts so results can be
split by domain (see :class:`csgr_distill.evaluation.DomainCOCOEvaluator`).
"""
import json
import logging
import os
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .errors import check_dataset_paths, register_splits

__all__ = [
    "SODA10M_CATEGORIES",
    "SODA10M_CLASSES",
    "SODA10M_DOMAIN_TAGS",
    "SODA10M_SPLITS",
    "load_soda10m_json",
    "register_soda10m",
    "register_all_soda10m",
]

logger = logging.getLogger(__name__)

SODA10M_CATEGORIES = [
    {"id": 1, "name": "Pedestrian"},
    {"id": 2, "name": "Cyclist"},
    {"id": 3, "name": "Car"},
    {"id": 4, "name": "Truck"},
    {"id": 5, "name": "Tram"},
    {"id": 6, "name": "Tricycle"},
]
SODA10M_CLASSES = tuple(c["name"] for c in SODA10M_CATEGORIES)
SODA10M_DOMAIN_TAGS = ("city", "location", "period", "weather")

# name -> (image dir, json file), relative to the datasets root
SODA10M_SPLITS = {
    f"soda10m_{split}": (
        f"SODA10M/SSLAD-2D/labeled/{split}",
        f"SODA10M/SSLAD-2D/labeled/annotations/instance_{split}.json",
    )
    for split in ("train", "val", "test")
}


def _category_mapping(categories: List[dict]):
    cats = sorted(categories, key=lambda c: c["id"])
    id_map = {int(c["id"]): i for i, c in enumerate(cats)}
    names = [c["name"] for c in cats]
    return id_map, names


def load_soda10m_json(
    json_file: str,
    image_root: str,
    dataset_name: Optional[str] = None,
    tags=SODA10M_DOMAIN_TAGS,
) -> List[Dict]:
    """Load a SODA10M (COCO-style) json into detectron2 dataset dicts.

    Category ids are mapped to contiguous ``0..K-1`` in the order of the json's categories sorted
    by id (ids need not be contiguous). Boxes with ``w <= 0`` or ``h <= 0`` are skipped (logged).
    A json without ``annotations`` (the test split) yields dicts with empty ``annotations``.

    Args:
        json_file: path of ``instance_{split}.json``.
        image_root: directory that holds the images named by ``file_name``.
        dataset_name: if given, the category mapping is checked against (or, if absent, written
            to) this dataset's metadata.
        tags: per-image keys copied into each dict (missing -> ``"unknown"``).

    Returns:
        list[dict] with ``file_name, image_id, height, width, annotations`` and the tags; each
        annotation has ``bbox`` (XYWH_ABS floats), ``bbox_mode``, ``category_id``, ``iscrowd``.
    """
    if dataset_name is not None:
        check_dataset_paths(dataset_name, json_file=json_file, image_root=image_root)
    with open(json_file) as f:
        data = json.load(f)

    categories = data.get("categories") or []
    meta = MetadataCatalog.get(dataset_name) if dataset_name is not None else None
    if categories:
        id_map, names = _category_mapping(categories)
    elif meta is not None and hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        id_map = dict(meta.thing_dataset_id_to_contiguous_id)
        names = list(meta.thing_classes)
    else:
        id_map, names = _category_mapping(SODA10M_CATEGORIES)
    if meta is not None:
        if hasattr(meta, "thing_dataset_id_to_contiguous_id"):
            if dict(meta.thing_dataset_id_to_contiguous_id) != id_map or list(
                meta.thing_classes
            ) != list(names):
                raise ValueError(
                    f"Dataset '{dataset_name}': the categories in {json_file} ({names}, ids "
                    f"{sorted(id_map)}) differ from the registered metadata "
                    f"({list(meta.thing_classes)}, ids "
                    f"{sorted(meta.thing_dataset_id_to_contiguous_id)}). Register the dataset "
                    "with the json's categories (register_soda10m(..., categories=...))."
                )
        else:
            meta.thing_classes = list(names)
            meta.thing_dataset_id_to_contiguous_id = id_map

    anns_per_image: Dict[int, list] = {}
    for ann in data.get("annotations") or []:
        anns_per_image.setdefault(ann["image_id"], []).append(ann)

    dicts = []
    num_degenerate = 0
    num_unknown_cat = 0
    for img in data.get("images", []):
        record = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "image_id": img["id"],
            "height": int(round(float(img["height"]))),
            "width": int(round(float(img["width"]))),
        }
        for tag in tags:
            value = img.get(tag)
            record[tag] = "unknown" if value is None or value == "" else str(value)
        objs = []
        for ann in anns_per_image.get(img["id"], []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                num_degenerate += 1
                continue
            cat = int(ann["category_id"])
            if cat not in id_map:
                num_unknown_cat += 1
                continue
            objs.append(
                {
                    "bbox": [x, y, w, h],
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "category_id": id_map[cat],
                    "iscrowd": int(ann.get("iscrowd", 0)),
                }
            )
        record["annotations"] = objs
        dicts.append(record)

    if num_degenerate:
        logger.warning(
            f"{json_file}: skipped {num_degenerate} degenerate boxes (width or height <= 0)."
        )
    if num_unknown_cat:
        logger.warning(
            f"{json_file}: skipped {num_unknown_cat} annotations whose category_id is not in "
            "the json's categories."
        )
    logger.info(f"Loaded {len(dicts)} images from {json_file}")
    return dicts


def register_soda10m(
    name: str,
    json_file: str,
    image_root: str,
    categories: List[dict] = SODA10M_CATEGORIES,
    tags=SODA10M_DOMAIN_TAGS,
) -> None:
    """Register one SODA10M split. Cheap: touches no file until ``DatasetCatalog.get(name)``."""
    id_map, names = _category_mapping(categories)
    DatasetCatalog.register(
        name, lambda: load_soda10m_json(json_file, image_root, name, tags=tags)
    )
    MetadataCatalog.get(name).set(
        thing_classes=list(names),
        thing_dataset_id_to_contiguous_id=id_map,
        evaluator_type="coco",
        json_file=json_file,
        image_root=image_root,
        domain_tags=tuple(tags),
    )


def register_all_soda10m(root: Optional[str] = None) -> List[str]:
    """Register ``soda10m_{train,val,test}`` under ``root`` (default ``$DETECTRON2_DATASETS``);
    names already registered are skipped. Returns the names registered now."""
    return register_splits(SODA10M_SPLITS, register_soda10m, root)
