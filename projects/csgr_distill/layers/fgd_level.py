"""One FGD level's four losses as a single autograd function with a hand-written backward.

What it computes is FGD's per-level formula (``docs/methods/FGD.md``), unchanged: with the
adapted student map ``S`` and the teacher map ``T`` ``[N, C, H, W]``, the masks ``M_fg``,
``M_bg`` ``[N, H, W]``, the attention ``A_S = HW softmax_{positions}(mean_c |F| / T_att)`` and
``A_C = C softmax_{channels}(mean_{h,w} |F| / T_att)`` of each map, and one global-context block
per network (:class:`~csgr_distill.layers.gc_block.GlobalContextBlock`, ``R(F) = F +
transform(context(F))``):

* ``fg = w_fg sum M_fg A_S^t A_C^t (S - T)^2``, ``bg`` the same with ``M_bg`` and ``w_bg``;
* ``at = w_at (sum |A_C^s - A_C^t| + sum |A_S^s - A_S^t|)``;
* ``gl = w_gl sum (R_s(S) - R_t(T))^2``;

the caller passes the weights already divided by N. Why a function of its own: written with
autograd a level dispatches about 400 ATen operators per forward + backward (two attention
maps, two GC blocks of 1x1 convolutions on ``[N, C, 1, 1]``, every view's backward), whatever
its size. Here both maps' attention comes from one stacked batch, the GC blocks' 1x1
convolutions are linear maps of ``[N, C]``, the block's addition is added once per map as
``[N, C]``, and the backward is written out: the student's gradient only (the teacher is
detached, its attention weighs the focal terms as a constant), the GC blocks' parameters
through ATen's own LayerNorm and ReLU backward kernels.

Differences from autograd: the context convolution's bias gets the exact gradient 0 of the
formula (a constant added to every logit of a softmax), and ``R_s(S) - R_t(T)`` is computed as
``(S - T) + (add_s - add_t)`` (float32 rounding: the losses agree to ~1e-8 relative).
"""
from typing import List, Tuple

import torch
from torch import Tensor

from .constants import constant, constant_vector

__all__ = ["fgd_level_losses"]


def _gc_forward(flat: Tensor, params: Tuple[Tensor, ...], eps: float):
    """``transform(context(x))`` ``[N, C]`` of ``flat`` ``[N, C, P]``; also what the backward
    needs."""
    w_ctx, b_ctx, w1, b1, gain, shift, w2, b2 = params
    n, c, _ = flat.shape
    c2 = w1.shape[0]
    logits = torch.bmm(w_ctx.view(1, 1, c).expand(n, 1, c), flat)  # the context conv, [N, 1, P]
    weights = torch.softmax(logits + b_ctx, dim=2)
    pooled = torch.bmm(flat, weights.transpose(1, 2)).view(n, c)
    hidden = torch.addmm(b1, pooled, w1.view(c2, c).t())
    normed, mean, rstd = torch.native_layer_norm(hidden, [c2], gain.view(c2), shift.view(c2), eps)
    relu = torch.relu(normed)
    added = torch.addmm(b2, relu, w2.view(c, c2).t())
    return added, (flat, weights, pooled, hidden, mean, rstd, relu)


def _gc_backward(d_added: Tensor, saved, params: Tuple[Tensor, ...], need_input: bool):
    """``(d_flat or None, [grads of the 8 parameters])`` of :func:`_gc_forward`."""
    w_ctx, _, w1, _, gain, shift, w2, _ = params
    flat, weights, pooled, hidden, mean, rstd, relu = saved
    n, c, _ = flat.shape
    c2 = w1.shape[0]
    d_w2 = torch.mm(d_added.t(), relu)
    d_relu = torch.mm(d_added, w2.view(c, c2))
    d_normed = torch.ops.aten.threshold_backward(d_relu, relu, 0)
    d_hidden, d_gain, d_shift = torch.ops.aten.native_layer_norm_backward(
        d_normed, hidden, [c2], mean, rstd, gain.view(c2), shift.view(c2), [True, True, True])
    d_w1 = torch.mm(d_hidden.t(), pooled)
    d_pooled = torch.mm(d_hidden, w1.view(c2, c))  # [N, C]
    d_weights = torch.bmm(d_pooled.unsqueeze(1), flat)  # [N, 1, P]
    d_logits = torch._softmax_backward_data(d_weights, weights, 2, weights.dtype)
    d_w_ctx = torch.bmm(d_logits, flat.transpose(1, 2)).sum(0)  # [1, C]
    d_flat = None
    if need_input:
        d_flat = d_pooled.unsqueeze(2) * weights + w_ctx.view(1, c, 1) * d_logits
    grads = [d_w_ctx.view_as(w_ctx), torch.zeros_like(params[1]), d_w1.view_as(w1),
             d_hidden.sum(0), d_gain.view_as(gain), d_shift.view_as(shift), d_w2.view_as(w2),
             d_added.sum(0)]
    return d_flat, grads


def _attention(value: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """``(softmax over positions [2, N, P], softmax over channels [2, N, C])`` of ``|F|``
    ``[2, N, C, P]`` (before the factors HW and C)."""
    _, _, c, p = value.shape  # the means as value.mean's sum and division (the same values)
    spatial = torch.softmax(value.sum(dim=2) / constant(c, value) / constant(temperature, value),
                            dim=2)
    channel = torch.softmax(value.sum(dim=3) / constant(p, value) / constant(temperature, value),
                            dim=2)
    return spatial, channel


class _FGDLevelLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, masks, temperature, weights, eps_s, eps_t, *params):
        n, c, h, w = s.shape
        p = h * w
        s_params, t_params = params[:8], params[8:]
        x = torch.stack([t, s]).view(2, n, c, p)  # teacher first
        sm_spatial, sm_channel = _attention(x.abs(), temperature)
        spatial = sm_spatial * constant(p, sm_spatial)  # A_S [2, N, P]
        channel = sm_channel * constant(c, sm_channel)  # A_C [2, N, C]
        diff = x[1] - x[0]  # [N, C, P]
        # A_C^t . (S - T)^2 per position, then A_S^t: the focal weight of every position
        focal_w = torch.bmm(channel[0].unsqueeze(1), diff * diff) * spatial[0].unsqueeze(1)
        focal = (masks.view(2, n, 1, p) * focal_w).sum(dim=(1, 2, 3))  # [fg, bg]
        d_spatial, d_channel = spatial[1] - spatial[0], channel[1] - channel[0]
        attention = d_channel.abs().sum() + d_spatial.abs().sum()
        add_s, saved_s = _gc_forward(x[1], s_params, eps_s)
        add_t, saved_t = _gc_forward(x[0], t_params, eps_t)
        glob = diff + (add_s - add_t).unsqueeze(2)  # R_s(S) - R_t(T), [N, C, P]
        terms = torch.cat([focal, attention.view(1), (glob * glob).sum().view(1)])
        weights = constant_vector(weights, terms)  # made once per device, not per step
        ctx.save_for_backward(*params)
        ctx.grid = (h, w)
        ctx.kept = (x, masks, sm_spatial, sm_channel, spatial, channel, diff, d_spatial,
                    d_channel, glob, saved_s, saved_t, weights, temperature)
        return tuple((terms * weights).unbind())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_fg, g_bg, g_at, g_gl):
        params = ctx.saved_tensors
        (x, masks, sm_spatial, sm_channel, spatial, channel, diff, d_spatial, d_channel, glob,
         saved_s, saved_t, weights, temperature) = ctx.kept
        _, n, c, p = x.shape
        coef = torch.stack([g_fg, g_bg, g_at, g_gl]) * weights
        # focal: d(S - T) = 2 (S - T) A_C^t (c_fg M_fg + c_bg M_bg) A_S^t
        d_focal_w = (masks.view(2, n, p) * coef[:2].view(2, 1, 1)).sum(0) * spatial[0]  # [N, P]
        d_diff = (channel[0].unsqueeze(2) * d_focal_w.unsqueeze(1)) * (diff + diff)
        # global: R_s(S) - R_t(T) = (S - T) + (add_s - add_t)
        d_glob = glob * (coef[3] + coef[3])
        d_diff += d_glob
        d_add = d_glob.sum(dim=2)  # [N, C]
        d_flat, s_grads = _gc_backward(d_add, saved_s, params[:8], True)
        _, t_grads = _gc_backward(-d_add, saved_t, params[8:], False)
        # attention: |A^s - A^t| through the student's softmaxes and |S|
        d_a = coef[2]
        d_sp = torch._softmax_backward_data(d_spatial.sign() * (d_a * constant(p, d_a)),
                                            sm_spatial[1], 1, x.dtype)  # [N, P]
        d_ch = torch._softmax_backward_data(d_channel.sign() * (d_a * constant(c, d_a)),
                                            sm_channel[1], 1, x.dtype)  # [N, C]
        d_abs = (d_sp.unsqueeze(1) / constant(temperature * c, d_sp)
                 + d_ch.unsqueeze(2) / constant(temperature * p, d_ch))
        d_s = d_diff + d_flat + d_abs * x[1].sign()
        return (d_s.view(n, c, *ctx.grid), None, None, None, None, None, None, *s_grads, *t_grads)


def fgd_level_losses(s: Tensor, t: Tensor, masks: Tensor, student_block, teacher_block,
                     temperature: float, weights: List[float]) -> Tuple[Tensor, ...]:
    """``(fg, bg, at, gl)`` of one level (module docstring), each times its weight in
    ``weights`` (already divided by N).

    Args:
        s: the adapted student map ``[N, C, H, W]``; t: the teacher map (no gradient reaches
            it).
        masks: ``[2, N, H, W]`` (fg, bg).
        student_block / teacher_block: the level's
            :class:`~csgr_distill.layers.gc_block.GlobalContextBlock` of each network.
    """
    params = []
    for block in (student_block, teacher_block):
        conv1, norm, _, conv2 = block.transform
        params += [block.context.weight, block.context.bias, conv1.weight, conv1.bias,
                   norm.weight, norm.bias, conv2.weight, conv2.bias]
    return _FGDLevelLosses.apply(s, t, masks, float(temperature),
                                 tuple(float(w) for w in weights),
                                 student_block.transform[1].eps, teacher_block.transform[1].eps,
                                 *params)
