"""One CSGR level's two losses as a single autograd function with a hand-written backward.

What it computes is CSGR's per-level formula (``docs/methods/CSGR.md``), unchanged:

* ``X_hat = (X - mu_c) / (sigma_c + 1e-6)`` per channel over (n, h, w), sigma unbiased
  (:func:`~csgr_distill.layers.adapters.channel_standardize`), for the teacher map ``T`` and
  the (adapted) student map ``S``;
* ``L_cs = (1/N) sum (V_T - V_S)^2`` with ``V = A^T X_hat`` and ``A = softmax_{positions}(W X_hat)``
  (learned attention, each network its own ``A``) or one fixed ``A`` for both (the teacher's
  class logits);
* ``L_gr = (1/N) sum (CCA(T_hat) - CCA(S_hat))^2`` with one criss-cross block
  (:class:`~csgr_distill.layers.criss_cross.CrissCrossAttention`, 1 or 2 passes);

returned as ``(alpha * L_cs, beta * L_gr)``. Why a function of its own: written with autograd
the level dispatches about 590 ATen operators per forward + backward (two branches, 1x1
convolutions, layout permutes, every view's backward), whatever the level's size, so on a GPU
the loss is bound by the host. Here the two networks run as one batch ``[2N, ...]`` (teacher
first), the maps are laid out channels-last once (1x1 convolutions become one matrix product
over ``[2N*H*W, C]``, the row direction of the criss-cross needs no copy), the classifier,
query and key share one product, and the backward is written out: it computes the student's
gradient only (no gradient reaches the teacher), reuses what the forward kept, and has no
per-view bookkeeping.

Equality with the autograd formulation: each map's statistics and their backward are computed
with the same operations, in the same order and layout, as :func:`channel_standardize` under
autograd (:func:`~csgr_distill.layers.adapters.standardize`: the standardisation's gradient is
sensitive to the summation order of its means at the 1e-5 level in float32), so losses and
gradients agree with the implementation it replaces to float32 rounding
(``tests/test_launch_bound.py``). Differences: the key bias gets the exact gradient 0 of the
formula (a constant added to every energy of a softmax; autograd returns its rounding noise),
the value bias too where the bias cancels (the last pass); a variance below the smallest normal
float32 (``1.2e-38``) is raised to it (:func:`~csgr_distill.layers.adapters.channel_standardize`
does the same: its root, 1.1e-19, vanishes next to the 1e-6 added to sigma).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from .adapters import standardize, standardize_backward
from .constants import constant

__all__ = ["csgr_level_losses"]

# ------------------------------------------------------------------------------------------------
# criss-cross pieces on channels-last maps [B, H, W, C], q/k as [B*H*W, C'] (any row stride)
# ------------------------------------------------------------------------------------------------
def _attend(q: Tensor, k: Tensor, b: int, h: int, w: int):
    """Criss-cross attention ``[B, H, W, H + W]`` (column part first, the pixel itself excluded
    from its column) of queries/keys ``[B*H*W, C']``; also the column-major copies of q and k
    ``[B*W, H, C']`` the backward reuses."""
    cq = q.shape[1]
    e_row = torch.bmm(q.view(b * h, w, cq), k.view(b * h, w, cq).transpose(1, 2))  # [BH, W, W]
    qc = q.view(b, h, w, cq).transpose(1, 2).reshape(b * w, h, cq)
    kc = k.view(b, h, w, cq).transpose(1, 2).reshape(b * w, h, cq)
    e_col = torch.bmm(qc, kc.transpose(1, 2))  # [BW, H, H]
    e_col.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    energy = torch.cat([e_col.view(b, w, h, h).transpose(1, 2), e_row.view(b, h, w, w)], dim=3)
    return torch.softmax(energy, dim=3), qc, kc


def _attend_backward(d_att: Tensor, att: Tensor, q: Tensor, k: Tensor, qc: Tensor, kc: Tensor,
                     b: int, h: int, w: int) -> Tuple[Tensor, Tensor]:
    """``(dq, dk)`` ``[B, H, W, C']`` from the gradient of :func:`_attend`'s attention (the
    excluded diagonal has attention 0, hence gradient 0)."""
    cq = q.shape[1]
    d_e = torch._softmax_backward_data(d_att, att, 3, att.dtype)
    d_row = d_e[..., h:].reshape(b * h, w, w)
    d_col = d_e[..., :h].transpose(1, 2).reshape(b * w, h, h)
    dq = torch.bmm(d_row, k.view(b * h, w, cq)).view(b, h, w, cq)
    dq += torch.bmm(d_col, kc).view(b, w, h, cq).transpose(1, 2)
    dk = torch.bmm(d_row.transpose(1, 2), q.view(b * h, w, cq)).view(b, h, w, cq)
    dk += torch.bmm(d_col.transpose(1, 2), qc).view(b, w, h, cq).transpose(1, 2)
    return dq, dk


def _aggregate(att: Tensor, v: Tensor):
    """``out[b, i, j] = sum_i' a_col v[b, i', j] + sum_j' a_row v[b, i, j']`` ``[B, H, W, C]``
    of values ``v`` ``[B, H, W, C]``; also the pieces the backward reuses."""
    b, h, w, c = v.shape
    a_row = att[..., h:].reshape(b * h, w, w)
    a_col = att[..., :h].transpose(1, 2).reshape(b * w, h, h)
    vc = v.transpose(1, 2).reshape(b * w, h, c)
    out = torch.bmm(a_row, v.view(b * h, w, c)).view(b, h, w, c)
    out += torch.bmm(a_col, vc).view(b, w, h, c).transpose(1, 2)
    return out, (a_row, a_col, vc)


def _aggregate_backward(d_out: Tensor, v: Tensor, saved, rows: Optional[slice]):
    """``(d_att [B, H, W, H + W], dv)`` of :func:`_aggregate`; ``dv`` ``[b, H, W, C]`` only for
    the batch ``rows`` (None: no dv)."""
    a_row, a_col, vc = saved
    b, h, w, c = v.shape
    d_row = d_out.view(b * h, w, c)
    d_col = d_out.transpose(1, 2).reshape(b * w, h, c)
    d_a_row = torch.bmm(d_row, v.view(b * h, w, c).transpose(1, 2))
    d_a_col = torch.bmm(d_col, vc.transpose(1, 2))
    d_att = torch.cat([d_a_col.view(b, w, h, h).transpose(1, 2), d_a_row.view(b, h, w, w)], dim=3)
    if rows is None:
        return d_att, None
    nb = len(range(b)[rows])
    r_rows, c_rows = slice(rows.start * h, rows.stop * h), slice(rows.start * w, rows.stop * w)
    dv = torch.bmm(a_row[r_rows].transpose(1, 2), d_row[r_rows]).view(nb, h, w, c)
    dv += torch.bmm(a_col[c_rows].transpose(1, 2), d_col[c_rows]).view(nb, w, h, c).transpose(1, 2)
    return d_att, dv


# ------------------------------------------------------------------------------------------------
class _CSGRLevelLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, w_cls, w_q, b_q, w_k, b_k, w_v, b_v, gamma, attention, alpha_n,
                beta_n, recurrence):
        n, c, h, w = s.shape
        b, p = 2 * n, h * w
        learned = attention is None
        # ---- standardisation of both maps, as channel_standardize (channels-first reductions)
        standardized = standardize(s)
        # both maps channels-last in one [2N, H, W, C] batch, the teacher first
        big_x = torch.cat([standardize(t).x_hat.permute(0, 2, 3, 1),
                           standardized.x_hat.permute(0, 2, 3, 1)])
        flat = big_x.view(b * p, c)
        # ---- one product for the classifier (learned attention), the query and the key
        cq = w_q.shape[0]
        k_cls = w_cls.shape[0] if learned else 0
        weights = [w_q.view(cq, c), w_k.view(cq, c)]
        biases = [b_q, b_k]
        if learned:
            weights.insert(0, w_cls.view(k_cls, c))
            biases.insert(0, b_q.new_zeros(k_cls))
        w_all, b_all = torch.cat(weights), torch.cat(biases)
        proj = torch.addmm(b_all, flat, w_all.t())  # [2N*H*W, K + 2C']
        # ---- category semantic vectors
        if learned:
            cat_att = torch.softmax(proj[:, :k_cls].view(b, p, k_cls), dim=1)  # [2N, P, K]
            vectors = torch.bmm(cat_att.transpose(1, 2), big_x.view(b, p, c))  # [2N, K, C]
            d_vec = vectors[:n] - vectors[n:]
        else:
            cat_att = attention  # [N, P, K], shared by both networks
            d_vec = torch.bmm(cat_att.transpose(1, 2), (big_x[:n] - big_x[n:]).view(n, p, c))
        loss_cs = (d_vec * d_vec).sum() * constant(alpha_n, d_vec)
        # ---- criss-cross passes; the last one on the difference (the value bias cancels)
        q, k = proj[:, k_cls:k_cls + cq], proj[:, k_cls + cq:]
        w_v2 = w_v.view(c, c)
        passes = []
        z = big_x
        for step in range(recurrence):
            if step:
                qk = torch.addmm(b_all[k_cls:], z.view(b * p, c), w_all[k_cls:].t())
                q, k = qk[:, :cq], qk[:, cq:]
            att, qc, kc = _attend(q, k, b, h, w)
            if step == recurrence - 1:
                agg, agg_saved = _aggregate(att, z)
                diff = agg[:n] - agg[n:]
                projected = torch.mm(diff.view(n * p, c), w_v2.t()).view(n, h, w, c)
                g = torch.addcmul(z[:n] - z[n:], gamma, projected)
                passes.append((z, q, k, att, qc, kc, agg_saved, None, diff, projected))
            else:
                values = torch.addmm(b_v, z.view(b * p, c), w_v2.t()).view(b, h, w, c)
                agg, agg_saved = _aggregate(att, values)
                passes.append((z, q, k, att, qc, kc, agg_saved, values, agg, None))
                z = torch.addcmul(z, gamma, agg)
        loss_gr = (g * g).sum() * constant(beta_n, g)
        ctx.save_for_backward(s, w_all, w_v2, gamma)
        ctx.kept = (standardized, big_x, cat_att, d_vec, g, passes,
                    learned, k_cls, cq, alpha_n, beta_n, b_v)
        return loss_cs, loss_gr

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_cs, grad_gr):
        s, w_all, w_v2, gamma = ctx.saved_tensors
        (standardized, big_x, cat_att, d_vec, g, passes, learned, k_cls, cq, alpha_n,
         beta_n, b_v) = ctx.kept
        n, c, h, w = s.shape
        b, p = 2 * n, h * w
        student = slice(n, b)
        # ---- L_gr: g = (z_T - z_S) + gamma W_v (agg_T - agg_S) of the last pass
        d_g = g * (grad_gr * constant(2 * beta_n, g))  # [N, H, W, C]
        z, q, k, att, qc, kc, agg_saved, _, diff, projected = passes[-1]
        d_gamma = (d_g * projected).sum().view(1)
        d_projected = (d_g * gamma).view(n * p, c)
        d_wv = torch.mm(d_projected.t(), diff.view(n * p, c))
        d_diff = torch.mm(d_projected, w_v2)
        d_agg = torch.cat([d_diff, -d_diff]).view(b, h, w, c)
        last = len(passes) == 1  # the last pass is the first: only the student's dz is needed
        d_att, d_z = _aggregate_backward(d_agg, z, agg_saved, student if last else slice(0, b))
        dq, dk = _attend_backward(d_att, att, q, k, qc, kc, b, h, w)
        d_b_v = torch.zeros_like(b_v)
        if last:
            d_x = d_z - d_g  # the student's side of z_T - z_S
        else:  # recurrence 2: through the second pass's query/key, then the first pass
            d_qk = torch.cat([dq.view(b * p, cq), dk.view(b * p, cq)], dim=1)
            d_w_qk = torch.mm(d_qk.t(), z.view(b * p, c))
            d_b_qk = d_qk.sum(0)
            d_z += torch.mm(d_qk, w_all[k_cls:]).view(b, h, w, c)
            d_z += torch.cat([d_g, -d_g])
            z, q, k, att, qc, kc, agg_saved, values, agg, _ = passes[0]
            d_gamma += (d_z * agg).sum()
            d_att, d_values = _aggregate_backward(d_z * gamma, values, agg_saved, slice(0, b))
            dq, dk = _attend_backward(d_att, att, q, k, qc, kc, b, h, w)
            d_values = d_values.view(b * p, c)
            d_wv += torch.mm(d_values.t(), z.view(b * p, c))
            d_b_v = d_values.sum(0)
            d_x = d_z[student] + torch.mm(d_values[n * p:], w_v2).view(n, h, w, c)
        # ---- L_cs
        d_vec = d_vec * (grad_cs * constant(2 * alpha_n, d_vec))
        if learned:
            d_vectors = torch.cat([d_vec, -d_vec])  # [2N, K, C]
            d_cat_att = torch.bmm(big_x.view(b, p, c), d_vectors.transpose(1, 2))  # [2N, P, K]
            d_logits = torch._softmax_backward_data(d_cat_att, cat_att, 1, cat_att.dtype)
            d_x -= torch.bmm(cat_att[student], d_vec).view(n, h, w, c)
            d_proj = torch.cat([d_logits.view(b * p, k_cls), dq.view(b * p, cq),
                                dk.view(b * p, cq)], dim=1)
        else:
            d_x -= torch.bmm(cat_att, d_vec).view(n, h, w, c)
            d_proj = torch.cat([dq.view(b * p, cq), dk.view(b * p, cq)], dim=1)
        d_w_all = torch.mm(d_proj.t(), big_x.view(b * p, c))
        d_b_all = d_proj.sum(0)
        if not last:
            d_w_all[k_cls:] += d_w_qk
            d_b_all[k_cls:] += d_b_qk
        d_x += torch.mm(d_proj[n * p:], w_all).view(n, h, w, c)
        # ---- the student's standardisation, as autograd differentiates channel_standardize
        d_s = standardize_backward(d_x.permute(0, 3, 1, 2), standardized)
        w_q = d_w_all[k_cls:k_cls + cq]
        return (d_s, None, d_w_all[:k_cls].view(k_cls, c, 1, 1) if learned else None,
                w_q.view(cq, c, 1, 1), d_b_all[k_cls:k_cls + cq],
                d_w_all[k_cls + cq:].view(cq, c, 1, 1), torch.zeros_like(d_b_all[k_cls + cq:]),
                d_wv.view(c, c, 1, 1), d_b_v, d_gamma, None, None, None, None)


def csgr_level_losses(s: Tensor, t: Tensor, classifier_weight: Optional[Tensor], cca,
                      alpha_n: float, beta_n: float,
                      attention: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``(alpha_n * sum (V_T - V_S)^2, beta_n * sum (CCA(T_hat) - CCA(S_hat))^2)`` of one level
    (module docstring); the caller passes ``alpha / N`` and ``beta / N``.

    Args:
        s: the student map ``[N, C, H, W]`` (after its adapter); t: the teacher map (no
            gradient reaches it).
        classifier_weight: ``W`` ``[K, C, 1, 1]`` of the learned attention, or None with
            ``attention``: the fixed attention ``[N, H*W, K]`` (each column sums to 1 over the
            positions) that pools both maps.
        cca: the level's :class:`~csgr_distill.layers.criss_cross.CrissCrossAttention`.
    """
    if (classifier_weight is None) == (attention is None):
        raise ValueError("csgr_level_losses needs either the classifier weight or a fixed "
                         "attention")
    # t and attention get no gradient (the function returns None for them)
    return _CSGRLevelLosses.apply(
        s, t, classifier_weight, cca.query.weight, cca.query.bias, cca.key.weight,
        cca.key.bias, cca.value.weight, cca.value.bias, cca.gamma, attention, float(alpha_n),
        float(beta_n), cca.recurrence)
