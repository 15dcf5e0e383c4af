"""The user's own datasets, named in the config (``DATASETS.REGISTER``) or on a tool's command line
(``--register-dataset``), registered without code.

An entry is a list of strings:

    [NAME, "coco", JSON_FILE, IMAGE_DIR]
    [NAME, "voc", VOC_ROOT, SPLIT]                         classes: every object name of the
                                                           split's XMLs, sorted alphabetically
    [NAME, "voc", VOC_ROOT, SPLIT, "class1,class2,..."]    classes in this order (ids 0..K-1)

COCO: a COCO instances json (``images`` with ``id, file_name, width, height``; ``annotations``
with ``image_id, category_id, bbox [x, y, w, h], area``; ``categories`` with ``id, name``) and the
folder that holds the images named by ``file_name``; registered with detectron2's
``register_coco_instances`` and loaded with its ``load_coco_json``; class names are the json's
categories sorted by id (mapped to contiguous ids ``0..K-1``). VOC: a VOC-style folder::

    VOC_ROOT/Annotations/<id>.xml   JPEGImages/<id>.jpg   ImageSets/Main/<SPLIT>.txt

read with detectron2's conventions (``load_voc_instances``: 1-based pixel corners, boxes XYXY_ABS,
``difficult`` objects kept; an image may also be ``<id>.png``, ``.jpeg``, ... when there is no
``<id>.jpg``), evaluated with ``PascalVOCDetectionEvaluator`` (year 2012: the area-under-curve
AP). Paths: ``~`` and ``$DETECTRON2_DATASETS`` (default ``datasets``) are expanded, other relative
paths are relative to the working directory.

Registration (:func:`register_from_cfg`) reads each annotation file once and stops with one
error naming the file and the fix for: a missing json / image folder / VOC folder / split file /
XML, an unparsable file, no images; in a json: no categories, an image without id, file_name or
a numeric width/height, an image id or file given twice, an annotation without a unique integer
id, with an unknown or non-integer category_id, a bbox that is not 4 finite numbers (e.g.
strings), without a numeric ``area`` (COCO evaluation needs it), an ``iscrowd`` other than 0/1
or an ``ignore`` flag (detectron2 refuses it); in VOC: an id listed twice, an object whose class
is not in the given list, a split without any object when the classes are to be read from it.
Then every image file (:func:`csgr_distill.data.checks.check_image_files`): missing, not an image,
or of another size than the annotations give as detectron2 reads it (after the EXIF
orientation), all listed in one error. It stores in the metadata: ``thing_classes``,
``evaluator_type`` (``"coco"`` / ``"pascal_voc"``), the paths (``json_file``, ``image_root`` /
``dirname``, ``split``, ``year``), and ``register_entry``, ``num_images``, ``num_instances`` (boxes
trained on: ``iscrowd`` 0), ``num_crowd``, ``class_box_counts`` (boxes trained on per class, in
``thing_classes`` order), ``image_size_median`` ((width, height) px).

Loading (``DatasetCatalog.get``) checks the image files again (files unchanged since they were
read are not re-read) and every box (:func:`csgr_distill.data.checks.check_boxes`: slightly
outside the image -> clipped, far outside or empty -> skipped, each a counted warning naming the
file).
"""
import argparse
import json
import logging
import math
import os
import statistics
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances
from detectron2.structures import BoxMode

from .checks import (DatasetContentError, DatasetFileNotFoundError, check_boxes, check_image_files,
                     warn_classes_without_boxes)
from .errors import datasets_root

__all__ = [
    "FORMATS",
    "REGISTER_KEY",
    "DATASET_FLAG",
    "DatasetEntry",
    "DatasetEntryError",
    "parse_entry",
    "parse_register",
    "parse_dataset_argument",
    "register_entry",
    "register_from_cfg",
    "add_dataset_arguments",
    "apply_dataset_arguments",
    "replace_entries",
    "pipeline_overrides",
    "load_custom_coco",
    "load_custom_voc",
    "read_voc",
]

logger = logging.getLogger(__name__)

FORMATS = ("coco", "voc")
REGISTER_KEY = "DATASETS.REGISTER"
DATASET_FLAG = "--register-dataset"
#: VOC metric of custom VOC sets (PascalVOCDetectionEvaluator: 2007 = 11-point AP, 2012 = area)
VOC_YEAR = 2012
_FORMS = {
    "coco": '[NAME, "coco", JSON_FILE, IMAGE_DIR]',
    "voc": '[NAME, "voc", VOC_ROOT, SPLIT] or [NAME, "voc", VOC_ROOT, SPLIT, "class1,class2"]',
}
_FLAG_FORMS = "NAME=coco:JSON_FILE:IMAGE_DIR or NAME=voc:VOC_ROOT:SPLIT[:class1,class2,...]"


class DatasetEntryError(ValueError):
    """A malformed ``DATASETS.REGISTER`` entry or ``--register-dataset`` value, or a name that is
    already registered with other files."""


@dataclass(frozen=True)
class DatasetEntry:
    """One parsed entry; paths absolute.

    Attributes:
        name: the dataset name (``DATASETS.TRAIN`` / ``TEST`` use it).
        format: ``"coco"`` or ``"voc"``.
        json_file, image_root: COCO's annotation file and image folder.
        dirname, split: VOC's root folder and split (``ImageSets/Main/<split>.txt``).
        classes: VOC's class list as given; ``()`` = read from the XMLs.
    """

    name: str
    format: str
    json_file: str = ""
    image_root: str = ""
    dirname: str = ""
    split: str = ""
    classes: Tuple[str, ...] = ()

    def as_list(self) -> List[str]:
        """The entry in the ``DATASETS.REGISTER`` form (absolute paths)."""
        if self.format == "coco":
            return [self.name, "coco", self.json_file, self.image_root]
        return [self.name, "voc", self.dirname, self.split, ",".join(self.classes)]

    @property
    def source(self) -> str:
        """The annotation source that messages name: the json file or the VOC split file."""
        if self.format == "coco":
            return self.json_file
        return os.path.join(self.dirname, "ImageSets", "Main", self.split + ".txt")


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------
def resolve_path(path: str) -> str:
    """``$DETECTRON2_DATASETS`` (default ``datasets``), other variables and ``~`` expanded; then
    absolute (relative to the working directory)."""
    root = datasets_root()
    for var in ("${DETECTRON2_DATASETS}", "$DETECTRON2_DATASETS"):
        path = path.replace(var, root)
    return os.path.abspath(os.path.expanduser(os.path.expandvars(path)))


def parse_entry(entry, where: str = REGISTER_KEY) -> DatasetEntry:
    """One ``DATASETS.REGISTER`` entry (a list or tuple of strings) as a :class:`DatasetEntry`.

    Raises:
        DatasetEntryError: naming ``where`` and the expected form.
    """
    if isinstance(entry, str) or not isinstance(entry, (list, tuple)):
        raise DatasetEntryError(
            f"{where}: {entry!r} is not a list. Each entry is a list: {_FORMS['coco']} or "
            f"{_FORMS['voc']}, e.g. {REGISTER_KEY} \"[['mydata_train', 'coco', 'data/train.json', "
            "'data/images']]\"")
    items = [str(x).strip() if x is not None else "" for x in entry]
    fmt = items[1].lower() if len(items) > 1 else ""
    if fmt not in FORMATS:
        raise DatasetEntryError(
            f"{where}: {list(entry)!r} has format {fmt or 'nothing'!r}; the second item is one of "
            f"{', '.join(FORMATS)}: {_FORMS['coco']} or {_FORMS['voc']}")
    name = items[0]
    if not name or any(c.isspace() for c in name):
        raise DatasetEntryError(f"{where}: {list(entry)!r} needs a dataset name without spaces as "
                                "its first item")
    sizes = {"coco": (4,), "voc": (4, 5)}[fmt]
    if len(items) not in sizes or not all(items[2:4]):
        raise DatasetEntryError(f"{where}: {list(entry)!r} is not of the form {_FORMS[fmt]}")
    if fmt == "coco":
        return DatasetEntry(name, fmt, json_file=resolve_path(items[2]),
                            image_root=resolve_path(items[3]))
    raw = entry[4] if len(entry) == 5 else ""
    if isinstance(raw, (list, tuple)):
        classes = tuple(str(c).strip() for c in raw)
    else:
        classes = tuple(c.strip() for c in str(raw or "").split(",")) if str(raw or "").strip() \
            else ()
    if any(not c for c in classes) or len(set(classes)) != len(classes):
        raise DatasetEntryError(f"{where}: the class list {raw!r} of '{name}' has an empty or "
                                "repeated name; give each class once, comma-separated, or \"\" to "
                                "read the classes from the XMLs")
    return DatasetEntry(name, fmt, dirname=resolve_path(items[2]), split=items[3],
                        classes=classes)


def parse_register(entries, where: str = REGISTER_KEY) -> List[DatasetEntry]:
    """Every entry of a ``DATASETS.REGISTER`` value, identical repeats dropped.

    Raises:
        DatasetEntryError: a malformed entry, or one name given with two different entries.
    """
    if isinstance(entries, str):
        raise DatasetEntryError(
            f"{where} is the string {entries!r}; it is a list of entries, e.g. "
            f"{REGISTER_KEY} \"[['mydata_train', 'coco', 'data/train.json', 'data/images']]\"")
    parsed: Dict[str, DatasetEntry] = {}
    for i, raw in enumerate(entries or []):
        entry = parse_entry(raw, f"{where} entry {i + 1}")
        old = parsed.get(entry.name)
        if old is not None and old != entry:
            raise DatasetEntryError(
                f"{where} gives dataset '{entry.name}' twice with other files: {old.as_list()} and "
                f"{entry.as_list()}. Keep one of them, or give the other another name.")
        parsed[entry.name] = entry
    return list(parsed.values())


def parse_dataset_argument(text: str) -> List[str]:
    """``NAME=FORMAT:PATH[:PATH...]`` (the ``--register-dataset`` value) as a REGISTER entry:
    ``mydata_train=coco:data/train.json:data/images`` -> ``['mydata_train', 'coco',
    'data/train.json', 'data/images']``; ``myvoc=voc:data/VOC:train:cat,dog`` -> ``['myvoc',
    'voc', 'data/VOC', 'train', 'cat,dog']``. Paths cannot contain ``:`` here (use
    ``DATASETS.REGISTER`` for those)."""
    where = f"{DATASET_FLAG} {text!r}"
    if "=" not in text:
        raise DatasetEntryError(f"{where}: write {_FLAG_FORMS}")
    name, rest = text.split("=", 1)
    items = [name.strip()] + rest.split(":")
    parse_entry(items, where)  # validate the form now, with the flag named
    return items


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def add_dataset_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the repeatable ``--register-dataset NAME=FORMAT:PATH[:PATH...]`` to a tool's parser
    (``args.register_dataset``: list of str). Give it before the trailing ``KEY VALUE``
    overrides (detectron2's parser takes everything after the first of them as overrides)."""
    parser.add_argument(
        DATASET_FLAG, dest="register_dataset", action="append", default=[],
        metavar="NAME=FORMAT:PATH[:PATH...]",
        help=f"register a dataset of your own (repeatable): {_FLAG_FORMS}; then name it in "
             "DATASETS.TRAIN / DATASETS.TEST (docs/own_data.md)")
    return parser


def apply_dataset_arguments(args, cfg):
    """Append ``args.register_dataset`` to ``cfg.DATASETS.REGISTER`` (cfg not frozen); an entry
    of the same name already in the config (its yaml) is replaced: the command line wins, as for
    ``KEY VALUE`` overrides. Returns ``cfg``."""
    return replace_entries(cfg, getattr(args, "register_dataset", None) or [])


def replace_entries(cfg, values: Sequence[str]):
    """``cfg.DATASETS.REGISTER`` plus the ``--register-dataset`` ``values``
    (``NAME=FORMAT:PATH[:PATH...]``), each replacing the entry of its name; returns ``cfg``."""
    if not values:
        return cfg
    new = [parse_dataset_argument(v) for v in values]
    names = {e[0] for e in new}
    kept = [list(e) for e in cfg.DATASETS.REGISTER
            if not (isinstance(e, (list, tuple)) and e and str(e[0]) in names)]
    cfg.DATASETS.REGISTER = kept + new
    return cfg


def pipeline_overrides(register: Sequence[str] = (), train: Optional[str] = None,
                       test: Optional[str] = None) -> List[str]:
    """``KEY VALUE`` overrides that move a whole pipeline (teacher, baseline and distilled
    students, evaluations: ``tools/demo.py``, ``tools/benchmark.py gain``) onto other data.

    ``register``: ``--register-dataset`` values (registered here, to learn their classes, and
    passed on as ``DATASETS.REGISTER``); ``train`` / ``test``: dataset names for
    ``DATASETS.TRAIN`` / ``DATASETS.TEST``. With ``train``, the class count of every head
    (``MODEL.RETINANET.NUM_CLASSES``, ``MODEL.ROI_HEADS.NUM_CLASSES``) is its number of classes and
    the teacher built by a distilled student reads the same training set
    (``MODEL.DISTILL.TEACHER.OPTS``), so its class count follows too; a class of ``train``
    without boxes is a warning (:func:`csgr_distill.data.checks.warn_classes_without_boxes`).

    Raises:
        DatasetEntryError: a malformed value, or ``train`` / ``test`` not registered.
    """
    entries = []
    for value in register:
        entries.append(parse_dataset_argument(value))
        register_entry(parse_entry(entries[-1], f"{DATASET_FLAG} {value}"))
    opts: List[str] = []
    if entries:
        opts += ["DATASETS.REGISTER", repr(entries)]
    for flag, name in (("--train", train), ("--test", test)):
        if name and name not in DatasetCatalog.list():
            raise DatasetEntryError(
                f"{flag} {name!r} is not a registered dataset: register it with {DATASET_FLAG} "
                f"{name}=coco:JSON_FILE:IMAGE_DIR (or =voc:VOC_ROOT:SPLIT), or name a built-in "
                "one (datasets/README.md)")
    if train:
        classes = MetadataCatalog.get(train).get("thing_classes", None)
        if classes is None:
            DatasetCatalog.get(train)
            classes = MetadataCatalog.get(train).get("thing_classes", None)
        if not classes:
            raise DatasetContentError(f"--train {train!r} has no class names (thing_classes)")
        warn_classes_without_boxes([train], "--train")
        k = str(len(classes))
        opts += ["DATASETS.TRAIN", repr((train,)), "MODEL.RETINANET.NUM_CLASSES", k,
                 "MODEL.ROI_HEADS.NUM_CLASSES", k,
                 "MODEL.DISTILL.TEACHER.OPTS", repr(["DATASETS.TRAIN", (train,)])]
    if test:
        opts += ["DATASETS.TEST", repr((test,))]
    return opts


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
def register_from_cfg(cfg) -> List[str]:
    """Register every ``DATASETS.REGISTER`` entry of ``cfg``; returns their names in order.

    Idempotent: a name already registered from the same entry is skipped. Every tool calls it
    after merging its config (the teacher's config gets the student's entries, see
    :func:`csgr_distill.teacher.build_teacher_cfg`).

    Raises:
        DatasetEntryError: a malformed entry, or a name already registered otherwise (a builtin
            name, or the same name with other files).
        DatasetFileNotFoundError, DatasetContentError: see :mod:`csgr_distill.data.custom`.
    """
    if "REGISTER" not in cfg.DATASETS:
        return []
    return [register_entry(e) for e in parse_register(cfg.DATASETS.REGISTER)]


def register_entry(entry: DatasetEntry) -> str:
    """Register one entry (reading its annotation file once); returns its name."""
    if entry.name in DatasetCatalog.list():
        prev = MetadataCatalog.get(entry.name).get("register_entry", None)
        if prev is not None and tuple(prev) == tuple(entry.as_list()):
            return entry.name
        if prev is not None:
            raise DatasetEntryError(
                f"Dataset '{entry.name}' is already registered with other files: "
                f"{list(prev)}; now {entry.as_list()}. Give the new one another name.")
        raise DatasetEntryError(
            f"'{entry.name}' is already a registered dataset (a builtin of detectron2 or of this "
            f"project); give your {REGISTER_KEY} entry another name, e.g. 'my_{entry.name}'.")
    if entry.format == "coco":
        summary = _scan_coco(entry)
    else:
        summary = _scan_voc(entry)
    if entry.name in MetadataCatalog.list():  # stale metadata of a removed registration
        MetadataCatalog.remove(entry.name)
    meta = dict(register_entry=tuple(entry.as_list()), dataset_format=entry.format,
                thing_classes=list(summary["classes"]), num_images=summary["num_images"],
                num_instances=summary["num_instances"], num_crowd=summary["num_crowd"],
                class_box_counts=list(summary["class_box_counts"]),
                image_size_median=summary["image_size_median"])
    if entry.format == "coco":
        register_coco_instances(entry.name, {}, entry.json_file, entry.image_root)
        DatasetCatalog.remove(entry.name)  # the checked loader instead of the plain one
        DatasetCatalog.register(entry.name, lambda e=entry: load_custom_coco(e))
        meta["thing_dataset_id_to_contiguous_id"] = summary["id_map"]
    else:
        DatasetCatalog.register(entry.name, lambda e=entry: load_custom_voc(e))
        meta.update(dirname=entry.dirname, split=entry.split, year=VOC_YEAR,
                    evaluator_type="pascal_voc")
    MetadataCatalog.get(entry.name).set(**meta)
    crowd = f" (and {summary['num_crowd']} iscrowd regions)" if summary["num_crowd"] else ""
    logger.info("Registered dataset '%s' (%s, %s): %d images (checked), %d boxes%s, %d classes "
                "%s", entry.name, entry.format, entry.source, summary["num_images"],
                summary["num_instances"], crowd, len(summary["classes"]),
                list(summary["classes"]))
    return entry.name


def _require(entry: DatasetEntry, paths: Sequence[Tuple[str, str, bool]]) -> None:
    """Raise one :class:`DatasetFileNotFoundError` listing every missing path of ``entry``."""
    missing = [(what, path) for what, path, is_dir in paths
               if not (os.path.isdir(path) if is_dir else os.path.isfile(path))]
    if missing:
        raise DatasetFileNotFoundError(
            entry.name, missing,
            fix=f"fix the path in its {REGISTER_KEY} entry ({_FORMS[entry.format]}) or "
                f"{DATASET_FLAG} value")


def _median_size(sizes: List[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
    if not sizes:
        return None
    return (int(statistics.median(w for w, _ in sizes)),
            int(statistics.median(h for _, h in sizes)))


# ---- COCO --------------------------------------------------------------------------------------
def _scan_coco(entry: DatasetEntry) -> dict:
    """Validate a COCO json once, at registration (its image files too: :func:`check_image_files`);
    returns classes, id map, counts (boxes trained on, crowd boxes, boxes per class), sizes."""
    _require(entry, [("the annotation file (JSON_FILE)", entry.json_file, False),
                     ("the image folder (IMAGE_DIR)", entry.image_root, True)])
    src = entry.json_file
    where = f"{src} (dataset '{entry.name}')"
    try:
        with open(src) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetContentError(f"{where} is not valid json: {e}") from e
    if not isinstance(data, dict):
        raise DatasetContentError(f"{where} is not a COCO instances json: expected an object with "
                                  "images, annotations, categories")
    images = data.get("images") or []
    if not images:
        raise DatasetContentError(
            f"{where} has no images: its 'images' list is empty or missing. An empty dataset "
            "cannot be trained or evaluated; check the file.")
    _check_coco_images(images, where)
    categories = data.get("categories") or []
    if not categories:
        raise DatasetContentError(
            f"{where} has no categories: the class names come from its 'categories' list "
            "([{\"id\": 1, \"name\": \"cat\"}, ...]); add it")
    if not all(isinstance(c, dict) and _is_id(c.get("id"), str_ok=False) and "name" in c
               for c in categories):
        raise DatasetContentError(f"{where}: every category needs an integer id and a name "
                                  "({\"id\": 1, \"name\": \"cat\"})")
    cats = sorted(categories, key=lambda c: c["id"])
    ids = [c["id"] for c in cats]
    names = [str(c["name"]) for c in cats]
    if len(set(ids)) != len(ids) or len(set(names)) != len(names):
        raise DatasetContentError(f"{where}: repeated category id or name in its categories "
                                  f"{list(zip(ids, names))}")
    annotations = data.get("annotations") or []
    _check_coco_annotations(annotations, dict(zip(ids, names)), where)
    image_ids = {im["id"] for im in images}
    used = [a for a in annotations if a["image_id"] in image_ids]
    if len(used) < len(annotations):
        logger.warning("%s: %d annotations name an image_id that is not among its images; they "
                       "are not used", src, len(annotations) - len(used))
    if not annotations:
        logger.warning("%s (dataset '%s') has no annotations: usable for inference only, not for "
                       "training or evaluation", src, entry.name)
    id_map = {i: k for k, i in enumerate(ids)}
    per_class = [0] * len(ids)
    crowd = 0
    for a in used:
        if a.get("iscrowd", 0):  # detectron2 trains on iscrowd == 0 only
            crowd += 1
        else:
            per_class[id_map[a["category_id"]]] += 1
    check_image_files(
        [{"file_name": os.path.join(entry.image_root, im["file_name"]), "width": im["width"],
          "height": im["height"]} for im in images], entry.name, src, fix=_image_dir_fix(entry))
    return dict(classes=names, id_map=id_map, num_images=len(images),
                num_instances=sum(per_class), num_crowd=crowd, class_box_counts=per_class,
                image_size_median=_median_size([(int(round(im["width"])),
                                                 int(round(im["height"]))) for im in images]))


def _image_dir_fix(entry: DatasetEntry) -> str:
    return (f"put them in {entry.image_root} or fix IMAGE_DIR (the 4th item of the "
            f"{REGISTER_KEY} entry)")


def _is_number(value) -> bool:
    """A finite int or float (JSON number), not a bool or a string."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _is_id(value, str_ok: bool = True) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or \
        (str_ok and isinstance(value, str))


def _examples(items: List[str], k: int = 3) -> str:
    return "; ".join(items[:k]) + (f" (and {len(items) - k} more)" if len(items) > k else "")


def _repeats(values: Sequence, key=lambda v: v) -> List[Tuple[int, int]]:
    """(first index, later index) for every value whose key was seen before."""
    first, pairs = {}, []
    for i, v in enumerate(values):
        j = first.setdefault(key(v), i)
        if j != i:
            pairs.append((j, i))
    return pairs


def _check_coco_images(images: List[dict], where: str) -> None:
    """Every image has an id (int or str), a file_name and a positive numeric width and height;
    no id and no file is given twice."""
    lacking = [f"images[{i}]" for i, im in enumerate(images)
               if not isinstance(im, dict) or any(k not in im for k in
                                                  ("id", "file_name", "width", "height"))]
    if lacking:
        raise DatasetContentError(
            f"{where}: {len(lacking)} of {len(images)} images lack id, file_name, width or "
            f"height (e.g. {_examples(lacking)}); every image needs id, file_name, width, height")
    bad_id = [f"images[{i}]: id {im['id']!r}" for i, im in enumerate(images)
              if not _is_id(im["id"])]
    if bad_id:
        raise DatasetContentError(f"{where}: {len(bad_id)} of {len(images)} images have an id "
                                  f"that is not an integer, e.g. {_examples(bad_id)}. Write each "
                                  "image's id as an integer")
    bad_size = [f"images[{i}] ({im['file_name']}): width {im['width']!r}, height "
                f"{im['height']!r}" for i, im in enumerate(images)
                if not (_is_number(im["width"]) and _is_number(im["height"])
                        and im["width"] > 0 and im["height"] > 0)]
    if bad_size:
        raise DatasetContentError(
            f"{where}: {len(bad_size)} of {len(images)} images have a width or height that is "
            f"not a positive number, e.g. {_examples(bad_size)}. Write the image size in pixels "
            "as numbers (\"width\": 640, \"height\": 480), not strings")
    twice = _repeats(images, key=lambda im: im["id"])
    if twice:
        lines = [f"id {images[i]['id']!r}: images[{j}] ({images[j]['file_name']}) and "
                 f"images[{i}] ({images[i]['file_name']})" for j, i in twice]
        raise DatasetContentError(
            f"{where}: {len(twice)} image ids are given twice: {_examples(lines)}. pycocotools "
            "keeps the last entry of an id: its file would train with the boxes of every entry "
            "of the id, and the other files would not be trained. Give every image its own id, "
            "and each annotation the image_id of its image")
    same_file = _repeats(images, key=lambda im: os.path.normpath(str(im["file_name"])))
    if same_file:
        lines = [f"{images[i]['file_name']}: images[{j}] (id {images[j]['id']!r}) and "
                 f"images[{i}] (id {images[i]['id']!r})" for j, i in same_file]
        raise DatasetContentError(
            f"{where}: {len(same_file)} image files are listed twice: {_examples(lines)}. Each "
            "entry would train the same pixels with only its own boxes. Merge the entries of a "
            "file into one (one id; the annotations' image_id set to it)")


def _check_coco_annotations(annotations: List[dict], categories: Dict[int, str],
                            where: str) -> None:
    """What detectron2's ``load_coco_json``, its training and COCO evaluation need of every
    annotation: a unique id, an image_id, a known integer category_id, a bbox of 4 finite numbers,
    a numeric area, iscrowd 0/1 if given, no ``ignore`` flag."""
    def refuse(test, problem: str, shown: str, fix: str):
        """Raise naming how many annotations fail ``test``, up to three of them (``shown``: a
        field to print, or "") and the fix."""
        bad = [a for a in annotations if test(a)]
        if bad:
            lines = [f"annotation id {a.get('id')!r}" + (f": {shown} {a.get(shown)!r}" if shown
                                                        else "") for a in bad]
            raise DatasetContentError(f"{where}: {len(bad)} of {len(annotations)} annotations "
                                      f"{problem}, e.g. {_examples(lines)}. {fix}")

    not_dict = [i for i, a in enumerate(annotations) if not isinstance(a, dict)]
    if not_dict:
        raise DatasetContentError(f"{where}: annotations[{not_dict[0]}] is not an object")
    refuse(lambda a: not _is_id(a.get("id"), str_ok=False), "have no integer id", "",
           "COCO evaluation and detectron2 index annotations by id: number them 1, 2, ...")
    twice = _repeats(annotations, key=lambda a: a["id"])
    if twice:
        j, i = twice[0]
        raise DatasetContentError(
            f"{where}: {len(twice)} annotation ids are given twice, e.g. id "
            f"{annotations[i]['id']} (annotations[{j}] and annotations[{i}]): detectron2 refuses "
            "the file and COCO evaluation would keep one of them. Give every annotation its own "
            "id")
    refuse(lambda a: not _is_id(a.get("image_id")), "have no image_id", "image_id",
           "Give each the id of its image")
    refuse(lambda a: not _is_id(a.get("category_id"), str_ok=False),
           "have a category_id that is not an integer", "category_id",
           "Write the id of its category as a number")
    refuse(lambda a: a["category_id"] not in categories,
           f"have a category_id that is not among its categories {categories}", "category_id",
           "Add the category or fix the annotations")
    refuse(lambda a: not isinstance(a.get("bbox"), (list, tuple)) or len(a["bbox"]) != 4,
           "have no bbox [x, y, w, h]", "bbox", "Give each annotation its box in pixels")
    refuse(lambda a: not all(_is_number(v) for v in a["bbox"]),
           "have a bbox whose values are not finite numbers", "bbox",
           "Write them as numbers (\"bbox\": [28.0, 12.5, 30.0, 40.0]), not strings")
    refuse(lambda a: "area" not in a, "have no 'area'", "",
           "COCO evaluation needs it: add \"area\": w * h of the box to each annotation")
    refuse(lambda a: not _is_number(a["area"]), "have an area that is not a number", "area",
           "Write it as a number (w * h of the box)")
    refuse(lambda a: a.get("iscrowd", 0) not in (0, 1), "have an iscrowd that is not 0 or 1",
           "iscrowd", "1 marks a crowd region (not trained on, ignored by COCO evaluation), 0 an "
           "object")
    refuse(lambda a: a.get("ignore", 0) not in (0, False), "have an 'ignore' flag", "ignore",
           "detectron2 refuses it: mark such regions with \"iscrowd\": 1 instead, or remove them")


def load_custom_coco(entry: DatasetEntry) -> List[dict]:
    """detectron2's ``load_coco_json``, then every image file checked (:func:`check_image_files`;
    unchanged files are not read again) and every box checked (:func:`check_boxes`). Returns
    detectron2 dataset dicts (boxes XYWH_ABS)."""
    _require(entry, [("the annotation file (JSON_FILE)", entry.json_file, False),
                     ("the image folder (IMAGE_DIR)", entry.image_root, True)])
    dicts = load_coco_json(entry.json_file, entry.image_root, entry.name)
    check_image_files(dicts, entry.name, entry.source, fix=_image_dir_fix(entry))
    return check_boxes(dicts, entry.source)


# ---- VOC ---------------------------------------------------------------------------------------
def read_voc(dirname: str, split: str, name: str = "") -> List[dict]:
    """Parse a VOC split as detectron2's ``load_voc_instances`` does, keeping the class *names*.

    Returns one dict per id of ``ImageSets/Main/<split>.txt``: ``file_name``
    (``JPEGImages/<id>.jpg``, else the first of ``<id>`` + :data:`VOC_IMAGE_EXTENSIONS` there; a
    missing file keeps the ``.jpg`` name), ``image_id`` (the id), ``height``, ``width`` (from
    ``<size>``),
    ``xml`` (its path) and ``objects``: ``[(class name, [x0, y0, x1, y1])]`` with 1-based pixel
    corners made 0-based (``x0 - 1, y0 - 1``, as detectron2), ``difficult`` objects kept.
    (Own parser instead of ``load_voc_instances``: that one stops with a bare ``ValueError`` on
    an unknown class, without naming the file, and cannot read a one-image split.)

    Raises:
        DatasetFileNotFoundError: a missing folder, split file or XML.
        DatasetContentError: an empty split, an id listed twice, an unparsable XML or one
            without size or boxes.
    """
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    label = f"dataset '{name}'" if name else "VOC split"
    with open(split_file) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise DatasetContentError(f"{split_file} ({label}) lists no images: an empty dataset "
                                  "cannot be trained or evaluated; one image id per line")
    twice = _repeats(ids)
    if twice:
        raise DatasetContentError(
            f"{split_file} ({label}) lists {len(twice)} image ids twice, e.g. "
            f"'{ids[twice[0][1]]}' (entries {twice[0][0] + 1} and {twice[0][1] + 1}): the image "
            "would be trained twice and VOC evaluation would count its objects twice. List each "
            "id once")
    images = voc_image_files(dirname, ids)
    xmls = [os.path.join(dirname, "Annotations", i + ".xml") for i in ids]
    missing = [x for x in xmls if not os.path.isfile(x)]
    if missing:
        raise DatasetFileNotFoundError(
            name or split, [(f"the annotation of {len(missing)} of {len(ids)} images listed in "
                             f"{split_file}, e.g.", p) for p in missing[:3]],
            fix="add the XML files to Annotations/ or remove those ids from the split file")
    records = []
    for fid, xml in zip(ids, xmls):
        try:
            tree = ET.parse(xml)
            width = int(float(tree.find("./size/width").text))
            height = int(float(tree.find("./size/height").text))
        except ET.ParseError as e:
            raise DatasetContentError(f"{xml} ({label}) is not valid XML: {e}") from e
        except (AttributeError, TypeError, ValueError) as e:
            raise DatasetContentError(f"{xml} ({label}) has no <size><width>/<height>: detectron2 "
                                      "needs the image size from it") from e
        objects = []
        for obj in tree.findall("object"):
            box = obj.find("bndbox")
            try:
                cls = obj.find("name").text.strip()
                xyxy = [float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (AttributeError, TypeError, ValueError) as e:
                raise DatasetContentError(f"{xml} ({label}) has an <object> without <name> or "
                                          "<bndbox> xmin/ymin/xmax/ymax") from e
            xyxy[0] -= 1.0
            xyxy[1] -= 1.0
            objects.append((cls, xyxy))
        records.append({"file_name": images[fid], "image_id": fid, "height": height,
                        "width": width, "xml": xml, "objects": objects})
    return records


#: image files of a VOC id besides ``JPEGImages/<id>.jpg``, in the order they are looked for
#: (lower case, then upper case)
VOC_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def voc_image_files(dirname: str, ids: Sequence[str]) -> Dict[str, str]:
    """id -> its image file in ``JPEGImages/``: ``<id>.jpg`` (detectron2's VOC name), else the
    first ``<id><ext>`` of :data:`VOC_IMAGE_EXTENSIONS` (lower, then upper case) that exists;
    ``<id>.jpg`` when none does (reported missing later). One directory listing."""
    folder = os.path.join(dirname, "JPEGImages")
    present = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    exts = VOC_IMAGE_EXTENSIONS + tuple(e.upper() for e in VOC_IMAGE_EXTENSIONS)
    return {fid: os.path.join(folder, next((fid + e for e in exts if fid + e in present),
                                           fid + ".jpg"))
            for fid in ids}


def _voc_fix(entry: DatasetEntry) -> str:
    return (f"put them in {os.path.join(entry.dirname, 'JPEGImages')} as <id>.jpg (or "
            f"{', '.join(VOC_IMAGE_EXTENSIONS[1:])})")


#: where a VOC set's image sizes are written, for messages
_VOC_SIZE_KEY = "<size><width>/<height> in the image's XML (Annotations/<id>.xml)"


def _scan_voc(entry: DatasetEntry) -> dict:
    """Validate a VOC split once, at registration; returns classes, counts, sizes."""
    split_file = entry.source
    _require(entry, [("the VOC folder (VOC_ROOT)", entry.dirname, True),
                     ("its Annotations/ folder", os.path.join(entry.dirname, "Annotations"), True),
                     ("its JPEGImages/ folder", os.path.join(entry.dirname, "JPEGImages"), True)])
    if not os.path.isfile(split_file):
        main = os.path.join(entry.dirname, "ImageSets", "Main")
        have = sorted(f[:-4] for f in os.listdir(main) if f.endswith(".txt")) \
            if os.path.isdir(main) else []
        raise DatasetFileNotFoundError(
            entry.name, [("the split file (SPLIT)", split_file)],
            fix=f"create it (one image id per line) or name an existing split"
                + (f": {', '.join(have)}" if have else ""))
    records = read_voc(entry.dirname, entry.split, entry.name)
    found = sorted({cls for r in records for cls, _ in r["objects"]})
    if entry.classes:
        _check_voc_classes(records, entry)
        classes = list(entry.classes)
    else:
        if not found:
            raise DatasetContentError(
                f"No <object> in any XML of {split_file} (dataset '{entry.name}'), so no class "
                "names can be read from them: give the classes in the entry "
                f"({_FORMS['voc']}) if this set is meant to be empty")
        classes = found
    counts = Counter(cls for r in records for cls, _ in r["objects"])
    per_class = [counts[c] for c in classes]
    check_image_files(records, entry.name, split_file, fix=_voc_fix(entry),
                      size_key=_VOC_SIZE_KEY)
    return dict(classes=classes, num_images=len(records), num_instances=sum(per_class),
                num_crowd=0, class_box_counts=per_class,
                image_size_median=_median_size([(r["width"], r["height"]) for r in records]))


def _check_voc_classes(records: List[dict], entry: DatasetEntry) -> None:
    for r in records:
        for cls, _ in r["objects"]:
            if cls not in entry.classes:
                raise DatasetContentError(
                    f"{r['xml']} (dataset '{entry.name}') has an object of class '{cls}', which "
                    f"is not in the class list {list(entry.classes)} of its {REGISTER_KEY} entry: "
                    "add it to the list, or give \"\" to read the classes from the XMLs")


def load_custom_voc(entry: DatasetEntry) -> List[dict]:
    """The VOC split as detectron2 dataset dicts (as ``load_voc_instances`` makes them: boxes
    XYXY_ABS, ``category_id`` = index in the class list), image files and boxes checked."""
    _require(entry, [("the VOC folder (VOC_ROOT)", entry.dirname, True),
                     ("the split file (SPLIT)", entry.source, False)])
    classes = list(MetadataCatalog.get(entry.name).thing_classes)
    records = read_voc(entry.dirname, entry.split, entry.name)
    _check_voc_classes(records, DatasetEntry(entry.name, "voc", classes=tuple(classes)))
    dicts = [{"file_name": r["file_name"], "image_id": r["image_id"], "height": r["height"],
              "width": r["width"],
              "annotations": [{"category_id": classes.index(cls), "bbox": list(box),
                               "bbox_mode": BoxMode.XYXY_ABS} for cls, box in r["objects"]]}
             for r in records]
    check_image_files(dicts, entry.name, entry.source, fix=_voc_fix(entry),
                      size_key=_VOC_SIZE_KEY)
    return check_boxes(dicts, entry.source)
