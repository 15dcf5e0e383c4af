"""``add_distill_config(cfg)``: every ``MODEL.DISTILL.*`` key, documented where it is defined."""
from detectron2.config import CfgNode as CN


def add_distill_config(cfg):
    """Add the distillation keys to a detectron2 config (in place) and return it.

    Safe to call twice. The teacher's config gets the same function applied.
    """
    if "DISTILL" in cfg.MODEL:
        return cfg
    _C = cfg
    _C.MODEL.DISTILL = CN()
    # Master switch. False: the Distill* meta-architectures behave exactly like their base class
    # (no teacher is built, no distiller runs) -> a baseline student with the same config file.
    _C.MODEL.DISTILL.ENABLED = False
    # Registered distiller names (DISTILLER_REGISTRY), applied together, e.g. ["CSGR"].
    _C.MODEL.DISTILL.METHODS = ["CSGR"]

    _C.MODEL.DISTILL.TEACHER = CN()
    # Path to the teacher's yaml (may use _BASE_ like any detectron2 config). Required in training.
    _C.MODEL.DISTILL.TEACHER.CONFIG = ""
    # Teacher checkpoint; overrides the MODEL.WEIGHTS of the teacher yaml. Empty -> the yaml's.
    # A teacher without weights is an error in training (a random teacher teaches nothing).
    _C.MODEL.DISTILL.TEACHER.WEIGHTS = ""
    # Extra KEY VALUE overrides for the teacher config, e.g. ["MODEL.RETINANET.NUM_CLASSES", 6].
    _C.MODEL.DISTILL.TEACHER.OPTS = []

    # Distillation-decay schedule: factor f(iter) multiplying the distillation losses of every
    # method that does not carry its own schedule (MODEL.DISTILL.<METHOD>.DECAY, below).
    _C.MODEL.DISTILL.DECAY = decay_node("none")

    # CSGR: category semantic + global relation distillation (shared/methods/CSGR.md).
    _C.MODEL.DISTILL.CSGR = CN()
    # Weight of the category-semantic loss L_cs (sum over N,K,C of squared differences / N).
    _C.MODEL.DISTILL.CSGR.ALPHA = 5e-4
    # Weight of the global-relation loss L_gr (sum over N,C,H,W of squared differences / N).
    _C.MODEL.DISTILL.CSGR.BETA = 1e-5
    # Student/teacher feature levels distilled, one independent loss module per level.
    _C.MODEL.DISTILL.CSGR.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Category attention source: "learned" (the paper: a shared 1x1 classifier C->K) or
    # "teacher_head" (the teacher's own class logits, max over anchors, softmax over positions).
    _C.MODEL.DISTILL.CSGR.ATTENTION = "learned"
    # Criss-cross passes: 1 (the paper) or 2 (CCNet's choice: every pixel sees the whole map).
    _C.MODEL.DISTILL.CSGR.RECURRENCE = 1
    # CSGR's own schedule; "default" follows MODEL.DISTILL.DECAY (the paper does not decay).
    _C.MODEL.DISTILL.CSGR.DECAY = decay_node("default")
    return cfg


def decay_node(type_: str) -> CN:
    """A decay-schedule node (``MODEL.DISTILL.DECAY`` or a method's own ``DECAY``)."""
    node = CN()
    # One of "none" (f = 1), "linear", "cosine", "step", "exp"; in a method's node also
    # "default": use MODEL.DISTILL.DECAY for this method.
    node.TYPE = type_
    # Decay runs from START_ITER (f = 1) to END_ITER (f = FINAL_FACTOR); END_ITER < 0 means
    # SOLVER.MAX_ITER. "step" jumps from 1 to FINAL_FACTOR at END_ITER; "exp" interpolates
    # geometrically (FINAL_FACTOR must be > 0).
    node.START_ITER = 0
    node.END_ITER = -1
    node.FINAL_FACTOR = 0.0
    # Linear warm-up of the factor from 0 over the first WARMUP_ITERS iterations (0 = off).
    node.WARMUP_ITERS = 0
    return node
