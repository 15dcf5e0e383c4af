#!/usr/bin/env python
"""Look at a distilled student with detectron2's Visualizer. For each image, writes PNGs:

* ``<id>_detections.png``: ground truth | teacher predictions | student predictions;
* ``<id>_csgr_category_attention.png``: CSGR's per-class spatial attention on one FPN level,
  teacher row above student row (learned classifier, or the teacher's logits with
  ``ATTENTION teacher_head``);
* ``<id>_csgr_criss_cross.png``: the criss-cross attention of a chosen pixel (teacher, student).

    tools/visualize.py --config-file configs/demo/CSGR-RetinaNet-R18.yaml \
        --weights output/demo/student_csgr/model_final.pth --dataset shapes_val --output vis/

``--weights`` is a training checkpoint of the distilled student (it holds the distiller's learned
parts); the teacher comes from ``MODEL.DISTILL.TEACHER.*`` of the config.
"""
import argparse
import os

import cv2
import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.visualizer import Visualizer

import csgr_distill  # noqa: F401  (registrations)
from csgr_distill.config import add_distill_config
from csgr_distill.vis import grid, heatmap_on_image, labelled, level_map_to_image, mark_pixel


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the distilled student's config")
    p.add_argument("--weights", required=True, help="student training checkpoint (.pth)")
    p.add_argument("--dataset", default=None, help="registered dataset (default DATASETS.TEST[0])")
    p.add_argument("--num-images", type=int, default=3)
    p.add_argument("--output", required=True, help="folder for the PNG files")
    p.add_argument("--level", default="p3", help="FPN level whose attention is drawn")
    p.add_argument("--pixel", type=int, nargs=2, metavar=("I", "J"), default=None,
                   help="grid cell (row, col) on --level for the criss-cross attention "
                        "(default: the centre of the largest ground-truth box)")
    p.add_argument("--score-thresh", type=float, default=0.4)
    p.add_argument("--min-display-size", type=int, default=320,
                   help="small images are enlarged to at least this short side for drawing")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return p.parse_args(argv)


def model_input(image_bgr_or_rgb, aug, height, width):
    image = aug.get_transform(image_bgr_or_rgb).apply_image(image_bgr_or_rgb)
    return {"image": torch.as_tensor(image.transpose(2, 0, 1).astype("float32")),
            "height": height, "width": width}


def draw_predictions(rgb, instances, metadata, thresh, scale):
    instances = instances.to("cpu")
    return Visualizer(rgb, metadata, scale=scale).draw_instance_predictions(
        instances[instances.scores > thresh]).get_image()


def main(argv=None):
    args = parse_args(argv)
    cfg = get_cfg()
    add_distill_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    if not cfg.MODEL.DISTILL.ENABLED:
        raise SystemExit("visualize.py needs a distillation config (MODEL.DISTILL.ENABLED True): "
                         "it draws the teacher and the distiller's attention")
    dataset = args.dataset or cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    os.makedirs(args.output, exist_ok=True)

    student = build_model(cfg)
    DetectionCheckpointer(student).load(args.weights)
    student.eval()
    teacher = student.teacher.model
    csgr = student.distillers["CSGR"] if "CSGR" in student.distillers else None
    aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    level = args.level
    stride = student.backbone.output_shape()[level].stride

    written = []
    for d in DatasetCatalog.get(dataset)[: args.num_images]:
        image = utils.read_image(d["file_name"], format=cfg.INPUT.FORMAT)
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        inputs = [model_input(image, aug, d["height"], d["width"])]
        with torch.no_grad():
            s_pred = student(inputs)[0]["instances"]
            t_pred = teacher(student.teacher_inputs(inputs))[0]["instances"]
        scale = max(1.0, args.min_display_size / min(rgb.shape[:2]))
        gt = Visualizer(rgb, metadata, scale=scale).draw_dataset_dict(d).get_image()
        panels = [labelled(gt, "ground truth"),
                  labelled(draw_predictions(rgb, t_pred, metadata, args.score_thresh, scale),
                           "teacher"),
                  labelled(draw_predictions(rgb, s_pred, metadata, args.score_thresh, scale),
                           "student")]
        stem = os.path.join(args.output, f"{d['image_id']}")
        written.append(_save(stem + "_detections.png", grid(panels, cols=3)))
        if csgr is None:
            continue

        with torch.no_grad():  # the records a training step gives the distiller
            s_images = student.preprocess_image(inputs)
            s_rec = student.recorder.record(student, s_images, inputs, ("features",))
            t_rec = student.run_teacher(inputs, s_rec)
            t_logits = t_rec.level_logits(level) if "cls_logits" in t_rec else None
            s_feats, t_feats = s_rec.features, t_rec.features
            maps = {role: csgr.attention_maps(feats, level, role, teacher_logits=t_logits)
                    for role, feats in (("teacher", t_feats), ("student", s_feats))}
        image_size = s_images.image_sizes[0]
        orig_hw = rgb.shape[:2]
        rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        out_hw = rgb.shape[:2]
        tiles = []
        for role in ("teacher", "student"):
            for k, name in enumerate(metadata.thing_classes):
                heat = level_map_to_image(maps[role]["category"][0, k], stride, image_size, out_hw)
                tiles.append(labelled(heatmap_on_image(rgb, heat), f"{role[0]}: {name}"))
        written.append(_save(stem + "_csgr_category_attention.png",
                             grid(tiles, cols=len(metadata.thing_classes))))

        i, j = args.pixel or default_pixel(d, stride, image_size, orig_hw)
        with torch.no_grad():
            pix = {role: csgr.pixel_attention(feats, level, i, j, role)
                   for role, feats in (("teacher", t_feats), ("student", s_feats))}
        scale_y, scale_x = out_hw[0] / image_size[0], out_hw[1] / image_size[1]
        xy = ((j + 0.5) * stride * scale_x, (i + 0.5) * stride * scale_y)
        tiles = [labelled(mark_pixel(heatmap_on_image(
                     rgb, level_map_to_image(pix[role][0], stride, image_size, out_hw, smooth=False)),
                     xy), f"{role}: ({i},{j}) {level}")
                 for role in ("teacher", "student")]
        written.append(_save(stem + "_csgr_criss_cross.png", grid(tiles, cols=2)))
    print("Wrote", len(written), "files to", args.output)
    return written


def default_pixel(d, stride, image_size, orig_hw):
    """Grid cell at the centre of the largest ground-truth box (or the image centre).

    ``image_size``: the model's resized input (h, w); ``orig_hw``: the dataset image (h, w)."""
    from detectron2.structures import BoxMode

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
    main()
