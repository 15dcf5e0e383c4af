"""What a registered dataset holds, as a small dict, for caches of results that depend on it
(``tools/benchmark.py gain`` keys its runs on it): the annotation files' bytes and the list of
image files with their sizes in bytes. A renamed set with the same files has the same
fingerprint; an edited annotation file, an added, removed or replaced image has another.

Image files are not read (a large set's images are gigabytes): an image replaced by one of the
same name and the same byte size (e.g. an uncompressed BMP edited in place) goes unnoticed.
"""
import hashlib
import json
import os
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .custom import voc_image_files

__all__ = ["dataset_fingerprint", "file_sha1"]

#: annotation file sha1 -> the image file names it lists (parsing a large json takes seconds)
_COCO_FILES: Dict[str, List[str]] = {}


def file_sha1(path: str) -> str:
    """sha1 hex digest (40 chars) of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dataset_fingerprint(name: str) -> Optional[dict]:
    """``{"annotations": sha1, "images": sha1, "num_images": int}`` of the registered dataset
    ``name``:

    * ``annotations``: the sha1 of its json (``json_file`` in its metadata), or of a VOC split's
      split file and every XML it lists (``dirname``, ``split``);
    * ``images``: the sha1 of the list of its image files (path relative to ``image_root`` /
      ``dirname``, in the annotations' order) with their sizes in bytes (-1: missing).

    None for an unregistered name, a set without those paths in its metadata, and sets generated
    by this project's code (metadata ``generated``: ``shapes_*``, whose content follows from the
    generator's code and parameters).
    """
    if name not in DatasetCatalog.list():
        return None
    meta = MetadataCatalog.get(name)
    if meta.get("generated", False):
        return None
    json_file, image_root = meta.get("json_file", None), meta.get("image_root", None)
    dirname, split = meta.get("dirname", None), meta.get("split", None)
    if json_file and image_root:
        annotations, root = file_sha1(json_file), image_root
        if annotations not in _COCO_FILES:
            with open(json_file) as f:
                _COCO_FILES[annotations] = [str(im["file_name"])
                                            for im in json.load(f).get("images") or []]
        files = _COCO_FILES[annotations]
    elif dirname and split:
        annotations, files = _voc(dirname, split)
        root = dirname
    else:
        return None
    h = hashlib.sha1()
    for rel in files:
        try:
            size = os.stat(os.path.join(root, rel)).st_size
        except OSError:
            size = -1
        h.update(f"{rel}\0{size}\n".encode())
    return {"annotations": annotations, "images": h.hexdigest(), "num_images": len(files)}


def _voc(dirname: str, split: str) -> Tuple[str, List[str]]:
    """sha1 of the split file and its XMLs (each with its relative path), and the image files
    (relative to ``dirname``) as :func:`csgr_distill.data.custom.read_voc` finds them."""
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    h = hashlib.sha1()
    with open(split_file, "rb") as f:
        text = f.read()
    h.update(text + b"\0")
    ids = [line.split()[0] for line in text.decode().splitlines() if line.strip()]
    for fid in ids:
        xml = os.path.join("Annotations", fid + ".xml")
        h.update(xml.encode() + b"\0")
        try:
            with open(os.path.join(dirname, xml), "rb") as f:
                h.update(f.read() + b"\0")
        except OSError:
            h.update(b"missing\0")
    images = voc_image_files(dirname, ids)
    return h.hexdigest(), [os.path.relpath(images[fid], dirname) for fid in ids]
