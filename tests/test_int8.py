"""W8A8 INT8 linears: TD quantization rule on hand-made tiles, kernels vs references, module swaps.

CPU tests run the Triton kernels under TRITON_INTERPRET=1 (int8 tl.dot is exact there); the `gpu`
tests run the same checks at Wan shapes on the device.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from turbovid.kernels import int8_gemm as K
from turbovid.kernels import interpreting, use_triton
from turbovid.quant.int8 import (FakeQuantLinear, FastInt8Linear, Int8Linear, convert_td_to_fast_,
                                 fake_quantized_linears, quantize_linears_, quantize_td, swap_block_linears,
                                 td_to_fast)

needs_kernels = pytest.mark.skipif(not interpreting(), reason="set TRITON_INTERPRET=1 to run Triton kernels on CPU")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _activations(M: int, K_: int, outlier: float = 1.0, device="cpu", seed: int = 0) -> torch.Tensor:
    """Gaussian tokens with 1% of the channels `outlier` times larger (DiT activations have such channels)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(M, K_, generator=g, device=device)
    ch = torch.ones(K_, device=device)
    ch[torch.randperm(K_, generator=g, device=device)[: max(1, K_ // 100)]] = outlier
    return (x * ch).to(torch.bfloat16)


def _both_quant_td(x):
    out = [K.quant_td_ref(x)]
    if interpreting():
        out.append(K.quant_td(x))
    return out


# --- TD quantization rule, hand-made tiles ---------------------------------------------------------

def test_td_rule_ties_saturation_negatives():
    # amax = 2 (a power of two): the step is 2/128 = 1/64 exactly, so k+0.5 steps are exact ties.
    x = torch.zeros(128, 128)
    vals = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 126.5, 127.5]) / 64
    x[0, : len(vals)] = vals
    x[5, 7] = 2.0    # the positive max: 2·128/2 = 128 -> saturates to 127
    x[6, 9] = -2.0   # the negative max reaches -128
    expect = torch.tensor([0, 2, 2, 0, -2, -2, 4, 126, 127], dtype=torch.int8)  # half to even; 127.5 -> 128 -> 127
    for q, s in _both_quant_td(x):
        assert torch.equal(q[0, : len(vals)], expect)
        assert q[5, 7] == 127 and q[6, 9] == -128
        assert s.shape == (1, 1) and s.item() == 2.0 / 128


def test_td_rule_partial_tiles_and_floor():
    # M = 130, K = 200: tiles (0,0) full, (0,1) 128×72, (1,0) 2×128, (1,1) 2×72.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(130, 200, generator=g)
    x[128:, 128:] = 0.0                     # an all-zero partial tile: scale = floor/128, q = 0
    x[128:, :128] = 1e-10                   # a tiny partial tile: amax floored to 1e-8
    for q, s in _both_quant_td(x):
        assert q.shape == (130, 200) and s.shape == (2, 2)
        assert s[0, 0].item() == pytest.approx(x[:128, :128].abs().max().item() / 128, rel=1e-7)
        assert s[0, 1].item() == pytest.approx(x[:128, 128:].abs().max().item() / 128, rel=1e-7)
        assert s[1, 1].item() == pytest.approx(1e-8 / 128, rel=1e-6) and q[128:, 128:].abs().max() == 0
        # 1e-10·128/1e-8 = 1.28 -> 1
        assert s[1, 0].item() == pytest.approx(1e-8 / 128, rel=1e-6) and bool((q[128:, :128] == 1).all())
        # every element within half a step of its tile's grid (or saturated at +amax)
        deq = K.dequant_td_ref(q, s)
        step = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:130, :200]
        assert bool(((deq - x).abs() <= step * 1.0 + 1e-12).all())


@needs_kernels
def test_quant_kernels_bit_exact():
    x = _activations(300, 260, outlier=8.0)
    for got, ref in ((K.quant_td(x), K.quant_td_ref(x)), (K.quant_per_token(x), K.quant_per_token_ref(x))):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # long rows take the two-sweep path of the per-token kernel
    x = _activations(3, 5000, outlier=4.0)
    got, ref = K.quant_per_token(x), K.quant_per_token_ref(x)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# --- TD GEMM --------------------------------------------------------------------------------------

def test_td_gemm_ref_matches_blockwise_fp64():
    # Independent check of the reference: Σ_b s_x,b s_w,b (q_x q_wᵀ)_b in float64.
    x, w = _activations(200, 384), _activations(136, 384, seed=1)
    (qx, sx), (qw, sw) = K.quant_td_ref(x), K.quant_td_ref(w)
    y = K.gemm_td_ref(qx, sx, qw, sw, torch.float32)
    ref = torch.zeros(200, 136, dtype=torch.float64)
    for b in range(3):
        ks = slice(128 * b, 128 * (b + 1))
        part = qx[:, ks].double() @ qw[:, ks].double().T
        ref += part * sx[:, b].double().repeat_interleave(128)[:200, None] * sw[:, b].double().repeat_interleave(128)[None, :136]
    # fp32 accumulation over 3 blocks: a few fp32 ulps of the output scale
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_td_gemm_kernel_bit_exact(dtype, with_bias):
    x, w = _activations(200, 384).to(dtype), _activations(136, 384, seed=1)
    bias = torch.randn(136).to(torch.bfloat16) if with_bias else None
    (qx, sx), (qw, sw) = K.quant_td_ref(x), K.quant_td_ref(w)
    assert torch.equal(K.gemm_td(qx, sx, qw, sw, dtype, bias), K.gemm_td_ref(qx, sx, qw, sw, dtype, bias))


@pytest.mark.parametrize("kernel", [False, True])
def test_activation_tiles_straddle_samples(kernel, monkeypatch):
    if kernel and not interpreting():
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on CPU")
    if not kernel:
        monkeypatch.setenv("TURBOVID_KERNELS", "ref")
    lin = nn.Linear(256, 72).to(torch.bfloat16)
    layer = Int8Linear.from_linear(lin)
    L = 100                                  # L % 128 != 0: rows 0..127 hold sample 0 and 28 rows of sample 1
    x = torch.stack([_activations(L, 256, seed=2), _activations(L, 256, seed=3) * 4]).to(torch.bfloat16)
    y = layer(x)
    # Same as quantizing the flattened [B·L, K] matrix by hand...
    qx, sx = K.quant_td_ref(x.reshape(-1, 256))
    expect = K.gemm_td_ref(qx, sx, layer.int8_weight, layer.scale, torch.bfloat16, layer.bias).view(2, L, 72)
    assert torch.equal(y, expect)
    # ...and sample 0 (rows 0..99) shares its row tile 0..127 with 28 rows of its 4× larger neighbour,
    # so its output differs from running it alone (TD behaviour, SPEC §7.2).
    alone = layer(x[:1])
    assert not torch.equal(y[0], alone[0])
    assert _rel(y[0], alone[0]) < 0.1  # still the same function, at a coarser step


# --- fast format ----------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("loop", ["tma", "ptr"])
def test_fast_gemm_int32_part_exact(loop, monkeypatch):
    monkeypatch.setattr(K, "GEMM_LOOP", loop)       # TMA descriptors + persistent grid, or pointer loads
    g = torch.Generator().manual_seed(4)
    qx = torch.randint(-127, 128, (150, 320), generator=g, dtype=torch.int8)
    qw = torch.randint(-127, 128, (90, 320), generator=g, dtype=torch.int8)
    ones_m, ones_n = torch.ones(150), torch.ones(90)
    # |acc| <= 127²·320 < 2^24: the fp32 output holds the int32 accumulator exactly.
    y = K.gemm_fast(qx, ones_m, qw, ones_n, out_dtype=torch.float32)
    assert torch.equal(y.long(), qx.long() @ qw.long().T)


@needs_kernels
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("K_", [200, 208])
def test_fast_gemm_epilogue(gelu, gated, K_):
    # K % 64 != 0: a K tail (200: K % 16 != 0, pointer loop with a masked tail; 208: TMA loop, the descriptor
    # reads the tail as zeros); M, N not multiples of the tile
    B, L, N = 2, 75, 136
    x, w = _activations(B * L, K_, outlier=4.0), _activations(N, K_, seed=5) * 0.05
    (qx, sx), (qw, sw) = K.quant_per_token_ref(x), K.quant_per_token_ref(w)
    bias = torch.randn(N).to(torch.bfloat16)
    extra = {}
    if gated:
        extra = dict(residual=torch.randn(B * L, N).to(torch.bfloat16), gate=torch.randn(B, N), tokens_per_sample=L)
    for dtype in (torch.float32, torch.bfloat16):
        got = K.gemm_fast(qx, sx, qw, sw, bias, gelu, out_dtype=dtype, **extra)
        ref = K.gemm_fast_ref(qx, sx, qw, sw, bias, gelu, out_dtype=dtype, **extra)
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=2e-6, atol=2e-6)
        else:  # within one bf16 rounding of the reference
            torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-5)
    # the gate really is per sample: sample 1's rows use gate[1]
    if gated:
        y = K.gemm_fast_ref(qx, sx, qw, sw, bias, gelu, out_dtype=torch.float32)
        expect = extra["residual"][L:].float() + extra["gate"][1] * y[L:]
        torch.testing.assert_close(ref[L:].float(), expect, rtol=2 ** -7, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("loop", ["tma", "ptr"])
@pytest.mark.parametrize("N", [72, 70])
def test_fast_gemm_two_gate_epilogue(loop, N, monkeypatch):
    # tokens_per_sample >= 256: the gate is read as two vectors per tile. Three samples of 260 rows: tiles straddle
    # sample borders and the last tile wraps past M (its first row is not the wrapped minimum); N = 72 stores
    # through TMA (16-byte rows), N = 70 in bf16 through pointers.
    monkeypatch.setattr(K, "GEMM_LOOP", loop)
    B, L, K_ = 3, 260, 208
    x, w = _activations(B * L, K_, outlier=4.0), _activations(N, K_, seed=6) * 0.05
    (qx, sx), (qw, sw) = K.quant_per_token_ref(x), K.quant_per_token_ref(w)
    extra = dict(residual=torch.randn(B * L, N).to(torch.bfloat16), gate=torch.randn(B, N), tokens_per_sample=L)
    got = K.gemm_fast(qx, sx, qw, sw, None, False, out_dtype=torch.bfloat16, **extra)
    ref = K.gemm_fast_ref(qx, sx, qw, sw, None, False, out_dtype=torch.bfloat16, **extra)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-5)


def test_fast_linear_vs_bf16():
    lin = nn.Linear(512, 256).to(torch.bfloat16)
    x = _activations(300, 512).view(3, 100, 512)
    layer = FastInt8Linear.from_linear(lin)
    assert layer.int8_weight.abs().max() <= 127 and layer.weight_scale.shape == (256,)
    assert _rel(layer(x) - lin.bias, lin(x) - lin.bias) < 0.015   # Gaussian tokens: ≈ 1.2%


def test_td_to_fast_converter():
    w = _activations(200, 300, outlier=6.0)
    q, s = quantize_td(w)
    qf, sf = td_to_fast(q, s)
    deq_td = K.dequant_td_ref(q, s)
    deq_fast = qf.float() * sf[:, None]
    # per-row requantization of the TD grid: within half a row step of the TD values
    assert bool(((deq_fast - deq_td).abs() <= 0.5 * sf[:, None] * (1 + 1e-4)).all())  # fp32 ties
    assert torch.allclose(sf * 127, deq_td.abs().amax(1).clamp_min(1e-8), rtol=1e-6)


# --- modules --------------------------------------------------------------------------------------

def test_int8_linear_vs_bf16_linear():
    lin = nn.Linear(384, 200).to(torch.bfloat16)
    layer = Int8Linear.from_linear(lin)
    assert layer.int8_weight.dtype == torch.int8 and layer.scale.shape == (2, 3) and layer.bias.dtype == torch.bfloat16
    assert set(dict(layer.named_buffers())) == {"int8_weight", "scale", "bias"} and not list(layer.parameters())
    for outlier, bound in ((1.0, 0.016), (4.0, 0.03)):   # 128×128 tiles: ≈ 1.3% Gaussian, ≈ 2.5% outliers
        x = _activations(256, 384, outlier=outlier).view(2, 128, 384)
        assert _rel(layer(x) - lin.bias, lin(x) - lin.bias) < bound
    x32 = torch.randn(5, 384)                            # fp32 accepted, fp32 out
    assert layer(x32).dtype == torch.float32


@pytest.mark.parametrize("kernel", [False, True])
def test_k_not_multiple_of_128(kernel, monkeypatch):
    if kernel and not interpreting():
        pytest.skip("set TRITON_INTERPRET=1 to run Triton kernels on CPU")
    if not kernel:
        monkeypatch.setenv("TURBOVID_KERNELS", "ref")
    assert use_triton(torch.empty(1)) == kernel
    lin = nn.Linear(200, 130).to(torch.bfloat16)
    x = _activations(150, 200).view(1, 150, 200)
    y = Int8Linear.from_linear(lin)(x)
    # Zero-padding K to 256 changes neither the amaxes nor the dots: same bits as the padded problem.
    pad = nn.Linear(256, 130).to(torch.bfloat16)
    with torch.no_grad():
        pad.weight.zero_()
        pad.weight[:, :200] = lin.weight
        pad.bias.copy_(lin.bias)
    y_pad = Int8Linear.from_linear(pad)(torch.nn.functional.pad(x, (0, 56)))
    assert torch.equal(y, y_pad)
    assert _rel(y - lin.bias, lin(x) - lin.bias) < 0.016
    fast = FastInt8Linear.from_linear(lin)
    assert _rel(fast(x) - lin.bias, lin(x) - lin.bias) < 0.015


def test_bad_inputs():
    layer = Int8Linear(256, 64)
    with pytest.raises(ValueError, match="last dim"):
        layer(torch.randn(2, 100))
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        layer(torch.ones(2, 256, dtype=torch.int32))
    with pytest.raises(ValueError, match="K mismatch"):
        K.gemm_fast(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4), torch.zeros(8, 32, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="unknown int8 format"):
        swap_block_linears(_TinyNet(), fmt="int4")


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.o = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.attn_op = nn.Module()
        self.attn_op.local_attn = nn.Module()
        self.attn_op.local_attn.proj_l = nn.Linear(d, d)   # SLA: never quantized

    def forward(self, x):
        return self.o(self.q(x)) + self.attn_op.local_attn.proj_l(x)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = _Attn(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.ffn(x)


class _TinyNet(nn.Module):
    def __init__(self, d=128, depth=2):
        super().__init__()
        self.patch_embedding = nn.Linear(16, d)            # outside blocks: never quantized
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))

    def forward(self, x):
        x = self.patch_embedding(x)
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("fmt", ["td", "fast"])
def test_swap_and_strict_round_trip(fmt):
    torch.manual_seed(0)
    model = _TinyNet().to(torch.bfloat16)
    x = torch.randn(2, 40, 16).to(torch.bfloat16)
    dense_out = model(x)
    quantize_linears_(model, fmt)
    cls = Int8Linear if fmt == "td" else FastInt8Linear
    blk = model.blocks[1]
    assert isinstance(blk.self_attn.q, cls) and isinstance(blk.self_attn.o, cls) and blk.self_attn.o.bias is None
    assert isinstance(blk.ffn[0], cls) and isinstance(blk.ffn[2], cls)
    assert type(blk.self_attn.attn_op.local_attn.proj_l) is nn.Linear and type(model.patch_embedding) is nn.Linear
    out = model(x)
    assert _rel(out, dense_out) < 0.03
    state = model.state_dict()
    # A fresh model built on meta, swapped to EMPTY int8 layers, loads the export strictly.
    with torch.device("meta"):
        fresh = _TinyNet().to(torch.bfloat16)
        swap_block_linears(fresh, fmt)
    assert fresh.blocks[0].ffn[0].int8_weight.is_meta
    assert set(fresh.state_dict()) == set(state)
    fresh.load_state_dict(state, strict=True, assign=True)
    assert torch.equal(fresh(x), out)


def test_convert_td_to_fast():
    torch.manual_seed(0)
    model = _TinyNet().to(torch.bfloat16)
    x = torch.randn(2, 40, 16).to(torch.bfloat16)
    dense_out = model(x)
    convert_td_to_fast_(quantize_linears_(model, "td"))
    assert isinstance(model.blocks[0].ffn[2], FastInt8Linear)
    assert _rel(model(x), dense_out) < 0.03


def test_custom_ops_registered():
    # torch.compile sees the kernels as opaque ops with shape-only fake implementations.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(300, 200, dtype=torch.bfloat16)
        q, s = torch.ops.turbovid.quant_td(x)
        assert q.shape == (300, 200) and s.shape == (3, 2)
        y = torch.ops.turbovid.gemm_fast(q, torch.empty(300), torch.empty(64, 200, dtype=torch.int8), torch.empty(64))
        assert y.shape == (300, 64) and y.dtype == torch.bfloat16


# --- GPU, Wan shapes ------------------------------------------------------------------------------

WAN_KN = [(1536, 1536), (1536, 8960), (8960, 1536), (5120, 5120), (5120, 13824), (13824, 5120)]


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", WAN_KN)
def test_gpu_fast_w8a8_error(k, n):
    M = 32760
    x = _activations(M, k, outlier=1.0, device="cuda")
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
    lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    lin.weight.data.copy_(w)
    y_bf16 = x @ w.T
    layer = FastInt8Linear.from_linear(lin)
    assert _rel(layer(x), y_bf16) < 0.015
    # with outlier channels (1% of channels 3× larger) the per-token format degrades gracefully
    xo = _activations(M, k, outlier=3.0, device="cuda", seed=1)
    assert _rel(layer(xo), xo @ w.T) < 0.025


@pytest.mark.gpu
@pytest.mark.parametrize("k,n", [(1536, 1536), (5120, 13824), (13824, 5120)])
def test_gpu_td_bit_exact(k, n):
    M = 32760
    x = _activations(M, k, outlier=4.0, device="cuda")
    w = _activations(n, k, device="cuda", seed=2) * 0.02
    (qx, sx), (qx_r, sx_r) = K.quant_td(x), K.quant_td_ref(x)
    assert torch.equal(qx, qx_r) and torch.equal(sx, sx_r)
    qw, sw = K.quant_td_ref(w)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    assert torch.equal(K.gemm_td(qx, sx, qw, sw, torch.bfloat16, bias), K.gemm_td_ref(qx, sx, qw, sw, torch.bfloat16, bias))


@pytest.mark.gpu
@pytest.mark.parametrize("loop", ["tma", "ptr"])
@pytest.mark.parametrize("k,n", [(1536, 1536), (8960, 1536), (5120, 13824)])
def test_gpu_fast_kernels_vs_ref(k, n, loop, monkeypatch):
    monkeypatch.setattr(K, "GEMM_LOOP", loop)
    M, L = 32760, 16380
    x = _activations(M, k, outlier=3.0, device="cuda")
    got, ref = K.quant_per_token(x), K.quant_per_token_ref(x)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    qw, sw = K.quant_per_token_ref(_activations(n, k, device="cuda", seed=3))
    qx, sx = got
    # unit scales: both sides round the exact integer sum to fp32 once
    assert torch.equal(K.gemm_fast(qx, torch.ones_like(sx), qw, torch.ones_like(sw), out_dtype=torch.float32),
                       (qx.double() @ qw.double().T).float())
    extra = dict(residual=torch.randn(M, n, device="cuda").to(torch.bfloat16),
                 gate=torch.randn(2, n, device="cuda"), tokens_per_sample=L)
    bias = torch.randn(n, device="cuda").to(torch.bfloat16)
    got = K.gemm_fast(qx, sx, qw, sw, bias, True, out_dtype=torch.float32, **extra)
    ref = K.gemm_fast_ref(qx, sx, qw, sw, bias, True, out_dtype=torch.float32, **extra)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_tuned_kernels_collect_the_cycles_a_tuning_call_leaves(monkeypatch):
    """A tuning call (the autotuner's cache grows) is followed by a full collection, so garbage cycles that hold
    the caller's tensors die with the call; a call with a known key does not collect."""
    import gc
    import weakref

    from turbovid.kernels import collect_after_tuning

    class FakeTuned:             # as triton's Autotuner: kernel[grid](...) calls self.run, a new key fills .cache
        def __init__(self):
            self.cache = {}

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)

        def run(self, x, key, grid, warmup):
            if key not in self.cache:
                self.cache[key] = "config"
                cycle = {"activation": x}     # a cycle holding the caller's tensor, as tuning left one
                cycle["self"] = cycle

    kernel = collect_after_tuning(FakeTuned())
    collections = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or real_collect(*a))
    gc.disable()                 # only the tuned kernel may collect during the test
    try:
        x = torch.zeros(1000)
        alive = weakref.ref(x)
        kernel[(1,)](x, "shape-a")
        del x
        assert alive() is None and len(collections) == 1
        kernel[(1,)](torch.zeros(3), "shape-a")
        assert len(collections) == 1
    finally:
        gc.enable()


def test_fake_quant_linear_rounds_like_fast_int8_and_passes_gradients_straight_through():
    # Quantization-aware training's stand-in: the forward is FastInt8Linear's (dequantized), the backward the
    # plain Linear's evaluated at the rounded operands.
    lin = nn.Linear(192, 96)
    x = _activations(2 * 37, 192, outlier=8.0).float().view(2, 37, 192).requires_grad_()
    fake = FakeQuantLinear(lin)
    y = fake(x)
    with torch.no_grad():
        torch.testing.assert_close(y, FastInt8Linear.from_linear(lin)(x), atol=1e-4, rtol=1e-4)
        assert (y - lin(x)).abs().max() > 1e-3      # it does round
    g = torch.randn_like(y)
    y.backward(g)
    qx, sx = K.quant_per_token_ref(x.detach().reshape(-1, 192))
    qw, sw = K.quant_per_token_ref(lin.weight.detach())
    xr, wr = qx.float() * sx[:, None], qw.float() * sw[:, None]
    torch.testing.assert_close(x.grad, (g.reshape(-1, 96) @ wr).view_as(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lin.weight.grad, g.reshape(-1, 96).T @ xr, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(lin.bias.grad, g.sum(dim=(0, 1)))


def test_fake_quantized_linears_swaps_the_block_linears_and_puts_them_back():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))])
    model.head = nn.Linear(8, 4)
    before = list(model.blocks[0])
    with fake_quantized_linears(model):
        assert [type(m).__name__ for m in model.blocks[0]] == ["FakeQuantLinear", "GELU", "FakeQuantLinear"]
        assert isinstance(model.head, nn.Linear)                    # outside the blocks: untouched
        assert {id(p) for p in model.parameters()} == {id(p) for m in (*before, model.head) for p in m.parameters()}
    assert list(model.blocks[0]) == before
