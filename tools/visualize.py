#!/usr/bin/env python
"""Look at a student (distilled or baseline) and its teacher with detectron2's Visualizer. For
each image ``<stem>`` (its file name without extension), writes PNGs:

* ``<stem>_detections.png``: ground truth | teacher | student; each model's ``--top-k`` best
  detections at or above ``--score-floor`` (scores on the labels, the rule on the panel), so a
  weak or young model still shows what it finds;
* distillation configs with CSGR: ``<stem>_csgr_category_attention.png`` (CSGR's per-class
  spatial attention on one FPN level, teacher row above student row; learned classifier, or the
  teacher's logits with ``ATTENTION teacher_head``) and ``<stem>_csgr_criss_cross.png`` (the
  criss-cross attention of one grid cell, teacher and student);
* distillation configs with FGD: ``<stem>_fgd_masks_attention.png`` (on one FPN level: FGD's
  foreground mask with the ground-truth boxes, its background mask, and the spatial attention
  of teacher and student);
* distillation configs with TAR: ``<stem>_tar_gaussian_masks.png`` (its Gaussian mask on one
  level and the masked feature difference) and, on Faster R-CNN, ``<stem>_tar_shared_rois.png``
  (a few shared RoIs with the teacher's and the student's boxes and class distributions, and
  which ones the adaptive regression rule gives the teacher's box as a target);
* distillation configs with LD: ``<stem>_ld_regions.png`` (the anchors of its main region and
  of its valuable localization region with their weights, and the teacher's and the student's
  distributions over the four sides of the student's best-scored positive anchor);
* distillation configs with DETRDistill: ``<stem>_detrdistill.png`` (the target-aware mask of
  the last decoder layer and its teacher <-> student matches).

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
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.nn import functional as F
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.file_io import PathManager
from detectron2.utils.visualizer import Visualizer

import csgr_distill  # noqa: F401  (registrations)
from csgr_distill.checkpoint import CheckedCheckpointer
from csgr_distill.cli import (CliError, add_debug_argument, load_config, parse_args_anywhere,
                              run_cli)
from csgr_distill.data import add_dataset_arguments
from csgr_distill.data.errors import check_datasets
from csgr_distill.distillers.tar import gaussian_masks
from csgr_distill.export import StudentCheckpointer
from csgr_distill.teacher import FrozenTeacher, build_teacher_cfg
from csgr_distill.vis import (captioned, draw_detections, draw_ld_regions, draw_shared_rois,
                              grid, heatmap_on_image, labelled, level_map_to_image,
                              lower_score_threshold, mark_pixel, rule_text, top_detections)


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


def in_format(inputs: List[dict], have: str, want: str) -> List[dict]:
    """``inputs`` in another model's channel order (RGB <-> BGR)."""
    if have == want:
        return inputs
    if {have, want} != {"RGB", "BGR"}:
        raise CliError(f"the teacher's INPUT.FORMAT {want} cannot be made from the student's "
                       f"{have}")
    return [dict(x, image=x["image"].flip(0)) for x in inputs]


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
class _LoadReport(CheckedCheckpointer):
    """A DetectionCheckpointer (an unreadable file is one clear error) that keeps what its last
    load did not match."""

    incompatible = None

    def _load_model(self, checkpoint):
        self.incompatible = super()._load_model(checkpoint)
        return self.incompatible


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


def without_distillation(cfg):
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DISTILL.ENABLED = False
    cfg.freeze()
    return cfg


def build_models(cfg, weights: str, use_teacher: bool, notes: List[str]):
    """(student, teacher or None, {method: distiller} of the methods whose pictures are drawn).

    The student is built with distillation on only when some method's pictures can be drawn (a
    method of :data:`PICTURES` configured, the teacher available, the checkpoint holding that
    distiller's tensors); otherwise with distillation off, loading a training checkpoint's
    student part."""
    methods = list(cfg.MODEL.DISTILL.METHODS) if cfg.MODEL.DISTILL.ENABLED else []
    drawable = [m for m in methods if m in PICTURES]
    others = [m for m in methods if m not in PICTURES]
    if others:
        notes.append(f"no method pictures for {others}: drawn for {sorted(PICTURES)} only")
    if drawable and use_teacher:
        student = build_model(cfg)
        loader = _LoadReport(student, what="--weights")
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
            model_inputs = inputs if model is student else in_format(
                inputs, student.input_format, model.input_format)
            with torch.no_grad():
                kept = top_detections(model(model_inputs)[0]["instances"], args.top_k,
                                      args.score_floor)
            panels.append(captioned(draw_detections(rgb, kept, metadata, scale),
                                    [name, f"{rule}: {len(kept)} shown"]))
        stem_path = os.path.join(args.output, stem)
        written.append(_save(stem_path + "_detections.png", grid(panels, cols=len(panels))))
        if distillers:
            written += method_pictures(args, student, distillers, d, inputs, rgb, scale,
                                       metadata, level, stem_path)
    print("Wrote", len(written), "files to", args.output)
    return written


@dataclass
class PictureInputs:
    """What a method's pictures read: the two records of one image (a training step's), the
    ground truth in the model's input pixels, and how to draw on the image."""

    args: argparse.Namespace
    d: dict  # the dataset dict
    student: object  # the DetectorOutputs of the student
    teacher: object  # ... and of the teacher
    gt_instances: list  # [Instances] with gt_boxes in input pixels
    level: str
    stride: int
    image_size: Tuple[int, int]  # the model's resized input (h, w)
    orig_hw: Tuple[int, int]  # the dataset image (h, w)
    rgb: np.ndarray  # the image, enlarged for display
    metadata: object
    stem_path: str
    model: object = None  # the student model (e.g. its box transform)

    def heat(self, level_map, smooth=True) -> np.ndarray:
        """A level map ``[h, w]`` over the display image."""
        return heatmap_on_image(self.rgb, level_map_to_image(
            level_map, self.stride, self.image_size, self.rgb.shape[:2], smooth=smooth))


def method_pictures(args, student, distillers, d, inputs, rgb, scale, metadata, level,
                    stem_path) -> List[str]:
    """The pictures of every method of ``distillers`` (:data:`PICTURES`), from the records a
    training step gives the distillers."""
    stride = student.backbone.output_shape()[level].stride
    orig_hw = rgb.shape[:2]
    image_size = tuple(inputs[0]["image"].shape[-2:])
    gt = Instances(image_size)
    gt.gt_boxes = Boxes(gt_boxes_in_input(d, image_size, orig_hw))
    gt.gt_classes = torch.tensor([a["category_id"] for a in d.get("annotations", [])],
                                 dtype=torch.long)
    inputs = [dict(inputs[0], instances=gt)]  # what the R-CNN's RoI sampling matches against
    with torch.no_grad():
        s_images = student.preprocess_image(inputs)
        s_rec = student.recorder.record(student, s_images, inputs,
                                        student.distill_fields["student"])
        t_rec = student.run_teacher(inputs, s_rec)
    pic = PictureInputs(args=args, d=d, student=s_rec, teacher=t_rec, gt_instances=[gt],
                        level=level, stride=stride, image_size=image_size, orig_hw=orig_hw,
                        rgb=cv2.resize(rgb, None, fx=scale, fy=scale,
                                       interpolation=cv2.INTER_LINEAR),
                        metadata=metadata, stem_path=stem_path, model=student)
    written = []
    for name, distiller in distillers.items():
        written += PICTURES[name](pic, distiller)
    return written


def picture_level(student, distillers) -> str:
    """``--level``'s default: p3 when the student has it, else the first level a drawn method
    distils (a DETR's res5), else the student's first level."""
    levels = list(student.backbone.output_shape())
    if "p3" in levels:
        return "p3"
    for d in distillers.values():
        for level in getattr(d, "in_features", ()):
            if level in levels:
                return level
    return levels[0]


def gt_boxes_in_input(d, image_size, orig_hw) -> torch.Tensor:
    """The dataset dict's boxes ``[B, 4]`` (XYXY) in the model's resized input pixels."""
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
             for a in d.get("annotations", [])]
    sy, sx = image_size[0] / orig_hw[0], image_size[1] / orig_hw[1]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * torch.tensor(
        [sx, sy, sx, sy])


def csgr_pictures(pic: PictureInputs, csgr) -> List[str]:
    """CSGR's class attention (``<stem>_csgr_category_attention.png``: one tile per class,
    teacher row above student row) and the criss-cross attention of one grid cell
    (``<stem>_csgr_criss_cross.png``), teacher and student."""
    level, stride = pic.level, pic.stride
    t_logits = pic.teacher.level_logits(level) if "cls_logits" in pic.teacher else None
    feats = {"teacher": pic.teacher.features, "student": pic.student.features}
    with torch.no_grad():
        maps = {role: csgr.attention_maps(f, level, role, teacher_logits=t_logits)
                for role, f in feats.items()}
    tiles = [labelled(pic.heat(maps[role]["category"][0, k]), f"{role[0]}: {name}")
             for role in ("teacher", "student")
             for k, name in enumerate(pic.metadata.thing_classes)]
    written = [_save(pic.stem_path + "_csgr_category_attention.png",
                     grid(tiles, cols=len(pic.metadata.thing_classes)))]

    i, j = pic.args.pixel or default_pixel(pic.d, stride, pic.image_size, pic.orig_hw)
    with torch.no_grad():
        pix = {role: csgr.pixel_attention(f, level, i, j, role) for role, f in feats.items()}
    out_hw = pic.rgb.shape[:2]
    scale_y, scale_x = out_hw[0] / pic.image_size[0], out_hw[1] / pic.image_size[1]
    xy = ((j + 0.5) * stride * scale_x, (i + 0.5) * stride * scale_y)
    tiles = [labelled(mark_pixel(pic.heat(pix[role][0], smooth=False), xy),
                      f"{role}: ({i},{j}) {level}") for role in ("teacher", "student")]
    written.append(_save(pic.stem_path + "_csgr_criss_cross.png", grid(tiles, cols=2)))
    return written


def fgd_pictures(pic: PictureInputs, fgd) -> List[str]:
    """FGD's weights on one level (``<stem>_fgd_masks_attention.png``): the foreground mask (with
    the ground-truth boxes), the background mask (grid cells, min-max scaled), and the spatial
    attention of teacher and student (the student's from its adapted map)."""
    maps = fgd.maps(pic.student, pic.teacher, pic.gt_instances, pic.level)
    out_hw = pic.rgb.shape[:2]
    sy, sx = out_hw[0] / pic.image_size[0], out_hw[1] / pic.image_size[1]
    fg = Visualizer(pic.heat(maps["fg"][0], smooth=False))
    for box in pic.gt_instances[0].gt_boxes.tensor.tolist():
        fg.draw_box([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], edge_color="w")
    scaling = fgd.box_scaling
    tiles = [labelled(fg.output.get_image(), f"fg mask {pic.level} ({scaling})"),
             labelled(pic.heat(maps["bg"][0], smooth=False), f"bg mask {pic.level}"),
             labelled(pic.heat(maps["teacher_spatial"][0]), "teacher spatial attention"),
             labelled(pic.heat(maps["student_spatial"][0]), "student spatial attention")]
    return [_save(pic.stem_path + "_fgd_masks_attention.png", grid(tiles, cols=4))]


def tar_pictures(pic: PictureInputs, tar) -> List[str]:
    """TAR's feature weights on one level (``<stem>_tar_gaussian_masks.png``: the Gaussian mask
    with the ground-truth boxes, and the masked squared difference ``M * sum_c (r(S) - T)^2``
    it penalises) and, when its head terms are on, the shared RoIs
    (``<stem>_tar_shared_rois.png``, :func:`csgr_distill.vis.draw_shared_rois`)."""
    level = pic.level
    s_feat, t_feat = pic.student.features[level], pic.teacher.features[level]
    with torch.no_grad():
        mask = gaussian_masks([pic.gt_instances[0].gt_boxes.tensor], s_feat.shape[-2:],
                              pic.student.padded_size, tar.sigma_scale)[0]
        diff = ((tar.adapters[level](s_feat) - t_feat) ** 2).sum(1)[0]
    out_hw = pic.rgb.shape[:2]
    sy, sx = out_hw[0] / pic.image_size[0], out_hw[1] / pic.image_size[1]
    v = Visualizer(pic.heat(mask, smooth=False))
    for box in pic.gt_instances[0].gt_boxes.tensor.tolist():
        v.draw_box([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy], edge_color="w")
    tiles = [labelled(v.output.get_image(), f"Gaussian mask {level}"),
             labelled(pic.heat(mask * diff, smooth=False), f"mask x diff^2 {level}")]
    written = [_save(pic.stem_path + "_tar_gaussian_masks.png", grid(tiles, cols=2))]
    if tar.uses_rois:
        details = {k: v.cpu() for k, v in tar.roi_details(pic.student, pic.teacher).items()}
        names = list(pic.metadata.thing_classes) + ["background"]
        written.append(_save(pic.stem_path + "_tar_shared_rois.png", draw_shared_rois(
            pic.rgb, details, names, scale=(sx, sy), proposals_from=tar.proposals)))
    return written


def ld_pictures(pic: PictureInputs, ld) -> List[str]:
    """LD's regions and one box's distributions (``<stem>_ld_regions.png``,
    :func:`csgr_distill.vis.draw_ld_regions`)."""
    details = {k: v.cpu() for k, v in
               ld.region_details(pic.student, pic.teacher, pic.gt_instances).items()}
    details["side_targets"] = pic.model.box2box_transform.side_targets(
        details["anchors"], details["gt_boxes"])
    out_hw = pic.rgb.shape[:2]
    scale = (out_hw[1] / pic.image_size[1], out_hw[0] / pic.image_size[0])
    return [_save(pic.stem_path + "_ld_regions.png", draw_ld_regions(
        pic.rgb, details, pic.gt_instances[0].gt_boxes.tensor, scale))]


def detrdistill_pictures(pic: PictureInputs, dd) -> List[str]:
    """DETRDistill on the last decoder layer (``<stem>_detrdistill.png``): the target-aware mask
    on the first encoder input level, and the student <-> teacher matches of the layer's
    predictions (the pairs whose teacher score is highest; magenta teacher, orange student, a
    line between their centres)."""
    from csgr_distill.distillers.detrdistill import match_predictions, target_aware_mask

    s, t = pic.student, pic.teacher
    h, w = pic.image_size
    with torch.no_grad():
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        gt = pic.gt_instances[0].gt_boxes.tensor / scale  # normalised xyxy, as the predictions
        t_lg, t_bx = t.pred_logits[-1][0], t.pred_boxes[-1][0]
        queries, quality = dd.quality(t_lg, t_bx, gt, t.softmax)
        name = next(iter(t.encoder_inputs))
        feat = t.encoder_inputs[name][0]
        mask = target_aware_mask(t.query_embeds[-1][0][queries], quality, feat, dd.mask_floor)
        (si, ti), = match_predictions(s.pred_logits[-1][:1], s.pred_boxes[-1][:1], t_lg[None],
                                      dd.teacher_match_boxes(t_bx)[None], s.softmax, dd.costs)
    stride = pic.student.padded_size[0] / feat.shape[-2]
    heat = heatmap_on_image(pic.rgb, level_map_to_image(mask, int(round(stride)), pic.image_size,
                                                        pic.rgb.shape[:2], smooth=False))
    prob = F.softmax(t_lg, -1)[:, :-1] if t.softmax else torch.sigmoid(t_lg)
    order = torch.argsort(prob.max(-1).values[ti], descending=True)[:5]
    out_h, out_w = pic.rgb.shape[:2]
    v = Visualizer(pic.rgb.copy())
    for k in order.tolist():
        for box, colour in ((t_bx[ti[k]], "magenta"), (s.pred_boxes[-1][0][si[k]], "orange")):
            cx, cy, bw, bh = box.tolist()
            v.draw_box([(cx - bw / 2) * out_w, (cy - bh / 2) * out_h, (cx + bw / 2) * out_w,
                        (cy + bh / 2) * out_h], edge_color=colour)
        (tx, ty), (sx, sy) = t_bx[ti[k]][:2].tolist(), s.pred_boxes[-1][0][si[k]][:2].tolist()
        v.draw_line([tx * out_w, sx * out_w], [ty * out_h, sy * out_h], color="w")
    tiles = [labelled(heat, f"target-aware mask ({name})"),
             labelled(v.output.get_image(), "matches: teacher / student")]
    return [_save(pic.stem_path + "_detrdistill.png", grid(tiles, cols=2))]


#: methods with pictures of their own: registered name -> fn(PictureInputs, distiller) -> paths
PICTURES = {"CSGR": csgr_pictures, "FGD": fgd_pictures, "TAR": tar_pictures, "LD": ld_pictures,
            "DETRDistill": detrdistill_pictures}


def default_pixel(d, stride, image_size, orig_hw):
    """Grid cell at the centre of the largest ground-truth box (or the image centre).

    ``image_size``: the model's resized input (h, w); ``orig_hw``: the dataset image (h, w)."""
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
             for a in d.get("annotations", [])]
    if boxes:
        x0, y0, x1, y1 = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    else:
        cy, cx = orig_hw[0] / 2, orig_hw[1] / 2
    sy, sx = image_size[0] / orig_hw[0], image_size[1] / orig_hw[1]
    rows = max(1, int(np.ceil(image_size[0] / stride)))
    cols = max(1, int(np.ceil(image_size[1] / stride)))
    return min(int(cy * sy // stride), rows - 1), min(int(cx * sx // stride), cols - 1)


def _save(path, rgb):
    cv2.imwrite(path, rgb[:, :, ::-1])
    return path


if __name__ == "__main__":
    sys.exit(run_cli(main))
