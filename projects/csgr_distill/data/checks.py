"""Checks of the data a config trains on: image files, boxes, class count, empty training sets.

* :func:`check_boxes`, :func:`check_image_files`: used by the loaders of the user's own datasets
  (:mod:`csgr_distill.data.custom`) on every load;
* :func:`check_num_classes`: the head's ``NUM_CLASSES`` against the training set's class list;
* :func:`check_training_data`: before training, every check of ``DATASETS.TRAIN`` together.
"""
import logging
import math
import os
from typing import Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from .errors import DatasetNotFoundError

__all__ = [
    "BOX_TOLERANCE_PX",
    "BOX_TOLERANCE_FRACTION",
    "DatasetContentError",
    "DatasetFileNotFoundError",
    "check_boxes",
    "check_image_files",
    "training_class_names",
    "check_num_classes",
    "check_training_data",
]

logger = logging.getLogger(__name__)

#: a box may stick out of its image by max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION x the image
#: side) and is then clipped to the image; one that sticks out further is skipped (a wrong
#: coordinate system or image size, not a rounding at the border)
BOX_TOLERANCE_PX = 2.0
BOX_TOLERANCE_FRACTION = 0.02


class DatasetContentError(ValueError):
    """An annotation file whose content cannot be used (the message names the file and the fix)."""


class DatasetFileNotFoundError(DatasetNotFoundError):
    """A file or folder of the user's dataset is missing; the message names each path and the fix.
    (A :class:`~csgr_distill.data.errors.DatasetNotFoundError`, so callers catching that one see
    it; the message is its own: these datasets do not live under ``$DETECTRON2_DATASETS``.)"""

    def __init__(self, dataset_name: str, missing: Iterable[Tuple[str, str]], fix: str = "",
                 key: Optional[str] = None):
        self.dataset_name, self.missing, self.key = dataset_name, list(missing), key
        lines = [f"Dataset '{dataset_name}': files are missing:"]
        for what, path in self.missing:
            lines.append(f"  {what}: {path}")
        if fix:
            lines.append(f"Fix: {fix}.")
        FileNotFoundError.__init__(self, "\n".join(lines))


def _plural(n: int, word: str, plural: str = "") -> str:
    if n == 1:
        return f"1 {word}"
    return f"{n} {plural or (word + 'es' if word.endswith(('x', 's')) else word + 's')}"


# ------------------------------------------------------------------------------------------------
# per-load checks
# ------------------------------------------------------------------------------------------------
def check_image_files(dicts: Sequence[dict], name: str, source: str, fix: str = "") -> None:
    """Raise :class:`DatasetFileNotFoundError` when any ``file_name`` of ``dicts`` is missing,
    naming how many, the first three and ``source`` (the annotation file that lists them)."""
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:
        raise DatasetFileNotFoundError(
            name, [(f"{len(missing)} of {len(dicts)} images listed in {source}, e.g.", p)
                   for p in missing[:3]], fix=fix)


def check_boxes(dicts: List[dict], source: str) -> List[dict]:
    """Check every box of ``dicts`` (detectron2 dataset dicts, ``bbox`` in its ``bbox_mode``,
    ``width``/``height`` the image size) against its image, in place; returns ``dicts``.

    * empty boxes (width or height <= 0) are skipped;
    * boxes that stick out by at most max(:data:`BOX_TOLERANCE_PX`,
      :data:`BOX_TOLERANCE_FRACTION` x side) are clipped to the image;
    * boxes that stick out further, or lie outside, are skipped.

    Each kind is one counted log line naming ``source`` (warnings for skipped boxes, e.g.
    ``skipped 3 boxes outside their image in data/train.json``; info for clipped ones).
    """
    skipped_out, skipped_empty, clipped = [], [], 0
    for d in dicts:
        w, h = float(d["width"]), float(d["height"])
        tx, ty = max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * w), \
            max(BOX_TOLERANCE_PX, BOX_TOLERANCE_FRACTION * h)
        kept = []
        for ann in d.get("annotations", []):
            mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), mode, BoxMode.XYXY_ABS)
            if not (x1 > x0 and y1 > y0):
                skipped_empty.append((d["file_name"], ann["bbox"]))
                continue
            if x0 < -tx or y0 < -ty or x1 > w + tx or y1 > h + ty:
                skipped_out.append((d["file_name"], [x0, y0, x1, y1], (w, h)))
                continue
            c = [min(max(x0, 0.0), w), min(max(y0, 0.0), h), min(max(x1, 0.0), w),
                 min(max(y1, 0.0), h)]
            if not (c[2] > c[0] and c[3] > c[1]):
                skipped_out.append((d["file_name"], [x0, y0, x1, y1], (w, h)))
                continue
            if c != [x0, y0, x1, y1]:
                clipped += 1
                ann = dict(ann, bbox=list(BoxMode.convert(c, BoxMode.XYXY_ABS, mode)))
            kept.append(ann)
        if "annotations" in d:
            d["annotations"] = kept
    if skipped_out:
        f, box, (w, h) = skipped_out[0]
        logger.warning(
            "skipped %s outside their image in %s (more than max(%g px, %g%% of the side) "
            "beyond its border; e.g. %s: box x0,y0,x1,y1 = %s in a %dx%d image). Check the "
            "coordinates and the image sizes in the annotations.",
            _plural(len(skipped_out), "box"), source, BOX_TOLERANCE_PX,
            100 * BOX_TOLERANCE_FRACTION, f, [round(v, 1) for v in box], w, h)
    if skipped_empty:
        logger.warning("skipped %s with width or height <= 0 in %s (e.g. %s: %s)",
                       _plural(len(skipped_empty), "empty box", "empty boxes"), source,
                       *skipped_empty[0])
    if clipped:
        logger.info("clipped %s to their image in %s (they stuck out by less than max(%g px, "
                    "%g%% of the side))", _plural(clipped, "box"), source, BOX_TOLERANCE_PX,
                    100 * BOX_TOLERANCE_FRACTION)
    return dicts


# ------------------------------------------------------------------------------------------------
# config-level checks
# ------------------------------------------------------------------------------------------------
def _class_names(name: str, load: bool = True) -> Optional[List[str]]:
    """``thing_classes`` of a registered dataset: from its metadata, else (``load``) by loading
    it once (detectron2's ``load_coco_json`` sets them); None when unknown or unregistered."""
    if name not in DatasetCatalog.list():
        return None
    names = MetadataCatalog.get(name).get("thing_classes", None)
    if names is None and load:
        DatasetCatalog.get(name)
        names = MetadataCatalog.get(name).get("thing_classes", None)
    return list(names) if names is not None else None


def training_class_names(cfg, load: bool = True) -> Optional[Tuple[str, List[str]]]:
    """``(name, class names)`` of the config's first training set whose classes are known, or
    None. Every training set with known classes must have the same list (an error otherwise).
    ``load=False``: metadata only (no dataset is loaded)."""
    found = None
    for name in cfg.DATASETS.TRAIN:
        names = _class_names(name, load)
        if names is None:
            continue
        if found is None:
            found = (name, names)
        elif names != found[1]:
            raise ValueError(
                f"DATASETS.TRAIN mixes sets with different classes: {found[0]} {found[1]} and "
                f"{name} {names}. Train on sets with one class list (same names, same order).")
    return found


def check_num_classes(cfg, opts_key: Optional[str] = None,
                      load: bool = True) -> Optional[List[str]]:
    """The head's class count (``MODEL.RETINANET.NUM_CLASSES`` for RetinaNet,
    ``MODEL.ROI_HEADS.NUM_CLASSES`` for R-CNN; see :func:`csgr_distill.teacher.num_classes_key`)
    must equal the length of the training set's class list.

    Args:
        cfg: a detectron2 config (its datasets registered).
        opts_key: where the fix goes when it is not the config itself, e.g.
            ``"MODEL.DISTILL.TEACHER.OPTS"`` for the teacher: the message then shows that form.
        load: a training set whose metadata has no class names is loaded once to learn them;
            False: such a set is not checked.

    Returns:
        the training set's class names, or None when no training set has known classes.

    Raises:
        ValueError: naming the key, its value, the training set and its class list, and the exact
            override.
    """
    from ..teacher import num_classes_key, num_classes_of

    found = training_class_names(cfg, load)
    if found is None:
        return None
    name, names = found
    key, value = num_classes_key(cfg), num_classes_of(cfg)
    if value == len(names):
        return names
    if opts_key:
        fix = f'{opts_key} "{[key, len(names)]!r}"'
    else:
        fix = f"{key} {len(names)} (on the command line, or {key.split('.')[-1]}: {len(names)} " \
              "in the yaml)"
    raise ValueError(
        f"{key} is {value}, but the training set {name} has {_plural(len(names), 'class')}: "
        f"{names}. A head of {value} classes would train on {len(names)}-class data. Set {fix}.")


def check_training_data(cfg) -> Optional[List[str]]:
    """Before training: every registered ``DATASETS.TRAIN`` set has annotations (sets registered
    from ``DATASETS.REGISTER`` know their count without loading), the class count matches
    (:func:`check_num_classes`), and the input size is not far from the training images' size
    (a warning naming ``INPUT.FIXED_SIZE``). A test set without annotations is a warning (it
    gives no AP). Returns the training class names (or None).

    Raises:
        DatasetContentError: a training set without any annotation.
        ValueError: from :func:`check_num_classes`.
    """
    registered = set(DatasetCatalog.list())
    for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
        for name in names:
            if name not in registered:
                continue
            meta = MetadataCatalog.get(name)
            if meta.get("num_instances", None) != 0:
                continue
            source = meta.get("json_file", None) or meta.get("dirname", name)
            if key == "DATASETS.TRAIN":
                raise DatasetContentError(
                    f"DATASETS.TRAIN names '{name}', which has no annotations ({source} has "
                    f"{meta.get('num_images', '?')} images and 0 boxes): a detector learns "
                    "nothing from it. Check the annotation file, or use the set in DATASETS.TEST "
                    "for inference only.")
            logger.warning("DATASETS.TEST names '%s', which has no annotations (%s): its "
                           "evaluation gives no AP", name, source)
    for name in cfg.DATASETS.TRAIN:
        if name in registered:
            _warn_input_size(cfg, name)
    return check_num_classes(cfg)


def _warn_input_size(cfg, name: str) -> None:
    size = MetadataCatalog.get(name).get("image_size_median", None)
    if not size:
        return
    w, h = size
    short_target = max(cfg.INPUT.MIN_SIZE_TRAIN)
    scale = min(short_target / min(w, h), cfg.INPUT.MAX_SIZE_TRAIN / max(w, h))
    if abs(math.log(scale)) <= math.log(1.25):
        return
    logger.warning(
        "Training images of '%s' are %dx%d px (median) and INPUT.MIN_SIZE_TRAIN %s / "
        "INPUT.MAX_SIZE_TRAIN %s resize them by %.2f to about %dx%d. To train at their own size, "
        "set INPUT.FIXED_SIZE %d (train and test), or the four INPUT.MIN/MAX_SIZE_TRAIN/TEST keys.",
        name, w, h, tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MAX_SIZE_TRAIN, scale,
        round(w * scale), round(h * scale), max(w, h))
