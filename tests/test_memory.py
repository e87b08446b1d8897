"""Memory plan: parameter bytes against the built modules, working-memory estimates against live-tensor
bytes measured on CPU, plan choices at their threshold budgets, one-line errors, and the helpers that
move weights (offload / swap_in / stream_blocks / prepare_stage) on CPU and the meta device."""
from __future__ import annotations

import math
import weakref
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from turbovid import memory as M
from turbovid.config import MODELS, TINY_DIT, TINY_TEXT, TINY_VAE, DiTConfig, VAEConfig
from turbovid.models.dit import WanDiT
from turbovid.models.text_encoder import TextEncoder, make_umt5
from turbovid.models.vae import WanVAE
from turbovid.quant.int8 import swap_block_linears


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops run under this mode allocate (what the CUDA caching allocator's
    max_memory_allocated sees, less kernel workspaces). Views and tensors made outside are not counted;
    a storage is released when the last tensor seen on it dies."""

    def __init__(self):
        super().__init__()
        self.refs, self.size, self.current, self.peak = {}, {}, 0, 0

    def _release(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.refs:
                self.refs[key] += 1
            elif key in inputs or storage.nbytes() == 0:
                continue
            else:
                self.refs[key], self.size[key] = 1, storage.nbytes()
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key)
        return out


def _meta_dit(cfg: DiTConfig, attention: str, quant: bool) -> WanDiT:
    with torch.device("meta"):
        net = WanDiT(cfg, attention=attention).to(torch.bfloat16)
    return swap_block_linears(net, "td") if quant else net


# ---- parameters ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-i2v", "Wan2.1-1.3B", "Wan2.1-14B", "Wan2.2-A14B"])
def test_dit_param_bytes_match_the_module(name):
    cfgs = [MODELS[name].dit] + ([replace(TINY_DIT, image_dim=48)] if name == "tiny" else [])
    for cfg in cfgs:
        for attention in ("dense", "sagesla"):
            for quant in (False, True):
                net = _meta_dit(cfg, attention, quant)
                measured = sum(t.nbytes for t in net.state_dict().values())
                assert M.dit_param_bytes(cfg, quant=quant, attention=attention) == measured
                block = sum(t.nbytes for t in net.blocks[0].state_dict().values())
                assert M.dit_block_bytes(cfg, quant=quant, attention=attention) == block
                kept = sum(t.nbytes for name, m in net.blocks[0].named_modules() if name in M.STREAM_KEEP
                           for t in m.state_dict().values())
                assert M.dit_block_streamed_bytes(cfg, quant=quant, attention=attention) == block - kept


def test_known_sizes():
    """SPEC §1.1 / §4.3 / §3.3 parameter counts, 2 bytes each (bf16)."""
    small, big = MODELS["Wan2.1-1.3B"].dit, MODELS["Wan2.1-14B"].dit
    assert M.dit_param_bytes(small, quant=False) == 2 * 1_418_996_800              # 2.84 GB
    assert M.dit_param_bytes(big, quant=False) == 2 * 14_288_491_584               # 28.6 GB
    assert round(M.dit_param_bytes(big, quant=False) / M.GB, 1) == 28.6
    ratio = M.dit_param_bytes(big, quant=True) / M.dit_param_bytes(big, quant=False)
    assert 0.5 < ratio < 0.51   # int8 halves the block Linears; scales, biases, embeddings stay
    assert M.text_encoder_param_bytes(MODELS["Wan2.1-14B"].text) == 2 * 5_680_910_336
    assert M.vae_param_bytes(VAEConfig()) == 2 * 126_892_531
    with torch.device("meta"):
        tiny_text = make_umt5(TINY_TEXT)
    assert M.text_encoder_param_bytes(TINY_TEXT, dtype_bytes=4) == sum(p.nbytes for p in tiny_text.parameters())


# ---- working memory (CPU, live-tensor bytes) ----------------------------------------------------------

@torch.no_grad()
@pytest.mark.parametrize("ffn_dim,grid,batch", [(690, (3, 32, 32), 1), (690, (3, 32, 32), 2), (1493, (2, 16, 48), 1)])
def test_dit_activation_estimate(ffn_dim, grid, batch):
    """ffn/dim 2.7 (the 14B's ratio): the RoPE phase is the peak; 5.8 (the 1.3B's): the FFN is."""
    cfg = DiTConfig(dim=256, ffn_dim=ffn_dim, num_heads=2, num_layers=2, text_dim=32, text_len=16, freq_dim=32)
    torch.manual_seed(0)
    net = WanDiT(cfg).to(torch.bfloat16).eval()
    x, t = torch.randn(batch, 16, *grid), torch.full((batch,), 500.0)
    context = torch.randn(batch, 16, 32, dtype=torch.bfloat16)
    with LiveBytes() as live:
        net(x, t, context)
    tokens = math.prod(grid) // 4
    estimate = M.dit_activation_bytes(cfg, tokens, batch, quant=False)
    assert abs(estimate / live.peak - 1) < 0.05


@torch.no_grad()
@pytest.mark.parametrize("cfg", [TINY_VAE, VAEConfig(dim=8, num_res_blocks=2)])
def test_vae_decode_estimate(cfg):
    torch.manual_seed(0)
    vae = WanVAE(cfg).to(torch.bfloat16).eval()
    for frames, h, w, chunk, tile in [(5, 4, 6, 1, None), (9, 4, 6, 3, None), (3, 8, 12, 1, None),
                                      (3, 8, 12, 1, 6)]:
        z = torch.randn(1, 16, frames, h, w, dtype=torch.bfloat16)
        with LiveBytes() as live:   # NCDHW here: the same bytes as channels-last, without the Triton interpreter
            vae.decode(z, fast=True, chunk=chunk, tile=tile, overlap=2, channels_last=False)
        video = M.video_elements(cfg, frames, h, w) * (2 + (4 if tile else 0))
        estimate = M.vae_decode_bytes(cfg, h, w, chunk=chunk, tile=tile) + video
        assert abs(estimate / live.peak - 1) < 0.15, (frames, h, w, chunk, tile)


# ---- plans ------------------------------------------------------------------------------------

W720 = dict(width=1280, height=720, frames=81)


def _need(spec, plan, **kw):
    """The smallest budget (GB) for which `plan` fits: its largest stage plus the reserve."""
    stages = M.stage_bytes(spec, plan=plan, **kw)
    return (max(stages.values()) + M.RESERVE) / M.GB


def test_plan_flips_at_its_thresholds():
    spec = MODELS["Wan2.1-14B"]
    kw = dict(quant=True, attention="sagesla", **W720)
    chunk = M.plan_memory(spec, budget_gb=200, **kw).vae_chunk
    everything = M.MemoryPlan(0, vae_chunk=chunk)
    edge = _need(spec, everything, **kw)
    assert M.plan_memory(spec, budget_gb=edge + 0.01, **kw).text_encoder == "gpu"
    below = M.plan_memory(spec, budget_gb=edge - 0.01, **kw)
    assert below.text_encoder == "free" and below.streamed_blocks == 0
    # the next step: stream DiT blocks exactly when the freed-encoder plan no longer fits
    free = replace(everything, text_encoder="free")
    edge = _need(spec, free, **kw)
    assert M.plan_memory(spec, budget_gb=edge + 0.01, **kw).streamed_blocks == 0
    plan = M.plan_memory(spec, budget_gb=edge - 0.01, **kw)
    assert plan.streamed_blocks == 2 and plan.peak_gb <= edge - 0.01   # one alone would save nothing
    # a reused encoder (server) is never freed
    assert M.plan_memory(spec, budget_gb=edge - 0.01, reuse_text_encoder=True, **kw).text_encoder == "cpu"
    # more budget never gives a slower plan
    blocks = [M.plan_memory(spec, budget_gb=b, **kw).streamed_blocks for b in (14, 16, 18, 20, 22, 24)]
    assert blocks == sorted(blocks, reverse=True) and blocks[0] > blocks[-1]


def test_experts_swap_before_streaming():
    spec = MODELS["Wan2.2-A14B"]
    kw = dict(quant=True, attention="sagesla", **W720)
    free = M.MemoryPlan(0, text_encoder="free", vae_chunk=1)
    edge = _need(spec, free, **kw)
    assert M.plan_memory(spec, budget_gb=edge + 0.01, **kw).experts == "resident"
    plan = M.plan_memory(spec, budget_gb=edge - 0.01, **kw)
    assert plan.experts == "swap" and plan.streamed_blocks == 0
    assert "image_encode" in dict(plan.stages_gb)


def test_decode_chunk_then_offload_then_tiles():
    spec = MODELS["Wan2.1-1.3B"]
    kw = dict(quant=False, attention="sagesla", width=832, height=480, frames=81)
    plans = [M.plan_memory(spec, budget_gb=b, **kw) for b in (12, 6, 4.5, 4, 3.5)]
    assert plans[0].vae_chunk > 1 and plans[1].vae_chunk == 1
    assert not plans[0].offload_dit_for_decode and plans[-1].offload_dit_for_decode
    assert plans[0].vae_tile is None and plans[-1].vae_tile is not None
    for plan, budget in zip(plans, (12, 6, 4.5, 4, 3.5)):
        assert plan.peak_gb * M.GB + M.RESERVE <= budget * M.GB


def test_no_plan_fits_one_line_error():
    spec = MODELS["Wan2.1-14B"]
    kw = dict(attention="sagesla", **W720)
    with pytest.raises(ValueError, match=r"Wan2.1-14B 1280x720 81 frames needs at least [\d.]+ GB with --quant; "
                                         r"budget is 8.0 GB") as err:
        M.plan_memory(spec, quant=True, budget_gb=8, **kw)
    assert "\n" not in str(err.value)
    need = float(str(err.value).split("at least ")[1].split(" GB")[0])
    M.plan_memory(spec, quant=True, budget_gb=need + 0.1, **kw)       # the stated minimum does fit
    with pytest.raises(ValueError, match="in bf16"):
        M.plan_memory(spec, quant=False, budget_gb=8, **kw)
    with pytest.raises(ValueError, match="must be positive"):
        M.plan_memory(spec, quant=True, budget_gb=0, **kw)


# ---- moving weights -----------------------------------------------------------------------------

def _devices(module):
    return {t.device.type for t in module.state_dict().values()}


@torch.no_grad()
def test_offload_and_swap_in_keep_parameters_and_values():
    torch.manual_seed(0)
    net = WanDiT(TINY_DIT).eval().requires_grad_(False)   # as the pipeline holds it
    values = {n: t.clone() for n, t in net.state_dict().items()}
    M.swap_in(net, "meta")
    assert _devices(net) == {"meta"}
    assert all(isinstance(p, torch.nn.Parameter) and not p.requires_grad for p in net.parameters())
    M.offload(net)
    assert _devices(net) == {"cpu"}
    assert net.state_dict().keys() == values.keys()
    assert all(torch.equal(t, values[n]) for n, t in net.state_dict().items())


@torch.no_grad()
def test_streamed_blocks_give_the_same_output():
    torch.manual_seed(0)
    net = WanDiT(TINY_DIT).eval()
    x, t, context = torch.randn(1, 16, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 16, 32)
    want = net(x, t, context)
    streamer = M.stream_blocks(net, 1, "cpu")
    assert M.stream_blocks(net, 1, "cpu") is streamer                    # idempotent
    seen = []   # the device copy a block ran with (on CPU the "copy" is the host tensor itself)
    net.blocks[-1].register_forward_pre_hook(lambda m, a: seen.append(m.ffn[0].weight))
    assert torch.equal(net(x, t, context), want)
    host = net.blocks[-1].ffn[0]._turbovid_host["weight"]
    assert len(seen) == 1 and torch.equal(seen[0], host)
    assert net.blocks[-1].ffn[0].weight.data_ptr() == host.data_ptr()   # back on the host copy after
    # WanDiT.text_kv runs every block's cross-attention K/V projections outside the block forwards (no hook
    # fires): those stay resident, everything else of a streamed block lives on the host between uses.
    block = net.blocks[-1]
    assert not block.cross_attn.k.__dict__.get("_turbovid_host") and not block.cross_attn.norm_k.__dict__.get("_turbovid_host")
    assert block.cross_attn.q._turbovid_host and block.self_attn.k._turbovid_host
    M.swap_in(net, "meta")                                               # streamed parts stay behind
    assert _devices(net.blocks[0]) == {"meta"}
    assert _devices(block.cross_attn.k) == _devices(block.cross_attn.v) == {"meta"}
    assert _devices(block.ffn) == _devices(block.self_attn) == _devices(block.cross_attn.q) == {"cpu"}
    streamer.remove()
    assert _devices(block) == {"cpu"}


@torch.no_grad()
def test_prepare_stage_follows_the_plan():
    """A Wan2.2-style pipeline on CPU, 'GPU' = the meta device: text encoder freed after encoding,
    experts swapped, DiT offloaded for the decode."""
    torch.manual_seed(0)
    encoder = TextEncoder(make_umt5(TINY_TEXT), tokenizer=None, text_len=16)
    pipe = SimpleNamespace(text_encoder=encoder, dit=WanDiT(TINY_DIT).eval(), dit_low=WanDiT(TINY_DIT).eval(),
                           vae=WanVAE(TINY_VAE), device=torch.device("meta"))
    plan = M.MemoryPlan(20, text_encoder="free", experts="swap", offload_dit_for_decode=True)
    M.prepare_stage(pipe, plan, "text_encode")
    assert _devices(encoder.model) == _devices(pipe.vae) == {"meta"}
    assert _devices(pipe.dit) == _devices(pipe.dit_low) == {"cpu"}
    M.prepare_stage(pipe, plan, "denoise")
    assert encoder.model is None
    assert _devices(pipe.dit) == {"meta"} and _devices(pipe.dit_low) == {"cpu"}
    assert M.activate_expert(pipe, plan, pipe.dit_low) is pipe.dit_low
    assert _devices(pipe.dit) == {"cpu"} and _devices(pipe.dit_low) == {"meta"}
    M.prepare_stage(pipe, plan, "vae_decode")
    assert _devices(pipe.dit) == _devices(pipe.dit_low) == {"cpu"}
    with pytest.raises(ValueError, match="unknown stage"):
        M.prepare_stage(pipe, plan, "decode")


def test_track_peak_is_a_no_op_off_cuda():
    peaks = {}
    with M.track_peak(peaks, "vae_decode", "cpu"):
        torch.zeros(10)
    assert peaks == {}


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_track_peak_and_streaming():
    peaks = {}
    before = torch.cuda.memory_allocated() / M.GB
    with M.track_peak(peaks, "x", "cuda"):
        a = torch.empty(250_000_000, dtype=torch.uint8, device="cuda")
        del a
    assert 0.25 <= peaks["x"] - before < 0.26
    torch.manual_seed(0)
    net = WanDiT(TINY_DIT).cuda().eval()
    x, t, context = torch.randn(1, 16, 2, 8, 8, device="cuda"), torch.tensor([500.0], device="cuda"), \
        torch.randn(1, 16, 32, device="cuda")
    want = net(x, t, context)
    M.stream_blocks(net, 2, "cuda")
    # Streamed blocks wait on the CPU, except the cross-attention K/V parts that WanDiT.text_kv runs outside
    # the block's forward (STREAM_KEEP), which stay resident.
    where = {name: t.device.type for name, t in net.blocks[-1].state_dict().items()}
    kept = {name for name in where if name.startswith(tuple(k + "." for k in M.STREAM_KEEP))}
    assert kept and {where[n] for n in kept} == {"cuda"}
    assert {where[n] for n in where if n not in kept} == {"cpu"}
    assert net.blocks[-1].ffn[0]._turbovid_host["weight"].is_pinned()
    assert torch.allclose(net(x, t, context), want, rtol=1e-5, atol=1e-6)
