#!/usr/bin/env python
"""Look at a student (distilled or baseline) and its teacher with detectron2's Visualizer. For
each image ``<stem>`` (its file name without extension), writes PNGs:

* ``<stem>_detections.png``: ground truth | teacher | student; each model's ``--top-k`` best
  detections at or above ``--score-floor`` (scores on the labels, the rule on the panel), so a
  weak or young model still shows what it finds;
* for each method of ``MODEL.DISTILL.METHODS`` that has pictures (a module
  ``csgr_distill.vis.<method in lower case>``), its pictures ``<stem>_<method>_*.png``, e.g.
  CSGR's class attention and criss-cross attention, FGD's masks and attention, TAR's Gaussian
  mask and shared RoIs, LD's regions and distributions, DETRDistill's target-aware mask and
  matches (each module's docstring says what it draws).

    tools/visualize.py --config-file configs/demo/CSGR-RetinaNet-R18.yaml \\
        --weights output/demo/student_csgr/model_final.pth --dataset shapes_val --output vis/
    tools/visualize.py --config-file configs/demo/student-RetinaNet-R18.yaml \\
        --weights output/demo/student_baseline/model_final.pth --images 0,7,000012.png --output vis/
    tools/visualize.py --config-file configs/own-data/CSGR-RetinaNet-R50.yaml \
        --weights output/own-data/csgr/model_final.pth \
        --register-dataset mydata_val=voc:/data/MyVOC:val --dataset mydata_val --output vis/

``--weights``: the student's checkpoint: a training checkpoint (``model_final.pth``; it holds the
distiller's learned parts, which the attention pictures need) or an exported plain student. The
teacher comes from ``MODEL.DISTILL.TEACHER.*`` of the config and is drawn when it is configured
and its weights exist (a baseline config with a teacher configured too); without it, or with
``--no-teacher``, the student is built with distillation off and drawn alone, and no teacher
weights are read. A known user error prints one message (``--debug``: the traceback).
"""
import argparse
import os
import sys
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from detectron2.utils.visualizer import Visualizer

import csgr_distill  # noqa: F401  (registrations)
from csgr_distill.checkpoint import RecordingCheckpointer
from csgr_distill.cli import (CliError, add_debug_argument, load_config, parse_args_anywhere,
                              run_cli)
from csgr_distill.data import add_dataset_arguments
from csgr_distill.data.errors import check_datasets
from csgr_distill.export import StudentCheckpointer, without_distillation
from csgr_distill.meta_arch.base import in_channel_order
from csgr_distill.teacher import FrozenTeacher, build_teacher_cfg
from csgr_distill.vis import (captioned, draw_detections, grid, lower_score_threshold, rule_text,
                              top_detections)
from csgr_distill.vis.pictures import method_pictures, picture_level, pictures_for, save_rgb


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True,
                   help="the student's config: a distillation config or a baseline one")
    p.add_argument("--weights", required=True, help="the student's checkpoint (.pth)")
    p.add_argument("--dataset", default=None, help="registered dataset (default DATASETS.TEST[0])")
    p.add_argument("--num-images", type=int, default=3,
                   help="draw the first N images of the dataset (when --images is not given)")
    p.add_argument("--images", action="append", default=[], metavar="NAME_OR_INDEX[,...]",
                   help="images to draw, by file name (with or without extension) or 0-based "
                        "index in the dataset, comma-separated; repeatable")
    p.add_argument("--output", required=True, help="folder for the PNG files")
    p.add_argument("--top-k", type=int, default=10,
                   help="draw each model's K best detections per image (0: no limit)")
    p.add_argument("--score-floor", type=float, default=0.05,
                   help="... among those scoring at least this")
    p.add_argument("--no-teacher", action="store_true",
                   help="draw ground truth | student only; nothing of the teacher is read")
    p.add_argument("--level", default=None,
                   help="level of the method pictures (attention, FGD's and TAR's masks); "
                        "default p3, or the first level the methods distil when the student "
                        "has no p3 (e.g. res5 of a DETR)")
    p.add_argument("--pixel", type=int, nargs=2, metavar=("I", "J"), default=None,
                   help="grid cell (row, col) on --level for the criss-cross attention "
                        "(default: the centre of the largest ground-truth box)")
    p.add_argument("--min-display-size", type=int, default=320,
                   help="small images are enlarged to at least this short side for drawing")
    add_debug_argument(p)
    add_dataset_arguments(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = parse_args_anywhere(p, argv)
    if args.score_floor < 0 or args.score_floor > 1:
        p.error(f"--score-floor {args.score_floor}: a score between 0 and 1")
    return args


# ------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------
def select_images(dicts: List[dict], selectors: Sequence[str], num_images: int,
                  dataset: str) -> List[dict]:
    """The dataset dicts named by ``selectors`` (``--images`` values: comma-separated file names,
    stems or 0-based indices), in the given order; without selectors the first ``num_images``."""
    tokens = [t.strip() for s in selectors for t in s.split(",") if t.strip()]
    if not tokens:
        return dicts[:num_images]
    by_name: Dict[str, int] = {}
    for i, d in enumerate(dicts):
        path = d["file_name"]
        for key in (path, os.path.basename(path), os.path.splitext(os.path.basename(path))[0]):
            by_name.setdefault(key, i)
    chosen = []
    for t in tokens:
        if t.lstrip("-").isdigit():
            i = int(t)
            if not -len(dicts) <= i < len(dicts):
                raise CliError(f"--images {t}: {dataset} has {len(dicts)} images, so an index is "
                               f"0..{len(dicts) - 1}")
            chosen.append(dicts[i])
        elif t in by_name:
            chosen.append(dicts[by_name[t]])
        else:
            examples = ", ".join(os.path.basename(d["file_name"]) for d in dicts[:3])
            raise CliError(f"--images {t}: no image of that name in {dataset} (its files are "
                           f"named e.g. {examples}); give a file name, its stem, or a 0-based "
                           "index")
    return chosen


def image_stems(dicts: List[dict]) -> List[str]:
    """File-name stems, made unique with ``-<image_id>`` where two images share one."""
    stems = [os.path.splitext(os.path.basename(d["file_name"]))[0] for d in dicts]
    return [f"{s}-{d.get('image_id', i)}" if stems.count(s) > 1 else s
            for i, (s, d) in enumerate(zip(stems, dicts))]


def model_input(image, aug, height, width):
    image = aug.get_transform(image).apply_image(image)
    return {"image": torch.as_tensor(image.transpose(2, 0, 1).astype("float32")),
            "height": height, "width": width}


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def find_teacher(cfg) -> Tuple[bool, str]:
    """(the teacher can be drawn, why not). Reads configs only (no weights are loaded)."""
    if not cfg.MODEL.DISTILL.TEACHER.CONFIG:
        return False, "no teacher configured (MODEL.DISTILL.TEACHER.CONFIG is empty)"
    try:
        tcfg = build_teacher_cfg(cfg)
    except (FileNotFoundError, ValueError, LookupError) as e:
        return False, str(e)
    weights = tcfg.MODEL.WEIGHTS
    if not weights:
        return False, "the teacher has no weights (MODEL.DISTILL.TEACHER.WEIGHTS is empty)"
    if "://" not in weights and not PathManager.exists(weights):
        return False, (f"the teacher's weights {weights!r} do not exist "
                       "(MODEL.DISTILL.TEACHER.WEIGHTS)")
    return True, ""


def build_models(cfg, weights: str, use_teacher: bool, notes: List[str]):
    """(student, teacher or None, {method: distiller} of the methods whose pictures are drawn).

    The student is built with distillation on only when some method's pictures can be drawn (a
    configured method with pictures, :func:`~csgr_distill.vis.pictures_for`; the teacher
    available; the checkpoint holding that distiller's tensors); otherwise with distillation
    off, loading a training checkpoint's student part."""
    methods = list(cfg.MODEL.DISTILL.METHODS) if cfg.MODEL.DISTILL.ENABLED else []
    drawable = [m for m in methods if pictures_for(m) is not None]
    others = [m for m in methods if m not in drawable]
    if others:
        notes.append(f"no method pictures for {others} (no module csgr_distill.vis.<method in "
                     "lower case>)")
    if drawable and use_teacher:
        student = build_model(cfg)
        loader = RecordingCheckpointer(student, what="--weights")
        loader.load(weights)
        student.eval()
        missing = loader.incompatible.missing_keys or []
        chosen = {}
        for m in drawable:
            if any(k.startswith(f"distillers.{m}.") for k in missing):
                notes.append(f"no {m} pictures: {weights} has no distillers.{m}.* tensors (an "
                             "exported student); a training checkpoint such as model_final.pth "
                             "has them")
            else:
                chosen[m] = student.distillers[m]
        if chosen:
            return student, student.teacher.model, chosen
    student = build_model(without_distillation(cfg))
    StudentCheckpointer(student, what="--weights").load(weights)
    student.eval()
    teacher = FrozenTeacher.from_student_cfg(cfg).model if use_teacher else None
    return student, teacher, {}


# ------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config_file, args.opts, args.register_dataset, check_steps=False)
    cfg.freeze()
    if not PathManager.exists(args.weights):
        raise FileNotFoundError(f"--weights {args.weights!r} does not exist: give the student's "
                                "checkpoint, e.g. output/<run>/model_final.pth")
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if dataset is None:
        raise CliError("no dataset to draw: DATASETS.TEST is empty; give --dataset NAME")
    check_datasets([dataset], "--dataset" if args.dataset else "DATASETS.TEST")
    dicts = select_images(DatasetCatalog.get(dataset), args.images, args.num_images, dataset)
    metadata = MetadataCatalog.get(dataset)

    notes: List[str] = []
    use_teacher = False
    if args.no_teacher:
        notes.append("teacher not drawn: --no-teacher")
    else:
        use_teacher, why = find_teacher(cfg)
        if not use_teacher and (cfg.MODEL.DISTILL.ENABLED or cfg.MODEL.DISTILL.TEACHER.CONFIG):
            notes.append(f"teacher not drawn: {why}")
    student, teacher, distillers = build_models(cfg, args.weights, use_teacher, notes)
    for model in (student, teacher):
        if model is not None:
            lower_score_threshold(model, args.score_floor, args.top_k)
    for n in notes:
        print("note:", n)
    os.makedirs(args.output, exist_ok=True)

    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    rule = rule_text(args.top_k, args.score_floor)
    student_name = "student" if cfg.MODEL.DISTILL.ENABLED else "student (no distillation)"
    level = args.level or picture_level(student, distillers)
    written = []
    for d, stem in zip(dicts, image_stems(dicts)):
        image = utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        inputs = [model_input(image, aug, d["height"], d["width"])]
        scale = max(1.0, args.min_display_size / min(rgb.shape[:2]))
        models = [("teacher", teacher)] if teacher is not None else []
        models.append((student_name, student))
        gt = Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(d).get_image()
        n_gt = len(d.get("annotations", []))
        panels = [captioned(gt, ["ground truth", f"{n_gt} object" + ("" if n_gt == 1 else "s")])]
        for name, model in models:
            model_inputs = in_channel_order(inputs, student.input_format, model.input_format)
            with torch.no_grad():
                kept = top_detections(model(model_inputs)[0]["instances"], args.top_k,
                                      args.score_floor)
            panels.append(captioned(draw_detections(rgb, kept, metadata, scale),
                                    [name, f"{rule}: {len(kept)} shown"]))
        stem_path = os.path.join(args.output, stem)
        written.append(save_rgb(stem_path + "_detections.png", grid(panels, cols=len(panels))))
        if distillers:
            written += method_pictures(student, distillers, d, inputs, rgb, scale, metadata,
                                       level, stem_path, pixel=args.pixel)
    print("Wrote", len(written), "files to", args.output)
    return written


if __name__ == "__main__":
    sys.exit(run_cli(main))
