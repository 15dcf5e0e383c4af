"""``shapes_{train,val}``: a deterministic synthetic detection set, generated on first use.

It is the embedded default that needs no download, so it is made hard enough that a small student
clearly trails a larger teacher, yet learnable:

* 6 classes defined by *shape* only (colours are random), in easily confused pairs:
  circle / ellipse, square / rectangle, filled / hollow (circle / ring); plus triangles;
* textured backgrounds: a random muted two-colour gradient, low-frequency noise, and unlabelled
  clutter (random lines and small irregular blobs); objects are bright in at least one channel
  (figure/ground contrast as in real scenes: a from-scratch detector must learn it within the
  demo's few CPU minutes, measured: the version-2 set with object-like clutter gave < 1 AP);
* 1 to 6 objects per image, sizes log-uniform between ``SHAPES_MIN_SIZE`` and
  ``SHAPES_MAX_SIZE`` px (the larger side of the un-occluded shape), random rotation;
* later objects are drawn over earlier ones; an object more than ``SHAPES_MAX_OCCLUSION`` hidden
  (measured on the drawn masks) gets no annotation, and every box is tight around the *visible*
  drawn pixels;
* pixel noise over everything, sometimes a slight blur.

On-disk layout (one self-contained folder per split, so it can be renamed into place atomically)::

    $DETECTRON2_DATASETS/shapes/{train,val}/
        images/{split}_000001.jpg ...
        annotations.json          COCO-style, category ids 1..6
        COMPLETE                  marker: generator version + parameter hash

Every image is drawn from its own RNG seeded with ``(seed, index)``; the same parameters give the
same files every time.
"""
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .errors import datasets_root

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_IMAGE_SIZE",
    "SHAPES_NUM_IMAGES",
    "SHAPES_SEEDS",
    "SHAPES_MIN_SIZE",
    "SHAPES_MAX_SIZE",
    "SHAPES_MAX_OBJECTS",
    "SHAPES_MAX_OCCLUSION",
    "generate_shapes",
    "shapes_split_paths",
    "load_shapes",
    "register_shapes",
    "register_all_shapes",
]

logger = logging.getLogger(__name__)

SHAPES_VERSION = 3  # bump whenever the drawn content changes: complete splits are then replaced
SHAPES_CLASSES = (
    "circle",
    "ellipse",
    "square",
    "rectangle",
    "triangle",
    "ring",
)
SHAPES_IMAGE_SIZE = 128
SHAPES_NUM_IMAGES = {"train": 1500, "val": 300}
SHAPES_SEEDS = {"train": 1, "val": 2}
SHAPES_MIN_SIZE = 6
SHAPES_MAX_SIZE = 96
SHAPES_MAX_OBJECTS = 6
SHAPES_MAX_OCCLUSION = 0.5  # drop an object when more than this fraction of it is hidden
SHAPES_MIN_VISIBLE_SIDE = 4  # and when its visible box is smaller than this (px, larger side)
_JPEG_QUALITY = 95
_MARKER = "COMPLETE"


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random gradient + low-frequency noise + unlabelled clutter, float32 [H, W, 3] in 0..255."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    # muted colours: objects stand out by contrast, as in real scenes, but the texture stays
    c0, c1 = rng.uniform(20, 120, size=3), rng.uniform(20, 120, size=3)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    grid = int(rng.integers(3, 9))
    low = rng.normal(0, 1, size=(grid, grid, 3)).astype(np.float32)
    low = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    img = img + low * rng.uniform(6, 18)
    img = np.clip(img, 0, 255).astype(np.uint8)

    # clutter: lines and irregular blobs, never labelled
    for _ in range(int(rng.integers(1, 6))):
        p0 = tuple(int(v) for v in rng.integers(-size // 4, size + size // 4, size=2))
        p1 = tuple(int(v) for v in rng.integers(-size // 4, size + size // 4, size=2))
        color = tuple(int(v) for v in rng.integers(30, 150, size=3))
        cv2.line(img, p0, p1, color, int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 3))):
        n = int(rng.integers(7, 14))
        r = np.exp(rng.uniform(np.log(3), np.log(12)))
        ang = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        rad = r * rng.uniform(0.35, 1.0, size=n)
        c = rng.uniform(0, size, size=2)
        pts = np.stack([c[0] + rad * np.cos(ang), c[1] + rad * np.sin(ang)], 1)
        color = tuple(int(v) for v in rng.integers(30, 150, size=3))
        cv2.fillPoly(img, [np.round(pts).astype(np.int32)], color, cv2.LINE_AA)
    return img


def _fit_polygon(pts: np.ndarray, extent: float) -> np.ndarray:
    """Center ``pts`` [N, 2] at the origin and scale so that its larger box side is ``extent``."""
    lo, hi = pts.min(0), pts.max(0)
    pts = pts - (lo + hi) / 2
    return pts * (extent / max(float((hi - lo).max()), 1e-6))


def _rotate(pts: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return pts @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _shape_polygon(rng: np.random.Generator, cls: str, extent: float) -> np.ndarray:
    """Outline of a shape as a polygon [N, 2], centred at 0, larger box side ``extent``."""
    angle = rng.uniform(0, np.pi)
    if cls in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    elif cls == "ellipse":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        pts = _rotate(np.stack([np.cos(t), rng.uniform(0.45, 0.72) * np.sin(t)], 1), angle)
    elif cls == "square":
        pts = _rotate(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64), angle)
    elif cls == "rectangle":
        a = rng.uniform(0.35, 0.7)
        pts = _rotate(np.array([[-1, -a], [1, -a], [1, a], [-1, a]], dtype=np.float64), angle)
    elif cls == "triangle":
        t = angle + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.35, 0.35, size=3)
        r = rng.uniform(0.85, 1.15, size=3)
        pts = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    else:
        raise ValueError(f"unknown shape class {cls!r}")
    return _fit_polygon(pts, extent)


def _draw_shape_mask(rng: np.random.Generator, cls: str, extent: float, size: int) -> np.ndarray:
    """A bool mask [size, size] of one shape (larger box side ~``extent``) fully inside the image."""
    hollow = cls == "ring"
    thick = max(1, int(round(extent * rng.uniform(0.07, 0.16)))) if hollow else 0
    # a stroke of width `thick` adds about thick/2 on each side of the outline
    poly = _shape_polygon(rng, cls, max(extent - thick, 2.0))
    lo, hi = poly.min(0) - thick / 2, poly.max(0) + thick / 2
    cx = rng.uniform(-lo[0], size - 1 - hi[0]) if hi[0] - lo[0] < size - 1 else (size - 1) / 2
    cy = rng.uniform(-lo[1], size - 1 - hi[1]) if hi[1] - lo[1] < size - 1 else (size - 1) / 2
    pts = np.round((poly + [cx, cy]) * 4).astype(np.int32)  # 2 fractional bits (shift=2)
    mask = np.zeros((size, size), np.uint8)
    if hollow:
        cv2.polylines(mask, [pts], True, 1, thick, cv2.LINE_8, shift=2)
    else:
        cv2.fillPoly(mask, [pts], 1, cv2.LINE_8, shift=2)
    return mask.astype(bool)


def _draw_image(rng: np.random.Generator, size: int, return_masks: bool = False):
    """Draw one image: uint8 [size, size, 3] (BGR) and its COCO-style annotations (category ids
    1-based). With ``return_masks``, also a list with, per drawn object, its ``full`` and
    ``visible`` bool masks and its annotation (None when dropped as too occluded or too small)."""
    img = _background(rng, size).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    owner = np.full((size, size), -1, np.int16)
    objs = []
    for k in range(int(rng.integers(1, SHAPES_MAX_OBJECTS + 1))):
        cls_id = int(rng.integers(0, len(SHAPES_CLASSES)))
        extent = float(np.exp(rng.uniform(np.log(SHAPES_MIN_SIZE), np.log(SHAPES_MAX_SIZE))))
        mask = _draw_shape_mask(rng, SHAPES_CLASSES[cls_id], extent, size)
        area = int(mask.sum())
        if area == 0:
            continue
        # random colour with some contrast to what lies beneath (otherwise it would be invisible)
        under = img[mask].mean(0)
        for _ in range(8):
            color = rng.uniform(0, 255, size=3).astype(np.float32)
            color[int(rng.integers(0, 3))] = rng.uniform(190, 255)  # bright in one channel
            if np.abs(color - under).sum() > 120:
                break
        # per-object shading: a weak linear gradient over the colour
        g = rng.uniform(-25, 25, size=2).astype(np.float32)
        shade = (g[0] * (xx - 0.5) + g[1] * (yy - 0.5))[mask]
        img[mask] = np.clip(color[None, :] + shade[:, None], 0, 255)
        owner[mask] = k
        objs.append({"k": k, "category": cls_id, "area_full": area, "full": mask})

    anns, masks = [], []
    for o in objs:
        visible = owner == o["k"]
        n_vis = int(visible.sum())
        ann = None
        if n_vis > 0 and n_vis >= (1.0 - SHAPES_MAX_OCCLUSION) * o["area_full"]:
            ys, xs = np.nonzero(visible)
            x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
            w, h = x1 - x0 + 1, y1 - y0 + 1
            if max(w, h) >= SHAPES_MIN_VISIBLE_SIDE:
                ann = {
                    "bbox": [float(x0), float(y0), float(w), float(h)],
                    "category_id": o["category"] + 1,
                    "area": float(n_vis),
                    "iscrowd": 0,
                }
                anns.append(ann)
        if return_masks:
            masks.append({"full": o["full"], "visible": visible, "ann": ann})

    img = img + rng.normal(0, rng.uniform(3, 8), size=img.shape).astype(np.float32)
    if rng.uniform() < 0.3:
        img = cv2.GaussianBlur(img, (3, 3), rng.uniform(0.5, 0.9))
    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return (img, anns, masks) if return_masks else (img, anns)


# ------------------------------------------------------------------------------------------------
# generation on disk
# ------------------------------------------------------------------------------------------------
def _params(split: str, num_images: int, image_size: int, seed: int) -> Dict:
    return {
        "version": SHAPES_VERSION,
        "split": split,
        "num_images": int(num_images),
        "image_size": int(image_size),
        "seed": int(seed),
        "classes": list(SHAPES_CLASSES),
        "min_size": SHAPES_MIN_SIZE,
        "max_size": SHAPES_MAX_SIZE,
        "max_objects": SHAPES_MAX_OBJECTS,
        "max_occlusion": SHAPES_MAX_OCCLUSION,
        "jpeg_quality": _JPEG_QUALITY,
    }


def _params_hash(params: Dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def shapes_split_paths(root: str, split: str) -> Tuple[str, str]:
    """``(json_file, image_root)`` of a split under the shapes folder ``root``."""
    split_dir = os.path.join(root, split)
    return os.path.join(split_dir, "annotations.json"), os.path.join(split_dir, "images")


def _is_complete(split_dir: str, expected_hash: str) -> bool:
    try:
        with open(os.path.join(split_dir, _MARKER)) as f:
            return json.load(f).get("hash") == expected_hash
    except (OSError, ValueError):
        return False


def generate_shapes(
    root: str,
    split: str,
    num_images: Optional[int] = None,
    image_size: int = SHAPES_IMAGE_SIZE,
    seed: Optional[int] = None,
) -> Tuple[str, str]:
    """Generate one split of the shapes set into ``root/split`` unless it is already complete.

    Safe when several processes run it at once: each writes into its own temporary folder and
    renames it into place; if a complete split appears meanwhile, that one is kept.

    Args:
        root: the shapes folder (e.g. ``$DETECTRON2_DATASETS/shapes``).
        split: folder name of the split (``train``/``val`` or any other).
        num_images: default ``SHAPES_NUM_IMAGES[split]``.
        image_size: side of the square RGB images, px.
        seed: default ``SHAPES_SEEDS[split]``.

    Returns:
        ``(json_file, image_root)``.
    """
    if num_images is None:
        num_images = SHAPES_NUM_IMAGES[split]
    if seed is None:
        seed = SHAPES_SEEDS[split]
    params = _params(split, num_images, image_size, seed)
    digest = _params_hash(params)
    split_dir = os.path.join(root, split)
    json_file, image_root = shapes_split_paths(root, split)
    if _is_complete(split_dir, digest):
        return json_file, image_root

    os.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".tmp-{split}-", dir=root)
    try:
        tmp_images = os.path.join(tmp, "images")
        os.makedirs(tmp_images)
        images, annotations = [], []
        for idx in range(num_images):
            rng = np.random.default_rng([int(seed), idx])
            img, anns = _draw_image(rng, image_size)
            image_id = idx + 1
            file_name = f"{split}_{image_id:06d}.jpg"
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
            assert ok, "cv2 failed to encode a JPEG"
            with open(os.path.join(tmp_images, file_name), "wb") as f:
                f.write(buf.tobytes())
            images.append(
                {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
            )
            for a in anns:
                a.update(id=len(annotations) + 1, image_id=image_id)
                annotations.append(a)
        coco = {
            "info": {"description": "csgr_distill synthetic shapes", "params": params},
            "images": images,
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(SHAPES_CLASSES)],
        }
        with open(os.path.join(tmp, "annotations.json"), "w") as f:
            json.dump(coco, f)
        with open(os.path.join(tmp, _MARKER), "w") as f:
            json.dump({"hash": digest, "params": params}, f, sort_keys=True)
        _move_into_place(tmp, split_dir, digest)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        f"Generated shapes split '{split}' ({num_images} images) in {split_dir} "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return json_file, image_root


def _move_into_place(tmp: str, split_dir: str, digest: str) -> None:
    for _ in range(5):
        try:
            os.rename(tmp, split_dir)  # atomic; fails if split_dir exists and is not empty
            return
        except OSError:
            if _is_complete(split_dir, digest):
                return  # another process finished first: keep its copy
            # stale or incomplete (other parameters, other version): move it aside and retry
            stale = tempfile.mkdtemp(prefix=".stale-", dir=os.path.dirname(split_dir))
            try:
                os.rename(split_dir, os.path.join(stale, "old"))
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
    raise RuntimeError(f"Could not move the generated shapes split into {split_dir}")


# ------------------------------------------------------------------------------------------------
# registration
# ------------------------------------------------------------------------------------------------
def load_shapes(
    name: str, root: str, split: str, num_images=None, image_size=SHAPES_IMAGE_SIZE, seed=None
) -> List[Dict]:
    """Generate (if needed) and load a shapes split as detectron2 dataset dicts."""
    json_file, image_root = generate_shapes(root, split, num_images, image_size, seed)
    return load_coco_json(json_file, image_root, name)


def register_shapes(
    name: str,
    root: str,
    split: str,
    num_images: Optional[int] = None,
    image_size: int = SHAPES_IMAGE_SIZE,
    seed: Optional[int] = None,
) -> None:
    """Register a shapes split; nothing is generated until ``DatasetCatalog.get(name)``."""
    json_file, image_root = shapes_split_paths(root, split)
    DatasetCatalog.register(
        name, lambda: load_shapes(name, root, split, num_images, image_size, seed)
    )
    MetadataCatalog.get(name).set(
        thing_classes=list(SHAPES_CLASSES),
        thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES_CLASSES))},
        evaluator_type="coco",
        json_file=json_file,
        image_root=image_root,
        generated=True,  # its content follows from this code (csgr_distill.data.fingerprint)
    )


def register_all_shapes(root: Optional[str] = None) -> List[str]:
    """Register ``shapes_train`` / ``shapes_val`` under ``root/shapes`` (default
    ``$DETECTRON2_DATASETS/shapes``)."""
    shapes_root = os.path.join(datasets_root(root), "shapes")
    done = []
    registered = set(DatasetCatalog.list())
    for split in ("train", "val"):
        name = f"shapes_{split}"
        if name in registered:
            continue
        register_shapes(name, shapes_root, split)
        done.append(name)
    return done
