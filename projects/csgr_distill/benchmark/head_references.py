"""Straightforward implementations of the losses that read detector head outputs (KD, LD, TAR,
DETRDistill), the yardstick of ``kernels`` for them.

Each is the method's formula written the plain way: probabilities from explicit exponentials,
IoUs, box decoding and smooth-L1 from their textbook formulas, region rules GT by GT. They read
the same records the distillers read (``(distiller, student, teacher, gt_instances) -> losses``,
records as :class:`~csgr_distill.outputs.DetectorOutputs`) and share the distiller's settings.
What is the detector's and not the method's is shared, not rewritten: the teacher's RoI head
answering for the shared RoIs (TAR), the student's extra decoder pass and its set losses, the
Hungarian solver (DETRDistill).
"""
from typing import Callable, Dict, List

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .references import GroundTruth, straightforward_tar


def _softmax(x: Tensor) -> Tensor:
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def _sigmoid(x: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-x))


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """``sum p (log p - log q)`` over the last axis (``0 log 0 = 0``)."""
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(dim=-1)


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``[..., 4]`` (x1, y1, x2, y2) that broadcast: ``_iou(a[:, None], b[None])``
    is the ``[A, B]`` matrix, ``_iou(a, b)`` of ``[R, 4]`` pairs is ``[R]``."""
    inter = (torch.minimum(a[..., 2:], b[..., 2:])
             - torch.maximum(a[..., :2], b[..., :2])).clamp_min(0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1) - inter
    return torch.where(inter > 0, inter / union, torch.zeros_like(inter))


def _giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU of broadcasting boxes ``[..., 4]`` (as :func:`_iou`)."""
    inter = (torch.minimum(a[..., 2:], b[..., 2:])
             - torch.maximum(a[..., :2], b[..., :2])).clamp_min(0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1) - inter
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return inter / union - (hull - union) / hull


def _xyxy(b: Tensor) -> Tensor:
    return torch.cat([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], dim=-1)


# ---- KD -----------------------------------------------------------------------------------
def straightforward_kd(distiller, student, teacher, gt_instances=None) -> Dict[str, Tensor]:
    """KD on every anchor: explicit sigmoid (Bernoulli KL per logit) or softmax (KL over the K
    classes of an anchor) probabilities at temperature T, the mean over all anchors of all
    levels times ``T^2`` and the weight, each level's share returned under its name."""
    t_ = distiller.temperature
    s_levels = distiller.level_logits(student, "student")
    t_levels = distiller.level_logits(teacher, "teacher")
    k = distiller.classes_per_anchor
    sums, anchors = {}, 0
    for level, s in s_levels.items():
        t = t_levels[level].detach()
        n, ak, h, w = s.shape
        s = s.permute(0, 2, 3, 1).reshape(-1, ak // k, k) / t_
        t = t.permute(0, 2, 3, 1).reshape(-1, ak // k, k) / t_
        if distiller.activation == "sigmoid":
            p, q = _sigmoid(t), _sigmoid(s)
            kl = (_kl(p[..., None], q[..., None]) + _kl(1 - p[..., None], 1 - q[..., None]))
        else:
            kl = _kl(_softmax(t), _softmax(s))
        sums[level] = kl.sum()
        anchors += n * (ak // k) * h * w
    scale = distiller.weight * t_ * t_ / anchors
    return {f"loss_kd_{level}": scale * v for level, v in sums.items()}


# ---- LD -----------------------------------------------------------------------------------
def _bin_kl(s: Tensor, t: Tensor, tau: float) -> Tensor:
    """``tau^2 mean_b p_b (log p_b - log q_b)`` over the last axis, explicit softmaxes."""
    p, q = _softmax(t.detach() / tau), _softmax(s / tau)
    return _kl(p, q) / p.shape[-1] * tau * tau


def _ld_region(anchors: List[Tensor], gt: Tensor, topk: int, low: float, diou: str = "paper"):
    """LD's VLR of one image, GT by GT: ATSS candidates per level by centre distance, threshold
    mean + unbiased std of their IoUs, the DIoU band ``[low t, t)`` (``diou "released"``: the
    intersection over the anchor's area in place of the IoU); an anchor claimed by several GTs
    keeps the largest IoU. ``(in_region [R] bool, iou [R])``."""
    all_anchors = torch.cat(anchors)
    best = torch.full((all_anchors.shape[0],), -1.0, device=all_anchors.device)
    centres = (all_anchors[:, :2] + all_anchors[:, 2:]) / 2
    for g in gt:
        iou = _iou(g, all_anchors)
        c = (g[:2] + g[2:]) / 2
        candidates, start = [], 0
        for level in anchors:
            dist = ((centres[start:start + len(level)] - c) ** 2).sum(-1).sqrt()
            candidates.append(dist.argsort()[:min(topk, len(level))] + start)
            start += len(level)
        cand_iou = iou[torch.cat(candidates)]
        t = cand_iou.mean() + (cand_iou.std() if len(cand_iou) > 1 else 0.0)
        enclosing = (torch.maximum(g[2:], all_anchors[:, 2:])
                     - torch.minimum(g[:2], all_anchors[:, :2])) ** 2
        overlap = iou
        if diou == "released":
            inter = (torch.minimum(g[2:], all_anchors[:, 2:])
                     - torch.maximum(g[:2], all_anchors[:, :2])).clamp_min(0).prod(-1)
            overlap = inter / (all_anchors[:, 2:] - all_anchors[:, :2]).prod(-1)
        d = overlap - ((centres - c) ** 2).sum(-1) / enclosing.sum(-1).clamp_min(1e-12)
        band = (d >= low * t) & (d < t)
        best = torch.where(band & (iou > best), iou, best)
    in_region = best >= 0
    return in_region, torch.where(in_region, best, torch.zeros_like(best))


def straightforward_ld(distiller, student, teacher, gt_instances) -> Dict[str, Tensor]:
    """docs/methods/LD.md written plainly, level by level as the released heads: the heads'
    outputs laid out per anchor, main LD on the student's positives weighted by its max class
    score (/ 4), VLR LD weighted by the claiming GT's IoU (/ ``vlr_normalizer``), the KL per side
    summed over the sides or one KL over the anchor's ``4 (n + 1)`` logits
    (``softmax_over``); main KD over the positives' classes, each level by its own positives
    (``kd_normalizer "level"``) or all levels by all positives (``"all"``)."""
    k, b = distiller.num_classes, distiller.bins

    def per_level(rec):
        cls = [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, k) for x in rec.cls_logits]
        box = [x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4 * b) for x in rec.box_deltas]
        return cls, box

    def box_kl(s: Tensor, t: Tensor) -> Tensor:  # [..., 4 b] -> [...]
        if distiller.softmax_over == "anchor":
            return _bin_kl(s, t, distiller.ld_temperature)
        shape = s.shape[:-1] + (4, b)
        return _bin_kl(s.reshape(shape), t.reshape(shape), distiller.ld_temperature).sum(-1)

    s_cls, s_box = per_level(student)
    t_cls, t_box = per_level(teacher)
    sizes = [x.shape[1] for x in s_cls]
    labels = torch.stack(student.anchor_labels).split(sizes, dim=1)
    regions = []
    if distiller.vlr_weight > 0:
        anchors = [a.tensor for a in student.anchors]
        for i, inst in enumerate(gt_instances):
            region, iou = _ld_region(anchors, inst.gt_boxes.tensor, distiller.vlr_topk,
                                     distiller.vlr_low, distiller.vlr_diou)
            regions.append((region, iou))
    ld = vlr = kd_level = kd_all = 0.0
    num_pos = 0
    for level in range(len(sizes)):
        pos = (labels[level] >= 0) & (labels[level] != k)
        num_pos += int(pos.sum())
        sc, tc, sb, tb = s_cls[level], t_cls[level], s_box[level], t_box[level]
        score = _sigmoid(sc[pos].detach()).max(dim=-1).values
        ld = ld + (box_kl(sb[pos], tb[pos]) * score).sum() / 4
        kd = _bin_kl(sc[pos], tc[pos], distiller.kd_temperature).sum()
        kd_all = kd_all + kd
        kd_level = kd_level + kd / max(int(pos.sum()), 1)
        start = sum(sizes[:level])
        for i, (region, iou) in enumerate(regions):
            r = region[start:start + sizes[level]]
            if distiller.vlr_exclude_positives:
                r = r & ~pos[i]
            v = iou[start:start + sizes[level]][r]
            vlr = vlr + (box_kl(sb[i][r], tb[i][r]) * v).sum() / distiller.vlr_normalizer
    out = {}
    if distiller.ld_weight > 0:
        out["loss_ld"] = distiller.ld_weight * ld
    if distiller.vlr_weight > 0:
        out["loss_ld_vlr"] = distiller.vlr_weight * vlr
    if distiller.kd_weight > 0:
        kd = kd_level if distiller.kd_normalizer == "level" else kd_all / max(num_pos, 1)
        out["loss_ld_kd"] = distiller.kd_weight * kd
    return out


# ---- TAR ----------------------------------------------------------------------------------
def _decode(deltas: Tensor, boxes: Tensor, weights, clamp: float) -> Tensor:
    """Faster R-CNN's box decoding: ``[R, 4]`` deltas relative to ``[R, 4]`` boxes."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    dx, dy = deltas[:, 0] / weights[0], deltas[:, 1] / weights[1]
    dw = (deltas[:, 2] / weights[2]).clamp(max=clamp)
    dh = (deltas[:, 3] / weights[3]).clamp(max=clamp)
    px, py, pw, ph = cx + dx * w, cy + dy * h, w * torch.exp(dw), h * torch.exp(dh)
    return torch.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], dim=1)


def _encode(target: Tensor, boxes: Tensor, weights) -> Tensor:
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = boxes[:, 0] + w / 2, boxes[:, 1] + h / 2
    tw, th = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    tx, ty = target[:, 0] + tw / 2, target[:, 1] + th / 2
    return torch.stack([weights[0] * (tx - cx) / w, weights[1] * (ty - cy) / h,
                        weights[2] * torch.log(tw / w), weights[3] * torch.log(th / h)], dim=1)


def straightforward_tar_heads(distiller, student, teacher, gt_instances) -> Dict[str, Tensor]:
    """TAR.md written plainly on Faster R-CNN records with the student's RoIs shared: the
    feature term (:func:`~csgr_distill.benchmark.references.straightforward_tar`), the class KD
    from explicit softmaxes averaged over RoIs, the regression term RoI by RoI: decode both
    heads' boxes of the RoI's GT class, keep the positives whose teacher box has the larger IoU
    with the GT, smooth-L1 to the teacher box re-encoded, summed, / positives."""
    if distiller.proposals != "student":
        raise ValueError("straightforward_tar_heads writes out the default PROPOSALS 'student'")
    out = {}
    if distiller.feat_weight > 0:
        gt = GroundTruth([i.gt_boxes.tensor for i in gt_instances], student.image_sizes,
                         student.padded_size)
        out.update(straightforward_tar(distiller, student.features, teacher.features, gt))
    rois = student.rois
    s_cls, s_deltas = student.roi_cls_logits, student.roi_box_deltas
    t_cls, t_deltas = teacher.roi_head([r.proposal_boxes for r in rois])
    tau = distiller.temperature
    if distiller.cls_weight > 0:
        kl = _kl(_softmax(t_cls.detach() / tau), _softmax(s_cls / tau))
        out["loss_tar_cls"] = distiller.cls_weight * kl.mean() * tau * tau
    if distiller.reg_weight > 0:
        s_head, t_head = student.roi_head, teacher.roi_head
        k = s_head.num_classes
        proposals = torch.cat([r.proposal_boxes.tensor for r in rois])
        gt_classes = torch.cat([r.gt_classes for r in rois])
        gt_boxes = torch.cat([r.gt_boxes.tensor for r in rois])
        positive = (gt_classes >= 0) & (gt_classes < k)
        cls = gt_classes.clamp(0, k - 1)
        rows = torch.arange(len(cls))

        def class_deltas(d):
            return d if d.shape[1] == 4 else d.reshape(len(d), -1, 4)[rows, cls]

        st, tt = s_head.box_transform, t_head.box_transform
        t_box = _decode(class_deltas(t_deltas.detach()), proposals, tt.weights, tt.scale_clamp)
        s_box = _decode(class_deltas(s_deltas.detach()), proposals, st.weights, st.scale_clamp)
        t_iou = _iou(t_box, gt_boxes)
        o_iou = _iou(s_box if distiller.reg_compare == "student" else proposals, gt_boxes)
        selected = positive & (t_iou > o_iou)
        diff = (class_deltas(s_deltas) - _encode(t_box, proposals, st.weights))[selected]
        beta = distiller.reg_beta
        loss = torch.where(diff.abs() < beta, 0.5 * diff ** 2 / max(beta, 1e-12),
                           diff.abs() - 0.5 * beta) if beta > 0 else diff.abs()
        out["loss_tar_reg"] = distiller.reg_weight * loss.sum() / max(int(positive.sum()), 1)
    return out


# ---- DETRDistill --------------------------------------------------------------------------
def straightforward_detrdistill(distiller, student, teacher, gt_instances) -> Dict[str, Tensor]:
    """docs/methods/DETRDistill.md written plainly, layer by layer: the soft class cost from
    explicit probabilities, L1 and GIoU costs from their formulas (to the teacher's boxes
    clipped to the image, with CLIP_TEACHER_BOXES), the Hungarian solver; pair losses averaged
    by pairs; the teacher's top-K (query, class) by a full sort, quality = score x max IoU with
    the GT, the mask from explicit cosines; the query-prior pass through the student's own
    decoder and set losses (the detector's, shared) under the teacher's assignment of each
    layer or of its last (QUERY_PRIOR_ASSIGNMENT)."""
    from ..detr_port.detr import detr_targets

    softmax = student.softmax
    targets = detr_targets(gt_instances, student.image_sizes)
    c_cls, c_l1, c_giou = distiller.costs
    out = {}
    layers = student.pred_logits.shape[0]
    for layer in range(layers):
        s_lg, s_bx = student.pred_logits[layer], student.pred_boxes[layer]
        t_lg, t_bx = teacher.pred_logits[layer].detach(), teacher.pred_boxes[layer].detach()
        if distiller.logits_weight:
            t_match = t_bx  # the teacher's boxes as matched: clipped to the image by default
            if distiller.clip_teacher_boxes:
                corners = _xyxy(t_bx)
                x0, y0, x1, y1 = corners.clamp(0, 1).unbind(-1)
                clipped = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
                crossing = ((corners < 0) | (corners > 1)).any(-1, keepdim=True)
                t_match = torch.where(crossing, clipped, t_bx)
            pairs = []
            for n in range(s_lg.shape[0]):
                with torch.no_grad():
                    if softmax:
                        cls_cost = -(_softmax(t_lg[n])[None] * torch.log(_softmax(s_lg[n]))[:, None]
                                     ).sum(-1)
                    else:
                        p, q = _sigmoid(t_lg[n])[None], _sigmoid(s_lg[n])[:, None]
                        cls_cost = -(p * torch.log(q) + (1 - p) * torch.log(1 - q)).sum(-1)
                    l1 = (s_bx[n][:, None] - t_match[n][None]).abs().sum(-1)
                    giou = _giou(_xyxy(s_bx[n])[:, None], _xyxy(t_match[n])[None])
                    cost = c_cls * cls_cost + c_l1 * l1 - c_giou * giou
                i, j = linear_sum_assignment(cost.cpu().numpy())
                pairs.append((n, torch.as_tensor(i), torch.as_tensor(j)))
            s_l = torch.cat([s_lg[n][i] for n, i, _ in pairs])
            t_l = torch.cat([t_lg[n][j] for n, _, j in pairs])
            s_b = torch.cat([s_bx[n][i] for n, i, _ in pairs])
            t_b = torch.cat([t_match[n][j] for n, _, j in pairs])
            count = max(len(s_l), 1)
            if softmax:
                tau = distiller.temperature
                cls = _kl(_softmax(t_l / tau), _softmax(s_l / tau)).sum() * tau * tau / count
            else:
                p, q = _sigmoid(t_l), _sigmoid(s_l)
                cls = -(p * torch.log(q) + (1 - p) * torch.log(1 - q)).sum() / count
            l1 = (s_b - t_b).abs().sum() / count
            giou = (1 - _giou(_xyxy(s_b), _xyxy(t_b))).sum() / count
            w = distiller.logits_weight
            out[f"loss_detrdistill_cls_l{layer}"] = w * c_cls * cls
            out[f"loss_detrdistill_l1_l{layer}"] = w * c_l1 * l1
            out[f"loss_detrdistill_giou_l{layer}"] = w * c_giou * giou
        if distiller.feature_weight:
            t_q = teacher.query_embeds[layer].detach()
            selected = []
            for n in range(t_lg.shape[0]):
                prob = _softmax(t_lg[n])[:, :-1] if softmax else _sigmoid(t_lg[n])
                order = prob.flatten().argsort(descending=True)[:min(distiller.topk, prob.numel())]
                scores, queries = prob.flatten()[order], order // prob.shape[1]
                gt = _xyxy(targets[n]["boxes"])
                if len(gt):
                    scores = scores * _iou(_xyxy(t_bx[n][queries])[:, None], gt[None]).max(
                        dim=1).values
                selected.append((queries, scores))
            total = 0.0
            for name, t_feat in teacher.encoder_inputs.items():
                s_feat = distiller.adapter(student.encoder_inputs[name])
                t_feat = t_feat.detach()
                masks = []
                for n, (queries, quality) in enumerate(selected):
                    q = t_q[n][queries]
                    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    f = t_feat[n].flatten(1)
                    f = f / f.norm(dim=0, keepdim=True).clamp_min(1e-12)
                    m = (quality[:, None] * (q @ f)).sum(0).clamp_min(distiller.mask_floor)
                    masks.append((m / m.max()).reshape(t_feat.shape[2:]))
                m = torch.stack(masks)[:, None]
                total = total + ((m * s_feat - m * t_feat) ** 2).mean()
            out[f"loss_detrdistill_feat_l{layer}"] = distiller.feature_weight * total
    if distiller.query_prior_weight:
        extra = student.decoder(teacher.object_queries.detach())
        for layer in range(extra["pred_logits"].shape[0]):
            losses = student.set_losses(extra["pred_logits"][layer], extra["pred_boxes"][layer],
                                        targets, teacher.matches[
                                            layer if distiller.query_prior_assignment
                                            == "per_layer" else -1], f"_l{layer}")
            for key, value in losses.items():
                out["loss_detrdistill_qp_" + key[len("loss_"):]] = \
                    distiller.query_prior_weight * value
    if distiller.contrast_weight:
        raise ValueError("straightforward_detrdistill covers the published setting "
                         "(CONTRAST_WEIGHT 0)")
    return out


#: distiller name -> fn(distiller, student record, teacher record, gt_instances) -> losses
HEAD_REFERENCE_LOSSES: Dict[str, Callable] = {"KD": straightforward_kd,
                                              "LD": straightforward_ld,
                                              "TAR": straightforward_tar_heads,
                                              "DETRDistill": straightforward_detrdistill}
