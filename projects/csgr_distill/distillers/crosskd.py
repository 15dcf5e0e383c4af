"""CrossKD: Cross-Head Knowledge Distillation for Object Detection (Wang et al., CVPR 2024, arXiv
2306.11369; released code jbwang1997/CrossKD, mmdet 3.x). Formulas with the paper's symbols,
every key's source, the two published recipes and what differs from the released code:
``docs/methods/CrossKD.md``.

Prediction mimicking gives the student's head two targets at once, the ground truth and the
teacher's predictions, which disagree. CrossKD leaves the student's head to the ground truth: the
student's head activations at stage k (the student's tower after its k-th conv, before that conv's
activation) go through the *teacher's* remaining head layers (its convs after stage k and its
predictors; frozen, but the gradient flows through them back into the student), and these
cross-head predictions ``p^s`` are distilled towards the teacher's own ``p^t``:

``L = L_cls(p^s_cls, p^t_cls) + L_box(p^s_box, p^t_box)``

per anchor a of every level, over the anchors the student's assignment does not ignore
(``label != -1``; the released ``label_weights``):

* ``loss_crosskd_cls``: the KD quality focal loss of the released code,
  ``sum_{a,c} BCE(x^s_ac, sigma(x^t_ac)) |sigma(x^s_ac) - sigma(x^t_ac)|^beta / N_pos``
  (every class, sigmoid targets, ``N_pos`` the batch's positives);
* ``loss_crosskd_giou``: ``sum_a w_a (1 - GIoU(B^s_a, B^t_a)) / Z`` with the boxes decoded from
  both box outputs on the anchors by the teacher's box transform, ``w_a = max_c sigma(x^t_ac)``
  (the teacher's score, no gradient) and ``Z`` = ``N_pos`` (RetinaNet recipe) or ``sum_a w_a``
  (GFL recipe, ``BOX_NORMALIZER``);
* ``loss_crosskd_kl`` (GFL recipe, a distribution teacher): ``sum_a w_a (1/4) sum_sides T^2
  KL(softmax(t / T) || softmax(s / T)) / Z`` on each side's bins (the KL summed over the bins).

Before the teacher's layers the student's activations are standardised per channel and given the
teacher's per-channel mean and std at that stage (released ``align_scale``), after a 1x1 conv when
the channel counts differ (ours: the released code needs equal counts). Every term is returned per
level (``loss_crosskd_<term>_<level>``), the levels summing to the released loss.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import RetinaNet
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss

from ..layers.adapters import build_channel_adapter, channel_standardize
from ..layers.box_distribution import DistributionBoxTransform
from ..layers.reference import plain_box_decode, plain_giou, plain_kl, plain_sigmoid, plain_softmax
from ..modeling.distribution_retinanet import DistributionRetinaNet
from .base import Distiller, Variant
from .registry import register_distiller

__all__ = ["CrossKDDistiller", "kd_quality_focal", "side_kl", "align_scale", "stage_of",
           "BOX_NORMALIZERS"]

#: ``MODEL.DISTILL.CROSSKD.BOX_NORMALIZER`` values: the batch's positives (released RetinaNet
#: recipe) or the sum of the box weights (released GFL recipe)
BOX_NORMALIZERS = ("positives", "weights")
NODE = "MODEL.DISTILL.CROSSKD"


def kd_quality_focal(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """The released ``kd_quality_focal_loss`` elementwise: ``BCE(x^s, sigma(x^t)) |sigma(x^s) -
    sigma(x^t)|^beta`` for logits ``pred`` (student side) and ``target`` (teacher, no gradient)
    of any one shape. 0 where the two agree."""
    t = torch.sigmoid(target.detach())
    bce = F.binary_cross_entropy_with_logits(pred, t, reduction="none")
    return bce * (torch.sigmoid(pred) - t).abs().pow(beta)


def side_kl(pred: Tensor, target: Tensor, temperature: float) -> Tensor:
    """``[M, B]`` logits twice -> ``[M]``: ``T^2 sum_b p_b (log p_b - log q_b)``, ``p =
    softmax(target / T)`` (no gradient), ``q = softmax(pred / T)``: the KL summed over the B bins
    (the released GFL recipe's ``class_reduction='sum'``)."""
    tau = float(temperature)
    log_q = F.log_softmax(pred / tau, dim=1)
    log_p = F.log_softmax(target.detach() / tau, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1) * tau * tau


def channel_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """``[N, C, H, W]`` -> the per-channel mean and unbiased std over (N, H, W), each
    ``[1, C, 1, 1]`` (a single position: std 0, not NaN)."""
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = (x - mean).pow(2).sum(dim=(0, 2, 3), keepdim=True) / max(m - 1, 1)
    return mean, var.sqrt()


def align_scale(student: Tensor, teacher: Tensor) -> Tensor:
    """The released ``align_scale``: ``student`` ``[N, C, H, W]`` standardised per channel over
    (N, H, W) (:func:`channel_standardize`: unbiased std + 1e-6), then given ``teacher``'s
    per-channel mean and std (no gradient)."""
    mean, std = channel_moments(teacher.detach())
    return channel_standardize(student) * std + mean


def stage_of(index: int, convs: int) -> int:
    """The tower stage ``REUSED_TEACHER_HEAD_IDX`` names in a head of ``convs`` convs: ``index``
    itself when >= 0 (the released meaning), ``convs + index`` when negative (counted from the
    end: -1 is the stage before the last conv)."""
    return index if index >= 0 else convs + index


@register_distiller("CrossKD")
class CrossKDDistiller(Distiller):
    """CrossKD's class and box terms on the cross-head predictions (module docstring), between a
    RetinaNet-family student and teacher with the same head levels and anchors."""

    required_outputs = {"student": ("head_towers", "anchors", "anchor_labels"),
                        "teacher": ("cls_logits", "box_deltas", "head_towers", "head_from")}
    loss_weight_keys = {"loss_crosskd_cls": f"{NODE}.CLS_WEIGHT",
                        "loss_crosskd_giou": f"{NODE}.GIOU_WEIGHT",
                        "loss_crosskd_kl": f"{NODE}.KL_WEIGHT"}
    benchmark_variants = {
        # the released best: CrossKD with PKD on the FPN maps
        "CrossKD+PKD": Variant(("MODEL.DISTILL.METHODS", ("CrossKD", "PKD")),
                               families=("dense",), parts=("gain",)),
        # the released GFL recipe (a distribution-head teacher: refused elsewhere)
        "CrossKD GFL recipe": Variant((f"{NODE}.KL_WEIGHT", 3.0, f"{NODE}.GIOU_WEIGHT", 2.0,
                                       f"{NODE}.BOX_NORMALIZER", "weights"),
                                      families=("dense",)),
    }

    @classmethod
    def add_config(cls, node) -> None:
        # Defaults: the released RetinaNet recipe (its config
        # crosskd_r50_retinanet_r101_fpn_2x_coco.py; here configs/CrossKD-RetinaNet-R50.yaml);
        # the released GFL recipe (crosskd_r50_gflv1_r101-2x-ms_fpn_1x_coco.py) on
        # DistributionRetinaNet: configs/CrossKD-RetinaNet-R50-GFL-recipe.yaml.
        #
        # The tower stage where the student's head activations enter the teacher's head: the
        # output of conv k (after its norm, before its activation); the teacher runs its convs
        # after stage k and its predictors. Released: 3 (both recipes, 4-conv heads: the
        # teacher's last conv is reused). Ours: -1, the same stage on 4-conv heads, counted from
        # the end of each head (-1: the student's stage before its last conv feeds the teacher's
        # last conv), so heads of other depths (the demo: 2-conv student, 4-conv teacher) keep
        # its meaning. A value >= 0 is the released absolute index, the same in both heads.
        node.REUSED_TEACHER_HEAD_IDX = -1
        # Class KD, the released KDQualityFocalLoss (both recipes: weight 1, beta 1), summed over
        # the non-ignored anchors and every class, divided by the batch's positives.
        node.CLS_WEIGHT = 1.0
        node.CLS_BETA = 1.0
        # Box KD, GIoU between the boxes decoded from the cross-head and the teacher's box
        # outputs, weighted by the teacher's max class score (released RetinaNet recipe: 1; GFL
        # recipe: 2).
        node.GIOU_WEIGHT = 1.0
        # Box KD on each side's distribution, the KL summed over the bins at temperature T, mean
        # over the 4 sides, weighted like GIoU; needs a DistributionRetinaNet teacher (released
        # GFL recipe: weight 3, T 1; RetinaNet recipe: none, 0).
        node.KL_WEIGHT = 0.0
        node.KL_TEMPERATURE = 1.0
        # The box terms' divisor: "positives", the batch's positive anchors (released RetinaNet
        # recipe, as the class term); "weights", the sum of the box weights over the non-ignored
        # anchors (released GFL recipe).
        node.BOX_NORMALIZER = "positives"

    @configurable
    def __init__(self, *, in_features: Sequence[str], num_classes: int, student_stage: int,
                 teacher_stage: int, student_channels: int, teacher_channels: int,
                 cls_weight: float = 1.0, cls_beta: float = 1.0, giou_weight: float = 1.0,
                 kl_weight: float = 0.0, kl_temperature: float = 1.0,
                 box_normalizer: str = "positives"):
        """
        Args:
            in_features: the head levels, in head order (the same in both detectors).
            num_classes: K. student_stage / teacher_stage: the tower stage read from the
                student and where the teacher's head resumes (:func:`stage_of`).
            student_channels / teacher_channels: the towers' channels at those stages (a 1x1
                conv adapter per tower when they differ).
            cls_weight, cls_beta: the class term; giou_weight: the GIoU term; kl_weight,
                kl_temperature: the side-distribution term; box_normalizer: the box terms'
                divisor (:data:`BOX_NORMALIZERS`).
        """
        super().__init__()
        for key, value in (("CLS_WEIGHT", cls_weight), ("CLS_BETA", cls_beta),
                           ("GIOU_WEIGHT", giou_weight), ("KL_WEIGHT", kl_weight)):
            if value < 0:
                raise ValueError(f"{NODE}.{key} must be >= 0, got {value}")
        if kl_temperature <= 0:
            raise ValueError(f"{NODE}.KL_TEMPERATURE must be > 0, got {kl_temperature}")
        if box_normalizer not in BOX_NORMALIZERS:
            raise ValueError(f"{NODE}.BOX_NORMALIZER must be one of {list(BOX_NORMALIZERS)}, "
                             f"got {box_normalizer!r}")
        self.in_features = list(in_features)
        self.num_classes = int(num_classes)
        self.student_stage, self.teacher_stage = int(student_stage), int(teacher_stage)
        self.cls_weight, self.cls_beta = float(cls_weight), float(cls_beta)
        self.giou_weight = float(giou_weight)
        self.kl_weight, self.kl_temperature = float(kl_weight), float(kl_temperature)
        self.box_normalizer = box_normalizer
        # one adapter per tower, shared by the levels as the towers are
        self.cls_adapter = build_channel_adapter(student_channels, teacher_channels)
        self.box_adapter = build_channel_adapter(student_channels, teacher_channels)

    @classmethod
    def from_config(cls, cfg, student, teacher):
        for role, spec in (("student", student), ("teacher", teacher)):
            if not issubclass(spec.model_type, RetinaNet):
                raise ValueError(
                    f"MODEL.DISTILL.METHODS 'CrossKD' runs the student's head activations through "
                    f"the teacher's head: the {role} must be a RetinaNet-family detector "
                    f"(RetinaNet, DistributionRetinaNet, their Distill* classes), not {spec.name}. "
                    "Use RetinaNet teacher and student (configs/CrossKD-RetinaNet-R50.yaml), or "
                    "a feature method (PKD, CSGR) for this pair")
        scfg, tcfg = student.cfg, teacher.cfg
        s_levels, t_levels = list(scfg.MODEL.RETINANET.IN_FEATURES), \
            list(tcfg.MODEL.RETINANET.IN_FEATURES)
        if s_levels != t_levels:
            raise ValueError(
                f"CrossKD: the student's head reads {s_levels} (MODEL.RETINANET.IN_FEATURES), the "
                f"teacher's {t_levels}; CrossKD runs each student level through the teacher's "
                "head and compares it with the teacher's own prediction there: use the same "
                "head levels")
        for key in ("SIZES", "ASPECT_RATIOS", "OFFSET"):
            if scfg.MODEL.ANCHOR_GENERATOR[key] != tcfg.MODEL.ANCHOR_GENERATOR[key]:
                raise ValueError(
                    f"CrossKD: MODEL.ANCHOR_GENERATOR.{key} differs between student and teacher; "
                    "CrossKD compares the two heads anchor by anchor on the student's "
                    "assignment: give the teacher the student's anchors")
        index = int(cfg.MODEL.DISTILL.CROSSKD.REUSED_TEACHER_HEAD_IDX)
        convs = {"student": scfg.MODEL.RETINANET.NUM_CONVS,
                 "teacher": tcfg.MODEL.RETINANET.NUM_CONVS}
        stages = {role: stage_of(index, n) for role, n in convs.items()}
        for role, stage in stages.items():
            if not 0 <= stage <= convs[role]:
                raise ValueError(
                    f"CrossKD: {NODE}.REUSED_TEACHER_HEAD_IDX {index} names no stage of the "
                    f"{role}'s head towers ({convs[role]} convs, MODEL.RETINANET.NUM_CONVS; "
                    f"stages 0..{convs[role]}, or -1..-{convs[role]} from the end): use a stage "
                    f"both heads have (-1: before each head's last conv)")
        c = cfg.MODEL.DISTILL.CROSSKD
        if c.KL_WEIGHT > 0 and not issubclass(teacher.model_type, DistributionRetinaNet):
            raise ValueError(
                f"CrossKD: {NODE}.KL_WEIGHT {c.KL_WEIGHT} distils box-side distributions, which "
                f"the teacher ({teacher.name}) does not predict: use a DistributionRetinaNet "
                "teacher (configs/CrossKD-RetinaNet-R50-GFL-recipe.yaml) or KL_WEIGHT 0 (the "
                "RetinaNet recipe)")
        # detectron2's RetinaNetHead: every tower conv keeps the channels of the head's input
        channels = {role: spec.shapes[s_levels[0]].channels
                    for role, spec in (("student", student), ("teacher", teacher))}
        return {"in_features": s_levels, "num_classes": student.num_classes,
                "student_stage": stages["student"], "teacher_stage": stages["teacher"],
                "student_channels": channels["student"],
                "teacher_channels": channels["teacher"],
                "cls_weight": c.CLS_WEIGHT, "cls_beta": c.CLS_BETA,
                "giou_weight": c.GIOU_WEIGHT, "kl_weight": c.KL_WEIGHT,
                "kl_temperature": c.KL_TEMPERATURE, "box_normalizer": c.BOX_NORMALIZER}

    # ---- the cross head ------------------------------------------------------------------------
    def cross_inputs(self, student, teacher) -> Tuple[List[Tensor], List[Tensor]]:
        """Per level the student's class and box tower activations at its stage, adapted to the
        teacher's channels and aligned to the teacher's statistics at its stage (what enters the
        teacher's head): two lists of ``[N, C_t, H_l, W_l]``."""
        s_towers, t_towers = student.head_towers, teacher.head_towers
        for role, towers, stage in (("student", s_towers, self.student_stage),
                                    ("teacher", t_towers, self.teacher_stage)):
            if len(towers["cls"]) <= stage or len(towers["cls"][stage]) != len(self.in_features):
                raise ValueError(
                    f"CrossKD: the {role}'s head_towers have {len(towers['cls']) - 1} convs and "
                    f"{len(towers['cls'][0])} levels; built for stage {stage} of levels "
                    f"{self.in_features}")
        out = []
        for tower, adapter in (("cls", self.cls_adapter), ("box", self.box_adapter)):
            out.append([align_scale(adapter(s), t) for s, t in
                        zip(s_towers[tower][self.student_stage],
                            t_towers[tower][self.teacher_stage])])
        return out[0], out[1]

    def cross_head(self, student, teacher) -> Tuple[List[Tensor], List[Tensor]]:
        """The cross-head predictions: per level ``[N, A*K, H_l, W_l]`` class logits and the
        teacher-shaped box outputs of the student's activations through the teacher's head."""
        cls_in, box_in = self.cross_inputs(student, teacher)
        return teacher.head_from(self.teacher_stage, cls_in, box_in)

    def reference_losses(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """:func:`straightforward_crosskd`."""
        return straightforward_crosskd(self, student, teacher, gt_instances)

    def forward(self, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
        """``(DetectorOutputs, DetectorOutputs, list[Instances]) ->
        {"loss_crosskd_<term>_<level>": ...}`` for the terms whose weight is > 0
        (``gt_instances`` unused: the student's recorded assignment labels the anchors)."""
        cross_cls, cross_box = self.cross_head(student, teacher)
        k = self.num_classes
        box_transform = teacher.head_from.box_transform
        labels = torch.stack(student.anchor_labels)  # [N, R]
        valid = labels >= 0
        num_pos = ((labels != k) & valid).sum().clamp_min(1).to(cross_cls[0].dtype)
        cls_sums, giou_sums, kl_sums, weight_sum = [], [], [], 0.0
        start = 0
        for level, (c_cls, c_box, t_cls, t_box, anchors) in enumerate(zip(
                cross_cls, cross_box, teacher.cls_logits, teacher.box_deltas, student.anchors)):
            n, ak, h, w = t_cls.shape
            width = t_box.shape[1] // (ak // k)  # box outputs per anchor: 4 or 4 (n + 1)
            if c_cls.shape != t_cls.shape or c_box.shape != t_box.shape:
                raise ValueError(f"CrossKD level {self.in_features[level]}: cross-head outputs "
                                 f"{tuple(c_cls.shape)}, {tuple(c_box.shape)} and the teacher's "
                                 f"{tuple(t_cls.shape)}, {tuple(t_box.shape)} differ")
            size = h * w * (ak // k)
            keep = valid[:, start:start + size]  # [N, R_l]
            start += size
            c_cls, t_cls = permute_to_N_HWA_K(c_cls, k)[keep], permute_to_N_HWA_K(t_cls, k)[keep]
            cls_sums.append(kd_quality_focal(c_cls, t_cls, self.cls_beta).sum())
            weight = torch.sigmoid(t_cls.detach().max(dim=1).values)  # [M]
            weight_sum = weight_sum + weight.sum()
            c_box = permute_to_N_HWA_K(c_box, width)[keep]
            t_box = permute_to_N_HWA_K(t_box, width)[keep].detach()
            if self.giou_weight > 0:
                boxes = anchors.tensor.to(c_box.dtype)[None].expand(n, -1, -1)[keep]
                giou = generalized_box_iou_loss(box_transform.apply_deltas(c_box, boxes),
                                                box_transform.apply_deltas(t_box, boxes),
                                                reduction="none")
                giou_sums.append((weight * giou).sum())
            if self.kl_weight > 0:
                bins = width // 4
                kl = side_kl(c_box.reshape(-1, bins), t_box.reshape(-1, bins),
                             self.kl_temperature).reshape(-1, 4).mean(dim=1)
                kl_sums.append((weight * kl).sum())
        box_norm = num_pos if self.box_normalizer == "positives" else \
            torch.as_tensor(weight_sum).clamp_min(1e-12)
        out = {}
        for term, sums, weight, norm in (("cls", cls_sums, self.cls_weight, num_pos),
                                         ("giou", giou_sums, self.giou_weight, box_norm),
                                         ("kl", kl_sums, self.kl_weight, box_norm)):
            if weight > 0:
                for level, value in zip(self.in_features, sums):
                    out[f"loss_crosskd_{term}_{level}"] = weight * value / norm
        return out


# ------------------------------------------------------------------------------------------------
# straightforward reference (Distiller.reference_losses; tools/benchmark.py kernels)
# ------------------------------------------------------------------------------------------------
def _plain_align(student: Tensor, teacher: Tensor) -> Tensor:
    """The released ``align_scale`` as written: channels first, ``torch.std`` per channel."""
    n, c, h, w = student.shape
    s = student.permute(1, 0, 2, 3).reshape(c, -1)
    t = teacher.detach().permute(1, 0, 2, 3).reshape(c, -1)
    s = (s - s.mean(-1, keepdim=True)) / (s.std(-1, keepdim=True) + 1e-6)
    s = s * t.std(-1, keepdim=True) + t.mean(-1, keepdim=True)
    return s.reshape(c, n, h, w).permute(1, 0, 2, 3)


def _plain_decode(box_transform, deltas: Tensor, anchors: Tensor) -> Tensor:
    """Boxes ``[M, 4]`` from ``[M, D]`` box outputs on ``[M, 4]`` anchors: the distribution's
    expected side distances in strides (explicit softmax), or Faster R-CNN's deltas."""
    if isinstance(box_transform, DistributionBoxTransform):
        probs = plain_softmax(deltas.reshape(-1, 4, box_transform.bins))
        sides = (probs * torch.arange(box_transform.bins, dtype=deltas.dtype,
                                      device=deltas.device)).sum(-1)
        sides = sides * box_transform.strides_of(anchors)[:, None]
        cx, cy = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
        return torch.stack([cx - sides[:, 0], cy - sides[:, 1], cx + sides[:, 2],
                            cy + sides[:, 3]], dim=1)
    return plain_box_decode(deltas, anchors, box_transform.weights, box_transform.scale_clamp)


def straightforward_crosskd(distiller, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
    """docs/methods/CrossKD.md written plainly, image by image and anchor row by row as the
    released ``pred_mimicking_loss_single``: the released ``align_scale``, the teacher's head
    from its stage, the KD quality focal loss with explicit sigmoids and logs, the teacher's max
    score as box weight, GIoU and the per-side KL from explicit formulas, the normalisers."""
    k = distiller.num_classes
    t_stage, s_stage = distiller.teacher_stage, distiller.student_stage
    cls_in = [_plain_align(distiller.cls_adapter(s), t) for s, t in zip(
        student.head_towers["cls"][s_stage], teacher.head_towers["cls"][t_stage])]
    box_in = [_plain_align(distiller.box_adapter(s), t) for s, t in zip(
        student.head_towers["box"][s_stage], teacher.head_towers["box"][t_stage])]
    cross_cls, cross_box = teacher.head_from(t_stage, cls_in, box_in)
    box_transform = teacher.head_from.box_transform
    labels = torch.stack(student.anchor_labels)
    num_pos = max(int(((labels >= 0) & (labels != k)).sum()), 1)
    sums = {"cls": [], "giou": [], "kl": []}
    weight_total, start = 0.0, 0
    for c_cls, c_box, t_cls, t_box, anchors in zip(cross_cls, cross_box, teacher.cls_logits,
                                                   teacher.box_deltas, student.anchors):
        a = t_cls.shape[1] // k
        width = t_box.shape[1] // a
        size = t_cls.shape[2] * t_cls.shape[3] * a
        level = {"cls": 0.0, "giou": 0.0, "kl": 0.0}
        for i in range(t_cls.shape[0]):
            rows = lambda x, d: x[i].permute(1, 2, 0).reshape(-1, d)  # noqa: E731  [R_l, d]
            keep = labels[i, start:start + size] >= 0
            s, t = rows(c_cls, k)[keep], rows(t_cls, k)[keep].detach()
            q, p = plain_sigmoid(s), plain_sigmoid(t)
            bce = -(p * torch.log(q) + (1 - p) * torch.log(1 - q))
            level["cls"] = level["cls"] + (bce * (q - p).abs() ** distiller.cls_beta).sum()
            weight = plain_sigmoid(t).max(dim=1).values
            weight_total = weight_total + weight.sum()
            sb, tb = rows(c_box, width)[keep], rows(t_box, width)[keep].detach()
            boxes = anchors.tensor[keep]
            giou = plain_giou(_plain_decode(box_transform, sb, boxes),
                              _plain_decode(box_transform, tb, boxes))
            level["giou"] = level["giou"] + (weight * (1 - giou)).sum()
            if distiller.kl_weight > 0:
                tau = distiller.kl_temperature
                bins = width // 4
                kl = plain_kl(plain_softmax(tb.reshape(-1, 4, bins) / tau),
                              plain_softmax(sb.reshape(-1, 4, bins) / tau)) * tau * tau
                level["kl"] = level["kl"] + (weight * kl.sum(-1) / 4).sum()
        start += size
        for term in sums:
            sums[term].append(level[term])
    box_norm = num_pos if distiller.box_normalizer == "positives" else weight_total
    out = {}
    for term, weight, norm in (("cls", distiller.cls_weight, num_pos),
                               ("giou", distiller.giou_weight, box_norm),
                               ("kl", distiller.kl_weight, box_norm)):
        if weight > 0:
            for level, value in zip(distiller.in_features, sums[term]):
                out[f"loss_crosskd_{term}_{level}"] = weight * value / norm
    return out
