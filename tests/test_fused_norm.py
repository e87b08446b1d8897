"""Fused LayerNorm/RMSNorm + AdaLN modulation (+ INT8 emit) vs the PyTorch reference and fp64 math.

CPU tests run the Triton kernel under TRITON_INTERPRET=1; the `gpu` tests run at Wan shapes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbovid.kernels import interpreting
from turbovid.kernels.fused_norm import (norm_modulate, norm_modulate_quant, norm_modulate_quant_ref,
                                         norm_modulate_ref)
from turbovid.kernels.int8_gemm import quant_per_token_ref

needs_kernels = pytest.mark.skipif(not interpreting(), reason="set TRITON_INTERPRET=1 to run Triton kernels on CPU")

VARIANTS = {  # name -> (kind, affine weight, affine bias)
    "ln": ("layer", False, False),
    "ln_affine": ("layer", True, True),
    "rms": ("rms", True, False),
}


def _inputs(B, L, D, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    # A non-zero mean per token (mean² ≫ var) is what exposes padded-lane bugs in the variance.
    x = (torch.randn(B, L, D, generator=g, device=device) + 3 * torch.randn(B, L, 1, generator=g, device=device))
    ch = torch.ones(D, device=device)
    ch[: max(1, D // 100)] = 8.0                                         # outlier channels
    x = (x * ch).to(torch.bfloat16)
    shift = torch.randn(B, D, generator=g, device=device)              # different per sample
    scale = 0.5 * torch.randn(B, D, generator=g, device=device)
    w = 1 + 0.1 * torch.randn(D, generator=g, device=device)
    b = 0.1 * torch.randn(D, generator=g, device=device)
    return x, shift, scale, w, b


def _args(variant, w, b):
    kind, has_w, has_b = VARIANTS[variant]
    return dict(kind=kind, weight=w if has_w else None, bias=b if has_b else None)


def _close_bf16(got, ref, term=None, max_frac=0.01):
    # ≤ 1 bf16 ulp of the result — plus, after modulation, 1 ulp of the rounded normalized value times
    # |1+scale| (`term`), since a flip there survives the cancellation in z·(1+scale)+shift — and only
    # a few elements off at all (the fp32 reduction order and rsqrt differ).
    d = (got.float() - ref.float()).abs()
    tol = ref.float().abs() * 2 ** -7 + (term * 2 ** -7 if term is not None else 0) + 1e-6
    assert bool((d <= tol).all()), f"max diff {d.max().item()}"
    assert (d > 0).float().mean().item() <= max_frac


def _term(x, args, scale):
    # |normalized value| · |1 + scale|: the magnitude before the shift is added
    return norm_modulate_ref(x, **args).float().abs() * (1 + scale[:, None, :]).abs()


def test_ref_matches_fp64_and_beats_td_padding_bug():
    # Independent check of the reference: fp64 LayerNorm + modulation, and the size of TD's bug.
    x, shift, scale, _, _ = _inputs(2, 6, 1536)
    xd = x.double()
    mu, var = xd.mean(-1, keepdim=True), xd.var(-1, unbiased=False, keepdim=True)
    z = (xd - mu) / torch.sqrt(var + 1e-6)
    expect = z * (1 + scale.double()[:, None]) + shift.double()[:, None]
    got = norm_modulate_ref(x, "layer", shift=shift, scale=scale)
    # two bf16 roundings: of z (carried through |1+scale|) and of the result
    tol = 2 ** -8 * (z.abs() * (1 + scale.double()[:, None]).abs() + expect.abs()) + 1e-6
    assert bool(((got.double() - expect).abs() <= tol).all())
    # TD's kernel adds (2048-1536)·μ² to Σ(x−μ)²: here that is a visible error.
    var_td = var + (2048 - 1536) / 1536 * mu ** 2
    z_td = (xd - mu) / torch.sqrt(var_td + 1e-6)
    assert (z_td - z).abs().max() > 0.1


@needs_kernels
@pytest.mark.parametrize("D", [100, 1536, 3000])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kernel_vs_ref(D, variant):
    B, L = 2, 5                                       # odd L: 2-row programs straddle the two samples
    x, shift, scale, w, b = _inputs(B, L, D, seed=D)
    args = _args(variant, w, b)
    _close_bf16(norm_modulate(x, **args), norm_modulate_ref(x, **args))                  # no modulation
    y = norm_modulate(x, **args, shift=shift, scale=scale)
    _close_bf16(y, norm_modulate_ref(x, **args, shift=shift, scale=scale), _term(x, args, scale))
    # one-rounding variant against the fp32 formula without the intermediate rounding
    y1 = norm_modulate(x, **args, shift=shift[:, None, :], scale=scale[:, None, :], round_norm=False)
    _close_bf16(y1, norm_modulate_ref(x, **args, shift=shift, scale=scale, round_norm=False))
    # INT8 emit: exactly the per-token quantization of the kernel's own bf16 output
    q, s = norm_modulate_quant(x, **args, shift=shift, scale=scale)
    q_ref, s_ref = quant_per_token_ref(y.reshape(-1, D))
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    # and close to the fully-reference pipeline (a flipped bf16 rounding can move q by 1)
    q_full, _ = norm_modulate_quant_ref(x, **args, shift=shift, scale=scale)
    assert (q.int() - q_full.int()).abs().max() <= 1


@needs_kernels
def test_per_sample_modulation_is_per_sample():
    x, shift, scale, _, _ = _inputs(2, 3, 128)
    x[1] = x[0]                                       # same tokens, different modulation per sample
    y = norm_modulate(x, "layer", shift=shift, scale=scale)
    z = norm_modulate(x, "layer")
    torch.testing.assert_close(y[1].float(), (z[1].float() * (1 + scale[1]) + shift[1]).bfloat16().float())
    assert not torch.equal(y[0], y[1])


@needs_kernels
def test_fp32_input_and_errors():
    x, shift, scale, w, _ = _inputs(1, 4, 100)
    x32 = x.float()
    y = norm_modulate(x32, "rms", weight=w, shift=shift, scale=scale)
    ref = norm_modulate_ref(x32, "rms", weight=w, shift=shift, scale=scale)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="both shift and scale"):
        norm_modulate(x, "layer", shift=shift)
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        norm_modulate(x, "layer", shift=shift[:, :50], scale=scale[:, :50])
    with pytest.raises(ValueError, match="kind"):
        norm_modulate(x, "group")


def test_ref_matches_torch_layer_norm_module():
    # the affine, unmodulated LN is what the DiT's norm3 computes: fp32 LN, one cast to bf16
    x, _, _, w, b = _inputs(2, 7, 3000)
    expect = F.layer_norm(x.float(), (3000,), w, b, 1e-6).to(torch.bfloat16)
    assert torch.equal(norm_modulate_ref(x, "layer", weight=w, bias=b), expect)


# --- GPU, Wan shapes ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B,L,D", [(1, 32760, 1536), (2, 16380, 1536), (1, 75600, 5120)])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_kernel_vs_ref(B, L, D, variant):
    x, shift, scale, w, b = _inputs(B, L, D, device="cuda")
    args = _args(variant, w, b)
    y = norm_modulate(x, **args, shift=shift, scale=scale)
    _close_bf16(y, norm_modulate_ref(x, **args, shift=shift, scale=scale), _term(x, args, scale))
    q, s = norm_modulate_quant(x, **args, shift=shift, scale=scale)
    q_ref, s_ref = quant_per_token_ref(y.reshape(-1, D))
    assert (q.int() - q_ref.int()).abs().max() <= 1 and (q != q_ref).float().mean() < 1e-4
    torch.testing.assert_close(s, s_ref, rtol=2 ** -7, atol=0)  # an amax may sit one bf16 rounding apart
