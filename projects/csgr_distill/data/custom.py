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
``difficult`` objects kept), evaluated with ``PascalVOCDetectionEvaluator`` (year 2012: the
area-under-curve AP). Paths: ``~`` and ``$DETECTRON2_DATASETS`` (default ``datasets``) are
expanded, other relative paths are relative to the working directory.

Registration (:func:`register_from_cfg`) reads each annotation file once and stops with one
error naming the file for: a missing json / image folder / VOC folder / split file / XML, an
unparsable file, no images, a json without categories or with annotations of unknown categories
or without ``area`` (COCO evaluation needs it), a VOC object whose class is not in the given list,
a VOC split without any object when the classes are to be read from it. It stores in the
metadata: ``thing_classes``, ``evaluator_type`` (``"coco"`` / ``"pascal_voc"``), the paths
(``json_file``, ``image_root`` / ``dirname``, ``split``, ``year``), and ``register_entry``,
``num_images``, ``num_instances``, ``image_size_median`` ((width, height) px).

Loading (``DatasetCatalog.get``) checks every image file (missing ones are an error listing
them) and every box (:func:`csgr_distill.data.checks.check_boxes`: slightly outside the image ->
clipped, far outside or empty -> skipped, each a counted warning naming the file).
"""
import argparse
import json
import logging
import os
import statistics
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances
from detectron2.structures import BoxMode

from .checks import DatasetContentError, DatasetFileNotFoundError, check_boxes, check_image_files
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
             "DATASETS.TRAIN / DATASETS.TEST (datasets/README.md)")
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
    (``MODEL.DISTILL.TEACHER.OPTS``), so its class count follows too.

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
                num_instances=summary["num_instances"],
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
    logger.info("Registered dataset '%s' (%s, %s): %d images, %d boxes, %d classes %s",
                entry.name, entry.format, entry.source, summary["num_images"],
                summary["num_instances"], len(summary["classes"]), list(summary["classes"]))
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
    """Validate a COCO json once, at registration; returns classes, id map, counts, sizes."""
    _require(entry, [("the annotation file (JSON_FILE)", entry.json_file, False),
                     ("the image folder (IMAGE_DIR)", entry.image_root, True)])
    src = entry.json_file
    try:
        with open(src) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DatasetContentError(f"{src} (dataset '{entry.name}') is not valid json: {e}") from e
    if not isinstance(data, dict):
        raise DatasetContentError(f"{src} (dataset '{entry.name}') is not a COCO instances json: "
                                  "expected an object with images, annotations, categories")
    images = data.get("images") or []
    if not images:
        raise DatasetContentError(
            f"{src} (dataset '{entry.name}') has no images: its 'images' list is empty or "
            "missing. An empty dataset cannot be trained or evaluated; check the file.")
    no_size = [im.get("file_name", im.get("id")) for im in images
               if im.get("width") is None or im.get("height") is None or "file_name" not in im]
    if no_size:
        raise DatasetContentError(
            f"{src} (dataset '{entry.name}'): {len(no_size)} images lack file_name, width or "
            f"height (e.g. {no_size[:3]}); every image needs id, file_name, width, height")
    categories = data.get("categories") or []
    if not categories:
        raise DatasetContentError(
            f"{src} (dataset '{entry.name}') has no categories: the class names come from its "
            "'categories' list ([{\"id\": 1, \"name\": \"cat\"}, ...]); add it")
    cats = sorted(categories, key=lambda c: int(c["id"]))
    ids = [int(c["id"]) for c in cats]
    names = [str(c["name"]) for c in cats]
    if len(set(ids)) != len(ids) or len(set(names)) != len(names):
        raise DatasetContentError(f"{src} (dataset '{entry.name}'): repeated category id or name "
                                  f"in its categories {list(zip(ids, names))}")
    annotations = data.get("annotations") or []
    known, image_ids = set(ids), {im["id"] for im in images}
    unknown = [a for a in annotations if int(a.get("category_id", -1)) not in known]
    if unknown:
        raise DatasetContentError(
            f"{src} (dataset '{entry.name}'): {len(unknown)} annotations have a category_id that "
            f"is not among its categories {dict(zip(ids, names))}, e.g. annotation "
            f"{unknown[0].get('id')} with category_id {unknown[0].get('category_id')}; add the "
            "category or fix the annotations")
    no_box = [a.get("id") for a in annotations if len(a.get("bbox") or []) != 4]
    if no_box:
        raise DatasetContentError(f"{src} (dataset '{entry.name}'): {len(no_box)} annotations "
                                  f"have no bbox [x, y, w, h], e.g. ids {no_box[:3]}")
    no_area = [a.get("id") for a in annotations if "area" not in a]
    if no_area:
        raise DatasetContentError(
            f"{src} (dataset '{entry.name}'): {len(no_area)} annotations have no 'area' (e.g. "
            f"ids {no_area[:3]}); COCO evaluation needs it: add \"area\": w * h of the box to "
            "each annotation")
    orphans = sum(1 for a in annotations if a.get("image_id") not in image_ids)
    if orphans:
        logger.warning("%s: %d annotations name an image_id that is not among its images; they "
                       "are not used", src, orphans)
    if not annotations:
        logger.warning("%s (dataset '%s') has no annotations: usable for inference only, not for "
                       "training or evaluation", src, entry.name)
    return dict(classes=names, id_map={i: k for k, i in enumerate(ids)},
                num_images=len(images), num_instances=len(annotations) - orphans,
                image_size_median=_median_size([(int(round(float(im["width"]))),
                                                 int(round(float(im["height"]))))
                                                for im in images]))


def load_custom_coco(entry: DatasetEntry) -> List[dict]:
    """detectron2's ``load_coco_json``, then every image file checked and every box checked
    (:func:`check_boxes`). Returns detectron2 dataset dicts (boxes XYWH_ABS)."""
    _require(entry, [("the annotation file (JSON_FILE)", entry.json_file, False),
                     ("the image folder (IMAGE_DIR)", entry.image_root, True)])
    dicts = load_coco_json(entry.json_file, entry.image_root, entry.name)
    check_image_files(dicts, entry.name, entry.source,
                      fix=f"put them in {entry.image_root} or fix IMAGE_DIR (the 4th item of the "
                          f"{REGISTER_KEY} entry)")
    return check_boxes(dicts, entry.source)


# ---- VOC ---------------------------------------------------------------------------------------
def read_voc(dirname: str, split: str, name: str = "") -> List[dict]:
    """Parse a VOC split as detectron2's ``load_voc_instances`` does, keeping the class *names*.

    Returns one dict per id of ``ImageSets/Main/<split>.txt``: ``file_name``
    (``JPEGImages/<id>.jpg``), ``image_id`` (the id), ``height``, ``width`` (from ``<size>``),
    ``xml`` (its path) and ``objects``: ``[(class name, [x0, y0, x1, y1])]`` with 1-based pixel
    corners made 0-based (``x0 - 1, y0 - 1``, as detectron2), ``difficult`` objects kept.
    (Own parser instead of ``load_voc_instances``: that one stops with a bare ``ValueError`` on
    an unknown class, without naming the file, and cannot read a one-image split.)

    Raises:
        DatasetFileNotFoundError: a missing folder, split file or XML.
        DatasetContentError: an empty split, an unparsable XML or one without size or boxes.
    """
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    label = f"dataset '{name}'" if name else "VOC split"
    with open(split_file) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise DatasetContentError(f"{split_file} ({label}) lists no images: an empty dataset "
                                  "cannot be trained or evaluated; one image id per line")
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
        records.append({"file_name": os.path.join(dirname, "JPEGImages", fid + ".jpg"),
                        "image_id": fid, "height": height, "width": width, "xml": xml,
                        "objects": objects})
    return records


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
    return dict(classes=classes, num_images=len(records),
                num_instances=sum(len(r["objects"]) for r in records),
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
    check_image_files(dicts, entry.name, entry.source,
                      fix=f"put them in {os.path.join(entry.dirname, 'JPEGImages')} as <id>.jpg")
    return check_boxes(dicts, entry.source)
