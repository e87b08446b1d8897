"""Quantized attention kernel vs its references (CPU via TRITON_INTERPRET=1; Wan shapes under the gpu marker).

Two references: `sage_attention_ref` (same quantization, exact softmax: the kernel may differ only by accumulation
order, bf16 output rounding and — FP8 PV — e4m3 rounding of P) and `attention_ref` (exact fp32 attention: the
error budget of the method). Inputs carry DiT-like outliers (`outlier_qkv`), not only randn.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from turbovid.attention.sage import SageAttention
from turbovid.kernels import interpreting, use_triton
from turbovid.kernels import sage_attention as SA
from turbovid.kernels import sla as S
from turbovid.kernels.sage_attention import (
    attention_ref, fake_quantize_qkv, kv_stats, outlier_qkv, quantize_int8, quantize_int8_ref, quantize_qkv,
    quantize_qkv_ref, quantize_v, quantize_v_ref, sage_attention, sage_attention_quantized, sage_attention_ref,
    sagesla_forward,
    sagesla_forward_ref, sagesla_prep, sagesla_stats)

needs_kernels = pytest.mark.skipif(not use_triton(torch.empty(0)), reason="run with TRITON_INTERPRET=1")


def metrics(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    o, r = out.float().flatten(), ref.float().flatten()
    return F.cosine_similarity(o, r, dim=0).item(), ((o - r).abs().sum() / r.abs().sum()).item()


def random_lut(b, h, length, block_q, block_k, k_sel, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_q, n_k = -(-length // block_q), -(-length // block_k)
    return torch.rand(b, h, n_q, n_k, generator=g).topk(k_sel, dim=-1).indices.sort(dim=-1).values.int()


# Budgets. Against the same-quantization reference: FP16 PV differs by bf16 output rounding (both sides,
# ~2^-9 relative), FP8 PV also by the e4m3 rounding of P (3 mantissa bits; smooth-V keeps it small).
KERNEL_VS_SAGE_REF = {"fp16": (0.99999, 0.006), "fp8": (0.9999, 0.01)}
# Against exact fp32 attention: these tiny, peaky outlier problems lose ~0.025-0.035 relative L1 to INT8 Q/K
# (per-block scales; a ×10 channel coarsens the whole block). The Wan-shape budget is the (GPU tests).
KERNEL_VS_EXACT = {"fp16": (0.998, 0.045), "fp8": (0.998, 0.045)}


# ---------------------------------------------------------------------------------------------- quantization

@needs_kernels
@pytest.mark.parametrize("length,block,dit_layout", [(77, 64, False), (200, 128, True)])
def test_quant_int8_matches_ref(length, block, dit_layout):
    q, k, _ = outlier_qkv(2, 3, length, 64, dit_layout=dit_layout, seed=1)
    mean = k.float().mean(dim=2)
    for x, mult, mu in [(q, 0.12752, None), (k, 1.0, mean)]:
        got, got_scale = quantize_int8(x, block, mult, mu)
        want, want_scale = quantize_int8_ref(x, block, mult, mu)
        assert got.shape == want.shape == (2, 3, -(-length // block) * block, 64)
        # The interpreter's division is IEEE, as is div_rn on the GPU: bit-exact, including the zero padding.
        assert torch.equal(got_scale, want_scale)
        assert torch.equal(got, want)
        assert got[:, :, length:].eq(0).all()
        # Dequantized values are within half a step of the (centred, scaled) input.
        x_in = (x.float() - (mu[:, :, None] if mu is not None else 0)) * mult
        deq = (got.float() * want_scale.repeat_interleave(block, -1)[..., None])[:, :, :length]
        assert ((deq - x_in).abs() <= 0.5001 * want_scale.repeat_interleave(block, -1)[..., :length, None]).all()


@needs_kernels
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_quant_v_matches_ref(pv):
    _, k, v = outlier_qkv(2, 2, 77, 128, dit_layout=True, seed=2)
    _, mean, scale = kv_stats(k, v, pv)
    got, want = quantize_v(v, 64, mean, scale), quantize_v_ref(v, 64, mean, scale)
    assert got.shape == want.shape == (2, 2, 128, 128) and got.dtype == want.dtype
    if pv == "fp16":
        assert torch.equal(got, want)
        return
    # Bit-exact e4m3 (on the interpreter thanks to the soft rounding in `_to_e4m3`), zero padding.
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert got[..., 77:].view(torch.uint8).eq(0).all()
    # Dequantized V is within one e4m3 half-step (2^-4 relative, or 2^-10 of the scale near zero) of V.
    deq = got.float().transpose(2, 3)[:, :, :77] * scale[:, :, None] + mean[:, :, None]
    centred = v.float() - mean[:, :, None]
    assert ((deq - v.float()).abs() <= (centred.abs() / 16 + scale[:, :, None] / 1024) * 1.001).all()


# ---------------------------------------------------------------------------------------------- attention

CASES = [  # (length, head_dim, pv, sparse, block_q, block_k)
    (200, 128, "fp8", False, 64, 128),
    (130, 128, "fp8", False, 128, 128),  # the H100 default tiles, plain int->float conversion (no magic)
    (77, 64, "fp16", False, 128, 64),
    (65, 64, "fp8", False, 128, 64),     # tail key block with a single valid key
    (200, 64, "fp8", True, 64, 64),
    (77, 128, "fp16", True, 64, 128),
    (200, 128, "fp16", True, 128, 128),
]


@needs_kernels
@pytest.mark.parametrize("length,d,pv,sparse,block_q,block_k", CASES)
def test_kernel_matches_references(length, d, pv, sparse, block_q, block_k):
    q, k, v = outlier_qkv(2, 2, length, d, seed=length + d)
    lut = None
    if sparse:
        n_k = -(-length // block_k)
        lut = random_lut(2, 2, length, block_q, block_k, max(1, n_k // 2), seed=3)
        if n_k > 1:  # make sure the partial tail block is exercised in sparse mode too
            lut[0, 0, 0] = torch.arange(n_k - lut.shape[-1], n_k, dtype=torch.int32)
    out = sage_attention(q, k, v, lut=lut, block_q=block_q, block_k=block_k, pv=pv)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()

    cos, rel = metrics(out, sage_attention_ref(q, k, v, lut=lut, block_q=block_q, block_k=block_k, pv=pv))
    assert cos >= KERNEL_VS_SAGE_REF[pv][0] and rel <= KERNEL_VS_SAGE_REF[pv][1], (cos, rel)
    exact = attention_ref(q, k, v, lut, block_q, block_k)
    cos, rel = metrics(out, exact)
    assert cos >= KERNEL_VS_EXACT[pv][0] and rel <= KERNEL_VS_EXACT[pv][1], (cos, rel)
    if not sparse:  # sanity of the reference itself: the dense exact reference is SDPA in fp32
        assert torch.allclose(exact, F.scaled_dot_product_attention(q.float(), k.float(), v.float()), atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("sparse", [False, True])
def test_promoted_fp8_accumulation_matches_references(sparse):
    # promote: each key block's P·V in a fresh accumulator, added in fp32 (SageAttention2's two-level accumulation).
    # Awkward length (tail key block), the H100 tiles; against the quantized reference and exact attention.
    length, d, block_q, block_k = 200, 128, 64, 128
    q, k, v = outlier_qkv(1, 2, length, d, seed=21)
    lut = random_lut(1, 2, length, block_q, block_k, 1, seed=4) if sparse else None
    quantized = quantize_qkv(q, k, v, block_q, block_k, "fp8")
    outs = {}
    for promote in (False, True):
        out = torch.empty_like(q)
        sage_attention_quantized(*quantized, out, lut, block_q, block_k, "fp8", promote=promote)
        outs[promote] = out
        cos, rel = metrics(out, sage_attention_ref(q, k, v, lut=lut, block_q=block_q, block_k=block_k, pv="fp8"))
        assert cos >= KERNEL_VS_SAGE_REF["fp8"][0] and rel <= KERNEL_VS_SAGE_REF["fp8"][1], (promote, cos, rel)
        cos, rel = metrics(out, attention_ref(q, k, v, lut, block_q, block_k))
        assert cos >= KERNEL_VS_EXACT["fp8"][0] and rel <= KERNEL_VS_EXACT["fp8"][1], (promote, cos, rel)
    if interpreting():  # the interpreter's dots are exact fp32: the two accumulations give the same numbers
        assert torch.equal(outs[False], outs[True])


@needs_kernels
def test_padded_keys_get_no_weight():
    # 65 keys in blocks of 64: the second block holds one real key and 63 zero-padded ones. With every real
    # value equal to 3 the exact output is 3 whatever the weights. Padding that leaked into the softmax (logit 0
    # instead of -inf: the sageattention 1.0.6 bug) would pull it towards the padded zeros, and by a lot:
    # after smooth-K the real logits q·(k_j - mean) average to 0 per row, the same as a padded key's.
    # FP16 PV only: with FP8 PV, smooth-V turns a constant V into zeros plus an exact epilogue add, which would
    # hide a leak; the (65, 64, "fp8") case above checks that path against exact attention instead.
    q, k, v = outlier_qkv(1, 2, 65, 64, seed=7)
    out = sage_attention(q, k, torch.full_like(v, 3.0), block_q=128, block_k=64, pv="fp16")
    assert torch.allclose(out.float(), torch.full(out.shape, 3.0), rtol=0, atol=0.02)


@needs_kernels
def test_strided_inputs_and_output_layout():
    # The DiT hands over [B, L, H, D] tensors viewed as [B, H, L, D]: no copy in, no copy out.
    q, k, v = outlier_qkv(2, 3, 77, 64, dit_layout=True, seed=4)
    assert not q.is_contiguous()
    out = sage_attention(q, k, v, block_q=64, block_k=64, pv="fp8")
    assert out.transpose(1, 2).is_contiguous()  # written straight into [B, L, H, D] storage
    dense = sage_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_q=64, block_k=64, pv="fp8")
    assert dense.is_contiguous()
    assert torch.equal(out, dense)  # same quantized values, same kernel: bit-identical

    module_out = SageAttention(pv="fp8", block_q=64, block_k=64)(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2))
    assert module_out.shape == (2, 77, 3, 64) and module_out.is_contiguous()
    assert torch.equal(module_out, out.transpose(1, 2))


@needs_kernels
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_kernel_quantization_equals_reference_quantization(pv):
    q, k, v = outlier_qkv(1, 2, 130, 128, dit_layout=True, seed=5)
    stats = kv_stats(k, v, pv)
    for got, want in zip(quantize_qkv(q, k, v, 64, 128, pv, stats), quantize_qkv_ref(q, k, v, 64, 128, pv, stats)):
        assert (got is None and want is None) or torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_reference_fallback(monkeypatch):
    # TURBOVID_KERNELS=ref routes the op to `sage_attention_ref` (what CPU and unsupported GPUs run).
    monkeypatch.setenv("TURBOVID_KERNELS", "ref")
    q, k, v = outlier_qkv(1, 2, 50, 64, dit_layout=True, seed=6)
    lut = random_lut(1, 2, 50, 64, 64, 1)
    out = sage_attention(q, k, v, lut=lut, block_q=64, block_k=64, pv="fp8")
    assert out.transpose(1, 2).is_contiguous()
    assert torch.equal(out, sage_attention_ref(q, k, v, lut=lut, block_q=64, block_k=64, pv="fp8"))


def test_fake_impl_matches_real(monkeypatch):
    # torch.compile traces the op through its fake impl: shapes, dtype and strides must match the real output.
    monkeypatch.setenv("TURBOVID_KERNELS", "ref")
    q, k, v = outlier_qkv(1, 2, 40, 64, dit_layout=True, seed=8)
    torch.library.opcheck(torch.ops.turbovid.sage_attention.default, (q, k, v, None, 64, 64, "fp16"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(q=torch.zeros(1, 2, 8, 64)), "bf16 or all fp16"),
    (dict(q=torch.zeros(1, 2, 8, 32, dtype=torch.bfloat16)), "one shape"),
    (dict(shape=(1, 2, 8, 96)), "head dim 64 or 128"),
    (dict(block_q=32), "block_q and block_k"),
    (dict(pv="int4"), "pv must be one of"),
    (dict(lut=torch.zeros(1, 2, 1, 1, dtype=torch.int64)), "lut must be int32"),
    (dict(lut=torch.zeros(1, 2, 3, 1, dtype=torch.int32)), "lut must be int32"),
    (dict(lut=torch.zeros(1, 2, 1, 2, dtype=torch.int32)), "K_sel"),
])
def test_launcher_errors(kwargs, match):
    shape = kwargs.pop("shape", (1, 2, 8, 64))
    args = {n: torch.zeros(shape, dtype=torch.bfloat16) for n in "qkv"}
    args.update({n: kwargs.pop(n) for n in "qkv" if n in kwargs})
    with pytest.raises(ValueError, match=match):
        sage_attention(args["q"], args["k"], args["v"], **kwargs)


# ---------------------------------------------------------------------------------------------- SageSLA fused path

def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def unpack_stats(stats, b, h, d):
    # sagesla_stats -> (k_mean, v_mean, v_scale) as [B, H, D] fp32 (kv_stats' format), S [B, H, D, D], z [B, H, D].
    vec, vec_lp, s = stats
    return tuple(x.view(b, h, d) for x in vec), s.view(b, h, d, d), vec_lp[1].view(b, h, d)


@needs_kernels
@pytest.mark.parametrize("d", [64, 128])
def test_sagesla_stats_match_refs(d, monkeypatch):
    # Pass A (three token splits, a partial last tile) + finalize vs kv_stats and the linear-branch reference.
    monkeypatch.setitem(SA.SAGESLA_STATS, "tokens", 128)
    monkeypatch.setitem(SA.SAGESLA_STATS, "block", 32)
    _, k, v = outlier_qkv(2, 2, 333, d, dit_layout=True, seed=20 + d)
    (k_mean, v_mean, v_scale), s, z = unpack_stats(sagesla_stats(k, v), 2, 2, d)
    want = kv_stats(k, v, "fp8")
    for got, ref in zip((k_mean, v_mean, v_scale), want):  # fp32 sums in another order: a few ulp
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    s_ref, z_ref = S.sla_linear_stats_ref(k, v)
    phi = torch.softmax(k, dim=-1).double()  # rounded to bf16 first, as TurboDiffusion
    for got, lowp, exact in ((s, s_ref, phi.transpose(-1, -2) @ v.double()), (z, z_ref, phi.sum(-2))):
        assert got.dtype == torch.bfloat16
        assert relerr(got, exact) <= 2 * relerr(lowp, exact) + 1e-6, (relerr(got, exact), relerr(lowp, exact))


@needs_kernels
@pytest.mark.parametrize("length,d,block_q,block_k", [(200, 64, 64, 128), (333, 128, 128, 64)])
def test_sagesla_prep_matches_refs(length, d, block_q, block_k):
    # Pass B: quantization bit-identical to quantize_qkv_ref fed the same statistics, pooling identical to the
    # block-map reference's, and the linear branch + proj_l (written into the output) as sla_linear_apply_ref.
    q, k, v = outlier_qkv(2, 2, length, d, dit_layout=True, seed=length)
    w, b = 0.1 * torch.randn(d, d), 0.1 * torch.randn(d)
    stats = sagesla_stats(k, v)
    kv, s, z = unpack_stats(stats, 2, 2, d)
    quantized, qp, kp, out = sagesla_prep(q, k, v, stats, w, b, block_q, block_k)
    for got, want in zip(quantized, quantize_qkv_ref(q, k, v, block_q, block_k, "fp8", kv)):
        assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(qp, S._mean_pool_ref(q, block_q))
    k_mean_lp = stats[1][0].view(2, 2, 1, d)  # the k mean rounded to bf16, as `k.mean()` of the reference
    torch.testing.assert_close(k_mean_lp, k.mean(dim=2, keepdim=True), rtol=2 ** -8, atol=0)  # within 1 ulp
    assert torch.equal(kp, S._mean_pool_ref(k - k_mean_lp, block_k))
    assert out.shape == (2, length, 2, d) and out.is_contiguous()
    p_l = S.sla_linear_apply_ref(q, torch.zeros_like(q), s, z, w, b)
    assert relerr(out, p_l) < 4e-3  # several bf16 roundings; a few elements land on the neighbouring ulp


@needs_kernels
@pytest.mark.parametrize("length,d,block_q,block_k,topk", [(200, 64, 64, 128, 0.5), (333, 128, 128, 64, 0.4)])
def test_sagesla_forward_matches_reference(length, d, block_q, block_k, topk):
    # All six launches against the composition of references (block map, same-quantization attention, linear
    # branch, proj_l); and against exact fp32 sparse attention + linear branch (the method's error budget).
    q, k, v = outlier_qkv(1, 2, length, d, dit_layout=True, seed=30 + length)
    w, b = 0.1 * torch.randn(d, d), 0.1 * torch.randn(d)
    out = sagesla_forward(q, k, v, w, b, topk, block_q, block_k)
    assert out.shape == (1, length, 2, d) and out.dtype == q.dtype and out.is_contiguous()
    cos, rel = metrics(out, sagesla_forward_ref(q, k, v, w, b, topk, block_q, block_k))
    assert cos >= KERNEL_VS_SAGE_REF["fp8"][0] and rel <= KERNEL_VS_SAGE_REF["fp8"][1], (cos, rel)
    lut = S.sla_block_map_ref(q, k, topk, block_q, block_k)
    exact = attention_ref(q, k, v, lut, block_q, block_k) + F.linear(S.sla_linear_ref(*(x.double() for x in (q, k, v))),
                                                                     w.double(), b.double()).float()
    cos, rel = metrics(out.transpose(1, 2), exact)
    assert cos >= KERNEL_VS_EXACT["fp8"][0] and rel <= KERNEL_VS_EXACT["fp8"][1], (cos, rel)


def test_sagesla_reference_fallback_and_fake(monkeypatch):
    monkeypatch.setenv("TURBOVID_KERNELS", "ref")
    q, k, v = outlier_qkv(1, 2, 70, 64, dit_layout=True, seed=9)
    w, b = 0.1 * torch.randn(64, 64), 0.1 * torch.randn(64)
    out = sagesla_forward(q, k, v, w.bfloat16(), b.bfloat16(), 0.5, 64, 64)
    assert torch.equal(out, sagesla_forward_ref(q, k, v, w.bfloat16(), b.bfloat16(), 0.5, 64, 64))
    args = (q, k, v, w.bfloat16(), b.bfloat16(), 0.5, 64, 64)
    torch.library.opcheck(torch.ops.turbovid.sagesla_forward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight=torch.zeros(64, 32)), "proj_l weight"),
    (dict(topk=0.0), "topk"),
    (dict(block_q=32), "block_q and block_k"),
])
def test_sagesla_errors(kwargs, match):
    args = dict(weight=torch.zeros(64, 64), bias=torch.zeros(64), topk=0.5, block_q=64, block_k=64)
    args.update(kwargs)
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=match):
        sagesla_forward(q, q, q, args["weight"], args["bias"], args["topk"], args["block_q"], args["block_k"])


@pytest.mark.parametrize("length, block_q, block_k", [(300, 64, 128), (333, 128, 64)])
def test_fake_quantize_qkv_is_what_the_kernel_multiplies(length, block_q, block_k):
    # Quantization-aware training's rounding: exact attention over the dequantized q, k, v is the FP8-PV reference
    # up to the e4m3 rounding of P (not modelled), and it is as far from exact attention as that reference.
    q, k, v = outlier_qkv(2, 2, length, 64, seed=21)
    qf, kf, vf = fake_quantize_qkv(q, k, v, block_q, block_k)
    assert qf.shape == kf.shape == vf.shape == q.shape and qf.dtype == torch.float32
    q8, qs = quantize_int8_ref(q, block_q)
    assert torch.equal(qf[:, :, :block_q], q8[:, :, :block_q].float() * qs[:, :, :1, None])   # one block by hand
    sage = sage_attention_ref(q, k, v, block_q=block_q, block_k=block_k, pv="fp8")
    exact = attention_ref(q.float(), k.float(), v.float())
    fake = attention_ref(qf, kf, vf)
    assert metrics(fake, sage)[1] < 0.005
    assert metrics(fake, exact)[1] == pytest.approx(metrics(sage, exact)[1], rel=0.1)
    assert metrics(fake, exact)[1] > 0.01          # the rounding is there


# ---------------------------------------------------------------------------------------------- GPU, Wan shapes

WAN_1_3B = (1, 12, 32760, 128)


@pytest.mark.gpu
@pytest.mark.parametrize("pv,budget", [("fp8", (0.999, 0.04)), ("fp16", (0.9995, 0.02))])
def test_gpu_dense_wan_shape(pv, budget):
    q, k, v = outlier_qkv(*WAN_1_3B, device="cuda", dit_layout=True, seed=11)
    out = sage_attention(q, k, v, pv=pv)
    assert out.transpose(1, 2).is_contiguous()
    cos, rel = metrics(out, attention_ref(q, k, v))
    assert cos >= budget[0] and rel <= budget[1], (cos, rel)


@pytest.mark.gpu
@pytest.mark.parametrize("block_q,block_k", [(64, 128), (128, 128), (128, 64)])
def test_gpu_sparse_wan_shape(block_q, block_k):
    b, h, length, d = WAN_1_3B
    q, k, v = outlier_qkv(b, h, length, d, device="cuda", dit_layout=True, seed=12)
    n_k = -(-length // block_k)
    lut = torch.rand(b, h, -(-length // block_q), n_k, device="cuda").topk(int(0.1 * n_k), -1).indices
    lut = lut.sort(dim=-1).values.int()
    out = sage_attention(q, k, v, lut=lut, block_q=block_q, block_k=block_k, pv="fp8")
    cos, rel = metrics(out, attention_ref(q, k, v, lut, block_q, block_k))
    assert cos >= 0.999 and rel <= 0.04, (cos, rel)


@pytest.mark.gpu
def test_gpu_quantization_matches_ref():
    q, k, v = outlier_qkv(*WAN_1_3B, device="cuda", dit_layout=True, seed=13)
    names = ("q8", "q_scale", "k8", "k_scale", "vt", "v_scale", "v_mean")
    stats = kv_stats(k, v, "fp8")
    got, want = quantize_qkv(q, k, v, 64, 128, "fp8", stats), quantize_qkv_ref(q, k, v, 64, 128, "fp8", stats)
    for name, g, w in zip(names, got, want):
        g, w = g.float(), w.float()  # e4m3 compared by value: +0 and -0 are the same number
        diff = (g - w).abs()
        info = (name, diff.max().item(), (diff > 0).float().mean().item())
        if name.endswith(("scale", "mean")):
            assert torch.equal(g, w), info  # IEEE division on both sides: identical scales
        else:
            # Identical scales make int8/e4m3 identical too; allow one step at rare exact ties (bound 1e-5).
            step = 1.0 if name != "vt" else w.abs() / 8 + 2.0 ** -9
            assert (diff <= step).all() and (diff > 0).float().mean() <= 1e-5, info


@pytest.mark.gpu
def test_gpu_kernel_matches_sage_ref():
    q, k, v = outlier_qkv(2, 4, 4000, 128, device="cuda", dit_layout=True, seed=14)
    for pv in ("fp8", "fp16"):
        cos, rel = metrics(sage_attention(q, k, v, pv=pv), sage_attention_ref(q, k, v, pv=pv))
        assert cos >= KERNEL_VS_SAGE_REF[pv][0] and rel <= KERNEL_VS_SAGE_REF[pv][1], (pv, cos, rel)


@pytest.mark.gpu
def test_gpu_sagesla_fused_wan_shape():
    # Wan2.1-1.3B shape, H100 block sizes: statistics vs kv_stats, pass B's quantization vs the reference fed the
    # same statistics, and the whole fused module vs bf16 SLA references (sparse branch over the same LUT).
    b, h, length, d = WAN_1_3B
    q, k, v = outlier_qkv(b, h, length, d, device="cuda", dit_layout=True, seed=15)
    w, bias = 0.05 * torch.randn(d, d, device="cuda"), 0.05 * torch.randn(d, device="cuda")
    stats = sagesla_stats(k, v)
    kv, s, z = unpack_stats(stats, b, h, d)
    # The means are token sums from the tensor cores (fp32 accumulation in another order): only centres, so a
    # relative 1e-4 of the channel's magnitude is plenty; the V scale comes from exact min/max.
    for got, ref in zip(kv, kv_stats(k, v, "fp8")):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    quantized, qp, kp, out = sagesla_prep(q, k, v, stats, w, bias, 64, 128)
    for name, g, want in zip(("q8", "q_scale", "k8", "k_scale", "vt", "v_scale", "v_mean"), quantized,
                             quantize_qkv_ref(q, k, v, 64, 128, "fp8", kv)):
        diff = (g.float() - want.float()).abs()
        step = 1.0 if name != "vt" else want.float().abs() / 8 + 2.0 ** -9
        assert (diff <= step).all() and (diff > 0).float().mean() <= 1e-5, (name, diff.max().item())
    out = sagesla_forward(q, k, v, w, bias, 0.1, 64, 128)
    lut = S.sla_block_map_ref(q, k, 0.1, 64, 128)
    s_ref, z_ref = S.sla_linear_stats_ref(k, v)
    ref = S.sla_linear_apply_ref(q, S.sla_sparse_ref(q, k, v, lut, 64, 128), s_ref, z_ref, w, bias)
    cos, rel = metrics(out, ref)
    assert cos >= 0.999 and rel <= 0.04, (cos, rel)
