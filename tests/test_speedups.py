"""apply_speedups: each acceleration moves the DiT output only within its kernel's budget.

References: the same model without the speedup (bf16) and an fp32 copy of it (the exact function). The rule
for exact-math kernels (fused norms, compile) is the repository's: the model's error against fp32 may be at
most 2x that of the plain bf16 model. Lossy kernels use their stated budgets (turbovid/speedups.py).
CPU tests run the Triton kernels under TRITON_INTERPRET=1 (the PyTorch references otherwise); the `gpu`
tests run a 4-block model at Wan2.1-1.3B width, head dim 128 and the 480p/81-frame token count.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from turbovid.attention import DenseAttention
from turbovid.attention.sage import SageAttention
from turbovid.attention.sla import SparseLinearAttention
from turbovid.config import MODELS, DiTConfig
from turbovid import speedups
from turbovid.kernels import fused_norm as FN
from turbovid.kernels import int8_gemm as IG
from turbovid.models.dit import WanDiT
from turbovid.quant.int8 import FastInt8Linear, Int8Linear, swap_block_linears
from turbovid.speedups import (FusedWanBlock, TextKVCache, apply_speedups, compile_blocks, enable_text_kv_cache,
                               fuse_block_norms, quantize, set_attention, set_sla_blocks)

CFG = MODELS["tiny"].dit            # dim 128, 2 heads of 64, 2 blocks


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def inputs(grid=(3, 4, 4), batch=1, seed=1):
    """Latent for a (T', H', W') token grid (48 tokens by default; (2, 8, 16) = 256 tokens = 4 SLA key blocks)."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    x = torch.randn(batch, 16, t, 2 * h, 2 * w, generator=g)
    return x, torch.tensor([700.0, 300.0][:batch]), torch.randn(batch, CFG.text_len, CFG.text_dim, generator=g)


@pytest.fixture(scope="module")
def models():
    """(fp32 model, bf16 copy) with seeded random weights; tests deep-copy before changing them."""
    torch.manual_seed(0)
    fp32 = WanDiT(CFG).eval().requires_grad_(False)
    return fp32, copy.deepcopy(fp32).to(torch.bfloat16)


def run(model, x, t, c):
    with torch.no_grad():
        return model(x, t, c)


# ---- 1. attention --------------------------------------------------------------------------------

def test_set_attention_swaps_every_block_and_keeps_proj_l(models):
    model = copy.deepcopy(models[1])
    set_attention(model, "sla", topk=0.2)
    for n, block in enumerate(model.blocks):
        attn = block.self_attn.attn_op.local_attn
        assert isinstance(attn, SparseLinearAttention) and not attn.quantized and attn.topk == 0.2
        assert not attn.proj_l.weight.any()                       # fresh SLA: zero proj_l = pure sparse attention
        torch.nn.init.normal_(attn.proj_l.weight, generator=torch.Generator().manual_seed(n))
    trained = {k: v.clone() for k, v in model.state_dict().items() if ".proj_l." in k}
    set_attention(model, "sagesla", topk=0.15)
    assert all(b.self_attn.attn_op.local_attn.quantized for b in model.blocks)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.items()) and len(trained) == 4
    set_attention(model, "sage")
    assert all(isinstance(b.self_attn.attn_op.local_attn, SageAttention) for b in model.blocks)
    assert not any(".proj_l." in k for k in model.state_dict())
    set_attention(model, "dense")
    assert all(isinstance(b.self_attn.attn_op.local_attn, DenseAttention) for b in model.blocks)
    assert all(isinstance(b.cross_attn.attn_op.local_attn, DenseAttention) for b in model.blocks)


def test_sla_blocks_are_set_carried_and_parsed(models, monkeypatch):
    from turbovid.attention.sla import parse_blocks
    from turbovid.config import MODELS
    from turbovid.pipeline import Pipeline

    model = set_attention(copy.deepcopy(models[1]), "sla", topk=0.5)
    cpu = torch.device("cpu")
    assert {b.self_attn.attn_op.local_attn.block_sizes(cpu) for b in model.blocks} == {(128, 64)}  # TurboDiffusion's
    set_sla_blocks(model, (64, 128))
    set_attention(model, "sagesla", topk=0.5)                     # sla <-> sagesla keeps the fixed sizes
    assert {b.self_attn.attn_op.local_attn.block_sizes(cpu) for b in model.blocks} == {(64, 128)}
    set_sla_blocks(model, None)
    assert {b.self_attn.attn_op.local_attn.block_sizes(cpu) for b in model.blocks} == {(128, 64)}
    # The sizes change which key blocks are selected, so the output (fp32, 256 tokens, 2-4 key blocks at top-k 0.5).
    x, t, c = inputs(grid=(2, 8, 16))
    sla = set_attention(copy.deepcopy(models[0]), "sla", topk=0.5)
    wide = set_sla_blocks(copy.deepcopy(sla), (128, 128))
    assert rel(run(wide, x, t, c), run(sla, x, t, c)) > 1e-3
    assert parse_blocks("128x64") == (128, 64) and parse_blocks(" 64 X 128") == (64, 128)
    for bad, match in (("128", "look like"), ("128x64x64", "look like"), ("axb", "look like"), ("96x64", "64 or 128")):
        with pytest.raises(ValueError, match=match):
            parse_blocks(bad)
    pipe = Pipeline.load("tiny", attention="sla", sla_blocks=(64, 64), device="cpu")
    assert pipe.sla_blocks == (64, 64)
    assert pipe.dit.blocks[0].self_attn.attn_op.local_attn.block_sizes(cpu) == (64, 64)
    assert Pipeline.load("tiny", device="cpu").sla_blocks is None        # the model's default: none fixed
    assert parse_blocks("auto") == parse_blocks(" AUTO ") == "auto"
    assert Pipeline.load("tiny", attention="sla", sla_blocks="auto", device="cpu").sla_blocks is None
    # a model with tuned blocks (mini's config.json sla_blocks) runs there on every device unless told otherwise
    monkeypatch.setitem(MODELS, "tiny", dataclasses.replace(MODELS["tiny"], sla_blocks=(64, 128)))
    pipe = Pipeline.load("tiny", attention="sagesla", device="cpu")
    assert pipe.sla_blocks == (64, 128)
    assert pipe.dit.blocks[0].self_attn.attn_op.local_attn.block_sizes(cpu) == (64, 128)
    assert Pipeline.load("tiny", attention="sla", sla_blocks="auto", device="cpu").sla_blocks is None
    assert Pipeline.load("tiny", attention="sla", sla_blocks=(128, 128), device="cpu").sla_blocks == (128, 128)
    with pytest.raises(ValueError, match="64 or 128"):
        Pipeline.load("tiny", attention="sla", sla_blocks=(32, 64), device="cpu")


def test_sla_with_topk_one_is_dense_attention(models):
    # Every key block selected and proj_l = 0: SLA is exact softmax attention (fp32, 256 tokens).
    x, t, c = inputs(grid=(2, 8, 16))
    dense = run(models[0], x, t, c)
    assert rel(run(set_attention(copy.deepcopy(models[0]), "sla", topk=1.0), x, t, c), dense) < 1e-5


def test_sparse_attention_within_budget(models):
    # 256 tokens = 4 key blocks of 64, topk 0.5: a real selection. SageSLA vs bf16 SLA at the same top-k is
    # the quantized sparse kernel's budget (cos >= 0.998 per call, test_sla); sparse vs dense is the method.
    x, t, c = inputs(grid=(2, 8, 16))
    sla = run(set_attention(copy.deepcopy(models[1]), "sla", topk=0.5), x, t, c)
    sage = run(set_attention(copy.deepcopy(models[1]), "sagesla", topk=0.5), x, t, c)
    assert torch.isfinite(sage).all()
    assert cos(sage, sla) >= 0.999 and rel(sage, sla) <= 0.02
    dense = run(models[1], x, t, c)
    assert 0 < rel(sla, dense) <= 0.1


def test_sage_attention_within_budget(models):
    # Per call: cos >= 0.998, rel-L1 <= 0.045 on tiny peaky inputs (kernels/sage_attention.py); the attention
    # output is one of three residual updates per block, so the model output moves less.
    x, t, c = inputs()
    dense = run(models[1], x, t, c)
    out = run(set_attention(copy.deepcopy(models[1]), "sage"), x, t, c)
    assert cos(out, dense) >= 0.999 and rel(out, dense) <= 0.02


# ---- 2. W8A8 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, cls", [("td", Int8Linear), ("fast", FastInt8Linear)])
def test_quantize_within_budget(models, fmt, cls):
    # quant/int8.py: per layer rel-L2 <= 1.5% (fast) / ~2% (td); whole model <= 3%.
    x, t, c = inputs()
    dense = run(models[1], x, t, c)
    model = quantize(copy.deepcopy(models[1]), fmt)
    assert isinstance(model.blocks[1].ffn[2], cls) and isinstance(model.blocks[0].cross_attn.k, cls)
    assert type(model.patch_embedding) is torch.nn.Linear and type(model.head.head) is torch.nn.Linear
    out = run(model, x, t, c)
    assert rel(out, dense) <= 0.03
    assert quantize(model, fmt) is model and isinstance(model.blocks[1].ffn[2], cls)   # already in this format


def test_quantize_converts_td_to_fast_but_not_back(models):
    x, t, c = inputs()
    model = quantize(quantize(copy.deepcopy(models[1]), "td"), "fast")
    assert all(not isinstance(m, Int8Linear) for m in model.modules())
    assert rel(run(model, x, t, c), run(models[1], x, t, c)) <= 0.03
    with pytest.raises(ValueError, match="fast-format"):
        quantize(model, "td")
    with pytest.raises(ValueError, match="unknown quantization format"):
        quantize(model, "int4")


# ---- 3. fused norms ------------------------------------------------------------------------------

def test_fused_norms_within_norm_kernel_budget(models, monkeypatch):
    # The norm kernel is within 1 ulp of the PyTorch norms: against fp32 the fused bf16 model may be at most
    # 2x as wrong as the plain bf16 model. Parameters and state-dict keys do not change.
    x, t, c = inputs()
    exact, plain = run(models[0], x, t, c), run(models[1], x, t, c)
    model = fuse_block_norms(copy.deepcopy(models[1]))
    assert all(type(b) is FusedWanBlock for b in model.blocks)
    assert model.state_dict().keys() == models[1].state_dict().keys()
    calls = []
    for attr in ("norm_modulate", "norm_modulate_ref"):
        fn = getattr(FN, attr)
        monkeypatch.setattr(FN, attr, lambda *a, _fn=fn, **k: calls.append(a[1]) or _fn(*a, **k))
    out = run(model, x, t, c)
    # per block: norm1 + modulation, RMS of q and k, norm3, RMS of the cross-attention q, norm2 + modulation
    assert calls == ["layer", "rms", "rms", "layer", "rms", "layer"] * CFG.num_layers
    # with fuse_qk_norm_rope, q and k of the self-attention go through kernels/qk_norm_rope.py instead
    qk = []
    monkeypatch.setattr(speedups, "qk_norm_rope", lambda *a, _fn=speedups.qk_norm_rope: qk.append(a[0].shape) or _fn(*a))
    calls.clear()
    out_qk = run(speedups.fuse_qk_norm_rope(model), x, t, c)
    assert calls == ["layer", "layer", "rms", "layer"] * CFG.num_layers and len(qk) == 2 * CFG.num_layers
    assert rel(out_qk, exact) <= 2 * rel(plain, exact)
    assert rel(out, exact) <= 2 * rel(plain, exact)
    assert rel(out, plain) <= rel(plain, exact)


def test_fused_fast_int8_feeds_gemms_from_the_norm_kernel(models, monkeypatch):
    # With fast INT8 linears the norm kernel emits the int8 activations of q/k/v, cross-q and ffn.0 (3 norm
    # passes per block) and the only standalone quantization passes left are the inputs of o, cross-o and ffn.2
    # (3 per block) plus the text K/V projections (2 per block, once per prompt with the cache).
    calls = {"norm_int8": 0, "rows_int8": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    for attr in ("norm_modulate_quant", "norm_modulate_quant_ref"):
        monkeypatch.setattr(FN, attr, counting("norm_int8", getattr(FN, attr)))
    for attr in ("quant_per_token", "quant_per_token_ref"):
        monkeypatch.setattr(IG, attr, counting("rows_int8", getattr(IG, attr)))

    x, t, c = inputs()
    exact, unfused = run(models[0], x, t, c), run(quantize(copy.deepcopy(models[1]), "fast"), x, t, c)
    model = fuse_block_norms(quantize(copy.deepcopy(models[1]), "fast"))
    calls.update(norm_int8=0, rows_int8=0)
    out = run(model, x, t, c)
    assert calls == {"norm_int8": 3 * CFG.num_layers, "rows_int8": 5 * CFG.num_layers}
    # Fusion only changes roundings (the gated residual rounds once): same error as unfused W8A8, within 2x.
    assert rel(out, exact) <= 2 * rel(unfused, exact)
    assert rel(out, unfused) <= 0.01


# ---- 4. text K/V cache ---------------------------------------------------------------------------

def test_text_kv_cache_is_bit_identical_and_computes_once_per_prompt(models):
    model = enable_text_kv_cache(copy.deepcopy(models[0]))
    cache = model.text_kv
    assert isinstance(cache, TextKVCache) and enable_text_kv_cache(model).text_kv is cache
    computed = []
    compute = cache.compute
    cache.compute = lambda *a: computed.append(1) or compute(*a)

    x, t, c = inputs()
    for step, time in enumerate((900.0, 500.0, 100.0)):          # three sampler steps, one context object
        xs = x + step
        assert torch.equal(run(model, xs, torch.tensor([time]), c), run(models[0], xs, torch.tensor([time]), c))
    assert len(computed) == 1
    other = c.clone()
    assert torch.equal(run(model, x, t, other), run(models[0], x, t, other)) and len(computed) == 2
    other.mul_(2.0)                                             # changed in place: the version counter moves
    assert torch.equal(run(model, x, t, other), run(models[0], x, t, other)) and len(computed) == 3
    with torch.enable_grad():                                   # never cache while autograd records
        model(x, t, other)
    assert len(computed) == 4 and cache.key[0] is other


# ---- 5. composition and compile ------------------------------------------------------------------

def test_all_speedups_compose_and_compile(models, monkeypatch):
    # SageSLA + fast W8A8 + fused norms + text K/V cache, traced by Dynamo in one graph per block (aot_eager:
    # the same kernels, no Inductor codegen). Budget: W8A8 (0.03) + SageSLA vs SLA (0.02) against the bf16 model
    # with the same sparse attention (computed by the PyTorch references). 48 tokens keep the interpreter quick
    # (test_sparse_attention_within_budget covers a real block selection).
    x, t, c = inputs()
    with monkeypatch.context() as env:
        env.setenv("TURBOVID_KERNELS", "ref")
        sla = run(set_attention(copy.deepcopy(models[1]), "sla", topk=0.5), x, t, c)
    model = apply_speedups(copy.deepcopy(models[1]), attention="sagesla", topk=0.5, quant="fast", fuse_norms=True,
                           cache_text_kv=True)
    eager = run(model, x, t, c)
    assert torch.isfinite(eager).all() and rel(eager, sla) <= 0.05 and cos(eager, sla) >= 0.998
    torch._dynamo.reset()
    compile_blocks(model, backend="aot_eager", fullgraph=True)
    assert torch.equal(run(model, x, t, c), eager)
    # Saved like a fast-format W8A8 SageSLA model: the speedups change modules, not the checkpoint layout.
    with torch.device("meta"):
        layout = swap_block_linears(WanDiT(CFG, attention="sagesla"), "fast").state_dict().keys()
    assert model.state_dict().keys() == layout


def test_bad_arguments_are_one_line_errors(models):
    model = copy.deepcopy(models[1])
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        apply_speedups(model, attention="flash")
    with pytest.raises(ValueError, match="unknown quantization format 'int4'"):
        apply_speedups(model, quant="int4")
    with pytest.raises(ValueError, match="topk"):
        apply_speedups(model, attention="sla", topk=0.0)


# ---- GPU: Wan2.1-1.3B width, head dim 128, 480p/81-frame token count (L = 21*30*52 = 32760) ----------

MID = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=4)
gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def mid():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = WanDiT(MID).to(torch.bfloat16).eval().requires_grad_(False)
        g = torch.Generator("cuda").manual_seed(1)
        x = torch.randn(1, 16, 21, 60, 104, device="cuda", generator=g)
        c = torch.randn(1, 512, 4096, device="cuda", generator=g).bfloat16()
    t = torch.tensor([988.0], device="cuda")
    with torch.no_grad():
        dense = model(x, t, c)
        sla = set_attention(copy.deepcopy(model), "sla", topk=0.1)(x, t, c)
    return model, (x, t, c), dense, sla


@gpu
@pytest.mark.parametrize("quant", [None, "td", "fast"])
@pytest.mark.parametrize("attention", ["dense", "sage", "sla", "sagesla"])
def test_gpu_each_attention_and_quant(mid, attention, quant):
    # Anchor: the bf16 model with the same attention *method* (dense for dense/sage, bf16 SLA at topk 0.1 for
    # sla/sagesla; random weights make sparse-vs-dense a large, meaningless number). Budgets: W8A8 <= 0.05 over
    # 4 blocks, quantized attention <= 0.03; both <= 0.07.
    model, args, dense, sla = mid
    m = apply_speedups(copy.deepcopy(model), attention=attention, topk=0.1, quant=quant)
    with torch.no_grad():
        out = m(*args)
    anchor = dense if attention in ("dense", "sage") else sla
    budget = {(False, False): 1e-3, (False, True): 0.05, (True, False): 0.03, (True, True): 0.07}
    assert torch.isfinite(out).all()
    assert rel(out, anchor) <= budget[(attention in ("sage", "sagesla"), quant is not None)], rel(out, anchor)


@gpu
@pytest.mark.parametrize("quant", [None, "fast"])
def test_gpu_fused_norms(mid, quant):
    # Fusion alone (bf16 SLA attention, so that only the norm / int8-emit / epilogue path differs): the norm
    # kernel is within 1 ulp and the epilogue rounds once, so the output moves by far less than W8A8 itself.
    model, args, dense, sla = mid
    plain = apply_speedups(copy.deepcopy(model), attention="sla", quant=quant)
    fused = apply_speedups(copy.deepcopy(model), attention="sla", quant=quant, fuse_norms=True, cache_text_kv=True)
    with torch.no_grad():
        a, b = plain(*args), fused(*args)
    assert torch.isfinite(b).all() and rel(b, a) <= 0.02, rel(b, a)
