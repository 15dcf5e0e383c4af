"""Frozen copies of the loss implementations as they were before the launch-bound rewrite (issue
30, commit bf14bdf), written with autograd: the yardstick of ``tests/test_launch_bound.py``
("every rewritten loss equals the current implementation"). Not used by the library."""
import torch
from torch.nn import functional as F


def channel_standardize(x, eps=1e-6):
    m = x.shape[0] * x.shape[2] * x.shape[3]
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    centered = x - mean
    var = centered.pow(2).sum(dim=(0, 2, 3), keepdim=True) / max(m - 1, 1)
    positive = var > 0
    std = torch.where(positive, var, torch.ones_like(var)).sqrt() * positive
    return centered / (std + eps)


# ---- CSGR ----------------------------------------------------------------------------------------
def _cc_attention(cca, x):
    q, k = cca.query(x), cca.key(x)
    e_col = torch.matmul(q.permute(0, 3, 2, 1), k.permute(0, 3, 1, 2))
    e_col.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
    e_row = torch.matmul(q.permute(0, 2, 3, 1), k.permute(0, 2, 1, 3))
    return F.softmax(torch.cat([e_col.permute(0, 2, 1, 3), e_row], dim=3), dim=3)


def _cc_aggregate(att, y):
    h = y.shape[2]
    out_col = torch.matmul(y.permute(0, 3, 1, 2), att[..., :h].permute(0, 2, 3, 1))
    out_row = torch.matmul(y.permute(0, 2, 1, 3), att[..., h:].transpose(2, 3))
    return out_col.permute(0, 2, 3, 1) + out_row.permute(0, 2, 1, 3)


def cc_paired_difference(cca, a, b):
    for _ in range(cca.recurrence - 1):
        a = torch.addcmul(a, cca.gamma, _cc_aggregate(_cc_attention(cca, a), cca.value(a)))
        b = torch.addcmul(b, cca.gamma, _cc_aggregate(_cc_attention(cca, b), cca.value(b)))
    agg = _cc_aggregate(_cc_attention(cca, a), a) - _cc_aggregate(_cc_attention(cca, b), b)
    bias = cca.value.bias
    projected = F.conv2d(agg, cca.value.weight, bias) - bias.view(1, -1, 1, 1)
    return torch.addcmul(a - b, cca.gamma, projected)


def _spatial_softmax(logits):
    n, k, h, w = logits.shape
    return F.softmax(logits.reshape(n, k, h * w), dim=2).view(n, k, h, w)


def _category_vectors(att, feat):
    n, k, h, w = att.shape
    return torch.bmm(att.reshape(n, k, h * w),
                     feat.reshape(n, feat.shape[1], h * w).transpose(1, 2))


def csgr_losses(d, student, teacher):
    """CSGRDistiller.forward of bf14bdf on two records."""
    losses = {}
    for level in d.in_features:
        s_feat, t_feat = student.features[level], teacher.features[level].detach()
        mod = d.levels[level]
        s_hat = channel_standardize(mod.adapter(s_feat))
        t_hat = channel_standardize(t_feat)
        n = s_feat.shape[0]
        if d.attention == "learned":
            a_s = _spatial_softmax(mod.classifier(s_hat))
            a_t = _spatial_softmax(mod.classifier(t_hat))
        else:
            logits = teacher.level_logits(level).detach()
            k = d.num_classes
            a_s = a_t = _spatial_softmax(
                logits.view(n, logits.shape[1] // k, k, *logits.shape[-2:]).amax(dim=1))
        l_cs = (_category_vectors(a_t, t_hat) - _category_vectors(a_s, s_hat)).pow(2).sum() / n
        l_gr = cc_paired_difference(mod.cca, t_hat, s_hat).pow(2).sum() / n
        losses[f"loss_csgr_cs_{level}"] = d.alpha * l_cs
        losses[f"loss_csgr_gr_{level}"] = d.beta * l_gr
    return losses


# ---- PKD / MIMIC ---------------------------------------------------------------------------------
def pkd_losses(d, student, teacher):
    """PKDDistiller.forward of bf14bdf."""
    return {f"loss_pkd_{level}": d.weight * F.mse_loss(
        channel_standardize(d.adapters[level](student.features[level])),
        channel_standardize(teacher.features[level].detach())) / 2 for level in d.in_features}


def mimic_losses(d, student, teacher):
    """MIMICDistiller.forward of bf14bdf."""
    return {f"loss_mimic_{level}": d.weight * F.mse_loss(
        d.adapters[level](student.features[level]), teacher.features[level].detach())
        for level in d.in_features}


# ---- TAR's feature term -------------------------------------------------------------------------
def gaussian_masks(boxes, grid, padded_size, sigma_scale=0.5):
    h, w = int(grid[0]), int(grid[1])
    n = len(boxes)
    device = boxes[0].device if n else torch.device("cpu")
    ys = torch.arange(h, device=device, dtype=torch.float32) + 0.5
    xs = torch.arange(w, device=device, dtype=torch.float32) + 0.5
    out = torch.zeros(n, h, w, device=device)
    sx_scale, sy_scale = w / float(padded_size[1]), h / float(padded_size[0])
    for i, b in enumerate(boxes):
        if b.numel() == 0:
            continue
        b = b.detach().float()
        x1, x2 = b[:, 0] * sx_scale, b[:, 2] * sx_scale
        y1, y2 = b[:, 1] * sy_scale, b[:, 3] * sy_scale
        x0, y0 = (x1 + x2) / 2, (y1 + y2) / 2
        sig_x = ((x2 - x1) * sigma_scale).clamp_min(1e-6)
        sig_y = ((y2 - y1) * sigma_scale).clamp_min(1e-6)
        gx = torch.exp(-(xs[None] - x0[:, None]) ** 2 / (2 * sig_x[:, None] ** 2))
        gy = torch.exp(-(ys[None] - y0[:, None]) ** 2 / (2 * sig_y[:, None] ** 2))
        out[i] = (gy[:, :, None] * gx[:, None, :]).amax(dim=0)
    return out


def tar_feature_losses(d, student, teacher, gt_instances):
    """TARDistiller.feature_losses of bf14bdf."""
    boxes = [i.gt_boxes.tensor for i in gt_instances]
    out = {}
    for level in d.in_features:
        s_feat, t_feat = student.features[level], teacher.features[level].detach()
        mask = gaussian_masks(boxes, s_feat.shape[-2:], student.padded_size, d.sigma_scale)[:, None]
        diff = (d.adapters[level](s_feat) - t_feat) ** 2
        loss = (diff * mask).sum() / mask.sum().clamp_min(1e-12)
        out[f"loss_tar_feat_{level}"] = d.feat_weight * loss
    return out


# ---- FGD -----------------------------------------------------------------------------------------
def fgd_masks(boxes, grid, image_sizes, padded_size, scaling="padded"):
    h, w = int(grid[0]), int(grid[1])
    n = len(image_sizes)
    device = boxes[0].device if n else torch.device("cpu")
    rows = torch.arange(h, device=device, dtype=torch.float32)
    cols = torch.arange(w, device=device, dtype=torch.float32)
    fg = torch.zeros(n, h, w, device=device)
    for i, (b, size) in enumerate(zip(boxes, image_sizes)):
        if b.numel() == 0:
            continue
        ref_h, ref_w = padded_size if scaling == "padded" else size
        b = b.detach().float()
        x1 = torch.floor(b[:, 0] * (w / ref_w))
        x2 = torch.ceil(b[:, 2] * (w / ref_w))
        y1 = torch.floor(b[:, 1] * (h / ref_h))
        y2 = torch.ceil(b[:, 3] * (h / ref_h))
        in_x = (cols[None] >= x1[:, None]) & (cols[None] <= x2[:, None])
        in_y = (rows[None] >= y1[:, None]) & (rows[None] <= y2[:, None])
        count = in_y.sum(1) * in_x.sum(1)
        value = 1.0 / count.clamp_min(1).float()
        cover = (in_y[:, :, None] & in_x[:, None, :]).float() * value[:, None, None]
        fg[i] = cover.amax(dim=0)
    bg = (fg == 0).float()
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp_min(1.0)
    return fg, bg


def fgd_attention(feat, temperature):
    n, c, h, w = feat.shape
    value = feat.abs()
    spatial = (h * w) * F.softmax((value.mean(dim=1) / temperature).view(n, -1), dim=1)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temperature, dim=1)
    return spatial.view(n, h, w), channel


def gc_block(block, x):
    n, c = x.shape[:2]
    weights = F.softmax(block.context(x).flatten(1), dim=1)
    pooled = torch.bmm(x.flatten(2), weights.unsqueeze(2)).view(n, c, 1, 1)
    return x + block.transform(pooled)


def fgd_losses(d, student, teacher, gt_instances):
    """FGDDistiller.forward of bf14bdf."""
    boxes = [i.gt_boxes.tensor for i in gt_instances]
    losses = {}
    for level in d.in_features:
        s_feat, t_feat = student.features[level], teacher.features[level].detach()
        fg, bg = fgd_masks(boxes, s_feat.shape[-2:], student.image_sizes, student.padded_size,
                           d.box_scaling)
        s = d.adapters[level](s_feat)
        n = s.shape[0]
        s_spatial, s_channel = fgd_attention(s, d.temperature)
        t_spatial, t_channel = fgd_attention(t_feat, d.temperature)
        weighted = torch.einsum("nc,nchw->nhw", t_channel, (s - t_feat).pow(2)) * t_spatial
        terms = {
            "fg": (fg * weighted).sum() / n,
            "bg": (bg * weighted).sum() / n,
            "at": ((s_channel - t_channel).abs().sum() + (s_spatial - t_spatial).abs().sum()) / n,
            "gl": (gc_block(d.student_context[level], s)
                   - gc_block(d.teacher_context[level], t_feat)).pow(2).sum() / n,
        }
        for term, value in terms.items():
            losses[f"loss_fgd_{term}_{level}"] = getattr(d, d.TERMS[term][0]) * value
    return losses


# ---- KD ------------------------------------------------------------------------------------------
def kd_losses(d, student, teacher, gt_instances=None):
    """KDDistiller.forward of bf14bdf (sigmoid and softmax)."""
    s_levels, t_levels = d.level_logits(student, "student"), d.level_logits(teacher, "teacher")
    num_anchors = sum(s.numel() // d.classes_per_anchor for s in s_levels.values())
    scale = d.weight * d.temperature ** 2 / max(num_anchors, 1)
    out = {}
    for level, s in s_levels.items():
        t = t_levels[level].detach()
        if d.activation == "sigmoid":
            s_, t_ = s / d.temperature, t / d.temperature
            p, p_bar = torch.sigmoid(t_), torch.sigmoid(-t_)
            kl = (p * (F.logsigmoid(t_) - F.logsigmoid(s_))
                  + p_bar * (F.logsigmoid(-t_) - F.logsigmoid(-s_))).sum()
        else:
            n, ak, h, w = s.shape
            shape = (n, ak // d.classes_per_anchor, d.classes_per_anchor, h, w)
            log_q = F.log_softmax(s.reshape(shape) / d.temperature, dim=2)
            log_p = F.log_softmax(t.reshape(shape) / d.temperature, dim=2)
            kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=2).sum()
        out[f"loss_kd_{level}"] = scale * kl
    return out


# ---- LD's valuable localization region ---------------------------------------------------------
def vlr_region(anchors, gt_boxes, topk=9, low=0.25, diou="paper"):
    """csgr_distill.distillers.ld.vlr_region of bf14bdf (one image, level by level)."""
    from torchvision.ops import box_iou

    from csgr_distill.distillers.ld import pairwise_diou

    all_anchors = torch.cat(list(anchors))
    r = all_anchors.shape[0]
    if gt_boxes.numel() == 0:
        return torch.zeros(r, dtype=torch.bool), all_anchors.new_zeros(r)
    iou = box_iou(gt_boxes, all_anchors)
    gt_c = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    candidates, start = [], 0
    for level in anchors:
        centres = (level[:, :2] + level[:, 2:]) / 2
        dist = torch.cdist(gt_c, centres)
        k = min(topk, level.shape[0])
        candidates.append(dist.topk(k, dim=1, largest=False).indices + start)
        start += level.shape[0]
    cand = torch.cat(candidates, dim=1)
    cand_iou = iou.gather(1, cand)
    std = cand_iou.std(dim=1) if cand.shape[1] > 1 else torch.zeros_like(cand_iou[:, 0])
    t = cand_iou.mean(dim=1) + std
    d = pairwise_diou(gt_boxes, all_anchors, "iou" if diou == "paper" else "over_area2")
    band = (d >= low * t[:, None]) & (d < t[:, None])
    claimed = torch.where(band, iou, torch.full_like(iou, -1.0))
    best, _ = claimed.max(dim=0)
    in_region = best >= 0
    return in_region, torch.where(in_region, best, torch.zeros_like(best))
