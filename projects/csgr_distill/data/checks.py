"""Checks of the data a config trains on: image files, boxes, class count, empty training sets,
classes without boxes, the test sets' class lists.

* :func:`check_image_files`: used when the user's own datasets (:mod:`csgr_distill.data.custom`)
  are registered and loaded; :func:`check_boxes`: on every load;
* :func:`check_num_classes`: the head's ``NUM_CLASSES`` against the training set's class list;
* :func:`check_training_data`: before training, every check of ``DATASETS.TRAIN`` and
  ``DATASETS.TEST`` together.
"""
import logging
import math
from typing import Iterable, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..detectors import num_classes_key, num_classes_of
from .errors import DatasetNotFoundError
from .images import read_headers

__all__ = [
    "BOX_TOLERANCE_PX",
    "BOX_TOLERANCE_FRACTION",
    "DatasetContentError",
    "DatasetFileNotFoundError",
    "check_boxes",
    "check_image_files",
    "classes_without_boxes",
    "training_class_names",
    "warn_classes_without_boxes",
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
                 key: Optional[str] = None, more: str = ""):
        self.dataset_name, self.missing, self.key = dataset_name, list(missing), key
        lines = [f"Dataset '{dataset_name}': files are missing:"]
        for what, path in self.missing:
            lines.append(f"  {what}: {path}")
        if fix:
            lines.append(f"Fix: {fix}.")
        if more:  # other problems of the same files, reported at once
            lines.append(more)
        FileNotFoundError.__init__(self, "\n".join(lines))


def _plural(n: int, word: str, plural: str = "") -> str:
    if n == 1:
        return f"1 {word}"
    return f"{n} {plural or (word + 'es' if word.endswith(('x', 's')) else word + 's')}"


# ------------------------------------------------------------------------------------------------
# per-load checks
# ------------------------------------------------------------------------------------------------
#: at most this many files of each kind are listed in an error (with the count of all)
MAX_LISTED = 10
#: EXIF orientations that swap width and height, as detectron2 applies them
_ROTATIONS = {5: "mirrored and turned", 6: "turned 90 degrees clockwise",
              7: "mirrored and turned", 8: "turned 90 degrees counter-clockwise"}


def check_image_files(dicts: Sequence[dict], name: str, source: str, fix: str = "",
                      size_key: str = "") -> None:
    """Every image of ``dicts`` (detectron2 dataset dicts: ``file_name``, ``width``, ``height``
    as the annotations give them) exists, is an image PIL opens, and has that size as detectron2
    reads it (after its EXIF orientation; :mod:`csgr_distill.data.images`: headers only, each
    file read once while unchanged). Otherwise training would stop when the sampler first draws
    the file (``FileNotFoundError``, ``PIL.UnidentifiedImageError``, ``SizeMismatchError``).

    One error lists every kind of problem, up to :data:`MAX_LISTED` files each with their count,
    and the fix of each. ``source``: the annotation file the message names; ``fix``: how to fix
    missing files; ``size_key``: where the sizes are written (default ``width/height in
    <source>``).

    Raises:
        DatasetFileNotFoundError: some files are missing (the other problems follow in the
            message).
        DatasetContentError: files that are no images or have another size.
    """

    size_key = size_key or f"width/height in {source}"
    headers = read_headers([d["file_name"] for d in dicts], source)
    missing, unreadable, resized, rotated = [], [], [], []
    for d, h in zip(dicts, headers):
        if isinstance(h, FileNotFoundError):
            missing.append(d["file_name"])
        elif isinstance(h, Exception):
            unreadable.append(f"{d['file_name']}: {type(h).__name__}: {h}")
        elif (h.width, h.height) != (d["width"], d["height"]):
            line = f"{d['file_name']}: {d['width']}x{d['height']} in the annotations, " \
                   f"{h.width}x{h.height} as detectron2 reads it"
            if h.orientation in _ROTATIONS:
                rotated.append(line + f" (stored {h.stored[0]}x{h.stored[1]}, EXIF orientation "
                                      f"{h.orientation}: {_ROTATIONS[h.orientation]})")
            else:
                resized.append(line)
    n = len(dicts)
    parts = []
    if unreadable:
        parts.append(_listing(
            unreadable, n, source, "not an image file that PIL opens",
            f"replace each with the image itself (a renamed file of another type, an error page "
            f"or an interrupted download is no image), or remove it and its annotations from "
            f"{source}"))
    if rotated:
        parts.append(_listing(
            rotated, n, source, "EXIF-rotated to another size than the annotations give",
            f"detectron2 (like image viewers) applies the orientation. If the boxes were drawn "
            f"on the rotated view (as browsers and most annotation tools show it), write the size "
            f"detectron2 reads as {size_key}; if they were drawn on the stored pixels, remove "
            f"the EXIF orientation tag from the files (docs/own_data.md, \"Image checks\")"))
    if resized:
        parts.append(_listing(
            resized, n, source, "of another size than the annotations give",
            f"write each file's size as {size_key} (and check that its boxes are in that image's "
            f"pixels), or replace the file with the annotated image"))
    if missing:
        shown = missing[:MAX_LISTED] + ([f"... and {len(missing) - MAX_LISTED} more"]
                                        if len(missing) > MAX_LISTED else [])
        raise DatasetFileNotFoundError(
            name, [(f"{len(missing)} of {n} images listed in {source}", "\n    ".join(shown))],
            fix=fix, more="\n".join(parts))
    if parts:
        raise DatasetContentError(
            f"Dataset '{name}': images listed in {source} cannot be trained on as they are; "
            "detectron2 would stop at the first one the sampler draws.\n" + "\n".join(parts))


def _listing(lines: List[str], total: int, source: str, what: str, fix: str) -> str:
    shown = [f"  {line}" for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        shown.append(f"  ... and {len(lines) - MAX_LISTED} more")
    head = f"{len(lines)} of {total} images listed in {source} " + \
        ("is " if len(lines) == 1 else "are ") + what + ":"
    return "\n".join([head] + shown + [f"Fix: {fix}."])


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
    ``MODEL.ROI_HEADS.NUM_CLASSES`` for R-CNN; see :func:`csgr_distill.detectors.num_classes_key`)
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
    empty = classes_without_boxes(cfg.DATASETS.TRAIN)
    dead = (f"; without the classes that have no boxes, {empty}, it would be "
            f"{len(names) - len(empty)} (docs/own_data.md, \"Classes without boxes\")"
            if empty else "")
    raise ValueError(
        f"{key} is {value}, but the training set {name} has {_plural(len(names), 'class')}: "
        f"{names}. A head of {value} classes would train on {len(names)}-class data. Set {fix}"
        f"{dead}.")


def classes_without_boxes(names: Sequence[str]) -> List[str]:
    """The classes that no training box (``iscrowd`` 0) of the sets ``names`` has, from the
    ``class_box_counts`` their registration stored (:mod:`csgr_distill.data.custom`); [] when a
    set's counts are unknown (built-in sets) or the sets' class lists differ."""
    counts, classes = None, None
    for name in names:
        if name not in DatasetCatalog.list():
            return []
        meta = MetadataCatalog.get(name)
        per_class, these = meta.get("class_box_counts", None), meta.get("thing_classes", None)
        if per_class is None or these is None or (classes is not None and these != classes):
            return []
        classes = list(these)
        counts = list(per_class) if counts is None else [a + b for a, b in zip(counts, per_class)]
    return [c for c, n in zip(classes or [], counts or []) if n == 0]


def warn_classes_without_boxes(names: Sequence[str], key: str = "DATASETS.TRAIN") -> List[str]:
    """One warning naming every class of :func:`classes_without_boxes` (a head trained on these
    sets would have a class that never occurs; COCO exporters often write e.g. an id-0
    supercategory), where it comes from and how to drop it. Returns those classes."""
    empty = classes_without_boxes(names)
    if not empty:
        return empty
    where = []
    for name in names:
        meta = MetadataCatalog.get(name)
        if meta.get("dataset_format", None) == "coco":
            ids = {k: i for i, k in meta.thing_dataset_id_to_contiguous_id.items()}
            cats = ", ".join(f"'{c}' (id {ids[meta.thing_classes.index(c)]})" for c in empty)
            where.append(f"delete {cats} from the \"categories\" of {meta.json_file}")
        elif meta.get("dataset_format", None) == "voc":
            where.append(f"remove {empty} from the class list of the {name!r} entry (its 5th "
                         "item, or the last field of --register-dataset)")
    logger.warning(
        "Classes without boxes in %s %s: %s. The head gets an output for each that never occurs "
        "in training. To drop them: %s; the class count is then %d, and the test set needs the "
        "same class list (docs/own_data.md, \"Classes without boxes\").", key, list(names),
        empty,
        "; ".join(dict.fromkeys(where)) or "remove them from the set's class list",
        len(MetadataCatalog.get(names[0]).thing_classes) - len(empty))
    return empty


def check_training_data(cfg) -> Optional[List[str]]:
    """Before training: every registered ``DATASETS.TRAIN`` set has annotations to train on
    (sets registered from ``DATASETS.REGISTER`` know their count without loading; ``iscrowd``
    regions do not count: detectron2 drops them, and a set of crowd regions only would end in its
    "No valid data found"), the class count matches (:func:`check_num_classes`), and the input
    size is not far from the training images' size (a warning naming ``INPUT.FIXED_SIZE``). A
    class without any box in the training sets is a warning
    (:func:`warn_classes_without_boxes`), and so is a test set without annotations (it gives no
    AP). Returns the training class names (or None).

    Raises:
        DatasetContentError: a training set without any annotation to train on.
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
            crowd = meta.get("num_crowd", 0)
            boxes = f"0 boxes and {crowd} iscrowd regions" if crowd else "0 boxes"
            if key == "DATASETS.TRAIN":
                raise DatasetContentError(
                    f"DATASETS.TRAIN names '{name}', which has no annotations to train on "
                    f"({source} has {meta.get('num_images', '?')} images and {boxes}"
                    + ("; detectron2 skips iscrowd regions in training" if crowd else "")
                    + "): a detector learns nothing from it. "
                    + ("Set \"iscrowd\": 0 on the annotations of single objects" if crowd else
                       "Check the annotation file")
                    + ", or use the set in DATASETS.TEST for inference only.")
            logger.warning("DATASETS.TEST names '%s', which has no annotations (%s: %s): its "
                           "evaluation gives no AP", name, source, boxes)
    train = [n for n in cfg.DATASETS.TRAIN if n in registered]
    for name in train:
        _warn_input_size(cfg, name)
    warn_classes_without_boxes(train)
    _check_test_classes(cfg)
    return check_num_classes(cfg)


def _check_test_classes(cfg) -> None:
    """Every ``DATASETS.TEST`` set with known classes has the training class list: the
    evaluators map the model's class k to the test set's k-th class."""
    found = training_class_names(cfg, load=False)
    if found is None:
        return
    train, classes = found
    for name in cfg.DATASETS.TEST:
        names = _class_names(name, load=False)
        if names is not None and names != classes:
            raise DatasetContentError(
                f"DATASETS.TEST names '{name}', whose classes {names} are not the training "
                f"classes {classes} of '{train}': its evaluation would score the model's class k "
                f"as the test set's k-th class. Give both one class list, same names in the same "
                f"order (COCO: the same \"categories\" in both jsons; VOC: the class list in "
                f"both entries).")


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
