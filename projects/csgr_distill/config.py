"""``add_distill_config(cfg)``: every ``MODEL.DISTILL.*`` key, documented where it is defined,
plus the project's data and schedule keys (``DATASETS.REGISTER``, ``INPUT.FIXED_SIZE``, steps as
fractions of ``SOLVER.MAX_ITER``) and the functions that apply them:

* :func:`merge_command_line` -- ``cfg.merge_from_list(opts)`` with a clear error for the common
  ``MODEL.DISTILL.TEACHER.OPTS KEY VALUE`` mistake;
* :func:`apply_derived_keys` -- ``INPUT.FIXED_SIZE`` and fractional ``SOLVER.STEPS`` into the keys
  detectron2 reads (call it after every merge, before ``cfg.freeze()``);
* :func:`load_config` -- all of it in the order every tool uses: yaml, ``KEY VALUE`` overrides,
  ``--register-dataset`` entries, registration, derived keys.
"""
import ast
import logging
import re
from typing import List, Optional, Sequence

from detectron2.config import CfgNode as CN

logger = logging.getLogger(__name__)

#: the command-line key whose value is itself a KEY VALUE list
TEACHER_OPTS_KEY = "MODEL.DISTILL.TEACHER.OPTS"


def add_distill_config(cfg):
    """Add the distillation keys to a detectron2 config (in place) and return it.

    Safe to call twice. The teacher's config gets the same function applied.
    """
    add_data_config(cfg)
    add_architecture_config(cfg)
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
    # Inheriting (FGD's option; FGD's official same-family configs turn it on): a training run
    # that starts from iteration 0 copies the teacher's neck and head (every student tensor
    # outside backbone.bottom_up and the distillers: RetinaNet's FPN + head, Faster R-CNN's FPN +
    # RPN + RoI heads) into the student, after MODEL.WEIGHTS is loaded (its neck/head tensors are
    # replaced, with a warning); the bottom-up backbone stays the student's. Not applied when
    # --resume continues from a checkpoint. Needs the same family and the same neck/head tensor
    # names and shapes (checked at build time). csgr_distill/inherit.py.
    _C.MODEL.DISTILL.INHERIT_TEACHER = False

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

    # MIMIC: FitNet-style feature mimicking (FitNets, ICLR 2015; Li et al., CVPR 2017), per level
    # L = WEIGHT * mean over (N, C, H, W) of (r(S) - T)^2, r: 1x1 adapter where channels differ.
    _C.MODEL.DISTILL.MIMIC = CN()
    # Not a published value: no paper fixes one for whole-map FPN mimicking on these detectors
    # (FitNets trains a classifier stage-wise with 1/2 ||.||^2; Li et al. mimic RPN-region
    # features with their own weight). The loss here is a mean, independent of image size, batch
    # and channel count, so 1.0 makes each level's term the mean squared feature difference, of
    # the order of the detection losses for FPN maps of unit-order values; sweep it with
    # `tools/benchmark.py gain --variant`.
    _C.MODEL.DISTILL.MIMIC.WEIGHT = 1.0
    # Levels distilled (present in both networks with equal strides); R-CNN configs: p2-p5.
    _C.MODEL.DISTILL.MIMIC.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # MIMIC's own schedule; "default" follows MODEL.DISTILL.DECAY.
    _C.MODEL.DISTILL.MIMIC.DECAY = decay_node("default")

    # PKD: Pearson-correlation distillation (Cao et al., NeurIPS 2022), per level
    # L = WEIGHT * mean over (N, C, H, W) of (S_hat - T_hat)^2 / 2, each channel standardised
    # over (N, H, W) (as CSGR: zero mean, unit unbiased std, + 1e-6) = WEIGHT * (1 - Pearson r).
    _C.MODEL.DISTILL.PKD = CN()
    # Published: 6 for two-stage students and for RetinaNet-R50 2x students (the official
    # RetinaNet X101 -> R50 config uses 10).
    _C.MODEL.DISTILL.PKD.WEIGHT = 6.0
    # Levels distilled (present in both networks with equal strides); R-CNN configs: p2-p5.
    _C.MODEL.DISTILL.PKD.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # PKD's own schedule; "default" follows MODEL.DISTILL.DECAY (the paper does not decay).
    _C.MODEL.DISTILL.PKD.DECAY = decay_node("default")

    # KD: temperature KD (Hinton et al. 2015) on every anchor of the dense logits, teacher and
    # student of the same family: dense students distil their class logits, Faster R-CNN students
    # their RPN objectness logits (their only logits defined on every anchor; the RoI class
    # logits of two networks belong to differently sampled proposals). Per anchor the KL of the
    # softened teacher and student distributions; L = WEIGHT * T^2 * mean over all anchors.
    _C.MODEL.DISTILL.KD = CN()
    # Not a published value (no paper fixes one for dense-logit KD on these detectors). 1.0, the
    # plain KL: being a mean over all anchors (most of them background, with near-zero KL), the
    # loss is small next to a focal loss normalised by the positives, so it guides rather than
    # overrides the detection loss; sweep it with `tools/benchmark.py gain --variant`.
    _C.MODEL.DISTILL.KD.WEIGHT = 1.0
    # Temperature T (Hinton's; T^2 keeps the gradient size). 1.0: the teacher's own
    # probabilities. Not a published detection value: focal-loss heads put most anchors near 0,
    # and T > 1 would pull all of them towards 0.5.
    _C.MODEL.DISTILL.KD.TEMPERATURE = 1.0
    # "sigmoid": sum over the K classes of Bernoulli KLs per anchor (heads trained with sigmoid /
    # focal losses: RetinaNet, FCOS, the RPN); "softmax": one categorical KL over the K classes
    # per anchor (heads trained with a softmax; needs K >= 2, so not the RPN).
    _C.MODEL.DISTILL.KD.ACTIVATION = "sigmoid"
    # KD's own schedule; "default" follows MODEL.DISTILL.DECAY.
    _C.MODEL.DISTILL.KD.DECAY = decay_node("default")

    # FGD: focal and global distillation (Yang et al., CVPR 2022; shared/methods/FGD.md), per
    # level alpha*L_fg + beta*L_bg + gamma*L_at + lambda*L_gl (csgr_distill/distillers/fgd.py).
    # The weights are the official RetinaNet (and GFL) ones; configs/Base-Distill-RCNN-FPN.yaml
    # sets the official Faster / Mask R-CNN ones (5e-5, 2.5e-5, 5e-5, 5e-7).
    _C.MODEL.DISTILL.FGD = CN()
    # Attention temperature T_att (official: 0.5 for RetinaNet, GFL, Faster/Mask R-CNN and
    # RepPoints; 0.8 for FCOS).
    _C.MODEL.DISTILL.FGD.TEMPERATURE = 0.5
    _C.MODEL.DISTILL.FGD.ALPHA = 1e-3  # foreground focal term (official RetinaNet)
    _C.MODEL.DISTILL.FGD.BETA = 5e-4  # background focal term (official RetinaNet)
    _C.MODEL.DISTILL.FGD.GAMMA = 5e-4  # attention term (official RetinaNet)
    _C.MODEL.DISTILL.FGD.LAMBDA = 5e-6  # global (GC block) term (official RetinaNet)
    # Levels distilled (present in both networks with equal strides); R-CNN configs: p2-p5.
    _C.MODEL.DISTILL.FGD.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # How ground-truth boxes reach a level's grid: "padded" divides by the padded batch size
    # (each box covers the cells under it); "unpadded" by the image's own size, as the official
    # code does (boxes of an image smaller than the padded batch are stretched towards the
    # padding).
    _C.MODEL.DISTILL.FGD.BOX_SCALING = "padded"
    # FGD's own schedule; "default" follows MODEL.DISTILL.DECAY (the paper does not decay).
    _C.MODEL.DISTILL.FGD.DECAY = decay_node("default")

    # TAR: task adaptive regularization (Sun et al., arXiv 2006.13108; shared/methods/TAR.md;
    # csgr_distill/distillers/tar.py). The paper gives none of its loss weights or
    # hyperparameters and has no public code: every value below not marked "spec" is our choice
    # (README "TAR: chosen values" says how each was chosen). A weight of 0 turns its term off;
    # configs/Base-Distill-RetinaNet.yaml turns the RoI terms off (a dense detector has no RoIs).
    _C.MODEL.DISTILL.TAR = CN()
    # Gaussian-mask feature imitation, per level sum M (r(S) - T)^2 / sum M (spec). The sum runs
    # over the channels too, so a level's term is about C times a per-channel squared difference:
    # 4e-3 ~ 1/256 makes it the mean squared difference inside the mask, MIMIC's scale (chosen).
    _C.MODEL.DISTILL.TAR.FEAT_WEIGHT = 4e-3
    # sigma = SIGMA_SCALE x box size, in grid units (spec default: half the box size).
    _C.MODEL.DISTILL.TAR.SIGMA_SCALE = 0.5
    # Levels of the feature term (present in both networks with equal strides); R-CNN configs:
    # p2-p5.
    _C.MODEL.DISTILL.TAR.IN_FEATURES = ["p3", "p4", "p5", "p6", "p7"]
    # Classification-head KD on the shared RoIs, tau^2 KL(p_t || p_s) over K + 1 classes (spec).
    # Weight 1: the scale of the box head's own cross-entropy (chosen); tau 1 (spec's start).
    _C.MODEL.DISTILL.TAR.CLS_WEIGHT = 1.0
    _C.MODEL.DISTILL.TAR.TEMPERATURE = 1.0
    # Adaptive regression distillation on the positive shared RoIs (spec), divided by the
    # positive count (spec), whereas the box head's own loss is divided by all sampled RoIs: with
    # P positives of R RoIs, equal weights give the term R/P times that loss's gradient per
    # positive (14-25x in the demo: 5-9 of 128). 0.1 (chosen, paper value unknown): weight 1 made
    # a demo Faster R-CNN student diverge at iteration ~80 (README, "TAR: chosen values"); 0.1
    # trained all three seeds and gained more. Smooth-L1 beta 1.0, Fast R-CNN's smooth L1 (the
    # paper names smooth L1 without a beta; 0 gives L1).
    _C.MODEL.DISTILL.TAR.REG_WEIGHT = 0.1
    _C.MODEL.DISTILL.TAR.REG_BETA = 1.0
    # The teacher's box is a target where its IoU with the matched GT beats the student's box
    # ("student", spec default) or the RoI's own ("proposal").
    _C.MODEL.DISTILL.TAR.REG_COMPARE = "student"
    # Region proposal sharing: both box heads answer for the student's sampled RoIs ("student",
    # spec default), the teacher's own RoIs sampled by its ROI heads ("teacher"), or both
    # ("union"). The last two run the student's box head a second time on the extra RoIs.
    _C.MODEL.DISTILL.TAR.PROPOSALS = "student"
    # TAR's distillation decay (spec): linear from 1 at iteration 0 to 0 at SOLVER.MAX_ITER.
    _C.MODEL.DISTILL.TAR.DECAY = decay_node("linear")

    # LD: localization distillation (Zheng et al., CVPR 2022, arXiv 2102.12252; released code
    # HikariTJU/LD; docs/methods/LD.md; csgr_distill/distillers/ld.py) between
    # DistributionRetinaNet teacher and student. Defaults: the GFL recipe (the paper's and the
    # released LDHead's; configs/LD-RetinaNet-R50-GFL-recipe.yaml); configs/LD-RetinaNet-R50.yaml
    # sets the released RetinaNet recipe (LDRetinaHead, configs/ld/ld_retina_r50_1x.py there).
    _C.MODEL.DISTILL.LD = CN()
    # Main-region LD on the student's positives (released configs, GFL recipe: weight 0.25, T 10;
    # RetinaNet recipe: 5, T 10). Divided by 4 (released code's avg_factor in both heads).
    _C.MODEL.DISTILL.LD.LD_WEIGHT = 0.25
    _C.MODEL.DISTILL.LD.LD_TEMPERATURE = 10.0
    # The softmax of both LD terms: "side", one per box side over its REG_MAX + 1 bins, the KLs of
    # the 4 sides summed (paper, released GFL head); "anchor", one over an anchor's 4 (REG_MAX + 1)
    # logits (released RetinaNet head).
    _C.MODEL.DISTILL.LD.SOFTMAX_OVER = "side"
    # Valuable-localization-region LD, same temperature (GFL recipe 0.25 with the positives;
    # RetinaNet recipe 0.03 x 5 = 0.15 without them). Its normaliser is the released code's:
    # 16 in the GFL head, 4 in the RetinaNet head.
    _C.MODEL.DISTILL.LD.VLR_WEIGHT = 0.25
    _C.MODEL.DISTILL.LD.VLR_EXCLUDE_POSITIVES = False
    _C.MODEL.DISTILL.LD.VLR_NORMALIZER = 16.0
    # ATSS candidates per level and GT (9), and the DIoU band's lower factor [0.25 t_g, t_g)
    # (released assigners).
    _C.MODEL.DISTILL.LD.VLR_TOPK = 9
    _C.MODEL.DISTILL.LD.VLR_LOW = 0.25
    # The band's DIoU: "paper", the true DIoU (the paper's definition); "released", what the
    # released helper computes (intersection over the anchor's area, not the union, minus the
    # distance term: its bbox_overlaps 'diou' mode keeps area1 as the union). Ours: the paper's,
    # the released one being a bug of that call; the two regions share only 37 % of the true
    # one on RetinaNet anchors (docs/methods/LD.md).
    _C.MODEL.DISTILL.LD.VLR_DIOU = "paper"
    # Main KD on the positives' class logits (GFL recipe: weight 10, T 2; RetinaNet recipe: 10,
    # T 8). KD_NORMALIZER "level": each FPN level's sum divided by that level's positives, the
    # levels summed (released code, both heads); "all": the sum over all levels divided by all
    # positives (this project's formula before 2026-12-05; about 1/L of "level" when the
    # positives spread over L levels).
    _C.MODEL.DISTILL.LD.KD_WEIGHT = 10.0
    _C.MODEL.DISTILL.LD.KD_TEMPERATURE = 2.0
    _C.MODEL.DISTILL.LD.KD_NORMALIZER = "level"
    # LD's own schedule; "default" follows MODEL.DISTILL.DECAY (the paper does not decay).
    _C.MODEL.DISTILL.LD.DECAY = decay_node("default")

    # DETRDistill (Chang et al., ICCV 2023; docs/methods/DETRDistill.md;
    # csgr_distill/distillers/detrdistill.py) between DETR-family teacher and student. Each
    # component's weight 0 turns it off (the paper's ablation). Sources: "paper", "released
    # code" (BIVLab-USTC/DETRDistill, its Deformable DETR config), "ours".
    _C.MODEL.DISTILL.DETRDISTILL = CN()
    # Hungarian logits distillation per decoder layer: matching costs = pair-loss weights
    # (paper and released code: class 1, L1 5, GIoU 2); the component's overall weight (paper 1).
    _C.MODEL.DISTILL.DETRDISTILL.LOGITS_WEIGHT = 1.0
    _C.MODEL.DISTILL.DETRDISTILL.COST_CLASS = 1.0
    _C.MODEL.DISTILL.DETRDISTILL.COST_L1 = 5.0
    _C.MODEL.DISTILL.DETRDISTILL.COST_GIOU = 2.0
    # Clip the teacher's boxes to the image before the matching and the L1/GIoU pair losses
    # (released code: True; the paper does not say). False: the boxes as predicted.
    _C.MODEL.DISTILL.DETRDISTILL.CLIP_TEACHER_BOXES = True
    # Temperature of the KL for softmax DETRs (ours: the released code distils sigmoid Deformable
    # DETR only; neither publishes one: 1, the plain KL).
    _C.MODEL.DISTILL.DETRDISTILL.TEMPERATURE = 1.0
    # Target-aware feature distillation per decoder layer (paper and released code: weight 1,
    # top-K 100, mask floor 0.01).
    _C.MODEL.DISTILL.DETRDISTILL.FEATURE_WEIGHT = 1.0
    _C.MODEL.DISTILL.DETRDISTILL.TOPK = 100
    _C.MODEL.DISTILL.DETRDISTILL.MASK_FLOOR = 0.01
    # Query-prior assignment distillation: the student's own set losses on its extra decoder pass
    # with the teacher's queries, under the teacher's assignment (paper: weight 1).
    _C.MODEL.DISTILL.DETRDISTILL.QUERY_PRIOR_WEIGHT = 1.0
    # Which teacher assignment supervises layer l of that pass: "per_layer" (layer l's own:
    # released code; the paper names no layer) or "last" (the teacher's last layer's for every
    # layer: ours, this project's first form).
    _C.MODEL.DISTILL.DETRDISTILL.QUERY_PRIOR_ASSIGNMENT = "per_layer"
    # Contrastive query term of the released code (every layer; learned projection heads of width
    # CONTRAST_DIM, InfoNCE over the batch's matched pairs, temperature 0.07; its config: weight
    # 0.2). Not in the paper's method: off by default; 0.2 reproduces the released config.
    _C.MODEL.DISTILL.DETRDISTILL.CONTRAST_WEIGHT = 0.0
    _C.MODEL.DISTILL.DETRDISTILL.CONTRAST_TEMPERATURE = 0.07
    _C.MODEL.DISTILL.DETRDISTILL.CONTRAST_DIM = 512
    _C.MODEL.DISTILL.DETRDISTILL.DECAY = decay_node("default")
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
      :mod:`csgr_distill.data.custom` and ``datasets/README.md``);
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


def load_config(config_file: str, opts: Sequence[str] = (), register: Sequence[str] = (),
                check_steps: bool = True, register_datasets: bool = True):
    """The (unfrozen) config of a tool: ``get_cfg()`` with the project's keys, ``config_file``,
    the ``KEY VALUE`` overrides ``opts`` (:func:`merge_command_line`), the ``--register-dataset``
    values ``register`` (``NAME=FORMAT:PATH[:PATH...]``; they replace entries of the same name),
    the ``DATASETS.REGISTER`` datasets registered (``register_datasets=False``: not yet; the
    caller registers them with :func:`csgr_distill.data.register_from_cfg` once its loggers are
    set up, so their summary lines and warnings reach the console and ``log.txt``), then
    :func:`apply_derived_keys`.

    Raises:
        FileNotFoundError: ``config_file`` does not exist (naming ``--config-file``).
        ValueError (and the dataset errors of :mod:`csgr_distill.data.custom`): bad overrides,
            entries, steps or input size, each naming the key and the fix.
    """
    from detectron2.config import get_cfg

    from .cli import check_file
    from .data.custom import register_from_cfg, replace_entries

    cfg = add_distill_config(get_cfg())
    cfg.merge_from_file(check_file(config_file))
    merge_command_line(cfg, opts)
    replace_entries(cfg, register)
    if register_datasets:
        register_from_cfg(cfg)
    return apply_derived_keys(cfg, check_steps=check_steps)


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

    Rule (documented in datasets/README.md):

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
