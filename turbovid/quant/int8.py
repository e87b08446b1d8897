"""W8A8 INT8 linear layers, applied to a built model from outside (gpt-fast style).

Two formats:
- `Int8Linear`: TurboDiffusion's `-quant` checkpoint format (SPEC §7), bit-exact with its kernels.
  Buffers `int8_weight` int8 [N, K], `scale` fp32 [ceil(N/128), ceil(K/128)], `bias` [N] (weight dtype).
  Activations are re-quantized on every call per 128×128 tile of the flattened (B·L, K) matrix, so
  one sample's output depends on its batch neighbours when L % 128 ≠ 0 (that is TD's behaviour).
- `FastInt8Linear`: our format — per-output-channel weight scales, per-token dynamic activation
  scales, int32 accumulation over the whole K and all scaling in the GEMM epilogue (KERNELS §7.2 K2).
  Error budget vs a bf16 Linear on activations with outlier channels: relative Frobenius error ≤ 1.5%.

Inputs: bf16/fp16 is the exact-TD path; fp32 inputs are accepted too (tests, training-time checks)
and give an fp32 output (TD's CUDA quantizer rejects fp32). K need not be a multiple of 128: the
partial last K tile is zero-padded, which changes neither a tile's amax nor any dot product
(TD's own GEMM silently returns zeros there).

Kernel or reference is decided by `turbovid.kernels.use_triton(x)` alone.
Models never import this module; the loader and `speedups` call `swap_block_linears` /
`quantize_linears_` / `convert_td_to_fast_` on a built model.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from turbovid.kernels import use_triton
from turbovid.kernels import int8_gemm as K

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def quantize_td(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TD weight quantizer (same 128×128-tile rule as the activations): w [N, K] -> (int8 [N, K], fp32 tiles)."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(w.shape)}")
    return K.quant_td(w) if use_triton(w) else K.quant_td_ref(w)


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: w [N, K] -> (int8 [N, K] in [-127, 127], fp32 [N] = amax/127)."""
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(w.shape)}")
    return K.quant_per_token(w) if use_triton(w) else K.quant_per_token_ref(w)


def td_to_fast(int8_weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TD 128×128-tile weights -> per-row weights: dequantize the tiles (fp32), requantize each row."""
    return K.quant_per_token_ref(K.dequant_td_ref(int8_weight, scale))


def _check_input(x: torch.Tensor, in_features: int) -> None:
    if x.shape[-1] != in_features:
        raise ValueError(f"expected last dim {in_features}, got input of shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"input must be bf16/fp16/fp32, got {x.dtype}")


class Int8Linear(nn.Module):
    """TurboDiffusion W8A8 Linear (SPEC §7): 128×128-tile scales for weights and activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Buffers, not parameters: the `-quant` checkpoints store them as such, and nothing trains them.
        self.register_buffer("int8_weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.zeros(math.ceil(out_features / 128), math.ceil(in_features / 128),
                                                  dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        m.int8_weight, m.scale = quantize_td(w)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features)
        x2 = x.reshape(-1, self.in_features)  # [B·L, K], rows in batch-major order (TD's tiling)
        if use_triton(x):
            qx, sx = K.quant_td(x2)
            y = K.gemm_td(qx, sx, self.int8_weight, self.scale, x.dtype, self.bias)
        else:
            qx, sx = K.quant_td_ref(x2)
            y = K.gemm_td_ref(qx, sx, self.int8_weight, self.scale, x.dtype, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, td"


class FastInt8Linear(nn.Module):
    """Per-token × per-channel W8A8 Linear (our format; KERNELS §7.2 K2)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("int8_weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FastInt8Linear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device)
        m.int8_weight, m.weight_scale = quantize_per_channel(w)
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    @classmethod
    def from_td(cls, td: Int8Linear) -> "FastInt8Linear":
        dtype = td.bias.dtype if td.bias is not None else torch.bfloat16
        m = cls(td.in_features, td.out_features, td.bias is not None, dtype, td.int8_weight.device)
        m.int8_weight, m.weight_scale = td_to_fast(td.int8_weight, td.scale)
        if td.bias is not None:
            m.bias = td.bias.clone()
        return m

    def matmul_quantized(self, qx: torch.Tensor, sx: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                         gelu: bool = False, residual: torch.Tensor | None = None,
                         gate: torch.Tensor | None = None, tokens_per_sample: int | None = None) -> torch.Tensor:
        """GEMM on already-quantized activations (e.g. from the fused norm): qx [M, K] int8, sx [M] fp32.

        Epilogue options: tanh-GELU; gated residual `residual + gate[sample]·y` with gate [B, N] fp32.
        """
        args = (qx, sx, self.int8_weight, self.weight_scale, self.bias, gelu, residual, gate, tokens_per_sample,
                out_dtype)
        return K.gemm_fast(*args) if use_triton(qx) else K.gemm_fast_ref(*args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features)
        x2 = x.reshape(-1, self.in_features)  # [B·L, K]
        qx, sx = K.quant_per_token(x2) if use_triton(x) else K.quant_per_token_ref(x2)
        y = self.matmul_quantized(qx, sx, out_dtype=x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fast"


class FakeQuantLinear(nn.Module):
    """Quantization-aware training's stand-in for a block Linear (ours): the forward computes what
    `FastInt8Linear.from_linear(linear)` would (per-token INT8 activations, per-channel INT8 weights, here
    dequantized), the backward treats both roundings as the identity (straight-through estimator). It holds
    the Linear itself, so the parameters being trained stay the Linear's."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    @staticmethod
    def _rounded(x2: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q, s = K.quant_per_token_ref(x2)
            r = (q.float() * s[:, None]).to(x2.dtype)
        return x2 - x2.detach() + r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        _check_input(x, lin.in_features)
        x2 = self._rounded(x.reshape(-1, lin.in_features))
        w = self._rounded(lin.weight).to(x2.dtype)
        y = torch.nn.functional.linear(x2, w, None if lin.bias is None else lin.bias.to(x2.dtype))
        return y.view(*x.shape[:-1], lin.out_features)


def _block_linears(model: nn.Module, kind: type = nn.Linear):
    """(parent, child_name, child) for every `kind` module inside model.blocks not named *proj_l*."""
    if not hasattr(model, "blocks"):
        raise ValueError("model has no `blocks` to quantize")
    found = []
    for parent_name, parent in model.blocks.named_modules(prefix="blocks"):
        for child_name, child in parent.named_children():
            if isinstance(child, kind) and "proj_l" not in f"{parent_name}.{child_name}":
                found.append((parent, child_name, child))
    return found


def _class_for(fmt: str) -> type:
    if fmt == "td":
        return Int8Linear
    if fmt == "fast":
        return FastInt8Linear
    raise ValueError(f"unknown int8 format {fmt!r}; expected 'td' or 'fast'")


def swap_block_linears(model: nn.Module, fmt: str = "td") -> nn.Module:
    """Replace the block Linears (SPEC §7.1: all but SLA proj_l) with EMPTY int8 layers of the same shape,
    on the device the model is on (meta included), so a `-quant` state dict loads with strict=True."""
    cls = _class_for(fmt)
    for parent, name, lin in _block_linears(model):
        w = lin.weight
        setattr(parent, name, cls(lin.in_features, lin.out_features, lin.bias is not None, w.dtype, w.device))
    return model


def quantize_linears_(model: nn.Module, fmt: str = "td") -> nn.Module:
    """Replace the block Linears with int8 copies of their current weights (in place; returns model)."""
    cls = _class_for(fmt)
    for parent, name, lin in _block_linears(model):
        if lin.weight.is_meta:
            raise ValueError("cannot quantize weights on the meta device; load the checkpoint first")
        setattr(parent, name, cls.from_linear(lin))
    return model


@contextlib.contextmanager
def fake_quantized_linears(model: nn.Module):
    """Within the block: every block Linear of `model` runs as a `FakeQuantLinear` (quantization-aware training);
    the Linears are put back on exit."""
    found = _block_linears(model)
    try:
        for parent, name, lin in found:
            setattr(parent, name, FakeQuantLinear(lin))
        yield model
    finally:
        for parent, name, lin in found:
            setattr(parent, name, lin)


def convert_td_to_fast_(model: nn.Module) -> nn.Module:
    """Replace every Int8Linear in model.blocks (a loaded `-quant` checkpoint) by a FastInt8Linear."""
    for parent, name, td in _block_linears(model, kind=Int8Linear):
        setattr(parent, name, FastInt8Linear.from_td(td))
    return model
