"""``add_distill_config(cfg)``: every ``MODEL.DISTILL.*`` key, documented where it is defined,
plus the project's data and schedule keys (``DATASETS.REGISTER``, ``INPUT.FIXED_SIZE``, steps as
fractions of ``SOLVER.MAX_ITER``) and the functions that apply them:

* :func:`merge_command_line` -- ``cfg.merge_from_list(opts)`` with a clear error for the common
  ``MODEL.DISTILL.TEACHER.OPTS KEY VALUE`` mistake;
* :func:`apply_derived_keys` -- ``INPUT.FIXED_SIZE`` and fractional ``SOLVER.STEPS`` into the keys
  detectron2 reads (call it after every merge, before ``cfg.freeze()``).

The schema imports nothing of the package; the tools' config pipeline (yaml, ``KEY VALUE``
overrides, ``--register-dataset`` entries, registration, derived keys) is
:func:`csgr_distill.cli.load_config`.
"""
import ast
import logging
import re
from typing import Callable, Dict, List, Optional, Sequence

from detectron2.config import CfgNode as CN

logger = logging.getLogger(__name__)

#: the command-line key whose value is itself a KEY VALUE list
TEACHER_OPTS_KEY = "MODEL.DISTILL.TEACHER.OPTS"


#: ``MODEL.DISTILL.<NODE>`` -> the function that fills it, one per registered method (filled by
#: :func:`csgr_distill.distillers.registry.register_distiller`)
_METHOD_CONFIGS: Dict[str, Callable] = {}


def register_method_config(node: str, add: Callable) -> None:
    """Declare the section ``MODEL.DISTILL.<node>`` of a method: ``add(section)`` fills a fresh
    ``CfgNode`` with its keys; a ``DECAY`` node following ``MODEL.DISTILL.DECAY`` is added unless
    it sets one. Configs made afterwards have it (:func:`add_distill_config`)."""
    _METHOD_CONFIGS[node] = add


def method_config_nodes() -> List[str]:
    """The ``MODEL.DISTILL`` sections of the registered methods, in registration order."""
    return list(_METHOD_CONFIGS)


def add_method_configs(cfg):
    """Add every registered method's section that ``cfg.MODEL.DISTILL`` lacks (in place)."""
    for node, add in _METHOD_CONFIGS.items():
        if node in cfg.MODEL.DISTILL or cfg.is_frozen():
            continue
        section = CN()
        add(section)
        if "DECAY" not in section:
            # the method's own schedule; "default" follows MODEL.DISTILL.DECAY
            section.DECAY = decay_node("default")
        cfg.MODEL.DISTILL[node] = section
    return cfg


def add_distill_config(cfg):
    """Add the distillation keys to a detectron2 config (in place) and return it.

    Safe to call twice. The teacher's config gets the same function applied.
    """
    add_data_config(cfg)
    add_architecture_config(cfg)
    if "DISTILL" in cfg.MODEL:
        return add_method_configs(cfg)
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
    # Inheriting (FGD's option; FGD's official same-family configs turn it on): a training run
    # that starts from iteration 0 copies the teacher's neck and head (every student tensor
    # outside backbone.bottom_up and the distillers: RetinaNet's FPN + head, Faster R-CNN's FPN +
    # RPN + RoI heads) into the student, after MODEL.WEIGHTS is loaded (its neck/head tensors are
    # replaced, with a warning); the bottom-up backbone stays the student's. Not applied when
    # --resume continues from a checkpoint. Needs the same family and the same neck/head tensor
    # names and shapes (checked at build time). csgr_distill/inherit.py.
    _C.MODEL.DISTILL.INHERIT_TEACHER = False

    # Distillation-decay schedule: factor f(iter) multiplying the distillation losses of every
    # method that does not carry its own schedule (MODEL.DISTILL.<METHOD>.DECAY).
    _C.MODEL.DISTILL.DECAY = decay_node("none")
    # torch.compile of every distiller's forward (and, through AOTAutograd, its backward): the
    # losses are many small operations, bound on a GPU by Python and kernel launches, which
    # compilation fuses (docs/results/overhead-kernels.md). "" = off (ours: the default until it
    # is measured on a GPU); "default" = torch.compile's default mode; "reduce-overhead" = also
    # CUDA graphs on a GPU (one capture per input size). Shapes that change with the image size
    # are made dynamic after the first change (torch's automatic dynamic shapes), so a
    # multi-scale run compiles a few times, then never again (on the CPU, 3 input sizes: 3 graphs
    # for CSGR, PKD, MIMIC, 7 for FGD and TAR, whose box masks run uncompiled). The first steps
    # take minutes longer; a machine where torch.compile cannot work (no C++ compiler for the
    # CPU, no Triton for the GPU) is refused when the model is built.
    _C.MODEL.DISTILL.COMPILE = ""

    # Each registered method's own section, MODEL.DISTILL.<METHOD> (declared in its file:
    # csgr_distill/distillers/<method>.py, add_config; docs/configuration.md lists them).

    add_method_configs(cfg)
    return cfg


def add_architecture_config(cfg):
    """The keys of this project's own meta-architectures (``DistributionRetinaNet``'s box
    branch), without the distillation keys: what an exported student's config needs (in place;
    safe to call twice)."""
    if "REG_MAX" not in cfg.MODEL.RETINANET:
        # n: each side's distance is predicted over the bins 0..n, in strides (GFL and LD: 16).
        cfg.MODEL.RETINANET.REG_MAX = 16
        # Distribution Focal Loss weight (GFL and LD's GFL recipe: 0.25; 0 turns it off, as LD's
        # released RetinaNet head has none). Targets clamped to [0, n - 0.1], as GFL's.
        cfg.MODEL.RETINANET.DFL_WEIGHT = 0.25
    if "DETR" not in cfg.MODEL:
        add_detr_config(cfg)
    if "OPTIMIZER" not in cfg.SOLVER:
        # "SGD" (detectron2's) or "ADAMW" (DETR's recipe: torch.optim.AdamW with
        # SOLVER.BASE_LR / WEIGHT_DECAY, betas (0.9, 0.999)).
        cfg.SOLVER.OPTIMIZER = "SGD"
        # lr factor of the backbone's parameters (`backbone.*`); DETR's recipe: 0.1.
        cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    if "BACKBONE_WEIGHTS" not in cfg.MODEL:
        # A trained detectron2 checkpoint (.pth) whose ResNet starts this model's ResNet in a run
        # that starts at iteration 0, after MODEL.WEIGHTS (csgr_distill/backbone_weights.py):
        # e.g. a DETR started from the R18 of a RetinaNet trained on the same data. Every ResNet
        # tensor of the model must be in it; its other tensors are left out. "" = off.
        cfg.MODEL.BACKBONE_WEIGHTS = ""
    if "LINEAR_PROJ_MULTIPLIER" not in cfg.SOLVER:
        # lr factor of Deformable DETR's sampling-offset and reference-point projections
        # (parameter names containing `sampling_offsets` / `reference_points`); its official
        # recipe: 0.1 (lr_linear_proj_mult), set by configs/detr/Base-DeformableDETR-COCO.yaml.
        cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 1.0
    return cfg


def add_detr_config(cfg):
    """``MODEL.DETR``: the DETR family of ``csgr_distill.detr_port`` (in place). Defaults: the
    official DETR R50 recipe (Carion et al., ECCV 2020); configs/detr/ set Deformable DETR's."""
    d = cfg.MODEL.DETR = CN()
    # foreground classes (COCO's 80; a checkpoint of the official 91-id head converts with
    # tools/convert_detr_checkpoint.py --coco-to-contiguous)
    d.NUM_CLASSES = 80
    # backbone levels the transformer reads, by the backbone's names: DETR reads res5 only;
    # Deformable DETR res3-res5 (plus NUM_FEATURE_LEVELS - 3 levels made by strided convs)
    d.IN_FEATURES = ["res5"]
    # object queries (DETR 100, Deformable DETR 300); two-stage Deformable DETR: the number of
    # encoder proposals kept as queries (the official two_stage_num_proposals = num_queries)
    d.NUM_QUERIES = 100
    d.HIDDEN_DIM = 256  # d_model
    d.NHEADS = 8
    d.ENC_LAYERS = 6
    d.DEC_LAYERS = 6
    d.DIM_FEEDFORWARD = 2048
    # 0.1 in both official codes. Deformable DETR: on every residual branch, the FFN activations
    # and the decoder self-attention's probabilities, not on the encoder input (docs/detr_port.md)
    d.DROPOUT = 0.1
    d.PRE_NORM = False  # DETR: post-norm layers
    # losses at every decoder layer (DETR's auxiliary decoding losses)
    d.AUX_LOSS = True
    # loss weights = matcher costs (DETR: class 1, L1 5, GIoU 2; Deformable DETR: 2, 5, 2)
    d.CLASS_WEIGHT = 1.0
    d.L1_WEIGHT = 5.0
    d.GIOU_WEIGHT = 2.0
    # DETR: weight of the no-object class in the cross-entropy (eos_coef)
    d.NO_OBJECT_WEIGHT = 0.1
    # Deformable DETR only: levels (res3-res5 + extra), sampling points, focal loss alpha,
    # iterative box refinement, two-stage (official defaults: 4, 4, 4, 0.25, off, off)
    d.NUM_FEATURE_LEVELS = 4
    d.ENC_N_POINTS = 4
    d.DEC_N_POINTS = 4
    d.FOCAL_ALPHA = 0.25
    # every decoder layer refines the previous layer's boxes, with its own class and box heads
    d.WITH_BOX_REFINE = False
    # the queries are the encoder's NUM_QUERIES best proposals, trained by the class-agnostic
    # encoder losses loss_*_enc (with AUX_LOSS, as the official code); needs WITH_BOX_REFINE
    d.TWO_STAGE = False
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


def add_data_config(cfg):
    """Add the project's data and input keys (in place; safe to call twice) and return ``cfg``.

    * ``DATASETS.REGISTER``: the user's own datasets, registered by
      :func:`csgr_distill.data.register_from_cfg` (entries documented in
      :mod:`csgr_distill.data.custom` and ``docs/own_data.md``);
    * ``INPUT.FIXED_SIZE``: one key for the input size (:func:`apply_input_size`).

    ``SOLVER.STEPS`` needs no new key: fractions of ``MAX_ITER`` are accepted there
    (:func:`scale_schedule`).
    """
    if "REGISTER" not in cfg.DATASETS:
        # The user's datasets, one entry each (lists of strings), registered before training:
        #   [NAME, "coco", JSON_FILE, IMAGE_DIR]
        #   [NAME, "voc", VOC_ROOT, SPLIT, "class1,class2,..."]   ("" or omitted: the classes are
        #                                                         read from the split's XMLs)
        # Relative paths are relative to the working directory; $DETECTRON2_DATASETS is expanded.
        # e.g. DATASETS.REGISTER "[['mydata_train', 'coco', 'data/train.json', 'data/images']]"
        cfg.DATASETS.REGISTER = []
    if "DETR_AUGMENTATION" not in cfg.INPUT:
        # True: DETR's training augmentation (flip; then either a multi-scale resize to
        # INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN, or a resize to one of DETR_CROP_RESIZE, a random
        # crop of INPUT.CROP.SIZE (absolute_range) and the multi-scale resize), each half the time.
        cfg.INPUT.DETR_AUGMENTATION = False
        cfg.INPUT.DETR_CROP_RESIZE = (400, 500, 600)
    if "FIXED_SIZE" not in cfg.INPUT:
        # > 0: train and test at this size: sets INPUT.MIN_SIZE_TRAIN (S,), MAX_SIZE_TRAIN S,
        # MIN_SIZE_TEST S, MAX_SIZE_TEST S (the longer image side becomes S; square tiles stay
        # S x S). 0: those four keys as given.
        cfg.INPUT.FIXED_SIZE = 0
    return cfg


# ------------------------------------------------------------------------------------------------
# derived keys: input size and learning-rate steps
# ------------------------------------------------------------------------------------------------
def apply_derived_keys(cfg, check_steps: bool = True):
    """Apply ``INPUT.FIXED_SIZE`` (:func:`apply_input_size`) and fractional ``SOLVER.STEPS``
    (:func:`scale_schedule`) to ``cfg`` in place; returns it. Call after every merge (yaml,
    command line, ``--register-dataset``) and before ``cfg.freeze()``; a second call changes
    nothing. ``check_steps=False`` skips the steps check (a teacher config that is not trained).
    """
    apply_input_size(cfg)
    scale_schedule(cfg, check=check_steps)
    return cfg


def apply_input_size(cfg):
    """``INPUT.FIXED_SIZE`` S > 0 sets ``INPUT.MIN_SIZE_TRAIN`` = (S,), ``INPUT.MAX_SIZE_TRAIN`` =
    S, ``INPUT.MIN_SIZE_TEST`` = S and ``INPUT.MAX_SIZE_TEST`` = S (it wins over the four, which
    is logged when it changes them). detectron2 then resizes every image so its shorter side is S
    unless the longer would exceed S: the longer side becomes S, and S x S tiles are not resized.
    """
    size = int(cfg.INPUT.get("FIXED_SIZE", 0) or 0)
    if size < 0:
        raise ValueError(f"INPUT.FIXED_SIZE is {size}: give the input size in pixels "
                         "(e.g. INPUT.FIXED_SIZE 512), or 0 to use INPUT.MIN_SIZE_* / MAX_SIZE_*")
    if size == 0:
        return cfg
    new = {"MIN_SIZE_TRAIN": (size,), "MAX_SIZE_TRAIN": size,
           "MIN_SIZE_TEST": size, "MAX_SIZE_TEST": size}
    changed = {k: cfg.INPUT[k] for k, v in new.items() if tuple(_as_tuple(cfg.INPUT[k])) != _as_tuple(v)}
    if changed:
        logger.info("INPUT.FIXED_SIZE %d sets %s", size,
                    ", ".join(f"INPUT.{k} {cfg.INPUT[k]} -> {new[k]}" for k in changed))
    with _unfrozen(cfg):
        for k, v in new.items():
            cfg.INPUT[k] = v
    return cfg


def scale_schedule(cfg, check: bool = True):
    """Make ``SOLVER.STEPS`` follow ``SOLVER.MAX_ITER``.

    Rule (documented in docs/own_data.md, "Schedule"):

    * steps given as fractions (every value strictly between 0 and 1, e.g. ``(0.8, 0.95)``) are
      iterations ``floor(f * MAX_ITER)``: with ``MAX_ITER 600``, ``(480, 570)``; with 2000,
      ``(1600, 1900)``. Steps that fall on iteration 0 or repeat (a tiny ``MAX_ITER``) are dropped.
    * steps given as iterations (integers >= 1) are kept, and any step at or beyond ``MAX_ITER``
      is an error naming both keys (detectron2 would ignore it with a warning, so the learning
      rate never drops where the config says). ``check=False`` skips this check.
    * mixing fractions and iterations is an error.

    Only the ``WarmupMultiStepLR`` scheduler reads the steps; fractions are converted for any
    scheduler, the check applies to that one only. Returns ``cfg`` (changed in place).
    """
    steps = tuple(cfg.SOLVER.STEPS)
    max_iter = int(cfg.SOLVER.MAX_ITER)
    if not steps:
        return cfg
    fractions = [0 < float(s) < 1 for s in steps]
    if any(fractions) and not all(fractions):
        raise ValueError(
            f"SOLVER.STEPS {steps} mixes fractions of SOLVER.MAX_ITER (values between 0 and 1) "
            "with iterations: give all steps one way, e.g. SOLVER.STEPS \"(0.8, 0.95)\" "
            f"(fractions of MAX_ITER {max_iter}) or SOLVER.STEPS \"({int(0.8 * max_iter)}, "
            f"{int(0.95 * max_iter)})\" (iterations)")
    if all(fractions):
        new = []
        for f in steps:
            it = int(float(f) * max_iter + 1e-9)
            if it >= 1 and (not new or it > new[-1]):
                new.append(it)
        if len(new) != len(steps):
            logger.info("SOLVER.STEPS %s of MAX_ITER %d: iterations %s (steps on iteration 0 or "
                        "on an earlier step dropped)", steps, max_iter, tuple(new))
        with _unfrozen(cfg):
            cfg.SOLVER.STEPS = tuple(new)
        return cfg
    bad_type = [s for s in steps if float(s) != int(float(s)) or float(s) < 1]
    if bad_type:
        raise ValueError(f"SOLVER.STEPS {steps}: a step is an iteration (an integer >= 1) or a "
                         "fraction of SOLVER.MAX_ITER between 0 and 1, not {bad_type[0]}")
    if check and cfg.SOLVER.get("LR_SCHEDULER_NAME", "WarmupMultiStepLR") == "WarmupMultiStepLR":
        beyond = [int(s) for s in steps if int(s) >= max_iter]
        if beyond:
            raise ValueError(
                f"SOLVER.STEPS {tuple(int(s) for s in steps)} has steps at or beyond "
                f"SOLVER.MAX_ITER {max_iter} ({', '.join(map(str, beyond))}): the learning rate "
                "would never drop there. Give the steps as fractions of MAX_ITER, so that they "
                "follow it, e.g. SOLVER.STEPS \"(0.8, 0.95)\", or as iterations below MAX_ITER, "
                f"e.g. SOLVER.STEPS \"({int(0.8 * max_iter)}, {int(0.95 * max_iter)})\"")
    with _unfrozen(cfg):
        cfg.SOLVER.STEPS = tuple(int(s) for s in steps)
    return cfg


# ------------------------------------------------------------------------------------------------
# command-line overrides
# ------------------------------------------------------------------------------------------------
def merge_command_line(cfg, opts: Sequence[str]):
    """``cfg.merge_from_list(opts)`` (the trailing ``KEY VALUE`` pairs of a tool), where a
    ``MODEL.DISTILL.TEACHER.OPTS`` that is not followed by one list literal is an error showing
    the exact form, e.g. ``MODEL.DISTILL.TEACHER.OPTS "['MODEL.RETINANET.NUM_CLASSES', 1]"``
    (yacs would say "Override list has odd length" or "Type mismatch"). Returns ``cfg``."""
    opts = list(opts or [])
    for i, token in enumerate(opts):
        if token != TEACHER_OPTS_KEY:
            continue
        value = opts[i + 1] if i + 1 < len(opts) else None
        parsed = _literal(value) if isinstance(value, str) else value
        if isinstance(parsed, (list, tuple)) and len(parsed) % 2 == 0:
            continue
        raise ValueError(teacher_opts_message(opts[i + 1:], "on the command line"))
    cfg.merge_from_list(opts)
    return cfg


def check_teacher_opts(opts) -> List:
    """``MODEL.DISTILL.TEACHER.OPTS`` as a flat ``[KEY, VALUE, ...]`` list; an error showing the
    exact command-line form when it is not one (a string, or an odd number of items)."""
    if isinstance(opts, str):
        raise ValueError(teacher_opts_message(opts.split(), "in the config"))
    opts = list(opts)
    if len(opts) % 2 or not all(isinstance(k, str) for k in opts[::2]):
        raise ValueError(teacher_opts_message(opts, "in the config"))
    return opts


def teacher_opts_message(tokens, where: str) -> str:
    """The error for a ``MODEL.DISTILL.TEACHER.OPTS`` that is not a list of KEY VALUE pairs:
    its exact command-line form, built from the tokens that followed it."""
    tokens = [str(t) for t in tokens]
    listed = _unquoted_list(tokens)
    if listed is not None:
        pair = listed  # e.g. [MODEL.RETINANET.NUM_CLASSES, 6]: the same list, its keys quoted
    elif len(tokens) >= 2 and _looks_like_key(tokens[0]):
        pair = [tokens[0], _literal(tokens[1])]
    else:
        pair = ["MODEL.RETINANET.NUM_CLASSES", 1]
    form = f'{TEACHER_OPTS_KEY} "{pair!r}"'
    return (
        f"{TEACHER_OPTS_KEY} takes one list of KEY VALUE overrides for the teacher's config, "
        f"quoted as a single argument; {where} it was followed by "
        f"{' '.join(tokens) if tokens else 'nothing'}. Write: {form} (further teacher keys go "
        "inside the same brackets: \"['KEY1', VALUE1, 'KEY2', VALUE2]\")"
    )


_BARE_WORD = re.compile(r"""('[^']*'|"[^"]*")|(?<![\w.])([A-Za-z_][\w.]*)""")


def _unquoted_list(tokens: List[str]) -> Optional[list]:
    """The KEY VALUE list that ``tokens`` begin with when it was written with unquoted words
    (``[MODEL.RETINANET.NUM_CLASSES, 6]``, maybe split at its spaces), else None."""
    if not tokens or not tokens[0].lstrip().startswith(("[", "(")):
        return None
    end = next((i for i, t in enumerate(tokens) if t.rstrip().endswith(("]", ")"))), None)
    if end is None:
        return None
    quoted = _BARE_WORD.sub(
        lambda m: m.group(0) if m.group(1) or m.group(2) in ("True", "False", "None")
        else repr(m.group(2)), " ".join(tokens[:end + 1]))
    value = _literal(quoted)
    if (isinstance(value, (list, tuple)) and value and len(value) % 2 == 0
            and all(isinstance(k, str) and _looks_like_key(k) for k in value[::2])):
        return list(value)
    return None


def _looks_like_key(token: str) -> bool:
    return "." in token and token.split(".")[0].isupper()


def _literal(value: Optional[str]):
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError):
        return value


def _as_tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


class _unfrozen:
    """``with _unfrozen(cfg):`` edits a config whatever its frozen state, restoring it."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __enter__(self):
        self.frozen = self.cfg.is_frozen()
        self.cfg.defrost()

    def __exit__(self, *exc):
        if self.frozen:
            self.cfg.freeze()
