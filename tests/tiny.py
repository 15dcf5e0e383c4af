"""Tiny configs, data and checkpoints shared by the framework tests (CPU, seconds).

Teacher: RetinaNet R18, FPN 32 channels. Student: RetinaNet R18, FPN 16 channels (so CSGR's
adapters are exercised). Images: 64x64 synthetic shapes, a handful of them.
"""
import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import csgr_distill  # noqa: F401  (registrations)
from csgr_distill.config import add_distill_config
from csgr_distill.data import register_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAIN, TINY_VAL = "shapes_tiny_train", "shapes_tiny_val"


def register_tiny_shapes(root):
    """Register 8 train + 4 val images of 64 px (idempotent across tests)."""
    if TINY_TRAIN not in DatasetCatalog.list():
        register_shapes(TINY_TRAIN, root, "tiny_train", num_images=8, image_size=64, seed=11)
        register_shapes(TINY_VAL, root, "tiny_val", num_images=4, image_size=64, seed=12)


def base_cfg(output_dir, fpn_channels=16):
    cfg = get_cfg()
    add_distill_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs/demo/Base-Demo-RetinaNet.yaml"))
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.FPN.OUT_CHANNELS = fpn_channels
    cfg.MODEL.RETINANET.NUM_CONVS = 1
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[1.0]]
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 64
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 64
    cfg.DATASETS.TRAIN = (TINY_TRAIN,)
    cfg.DATASETS.TEST = (TINY_VAL,)
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = 2
    cfg.SOLVER.STEPS = ()
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.BASE_LR = 0.01
    cfg.TEST.EVAL_PERIOD = 0
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def make_teacher(tmp_path):
    """Write a teacher yaml + checkpoint (random weights: enough to test the mechanics)."""
    tcfg = base_cfg(tmp_path / "teacher", fpn_channels=32)
    tcfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    torch.manual_seed(0)
    teacher = build_model(tcfg)
    os.makedirs(tcfg.OUTPUT_DIR, exist_ok=True)
    DetectionCheckpointer(teacher, save_dir=tcfg.OUTPUT_DIR).save("model_final")
    yaml_path = str(tmp_path / "teacher.yaml")
    with open(yaml_path, "w") as f:
        f.write(tcfg.dump())
    return yaml_path, os.path.join(tcfg.OUTPUT_DIR, "model_final.pth"), teacher


def student_cfg(tmp_path, teacher_yaml, teacher_weights, methods=("CSGR",), enabled=True):
    cfg = base_cfg(tmp_path / "student")
    cfg.MODEL.META_ARCHITECTURE = "DistillRetinaNet"
    cfg.MODEL.DISTILL.ENABLED = enabled
    cfg.MODEL.DISTILL.METHODS = list(methods)
    cfg.MODEL.DISTILL.TEACHER.CONFIG = teacher_yaml
    cfg.MODEL.DISTILL.TEACHER.WEIGHTS = teacher_weights
    return cfg


def fake_batch(n=2, size=64, seed=0):
    """Batched inputs as DatasetMapper makes them: uint8-range images and instances."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for i in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]))
        inst.gt_classes = torch.tensor([1, 3])
        img = (torch.rand(3, size, size, generator=g) * 255).round()
        batch.append({"image": img, "instances": inst, "height": size, "width": size})
    return batch


def rcnn_base_cfg(output_dir, fpn_channels=16):
    """A tiny Faster R-CNN FPN (R18, p2-p6) on the tiny shapes, with the input, solver and data
    loader of ``base_cfg`` (the model-zoo base it merges would set 640-800 px, 16 images a batch
    and 90k iterations)."""
    from detectron2 import model_zoo

    tiny = base_cfg(output_dir, fpn_channels)
    cfg = tiny.clone()
    cfg.merge_from_file(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))
    cfg.SOLVER, cfg.INPUT, cfg.DATALOADER = tiny.SOLVER, tiny.INPUT, tiny.DATALOADER
    cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    cfg.MODEL.DISTILL.TAR = add_distill_config(get_cfg()).MODEL.DISTILL.TAR  # RetinaNet: RoIs off
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 32
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 64
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16], [32], [64], [128]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[1.0]]
    cfg.DATASETS.TRAIN = (TINY_TRAIN,)  # the model-zoo base names COCO
    cfg.DATASETS.TEST = (TINY_VAL,)
    return cfg


def write_model(tmp_path, cfg, name):
    """Save a randomly initialised model of ``cfg`` as ``<name>.yaml`` + ``<name>.pth``; returns
    (yaml path, weights path, model)."""
    torch.manual_seed(0)
    model = build_model(cfg)
    weights = str(tmp_path / f"{name}.pth")
    torch.save({"model": model.state_dict()}, weights)
    yaml_path = tmp_path / f"{name}.yaml"
    yaml_path.write_text(cfg.dump())
    return str(yaml_path), weights, model


def fake_demo_tool(calls, ap):
    """A stand-in for ``tools/demo.py``'s ``run_tool``: records each call's arguments in
    ``calls``; an ``--eval-only`` call writes ``eval_results.json`` with the AP of ``ap[run
    folder name]`` (the folder of its MODEL.WEIGHTS) into its OUTPUT_DIR."""
    import json

    def fake_tool(args, log_path):
        calls.append(list(args))
        if "--eval-only" in args:
            out = args[args.index("OUTPUT_DIR") + 1]
            os.makedirs(out, exist_ok=True)
            which = os.path.basename(os.path.dirname(args[args.index("MODEL.WEIGHTS") + 1]))
            with open(os.path.join(out, "eval_results.json"), "w") as f:
                json.dump({"bbox": {"AP": ap[which], "AP50": 10.0, "AP75": None}}, f)

    return fake_tool


def train_opts(out, test: bool = False, size=64):
    """``tools/train_net.py`` overrides for a 2-iteration run on the tiny shapes (batch 2, no
    workers, no warm-up) into ``out``; ``test``: evaluate on the tiny val split (``--eval-only``),
    else no test set."""
    return ["DATASETS.TRAIN", f"('{TINY_TRAIN}',)",
            "DATASETS.TEST", f"('{TINY_VAL}',)" if test else "()",
            "INPUT.FIXED_SIZE", str(size), "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
            "SOLVER.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0", "TEST.EVAL_PERIOD", "0",
            "OUTPUT_DIR", str(out)]


def logged_keys(out) -> set:
    """Every key of a run's ``metrics.json``."""
    import json

    with open(os.path.join(str(out), "metrics.json")) as f:
        return set().union(*[json.loads(line) for line in f if line.strip()])


def build_distiller(name, cfg, student_shapes, teacher_shapes=None):
    """The registered distiller ``name`` built from ``cfg`` for a student and a teacher with the
    given level shapes (no backbone: :meth:`DetectorSpec.from_shapes`, both of ``cfg``'s
    meta-architecture)."""
    from csgr_distill.distillers import DISTILLER_REGISTRY
    from csgr_distill.records import DetectorSpec

    teacher_shapes = student_shapes if teacher_shapes is None else teacher_shapes
    return DISTILLER_REGISTRY.get(name)(cfg, DetectorSpec.from_shapes(cfg, student_shapes),
                                        DetectorSpec.from_shapes(cfg, teacher_shapes))
