"""SLA / SageSLA: Triton kernels vs PyTorch references, the module's semantics (SPEC §6), gradients.

CPU tests run the kernels under TRITON_INTERPRET=1 on awkward shapes (L not a multiple of the blocks,
batch 2, head dims 64 and 128, fp32 and bf16). Tolerance rule: against an fp64 reference the bf16
kernel may be at most 2x as wrong as the same computation in plain bf16 PyTorch. GPU tests (marker
`gpu`) use the Wan2.1-1.3B shape (12 heads x 32760 tokens x 128) with DiT-like outliers.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from turbovid.attention.sla import SparseLinearAttention, default_block_sizes
from turbovid.kernels import sla as K
from turbovid.kernels import use_triton
from turbovid.kernels.sage_attention import outlier_qkv

needs_kernels = pytest.mark.skipif(not use_triton(torch.empty(0)), reason="run with TRITON_INTERPRET=1")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def make_qkv(b, length, h, d, dtype, seed=0, scale=1.0):
    # [B, H, L, D] views of [B, L, H, D] storage, the layout the DiT hands over.
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(b, length, h, d, generator=g)).to(dtype).transpose(1, 2) for _ in range(3)]


def assert_tie_free(q, k, topk, bq, bk):
    # Precondition of an exact LUT comparison: the K_sel-th and (K_sel+1)-th pooled scores differ.
    scores = K.sla_block_scores_ref(q, k, bq, bk).float().sort(dim=-1, descending=True).values
    ksel = K.sla_topk_count(topk, scores.shape[-1])
    if ksel < scores.shape[-1]:
        assert (scores[..., ksel - 1] > scores[..., ksel]).all(), "inputs have a tie at the selection boundary"


def check_vs_fp64(out, ref_lowp, ref64, dtype):
    err, budget = rel(out, ref64), rel(ref_lowp, ref64)
    if dtype == torch.float32:
        assert err < 1e-5, err
    else:
        assert err <= 2 * budget + 1e-6, (err, budget)


# --------------------------------------------------------------------------------------------- block map

@pytest.mark.parametrize("length,block,topk,expected", [
    (32760, 64, 0.1, 51), (32760, 64, 0.15, 76), (32760, 128, 0.1, 25), (32760, 128, 0.15, 38),
    (75600, 64, 0.1, 118), (75600, 64, 0.15, 177), (75600, 128, 0.1, 59), (75600, 128, 0.15, 88),
    (200, 64, 0.1, 1), (200, 64, 1.0, 4)])
def test_topk_count_matches_spec(length, block, topk, expected):
    # SPEC §6.2 examples (81 frames at 480p / 720p); tiny L clamps to one block instead of NaN.
    assert K.sla_topk_count(topk, K.cdiv(length, block)) == expected


def test_block_map_ref_by_hand():
    # Hand-computed pooling: true-count mean of the partial last block, k smoothed by its token mean.
    q = torch.arange(5.0)[None, None, :, None].expand(1, 1, 5, 2).clone()  # token t -> (t, t)
    k = torch.tensor([[4.0, 0.0], [0.0, 4.0], [2.0, 2.0], [6.0, 0.0], [0.0, 0.0]])[None, None]
    scores = K.sla_block_scores_ref(q, k, 2, 2)
    mean = k[0, 0].mean(0)  # (2.4, 1.2)
    kbar = torch.stack([k[0, 0, 0:2].mean(0), k[0, 0, 2:4].mean(0), k[0, 0, 4:5].mean(0)]) - mean
    qbar = torch.tensor([[0.5, 0.5], [2.5, 2.5], [4.0, 4.0]])
    torch.testing.assert_close(scores[0, 0], qbar @ kbar.T)
    lut = K.sla_block_map_ref(q, k, 0.7, 2, 2)  # K_sel = int(0.7 * 3) = 2, sorted ascending
    want = (qbar @ kbar.T).topk(2, dim=-1).indices.sort(-1).values
    assert lut.dtype == torch.int32 and torch.equal(lut[0, 0].long(), want)


@needs_kernels
@pytest.mark.parametrize("dtype,length,d,bq,bk,topk", [
    (torch.float32, 333, 64, 64, 64, 0.5), (torch.bfloat16, 200, 128, 128, 64, 0.5),
    (torch.bfloat16, 333, 64, 64, 128, 0.4)])
def test_block_map_kernel_matches_ref(dtype, length, d, bq, bk, topk):
    q, k, _ = make_qkv(2, length, 2, d, dtype, seed=1)
    k = k + 3.0  # a channel bias the smoothing must remove
    assert_tie_free(q, k, topk, bq, bk)
    lut = K.sla_block_map_triton(q, k, None, topk, bq, bk)
    assert torch.equal(lut, K.sla_block_map_ref(q, k, topk, bq, bk))


@needs_kernels
def test_block_map_kernel_ties_take_lowest_indices():
    # Every smoothed key block pools to exactly 0 (tokens alternate c and c + 2 per channel c), so every
    # score ties exactly; the kernel keeps blocks 0..K_sel-1.
    q = make_qkv(1, 320, 1, 64, torch.float32, seed=2)[0]
    k = ((torch.arange(320) % 2) * 2.0)[:, None] + torch.arange(64.0)[None, :]
    k = k[None, None]
    assert not K.sla_block_scores_ref(q, k, 64, 64).any()
    lut = K.sla_block_map_triton(q, k, None, 0.6, 64, 64)
    assert torch.equal(lut, torch.arange(3, dtype=torch.int32).expand(1, 1, 5, 3))


# --------------------------------------------------------------------------------------------- sparse branch

SPARSE_CASES = [(torch.float32, 333, 64, 64, 64), (torch.bfloat16, 200, 128, 128, 64),
                (torch.bfloat16, 333, 64, 64, 128)]


@needs_kernels
@pytest.mark.parametrize("dtype,length,d,bq,bk", SPARSE_CASES)
def test_sparse_forward_kernel(dtype, length, d, bq, bk):
    q, k, v = make_qkv(2, length, 2, d, dtype, seed=3, scale=2.0)
    lut = K.sla_block_map_ref(q, k, 0.5, bq, bk)
    out, lse = K.sla_sparse_fwd(q, k, v, lut, bq, bk)
    ref64 = K.sla_sparse_ref(q.double(), k.double(), v.double(), lut, bq, bk)
    check_vs_fp64(out, K.sla_sparse_ref(q, k, v, lut, bq, bk), ref64, dtype)
    # LSE (base 2) over the selected keys only, from a dense masked computation.
    kb = torch.arange(length) // bk
    allowed = torch.zeros(*lut.shape[:3], K.cdiv(length, bk), dtype=torch.bool).scatter_(-1, lut.long(), True)
    allowed = allowed[:, :, torch.arange(length) // bq][..., kb]  # [B, H, L, L]
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    lse_ref = torch.logsumexp(s.masked_fill(~allowed, float("-inf")), dim=-1) / math.log(2)
    torch.testing.assert_close(lse.view_as(lse_ref).double(), lse_ref, atol=0.05 if dtype != torch.float32 else 1e-4,
                               rtol=0)


@needs_kernels
@pytest.mark.parametrize("dtype,length,d,bq,bk", SPARSE_CASES)
def test_sparse_backward_kernel(dtype, length, d, bq, bk):
    q, k, v = make_qkv(2, length, 2, d, dtype, seed=4, scale=2.0)
    do = make_qkv(2, length, 2, d, dtype, seed=5)[0]
    lut = K.sla_block_map_ref(q, k, 0.5, bq, bk)

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        fn(*xs, lut, bq, bk).backward(do.to(xs[0].dtype))
        return [x.grad for x in xs]

    got = grads(K.SparseAttention.apply, q, k, v)
    ref64 = grads(K.sla_sparse_ref, q.double(), k.double(), v.double())
    lowp = grads(K.sla_sparse_ref, q, k, v)
    for g, lp, r in zip(got, lowp, ref64):
        assert g.dtype == dtype and g.shape == q.shape
        check_vs_fp64(g, lp, r, dtype)


def test_sparse_ref_full_selection_is_softmax_attention():
    q, k, v = make_qkv(2, 200, 2, 64, torch.float64, seed=6)
    lut = K.sla_block_map_ref(q, k, 1.0, 64, 64)
    torch.testing.assert_close(K.sla_sparse_ref(q, k, v, lut, 64, 64), F.scaled_dot_product_attention(q, k, v))


# --------------------------------------------------------------------------------------------- linear branch

@needs_kernels
@pytest.mark.parametrize("dtype,d", [(torch.float32, 64), (torch.bfloat16, 128)])
def test_linear_kernels_match_ref(dtype, d):
    q, k, v = make_qkv(2, 333, 2, d, dtype, seed=7)
    o_s = make_qkv(2, 333, 2, d, dtype, seed=8)[0]
    w, b = 0.1 * torch.randn(d, d), 0.1 * torch.randn(d)
    s_ref, z_ref = K.sla_linear_stats_ref(k, v)
    phi = torch.softmax(k, dim=-1).double()  # rounded to the input dtype first, as in TurboDiffusion
    # Both statistics passes (the op runs K.STATS_CONFIG's).
    for k_sum, s, z in (K._stats_fused(k, v, True), K._stats_two_pass(k, v), K.sla_linear_stats(k, v)):
        torch.testing.assert_close(k_sum.view(2, 2, d), k.float().sum(2), atol=1e-3, rtol=1e-5)
        check_vs_fp64(s, s_ref, phi.transpose(-1, -2) @ v.double(), dtype)
        check_vs_fp64(z, z_ref, phi.sum(-2), dtype)
    out = K.sla_linear_apply(q, o_s, s, z, w, b).transpose(1, 2)
    ref = K.sla_linear_apply_ref(q, o_s, s, z, w, b)
    assert out.dtype == dtype and out.is_contiguous()
    # The linear branch adds several bf16 roundings; a few elements may round to the neighbouring ulp.
    assert rel(out, ref) < (1e-6 if dtype == torch.float32 else 4e-3)
    # The whole linear branch against fp64.
    o64 = K.sla_linear_ref(q.double(), k.double(), v.double()) @ w.double().T + b.double() + o_s.double()
    check_vs_fp64(out.transpose(1, 2), ref.transpose(1, 2), o64, dtype)


# --------------------------------------------------------------------------------------------- module

def test_module_defaults_and_state_dict():
    m = SparseLinearAttention(128)
    assert set(m.state_dict()) == {"proj_l.weight", "proj_l.bias"}
    assert m.proj_l.weight.dtype == torch.float32 and not m.proj_l.weight.any() and not m.proj_l.bias.any()
    assert m.block_sizes(torch.device("cpu")) == (128, 64)
    assert default_block_sizes(True, torch.device("cpu")) == (128, 64)
    assert SparseLinearAttention(64, block_q=64, block_k=64).block_sizes(torch.device("cpu")) == (64, 64)
    with pytest.raises(ValueError):
        SparseLinearAttention(64, topk=0.0)
    with pytest.raises(ValueError):
        m(*(torch.randn(1, 10, 2, 64) for _ in range(3)))


@pytest.mark.parametrize("grad", [False, True])
def test_module_topk_one_is_full_attention(grad):
    q, k, v = (x.transpose(1, 2) for x in make_qkv(2, 200, 2, 64, torch.float32, seed=9))  # [B, L, H, D]
    m = SparseLinearAttention(64, topk=1.0, block_q=64, block_k=64)
    with torch.set_grad_enabled(grad):
        out = m(q, k, v)
    ref = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_module_zero_proj_is_sparse_attention_and_gradients_flow():
    q, k, v = (x.transpose(1, 2).detach().requires_grad_() for x in make_qkv(2, 333, 2, 64, torch.float32, seed=10))
    m = SparseLinearAttention(64, topk=0.3)
    out = m(q, k, v)
    qh, kh, vh = (x.detach().transpose(1, 2) for x in (q, k, v))
    lut = K.sla_block_map_ref(qh, kh, 0.3, 128, 64)
    torch.testing.assert_close(out, K.sla_sparse_ref(qh, kh, vh, lut, 128, 64).transpose(1, 2), atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert m.proj_l.weight.grad.abs().sum() > 0 and m.proj_l.bias.grad.abs().sum() > 0
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))


@needs_kernels
def test_module_gradients_match_reference():
    # Training path (Triton sparse fwd/bwd + autograd linear branch) vs autograd through the references in fp64.
    torch.manual_seed(11)
    x = [t.transpose(1, 2) for t in make_qkv(2, 200, 2, 64, torch.float32, seed=11)]
    do = torch.randn(2, 200, 2, 64)
    m = SparseLinearAttention(64, topk=0.5, block_q=64, block_k=64)
    torch.nn.init.normal_(m.proj_l.weight, std=0.2)
    torch.nn.init.normal_(m.proj_l.bias, std=0.2)

    xs = [t.detach().requires_grad_() for t in x]
    m(*xs).backward(do)
    got = [t.grad for t in xs] + [m.proj_l.weight.grad, m.proj_l.bias.grad]
    lut = K.sla_block_map_ref(*(t.transpose(1, 2) for t in x[:2]), 0.5, 64, 64)
    xs = [t.detach().double().requires_grad_() for t in x]
    w = m.proj_l.weight.detach().double().requires_grad_()
    b = m.proj_l.bias.detach().double().requires_grad_()
    qh, kh, vh = (t.transpose(1, 2) for t in xs)
    ref = K.sla_sparse_ref(qh, kh, vh, lut, 64, 64) + F.linear(K.sla_linear_ref(qh, kh, vh), w, b)
    ref.transpose(1, 2).backward(do.double())
    for g, r in zip(got, [t.grad for t in xs] + [w.grad, b.grad]):
        assert rel(g, r) < 1e-5


@needs_kernels
def test_module_inference_kernels_match_training_path():
    # bf16: the fused inference kernels vs the module's autograd path (references for the linear branch).
    q, k, v = (x.transpose(1, 2) for x in make_qkv(2, 333, 2, 128, torch.bfloat16, seed=12))
    m = SparseLinearAttention(128, topk=0.4)
    torch.nn.init.normal_(m.proj_l.weight, std=0.1)
    with torch.no_grad():
        fast = m(q, k, v)
    slow = m(q.requires_grad_(), k, v).detach()
    assert fast.shape == q.shape and fast.dtype == torch.bfloat16 and fast.is_contiguous()
    assert rel(fast, slow) < 8e-3


@needs_kernels
def test_module_compiles_with_fullgraph():
    # The custom ops' fake implementations let torch.compile trace the fused inference path in one graph.
    q, k, v = (x.transpose(1, 2) for x in make_qkv(1, 200, 2, 64, torch.bfloat16, seed=14))
    m = SparseLinearAttention(64, topk=0.5)
    torch.nn.init.normal_(m.proj_l.weight, std=0.1)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend="aot_eager", fullgraph=True)(q, k, v), m(q, k, v),
                                   atol=0, rtol=0)


def test_sagesla_close_to_bf16_sla():
    # SageSLA (INT8 QK, FP8 PV over the same LUT) vs bf16 SLA at the same top-k and blocks, DiT-like outliers.
    q, k, v = (x.transpose(1, 2) for x in outlier_qkv(2, 2, 333, 64, seed=13, dit_layout=True))
    sla = SparseLinearAttention(64, topk=0.4)
    sage = SparseLinearAttention(64, topk=0.4, quantized=True)
    w = 0.1 * torch.randn(64, 64)
    for m in (sla, sage):
        m.proj_l.weight.data.copy_(w)
    with torch.no_grad():
        assert cos(sage(q, k, v), sla(q, k, v)) > 0.998


# --------------------------------------------------------------------------------------------- GPU, Wan shapes

gpu = pytest.mark.gpu


def wan_qkv(h=12, length=32760, seed=0):
    return outlier_qkv(1, h, length, 128, dtype=torch.bfloat16, device="cuda", seed=seed, dit_layout=True)


@gpu
def test_gpu_block_map_1p3b():
    q, k, _ = wan_qkv()
    for bq, bk in [(128, 64), (64, 128)]:
        lut = K.sla_block_map(q, k, 0.1, bq, bk)
        ref = K.sla_block_map_ref(q, k, 0.1, bq, bk)
        assert lut.shape == ref.shape
        # Exact up to ties and bf16 pooling order: nearly every selected block agrees, and every
        # disagreement is a near-tie in the reference scores.
        scores = K.sla_block_scores_ref(q, k, bq, bk).float()
        same = (lut[..., :, None] == ref[..., None, :]).any(-1).float().mean().item()
        kth = scores.gather(-1, ref.long()).min(-1, keepdim=True).values
        picked = scores.gather(-1, lut.long())
        assert same > 0.995, same
        assert (picked >= kth - 0.02 * kth.abs() - 1e-3).all()


@gpu
def test_gpu_sparse_forward_1p3b():
    q, k, v = wan_qkv(seed=1)
    lut = K.sla_block_map_ref(q, k, 0.1, 128, 64)
    out, _ = K.sla_sparse_fwd(q, k, v, lut, 128, 64)
    ref32 = K.sla_sparse_ref(q.float(), k.float(), v.float(), lut, 128, 64)
    check_vs_fp64(out, K.sla_sparse_ref(q, k, v, lut, 128, 64), ref32, torch.bfloat16)


@gpu
def test_gpu_sagesla_vs_sla_1p3b():
    q, k, v = (x.transpose(1, 2) for x in wan_qkv(seed=2))
    sage = SparseLinearAttention(128, topk=0.1, quantized=True).cuda()
    bq, bk = sage.block_sizes(q.device)
    sla = SparseLinearAttention(128, topk=0.1, block_q=bq, block_k=bk).cuda()
    with torch.no_grad():
        got = sage(q, k, v)
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        lut = K.sla_block_map_ref(qh, kh, 0.1, bq, bk)
        ref = K.sla_sparse_ref(qh, kh, vh, lut, bq, bk).transpose(1, 2)  # proj_l is zero
        assert cos(got, ref) >= 0.999
        assert cos(sla(q, k, v), ref) >= 0.9999


@gpu
def test_gpu_backward_1p3b():
    # Two heads of the 1.3B shape keep the autograd reference in memory.
    q, k, v = wan_qkv(h=2, seed=3)
    do = torch.randn_like(q)
    lut = K.sla_block_map_ref(q, k, 0.1, 64, 64)

    def grads(fn, *xs):
        xs = [x.detach().clone().requires_grad_() for x in xs]
        fn(*xs, lut, 64, 64).backward(do.to(xs[0].dtype))
        return [x.grad for x in xs]

    got = grads(K.SparseAttention.apply, q, k, v)
    ref32 = grads(K.sla_sparse_ref, q.float(), k.float(), v.float())
    lowp = grads(K.sla_sparse_ref, q, k, v)
    for g, lp, r in zip(got, lowp, ref32):
        check_vs_fp64(g, lp, r, torch.bfloat16)


def test_quantized_module_trains_through_the_kernel_rounding():
    # SageSLA with gradients (quantization-aware training): the forward is the inference SageSLA's up to the e4m3
    # rounding of P, and gradients reach q, k, v and proj_l (straight through the rounding).
    q, k, v = (x.transpose(1, 2) for x in outlier_qkv(2, 2, 333, 64, seed=15, dit_layout=True))
    m = SparseLinearAttention(64, topk=0.4, quantized=True)
    torch.nn.init.normal_(m.proj_l.weight, std=0.1)
    with torch.no_grad():
        inference = m(q, k, v)
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    trained = m(q, k, v)
    assert rel(trained.detach(), inference) < 0.01
    plain = SparseLinearAttention(64, topk=0.4)
    plain.load_state_dict(m.state_dict())
    assert rel(plain(q, k, v).detach(), inference) > 2 * rel(trained.detach(), inference)   # it does round
    trained.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
               for t in (q, k, v, m.proj_l.weight))
