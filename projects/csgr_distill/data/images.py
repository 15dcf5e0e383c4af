"""Image files read as detectron2 reads them, without decoding a pixel: the size after the EXIF
orientation, for :func:`csgr_distill.data.checks.check_image_files`.

detectron2's ``read_image`` opens a file with PIL, applies its EXIF orientation
(``_apply_exif_orientation``: orientations 5-8 swap width and height) and ``check_image_size``
then requires (width, height) to equal the dataset dict's, else ``SizeMismatchError`` when the
sampler first draws the image. :func:`read_header` gives that size from the file's header:
``PIL.Image.open`` reads the header only (size, and for JPEG the APP1 EXIF segment), and the
orientation is read with PIL's EXIF reader from the bytes already read (``Image.getexif`` of the
base class: for JPEG, WebP, TIFF and PNG chunks before the image data; PNG's own ``getexif``
would decode the image first). A PNG ``eXIf`` chunk written after the image data (allowed, and
read by detectron2 after decoding) is looked for in the file's last 16 KiB
(:func:`_png_late_exif`).

Headers are remembered per file (its path, mtime in ns and size in bytes): in the process,
and on disk for sets of at least :data:`CACHE_MIN_IMAGES` images (:func:`read_headers`), so an
unchanged dataset is read once, however many processes load it.
"""
import hashlib
import json
import logging
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

from PIL import ExifTags, Image

__all__ = [
    "CACHE_MIN_IMAGES",
    "ImageHeader",
    "cache_file",
    "read_header",
    "read_headers",
]

logger = logging.getLogger(__name__)

#: detectron2's ``_EXIF_ORIENT`` (274)
ORIENTATION_TAG = ExifTags.Base.Orientation
#: EXIF orientations detectron2 applies by a transpose that swaps width and height (transpose,
#: rotate 270, transverse, rotate 90)
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
#: sets with at least this many images keep their headers in a cache file (smaller ones are read
#: in well under a second)
CACHE_MIN_IMAGES = 1000
#: bytes at the end of a PNG searched for an eXIf chunk after the image data
PNG_TAIL_BYTES = 1 << 14  # an EXIF block with a thumbnail may be larger: not found
#: threads reading headers (file opens wait on the disk or network, not on the CPU)
READ_THREADS = 8
_CACHE_VERSION = 1


class ImageHeader(NamedTuple):
    """An image file as detectron2 reads it: ``width`` x ``height`` after the EXIF orientation;
    ``orientation`` the EXIF value (1 when absent); ``stored`` (width, height) of the pixels in
    the file."""

    width: int
    height: int
    orientation: int
    stored: Tuple[int, int]


def read_header(path: str) -> ImageHeader:
    """The size of the image file ``path`` as detectron2's ``read_image`` returns it, from its
    header.

    Raises:
        whatever ``PIL.Image.open`` raises for a file that is not an image it can open
        (``PIL.UnidentifiedImageError``, ``OSError``, ``Image.DecompressionBombError``, ...).
    """
    with Image.open(path) as im:
        stored = im.size
        orientation = _orientation(im, path)
    w, h = stored
    if orientation in SWAPPING_ORIENTATIONS:
        w, h = h, w
    return ImageHeader(w, h, orientation, stored)


def _orientation(im: Image.Image, path: str) -> int:
    """EXIF orientation of an opened image (1: none), as detectron2 takes it: an unreadable EXIF
    block counts as none."""
    try:
        value = Image.Image.getexif(im).get(ORIENTATION_TAG)
        if value is None and im.format == "PNG":
            value = _png_late_exif(path)
    except Exception:  # noqa: BLE001  (detectron2: "exif = None" on any error, issue 1885)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _png_late_exif(path: str) -> Optional[int]:
    """The orientation in a PNG ``eXIf`` chunk after the image data (PIL reads those only while
    decoding), or None. Such a chunk sits between the last ``IDAT`` and ``IEND``, so only the
    file's last :data:`PNG_TAIL_BYTES` are read (walking the chunks from the start would read
    most of the file: encoders write ``IDAT`` in 8 KiB pieces); a chunk is taken when its CRC
    matches."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(8, f.tell() - PNG_TAIL_BYTES))
        tail = f.read()
    at = tail.find(b"eXIf", 4)
    while at >= 0:
        (length,) = struct.unpack(">I", tail[at - 4:at])
        end = at + 4 + length
        if end + 4 <= len(tail) and \
                struct.unpack(">I", tail[end:end + 4])[0] == zlib.crc32(tail[at:end]):
            exif = Image.Exif()
            exif.load(b"Exif\x00\x00" + tail[at + 4:end])
            return exif.get(ORIENTATION_TAG)
        at = tail.find(b"eXIf", at + 1)
    return None


# ------------------------------------------------------------------------------------------------
# many files: remembered in the process and, for large sets, on disk
# ------------------------------------------------------------------------------------------------
#: path -> (mtime_ns, size, header): headers read in this process
_SEEN: Dict[str, Tuple[int, int, ImageHeader]] = {}


def cache_file(source: str) -> str:
    """The header cache of the set described by ``source`` (its annotation file):
    ``<cache dir>/csgr_distill/image_headers/<sha1 of the absolute path>.json``, the cache dir
    being iopath's (``$FVCORE_CACHE``, default ``~/.torch/iopath_cache``, where detectron2
    keeps its downloads)."""
    from iopath.common.file_io import get_cache_dir

    digest = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:16]
    return os.path.join(get_cache_dir(), "csgr_distill", "image_headers", digest + ".json")


def _load_cache(path: str) -> None:
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("version") != _CACHE_VERSION:
            return
        for file_name, (mtime, size, w, h, o, sw, sh) in data["files"].items():
            _SEEN.setdefault(file_name, (mtime, size, ImageHeader(w, h, o, (sw, sh))))
    except (OSError, ValueError, KeyError, TypeError):  # absent or damaged: read the files
        return


def _save_cache(path: str, paths: Sequence[str]) -> None:
    files = {p: [_SEEN[p][0], _SEEN[p][1], *_SEEN[p][2][:3], *_SEEN[p][2].stored]
             for p in paths if p in _SEEN}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as f:
            json.dump({"version": _CACHE_VERSION, "files": files}, f)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file
    except OSError as e:  # a read-only cache dir costs a re-read next time, nothing else
        logger.debug("image header cache %s not written: %s", path, e)
        if os.path.exists(tmp):
            os.remove(tmp)


def read_headers(paths: Sequence[str], source: str = "") -> List[Union[ImageHeader, Exception]]:
    """For each of ``paths``: its :class:`ImageHeader`, or the exception that stopped it
    (``FileNotFoundError`` for a missing file, another ``OSError`` when it cannot be opened, PIL's
    error for a file that is not an image it reads).

    A file whose path, mtime and size are unchanged since it was last read (in this process, or
    in the cache file of ``source`` when there are at least :data:`CACHE_MIN_IMAGES` paths) is
    not read again; the others are read by :data:`READ_THREADS` threads. Failures are never
    cached."""
    use_disk = bool(source) and len(paths) >= CACHE_MIN_IMAGES
    if use_disk:
        _load_cache(cache_file(source))
    out: List = [None] * len(paths)
    todo: List[Tuple[int, str, int, int]] = []
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
        except OSError as e:  # FileNotFoundError: missing; others (permissions): unreadable
            out[i] = e
            continue
        seen = _SEEN.get(p)
        if seen is not None and seen[:2] == (st.st_mtime_ns, st.st_size):
            out[i] = seen[2]
        else:
            todo.append((i, p, st.st_mtime_ns, st.st_size))

    def read(item):
        try:
            return read_header(item[1])
        except Exception as e:  # noqa: BLE001  (reported per file by the caller)
            return e

    if todo:
        with ThreadPoolExecutor(min(READ_THREADS, len(todo))) as pool:
            for (i, p, mtime, size), result in zip(todo, pool.map(read, todo)):
                out[i] = result
                if isinstance(result, ImageHeader):
                    _SEEN[p] = (mtime, size, result)
        if use_disk:
            _save_cache(cache_file(source), paths)
    return out
