"""MiniCOCO: the 25k-image stratified subset of COCO train2017 (coco-minitrain project).

On-disk layout (see ``datasets/README.md``)::

    $DETECTRON2_DATASETS/coco/
        annotations/instances_minitrain2017.json
        annotations/instances_val2017.json     (for coco_2017_val, registered by detectron2)
        train2017/   val2017/                  official COCO images

``coco_2017_minitrain`` uses COCO's builtin metadata, so its class order (contiguous 0..79 from
the non-contiguous COCO ids 1..90) equals that of COCO-trained teachers. It is evaluated on
detectron2's own ``coco_2017_val``.
"""
from typing import List, Optional

from detectron2.data import DatasetCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

from .errors import check_dataset_paths, register_splits

__all__ = ["MINICOCO_SPLITS", "register_minicoco", "register_all_minicoco"]

# name -> (image dir, json file), relative to the datasets root
MINICOCO_SPLITS = {
    "coco_2017_minitrain": ("coco/train2017", "coco/annotations/instances_minitrain2017.json"),
}


def register_minicoco(name: str, json_file: str, image_root: str) -> None:
    """Register a COCO-format split with COCO's builtin metadata; loading first checks that the
    files exist and otherwise raises :class:`~csgr_distill.data.errors.DatasetNotFoundError`."""
    register_coco_instances(name, _get_builtin_metadata("coco"), json_file, image_root)

    def _load():
        check_dataset_paths(name, json_file=json_file, image_root=image_root)
        return load_coco_json(json_file, image_root, name)

    # replace detectron2's plain loader by the checked one; the metadata stays as set above
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, _load)


def register_all_minicoco(root: Optional[str] = None) -> List[str]:
    """Register ``coco_2017_minitrain`` under ``root`` (default ``$DETECTRON2_DATASETS``)."""
    return register_splits(MINICOCO_SPLITS, register_minicoco, root)
