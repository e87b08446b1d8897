"""Every acceleration of the Wan DiT, applied to a built model from outside, in the order applied.

    apply_speedups(model, attention="sagesla", topk=0.1, quant="fast", fuse_norms=True,
                   cache_text_kv=True, compile=True)

runs, in this order, each of the small functions below (each also usable alone, which is how
benchmarks/e2e.py measures the waterfall):

1. set_attention          self-attention kernel: dense | sage | sla | sagesla (+ SLA top-k ratio). A
                          trained SLA `proj_l` moves along between sla and sagesla.
2. quantize               W8A8 INT8 block linears (quant/int8.py): "td" = TurboDiffusion's 128x128-tile
                          format (bit-exact with its checkpoints), "fast" = per-token x per-channel scales.
3. fuse_block_norms       blocks run the fused norm kernel (kernels/fused_norm.py): LayerNorm + AdaLN
                          modulation in one pass; with "fast" linears the kernel emits the INT8 activations
                          and per-token scales that the q/k/v, cross-q and ffn.0 GEMMs consume directly, and
                          the gated residuals (o-proj, cross o-proj, ffn.2) run in the GEMM epilogues, so
                          no standalone quantization pass is left before those GEMMs (KERNELS §7.2 K1/K2).
   fuse_qk_norm_rope      q/k RMSNorm over the width + RoPE in one kernel (kernels/qk_norm_rope.py), in plain
                          and fused blocks; within an ulp of the module. On by default with fuse_norms.
4. enable_text_kv_cache   cross-attention K/V computed once per prompt instead of once per step.
5. compile_blocks         torch.compile of every block (Dynamo traces one block; all blocks share the
                          graph), which fuses the remaining PyTorch glue (RoPE, q/k casts, modulation).

Error budgets — how far each step may move the DiT output (tests/test_speedups.py checks them on the
tiny model, the `gpu` tests at Wan widths):
- set_attention sage: the kernel's budget (kernels/sage_attention.py): per call cos >= 0.999, rel-L1 <=
  0.04 vs exact attention at Wan shapes; sla/sagesla change the function itself (sparse attention), and
  match dense attention exactly at topk = 1.0 with a zero proj_l; sagesla vs sla: cos >= 0.998.
- quantize: per layer rel-L2 <= 1.5% (fast) / ~2% (td) vs the bf16 layer; whole model <= 3% on the tiny net.
- fuse_block_norms: the norm kernel is within 1 ulp of the PyTorch norms; the fused gated residual rounds
  once instead of twice, so the model's error vs an fp32 reference stays within 2x that of the plain
  bf16 model (the repository's rule for kernels).
- enable_text_kv_cache: bit-identical.
- compile_blocks: Inductor may reorder fp32 arithmetic; same 2x-of-bf16 rule.

Measured (H100, random weights, Wan2.1-1.3B 480p/81 frames, one 4-step rCM video, benchmarks/e2e.py ->
benchmarks/results/e2e_h100_2026-11-22.json): bf16 dense 2.87 s -> SageSLA 1.75 -> + W8A8 1.82 (the separate
activation-quantization passes eat the INT8 gain) -> + fused norms / epilogues / text K/V 1.17 -> + compile 0.93 s;
final latent rel-L2 0.0073 vs bf16 dense. Wan2.1-14B 720p without compile: 3.88 s per step.
Re-measured with the fused q/k kernel (benchmarks/results/e2e_h100_2026-11-22_run3.json, --quick: one video a
row): fused norms/epilogues/text K/V 1.10 s -> + fused q/k RMSNorm + RoPE 0.83 s (269 -> 201 ms a step) -> +
compile 0.83 s (nothing left for Inductor to fuse). Wan2.1-14B 720p, everything but compile: 13.05 s for 4 steps
(3.26 s a step; e2e_14b_h100_2026-11-22_run3.json).
"""
from __future__ import annotations

import torch

from turbovid.attention import ATTENTION_KINDS, make_self_attention
from turbovid.attention.sla import SparseLinearAttention
from turbovid.kernels import fused_norm as FN
from turbovid.kernels import int8_gemm as IG
from turbovid.kernels import use_triton
from turbovid.kernels.qk_norm_rope import qk_norm_rope
from turbovid.models.dit import WanBlock, WanDiT, apply_rope
from turbovid.quant.int8 import FastInt8Linear, Int8Linear, convert_td_to_fast_, quantize_linears_

QUANT_FORMATS = ("td", "fast")


# ---- 1. attention ----------------------------------------------------------------------------------

def set_attention(model: WanDiT, kind: str, topk: float = 0.1) -> WanDiT:
    """Swap every block's `self_attn.attn_op.local_attn` for a `kind` attention. Between sla and sagesla the
    (trained) proj_l module and any fixed block sizes are carried over; from dense/sage a new SLA starts with
    proj_l = 0 (pure sparse)."""
    for block in model.blocks:
        op = block.self_attn.attn_op
        new = make_self_attention(kind, model.cfg.head_dim, topk)
        if isinstance(new, SparseLinearAttention) and isinstance(op.local_attn, SparseLinearAttention):
            new.proj_l = op.local_attn.proj_l
            new.block_q, new.block_k = op.local_attn.block_q, op.local_attn.block_k
        op.local_attn = new.to(block.modulation.device)
    return model


def set_sla_blocks(model: WanDiT, blocks: tuple[int, int] | None) -> WanDiT:
    """Run every SLA / SageSLA module at (b_q, b_k) on any device; None: TurboDiffusion's per-device choice
    (attention/sla.py `default_block_sizes`). Dense and Sage modules are left alone."""
    for block in model.blocks:
        op = block.self_attn.attn_op.local_attn
        if isinstance(op, SparseLinearAttention):
            op.block_q, op.block_k = blocks if blocks is not None else (None, None)
    return model


# ---- 2. W8A8 ---------------------------------------------------------------------------------------

def _holds(model: WanDiT, cls: type) -> bool:
    return any(isinstance(m, cls) for m in model.blocks.modules())


def quantize(model: WanDiT, fmt: str = "fast") -> WanDiT:
    """INT8 block linears in format `fmt`. A model loaded from a TD `-quant` file converts to "fast" (the TD
    tiles are dequantized and re-quantized per channel); an already matching model is left as it is."""
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose one of {', '.join(QUANT_FORMATS)}")
    td, fast = _holds(model, Int8Linear), _holds(model, FastInt8Linear)
    if fmt == "fast" and td:
        return convert_td_to_fast_(model)
    if fmt == "td" and fast:
        raise ValueError("the model already holds fast-format int8 layers, from which TurboDiffusion's 128x128 "
                         "tiles cannot be recovered; load the bf16 or TD -quant checkpoint instead")
    if td or fast:
        return model
    return quantize_linears_(model, fmt)


# ---- 3. fused norms --------------------------------------------------------------------------------
# Kernel or PyTorch reference, by the one switch `use_triton` (the references have the same numerics).

def _norm(x: torch.Tensor, norm, kind: str = "layer", shift=None, scale=None) -> torch.Tensor:
    """x [B, L, D] -> norm(x) (* (1 + scale) + shift) in x.dtype; shift/scale [B, D] fp32."""
    fn = FN.norm_modulate if use_triton(x) else FN.norm_modulate_ref
    return fn(x, kind, norm.weight, getattr(norm, "bias", None), shift, scale, norm.eps)


def _norm_int8(x: torch.Tensor, norm, shift=None, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same LayerNorm (+ modulation), emitted as INT8 [B*L, D] + per-token fp32 scales [B*L] for FastInt8Linear."""
    fn = FN.norm_modulate_quant if use_triton(x) else FN.norm_modulate_quant_ref
    return fn(x, "layer", norm.weight, norm.bias, shift, scale, norm.eps)


def _rows_int8(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return IG.quant_per_token(u) if use_triton(u) else IG.quant_per_token_ref(u)


def _project(lin, x: torch.Tensor, norm, shift=None, scale=None) -> torch.Tensor:
    """lin(norm(x) modulated), [B, L, d] -> [B, L, N]; fast INT8 linears take the kernel's INT8 output directly."""
    B, L, _ = x.shape
    if isinstance(lin, FastInt8Linear):
        return lin.matmul_quantized(*_norm_int8(x, norm, shift, scale), x.dtype).view(B, L, -1)
    return lin(_norm(x, norm, shift=shift, scale=scale))


def _residual(lin, u: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """x + gate * lin(u) for u [B, L, K], x [B, L, d], gate [B, d] fp32 (None: 1). Fast INT8 linears do the gated
    add in the GEMM epilogue (one rounding); the others follow the plain block (gate cast to bf16 first)."""
    B, L, d = x.shape
    if isinstance(lin, FastInt8Linear):
        gate = gate if gate is not None else torch.ones(B, d, device=x.device)
        y = lin.matmul_quantized(*_rows_int8(u.reshape(B * L, -1)), x.dtype, residual=x.reshape(B * L, d),
                                 gate=gate, tokens_per_sample=L)
        return y.view(B, L, d)
    y = lin(u)
    return x + y if gate is None else x + y * gate.to(x.dtype)[:, None, :]


class FusedWanBlock(WanBlock):
    """A WanBlock (same parameters, same state-dict keys) whose forward runs the fused kernels.

    Per block, with fast INT8 linears: norm1+mod -> int8 -> q,k,v GEMMs; RMS q/k; RoPE (with fuse_qk_norm_rope: one
    kernel each); attention; quant ->
    o GEMM + gated residual; norm3 -> int8 -> cross-q GEMM; cross-attention; quant -> cross-o GEMM + residual;
    norm2+mod -> int8 -> ffn.0 GEMM with GELU; quant -> ffn.2 GEMM + gated residual."""

    def forward(self, x, e0, rope, kv, kv_img):
        sa, ca, (ffn_in, act, ffn_out) = self.self_attn, self.cross_attn, self.ffn
        # [B, 6, d] fp32 -> six [B, d] vectors.
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (self.modulation.float() + e0).unbind(1)

        # 1. Self-attention: one norm pass feeds all three projections; [B, L, d] -> [B, L, H, D].
        if isinstance(sa.q, FastInt8Linear):
            qx, sx = _norm_int8(x, self.norm1, shift_msa, scale_msa)
            q, k, v = (lin.matmul_quantized(qx, sx, x.dtype).view(x.shape) for lin in (sa.q, sa.k, sa.v))
        else:
            z = _norm(x, self.norm1, shift=shift_msa, scale=scale_msa)
            q, k, v = sa.q(z), sa.k(z), sa.v(z)
        heads = lambda u: u.unflatten(-1, (sa.num_heads, -1))  # noqa: E731
        if sa.fused_qk:   # RMSNorm + RoPE in one pass each (fuse_qk_norm_rope)
            q = qk_norm_rope(q, sa.norm_q.weight, *rope, sa.num_heads, sa.norm_q.eps)
            k = qk_norm_rope(k, sa.norm_k.weight, *rope, sa.num_heads, sa.norm_k.eps)
        else:
            q, k = heads(_norm(q, sa.norm_q, "rms")), heads(_norm(k, sa.norm_k, "rms"))
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = sa.attn_op(q, k, heads(v))
        x = _residual(sa.o, out.flatten(2), x, gate_msa)

        # 2. Cross-attention over the (cached or fresh) text K/V.
        q = ca.heads(_norm(_project(ca.q, x, self.norm3), ca.norm_q, "rms"))
        out = ca.attn_op(q, *kv)
        if kv_img is not None:
            out = out + ca.attn_op(q, *kv_img)
        x = _residual(ca.o, out.flatten(2), x, None)

        # 3. FFN: GELU in the ffn.0 epilogue when INT8.
        if isinstance(ffn_in, FastInt8Linear):
            hidden = ffn_in.matmul_quantized(*_norm_int8(x, self.norm2, shift_mlp, scale_mlp), x.dtype, gelu=True)
        else:
            hidden = act(ffn_in(_norm(x, self.norm2, shift=shift_mlp, scale=scale_mlp)))
        return _residual(ffn_out, hidden.view(*x.shape[:2], -1), x, gate_mlp)


def fuse_qk_norm_rope(model: WanDiT) -> WanDiT:
    """Self-attention q and k through kernels/qk_norm_rope.py (RMSNorm over the width + RoPE in one pass), in plain
    and in fused blocks (H100: 0.10 ms against 2.05 ms for the PyTorch ops at 1.3B 480p, per call)."""
    for block in model.blocks:
        block.self_attn.fused_qk = True
    return model


def fuse_block_norms(model: WanDiT) -> WanDiT:
    """Run every block through FusedWanBlock.forward. Only the class changes (parameters, buffers, keys and the
    attention/linear choices stay), so the other speedups compose with it in any order."""
    for block in model.blocks:
        if not isinstance(block, WanBlock):
            raise ValueError(f"fuse_block_norms expects WanBlock blocks, got {type(block).__name__}")
        block.__class__ = FusedWanBlock
    return model


# ---- 4. text K/V cache -----------------------------------------------------------------------------

def _version(t: torch.Tensor | None) -> int | None:
    if t is None or t.is_inference():   # inference tensors keep no version counter
        return None
    return t._version


class TextKVCache:
    """Stands in for `WanDiT.text_kv`: returns the previous result while the same context (and clip) tensor
    comes back unmodified — a sampler passes one context object to all of its steps. Holding the tensors
    keeps their memory alive, so identity plus the in-place version counter is a safe key. Nothing is cached
    while autograd records (training), and `clear()` is needed after the cross-attention weights change."""

    def __init__(self, compute):
        self.compute = compute
        self.clear()

    def clear(self) -> None:
        self.key, self.value = None, None

    def __call__(self, context: torch.Tensor, clip: torch.Tensor | None = None) -> list[tuple]:
        if torch.is_grad_enabled():
            return self.compute(context, clip)
        key = (context, _version(context), clip, _version(clip))
        old = self.key
        if old is None or not (old[0] is context and old[1] == key[1] and old[2] is clip and old[3] == key[3]):
            self.value, self.key = self.compute(context, clip), key
        return self.value


def enable_text_kv_cache(model: WanDiT) -> WanDiT:
    """Serve `model.text_kv` (the per-block cross-attention K/V, SPEC §1.3 7e) from a per-prompt cache."""
    if not isinstance(model.__dict__.get("text_kv"), TextKVCache):
        model.text_kv = TextKVCache(model.text_kv)   # instance attribute shadows the method
    return model


# ---- 5. compile ------------------------------------------------------------------------------------

def compile_blocks(model: WanDiT, *, backend: str = "inductor", mode: str | None = None,
                   fullgraph: bool = False) -> WanDiT:
    """torch.compile each block in place (keys unchanged). The Triton kernels are custom ops with fake
    implementations, so Dynamo traces through the whole block; every block shares the one compiled graph."""
    for block in model.blocks:
        block.compile(backend=backend, mode=mode, fullgraph=fullgraph)
    return model


# ---- all of them -----------------------------------------------------------------------------------

def apply_speedups(model: WanDiT, *, attention: str | None = None, topk: float = 0.1, quant: str | None = None,
                   fuse_norms: bool = False, cache_text_kv: bool = False, compile: bool = False,
                   fuse_qk: bool | None = None) -> WanDiT:
    """Apply the chosen accelerations in order (module docstring); returns the same model, changed in place.
    fuse_qk fuses the q/k RMSNorm + RoPE (default: with fuse_norms)."""
    if attention is not None and attention not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
    if quant is not None and quant not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization format {quant!r}; choose one of {', '.join(QUANT_FORMATS)}")
    if attention is not None:
        set_attention(model, attention, topk)
    if quant is not None:
        quantize(model, quant)
    if fuse_norms:
        fuse_block_norms(model)
    if fuse_qk is None:
        fuse_qk = fuse_norms
    if fuse_qk:
        fuse_qk_norm_rope(model)
    if cache_text_kv:
        enable_text_kv_cache(model)
    if compile:
        compile_blocks(model)
    return model
