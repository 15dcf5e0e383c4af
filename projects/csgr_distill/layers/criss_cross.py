"""Criss-cross attention (CCNet), as used by CSGR's global-relation distillation.

For a map ``X`` ``[N, C, H, W]`` and a pixel ``u = (i, j)``::

    q = W_q * X + b_q,  k = W_k * X + b_k        [N, C', H, W],  C' = max(C // 8, 1)
    v = W_v * X + b_v                            [N, C,  H, W]
    e_col[u, i'] = q_u . k_(i', j)   for i' != i  (the pixel itself is excluded: -inf)
    e_row[u, j'] = q_u . k_(i, j')   for all j'   (the pixel itself is included)
    a_u = softmax([e_col[u, :], e_row[u, :]])    over H + W positions (no scaling, temperature 1)
    out_u = sum_i' a_col[u, i'] v_(i', j) + sum_j' a_row[u, j'] v_(i, j')
    CCA(X) = gamma * out + X

so every pixel attends to the H + W - 1 positions of its row and column. With ``recurrence`` R
the same block (same weights) is applied R times: ``CCA(CCA(X))`` for R = 2.

The implementation avoids the per-call ``[N*W, H, H]`` ``-inf`` diagonal tensors of the usual
implementation (see :mod:`csgr_distill.layers.reference`): the column energies are computed as
one batched matmul into a fresh ``[N, W, H, H]`` tensor whose diagonal is filled with ``-inf`` in
place (matmul's backward needs only its inputs, so this is autograd-safe), and the row and column
energies share one softmax. :meth:`CrissCrossAttention.paired_difference` computes
``CCA(a) - CCA(b)`` (what a distillation loss needs) with one value projection in the last pass
instead of one per branch.
"""
import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["CrissCrossAttention"]


def _kaiming_conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
    nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return conv


class CrissCrossAttention(nn.Module):
    """Criss-cross attention block ``X -> gamma * out + X``, applied ``recurrence`` times.

    Args:
        in_channels: C of the input ``[N, C, H, W]``.
        recurrence: number of passes of the same block (1: the CSGR paper; 2: CCNet).

    Parameters: ``query`` / ``key`` 1x1 convs C -> max(C // 8, 1), ``value`` 1x1 conv C -> C (all
    with bias, Kaiming-normal fan-in weights, zero bias), scalar ``gamma`` initialised to 0.
    """

    def __init__(self, in_channels: int, recurrence: int = 1):
        super().__init__()
        if recurrence < 1:
            raise ValueError(f"recurrence must be >= 1, got {recurrence}")
        self.in_channels = int(in_channels)
        self.recurrence = int(recurrence)
        inner = max(self.in_channels // 8, 1)
        self.query = _kaiming_conv1x1(self.in_channels, inner)
        self.key = _kaiming_conv1x1(self.in_channels, inner)
        self.value = _kaiming_conv1x1(self.in_channels, self.in_channels)
        self.gamma = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, recurrence={self.recurrence}"

    # ------------------------------------------------------------------ core
    def _attention(self, x: Tensor) -> Tensor:
        """Criss-cross attention weights ``[N, H, W, H + W]`` (column part first) of ``x``."""
        q = self.query(x)
        k = self.key(x)
        # column energies, batched over (n, w): [N, W, H, C'] @ [N, W, C', H] -> [N, W, H, H]
        e_col = torch.matmul(q.permute(0, 3, 2, 1), k.permute(0, 3, 1, 2))
        e_col.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
        # row energies, batched over (n, h): [N, H, W, C'] @ [N, H, C', W] -> [N, H, W, W]
        e_row = torch.matmul(q.permute(0, 2, 3, 1), k.permute(0, 2, 1, 3))
        energy = torch.cat([e_col.permute(0, 2, 1, 3), e_row], dim=3)  # [N, H, W, H + W]
        return F.softmax(energy, dim=3)

    @staticmethod
    def _aggregate(att: Tensor, y: Tensor) -> Tensor:
        """``out[n, :, i, j] = sum_i' a_col y[n, :, i', j] + sum_j' a_row y[n, :, i, j']``.

        Args:
            att: ``[N, H, W, H + W]`` from :meth:`_attention`; y: ``[N, C, H, W]``.
        """
        h = y.shape[2]
        a_col = att[..., :h]  # [N, H(i), W(j), H(i')]
        a_row = att[..., h:]  # [N, H(i), W(j), W(j')]
        #   batched over (n, j): [N, W, C, H(i')] @ [N, W, H(i'), H(i)] -> [N, W, C, H(i)]
        out_col = torch.matmul(y.permute(0, 3, 1, 2), a_col.permute(0, 2, 3, 1))
        #   batched over (n, i): [N, H, C, W(j')] @ [N, H, W(j'), W(j)] -> [N, H, C, W(j)]
        out_row = torch.matmul(y.permute(0, 2, 1, 3), a_row.transpose(2, 3))
        return out_col.permute(0, 2, 3, 1) + out_row.permute(0, 2, 1, 3)

    def _single_pass(self, x: Tensor) -> Tensor:
        """One criss-cross pass: ``gamma * out + x``, ``[N, C, H, W] -> [N, C, H, W]``."""
        out = self._aggregate(self._attention(x), self.value(x))
        return torch.addcmul(x, self.gamma, out)  # gamma * out + x in one pass

    def forward(self, x: Tensor) -> Tensor:
        """``x [N, C, H, W] -> [N, C, H, W]``: ``recurrence`` criss-cross passes."""
        self._check(x)
        for _ in range(self.recurrence):
            x = self._single_pass(x)
        return x

    def paired_difference(self, a: Tensor, b: Tensor) -> Tensor:
        """``CCA(a) - CCA(b)`` for two maps ``[N, C, H, W]`` (e.g. teacher and student).

        The last pass applies the value projection once, to the difference: every attention row
        sums to 1, so ``sum a (W_v y + b_v) = W_v (sum a y) + b_v`` and, for that pass's inputs
        ``a``, ``b``: ``pass(a) - pass(b) = (a - b) + gamma * W_v (agg_a(a) - agg_b(b))``
        (``b_v`` cancels). Earlier passes (``recurrence`` > 1) need each branch's full output.
        """
        self._check(a)
        if a.shape != b.shape:
            raise ValueError(f"paired_difference needs equal shapes, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        for _ in range(self.recurrence - 1):
            a, b = self._single_pass(a), self._single_pass(b)
        agg = self._aggregate(self._attention(a), a) - self._aggregate(self._attention(b), b)
        # "+ b_v - b_v": the bias stays in the graph (its gradient is exactly 0, as in the
        # formula) so that DDP sees every parameter used.
        bias = self.value.bias
        projected = F.conv2d(agg, self.value.weight, bias) - bias.view(1, -1, 1, 1)
        return torch.addcmul(a - b, self.gamma, projected)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"CrissCrossAttention expects [N, {self.in_channels}, H, W], got {tuple(x.shape)}"
            )

    # ------------------------------------------------------------------ visualisation
    @torch.no_grad()
    def attention_for_pixel(self, x: Tensor, i: int, j: int, step: int = 0) -> Tensor:
        """Attention weights of pixel ``(i, j)`` scattered into an ``[N, H, W]`` map.

        Column weights land at ``(i', j)``, row weights at ``(i, j')``; everything else is 0 and
        each map sums to 1 (``(i, j)`` itself carries only its row weight).

        Args:
            x: ``[N, C, H, W]`` input of the block.
            step: which pass (0-based, < recurrence) to show; pass ``r`` sees the output of the
                first ``r`` passes.
        """
        if not 0 <= step < self.recurrence:
            raise ValueError(f"step must be in [0, {self.recurrence}), got {step}")
        for _ in range(step):
            x = self._single_pass(x)
        n, _, h, w = x.shape
        if not (0 <= i < h and 0 <= j < w):
            raise IndexError(f"pixel ({i}, {j}) outside the {h}x{w} map")
        q = self.query(x)[:, :, i, j]  # [N, C']
        k = self.key(x)  # [N, C', H, W]
        e_col = torch.einsum("nc,nch->nh", q, k[:, :, :, j])
        e_col[:, i] = float("-inf")
        e_row = torch.einsum("nc,ncw->nw", q, k[:, :, i, :])
        a = F.softmax(torch.cat([e_col, e_row], dim=1), dim=1)
        out = x.new_zeros(n, h, w)
        out[:, :, j] += a[:, :h]
        out[:, i, :] += a[:, h:]
        return out
