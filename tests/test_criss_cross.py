"""CrissCrossAttention against explicit loops and against the CCNet-style reference; adapters and
per-channel standardisation against brute force."""
import numpy as np
import pytest
import torch
from torch import nn

from csgr_distill.layers import CrissCrossAttention, build_channel_adapter, channel_standardize
from csgr_distill.layers.reference import (
    NaiveCrissCrossAttention,
    loop_channel_standardize,
    loop_criss_cross,
    loop_criss_cross_pass,
)


def _block(channels, recurrence=1, gamma=0.7, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    block = CrissCrossAttention(channels, recurrence=recurrence).to(dtype)
    with torch.no_grad():
        for conv in (block.query, block.key, block.value):
            conv.bias.normal_()  # non-zero biases, so a dropped bias would show
        block.gamma.fill_(gamma)
    return block


def test_parameters_and_init():
    block = CrissCrossAttention(16)
    assert block.query.out_channels == 2 and block.key.out_channels == 2
    assert block.value.out_channels == 16
    assert all(c.bias is not None for c in (block.query, block.key, block.value))
    assert block.gamma.detach().item() == 0.0
    assert CrissCrossAttention(4).query.out_channels == 1  # C // 8 floored at 1
    # gamma = 0 -> identity
    x = torch.randn(2, 16, 3, 4)
    assert torch.equal(block(x), x)


@pytest.mark.parametrize("shape", [(2, 16, 4, 5), (1, 8, 1, 3), (1, 8, 3, 1)])
def test_matches_loops(shape):
    block = _block(shape[1])
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        ours = block(x)
    ref = loop_criss_cross_pass(block, x)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ours, x)  # gamma = 0.7: attention really contributes


def test_column_excludes_pixel_row_includes_it():
    # With keys equal everywhere all energies tie: the pixel sees H-1 column + W row positions,
    # so out = mean of those values.
    block = _block(8, gamma=1.0)
    with torch.no_grad():
        block.key.weight.zero_()
        block.value.weight.zero_()
        block.value.bias.zero_()
        block.value.weight[:, :, 0, 0] = torch.eye(8, dtype=torch.float64)  # v = x
    h, w = 3, 4
    x = torch.randn(1, 8, h, w, dtype=torch.float64)
    with torch.no_grad():
        y = block(x) - x
    i, j = 1, 2
    col = [x[0, :, ii, j] for ii in range(h) if ii != i]
    row = [x[0, :, i, jj] for jj in range(w)]
    expected = torch.stack(col + row).mean(0)
    assert torch.allclose(y[0, :, i, j], expected, atol=1e-12)


def test_recurrence_two_is_two_loop_passes():
    block = _block(16, recurrence=2, gamma=0.6, seed=3)
    x = torch.randn(2, 16, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        ours = block(x)
    ref = loop_criss_cross(block, x)
    once = loop_criss_cross_pass(block, x)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ours, once, atol=1e-3)


def test_attention_for_pixel_matches_loops():
    block = _block(16, seed=5)
    n, h, w = 2, 4, 5
    x = torch.randn(n, 16, h, w, dtype=torch.float64)
    i, j = 2, 1
    att = block.attention_for_pixel(x, i, j)
    assert att.shape == (n, h, w)
    assert torch.allclose(att.sum(dim=(1, 2)), torch.ones(n, dtype=torch.float64))
    q, k = block.query(x).detach(), block.key(x).detach()
    for b in range(n):
        energies = {}
        for ii in range(h):
            if ii != i:
                energies[("c", ii)] = float(q[b, :, i, j] @ k[b, :, ii, j])
        for jj in range(w):
            energies[("r", jj)] = float(q[b, :, i, j] @ k[b, :, i, jj])
        z = sum(np.exp(e) for e in energies.values())
        expected = torch.zeros(h, w, dtype=torch.float64)
        for (kind, idx), e in energies.items():
            if kind == "c":
                expected[idx, j] += np.exp(e) / z
            else:
                expected[i, idx] += np.exp(e) / z
        assert torch.allclose(att[b], expected, atol=1e-12)
    # weights off the cross are zero
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[i, :] = True
    mask[:, j] = True
    assert torch.all(att[:, ~mask] == 0)
    # and the weights reproduce the block's output at that pixel
    v = block.value(x).detach()
    out = torch.einsum("nhw,nchw->nc", att, v)
    with torch.no_grad():
        y = block(x)
    assert torch.allclose(y[:, :, i, j], 0.7 * out + x[:, :, i, j], atol=1e-10)


def test_matches_naive_reference_forward_and_backward():
    torch.manual_seed(0)
    fast = CrissCrossAttention(64)
    naive = NaiveCrissCrossAttention(64)
    naive.load_state_dict(fast.state_dict())
    with torch.no_grad():
        fast.gamma.fill_(0.7)
        naive.gamma.fill_(0.7)
    x = torch.randn(2, 64, 24, 31)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(xa), naive(xb)
    assert ((ya - yb).abs().max() / yb.abs().max()).item() < 1e-5
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    pairs = [("x", xa.grad, xb.grad)] + [
        (name, p.grad, q.grad)
        for (name, p), q in zip(fast.named_parameters(), naive.parameters())
        if name != "key.bias"  # analytically zero (see test_key_bias_gradient_is_zero)
    ]
    for name, ga, gb in pairs:
        assert ((ga - gb).abs().max() / gb.abs().max()).item() < 1e-4, name


def test_key_bias_gradient_is_zero():
    # q_u . b_k shifts all energies of pixel u equally -> softmax and output do not depend on b_k
    block = _block(16, seed=2)
    x = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    block(x).pow(2).sum().backward()
    assert block.key.bias.grad.abs().max() < 1e-9
    assert block.query.bias.grad.abs().max() > 1e-6


def test_wrong_channels_raise():
    with pytest.raises(ValueError, match=r"\[N, 16, H, W\]"):
        CrissCrossAttention(16)(torch.randn(1, 8, 3, 3))
    with pytest.raises(ValueError):
        CrissCrossAttention(16, recurrence=0)


# ---------------------------------------------------------------- adapters / standardisation
def test_channel_standardize_matches_numpy():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.1, 7.0],
                                                                   dtype=torch.float64).view(1, 4, 1, 1)
    x = x + torch.tensor([0.0, -2.0, 5.0, 1.0], dtype=torch.float64).view(1, 4, 1, 1)
    ours = channel_standardize(x)
    a = x.numpy()
    mu = a.mean(axis=(0, 2, 3), keepdims=True)
    sd = a.std(axis=(0, 2, 3), ddof=1, keepdims=True)
    assert np.allclose(ours.numpy(), (a - mu) / (sd + 1e-6), atol=1e-12)
    assert torch.allclose(ours, loop_channel_standardize(x), atol=1e-12)
    o = ours.numpy()
    assert np.allclose(o.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    assert np.allclose(o.std(axis=(0, 2, 3), ddof=1), 1, atol=1e-5)
    # population std would give a different answer: the unbiased one is used
    assert not np.allclose(ours.numpy(), (a - mu) / (a.std(axis=(0, 2, 3), keepdims=True) + 1e-6))


def test_channel_standardize_hand_case():
    # channel values [1, 3]: mean 2, unbiased std sqrt(2)
    x = torch.tensor([[[[1.0, 3.0]]]], dtype=torch.float64)
    r = 1 / np.sqrt(2)
    assert torch.allclose(channel_standardize(x, eps=0.0),
                          torch.tensor([[[[-r, r]]]], dtype=torch.float64))


def test_adapter():
    ad = build_channel_adapter(8, 16)
    assert isinstance(ad, nn.Conv2d) and ad.kernel_size == (1, 1) and ad.bias is not None
    assert ad(torch.randn(2, 8, 3, 3)).shape == (2, 16, 3, 3)
    assert isinstance(build_channel_adapter(16, 16), nn.Identity)


@pytest.mark.parametrize("recurrence", [1, 2])
def test_paired_difference_equals_difference_of_outputs(recurrence):
    torch.manual_seed(5)
    block = CrissCrossAttention(16, recurrence=recurrence).double()
    with torch.no_grad():
        block.gamma.fill_(0.8)
        block.value.bias.normal_()
    a = torch.randn(2, 16, 5, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 16, 5, 7, dtype=torch.float64, requires_grad=True)
    fast = block.paired_difference(a, b)
    slow = block(a) - block(b)
    assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-12)
    g_fast = torch.autograd.grad(fast.pow(2).sum(), [a, b, block.value.weight, block.gamma])
    g_slow = torch.autograd.grad(slow.pow(2).sum(), [a, b, block.value.weight, block.gamma])
    for x, y in zip(g_fast, g_slow):
        assert torch.allclose(x, y, rtol=1e-8, atol=1e-10)
