"""`turbovid quantize`: any loadable Wan DiT checkpoint -> a W8A8 INT8 checkpoint, written atomically.

Inputs: everything `load_dit` reads — official Wan (Conv3d patch weight, sharded safetensors or .pth),
TurboDiffusion .pth (with or without SLA proj_l), diffusers WanTransformer3DModel, a TurboDiffusion -quant
.pth, or one of our fast files.

Outputs (SPEC §7.4):
- "td": a TurboDiffusion `-quant` .pth, the state dict its `inference/modify_model.py --attention_type sla
  --quant_linear` saves: every block Linear (self/cross q, k, v, o, ffn.0, ffn.2; Wan2.1 i2v k_img, v_img)
  as buffers `int8_weight` int8 [N, K], `scale` fp32 [ceil(N/128), ceil(K/128)] (one per 128x128 tile) and
  `bias` bf16; the block norm weights (norm_q, norm_k, norm_k_img, norm3 weight and bias) in fp32, as its
  fast norms store them; SLA `proj_l` always present (zeros when the source has none: the SLA modules it
  inserts start at zero); every other tensor bf16. TurboDiffusion converts its inputs to bf16 before this
  step (scripts/safetensors_to_pth.py, dcp_to_pth.py), so weights are quantized from their bf16 values and
  norms are bf16-rounded before being widened — the same bytes it would write from the same source.
- "fast": ours, .safetensors: the same tensors except that each block Linear is `int8_weight` int8 [N, K],
  `weight_scale` fp32 [N] (one scale per output channel) and `bias` bf16 — what FastInt8Linear runs
  directly. A TD -quant input converts to it (tiles dequantized, rows re-quantized); the reverse is
  refused, since the tiles cannot be recovered.

Both load with `turbovid generate --quant --dit OUT` (turbovid.loading.load_dit detects the format).
The file appears only when complete: it is written to a temporary name in the same folder and renamed.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from turbovid.config import DEFAULT_MODEL, MODELS
from turbovid.loading import load_dit
from turbovid.models.dit import WanDiT
from turbovid.quant.int8 import FastInt8Linear, Int8Linear, convert_td_to_fast_, quantize_linears_

FORMATS = {"td": (".pth", ".pt"), "fast": (".safetensors",)}


def _check_paths(src: Path, dst: Path, fmt: str) -> None:
    if dst.suffix not in FORMATS[fmt]:
        raise ValueError(f"the {fmt} format is written as {' or '.join(FORMATS[fmt])}; got output {str(dst)!r}")
    if dst.is_dir():
        raise ValueError(f"output {str(dst)!r} is a folder")
    if not dst.parent.is_dir():
        raise ValueError(f"output folder {str(dst.parent)!r} does not exist")
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"output {str(dst)!r} is the input checkpoint")


def _quantize_model(net: WanDiT, fmt: str) -> WanDiT:
    td = any(isinstance(m, Int8Linear) for m in net.blocks.modules())
    fast = any(isinstance(m, FastInt8Linear) for m in net.blocks.modules())
    if fast and fmt == "td":
        raise ValueError("the input is already in the fast int8 format; TurboDiffusion's 128x128 tiles cannot be "
                         "recovered from it: quantize the bf16 checkpoint instead")
    if td and fmt == "fast":
        return convert_td_to_fast_(net)
    if td or fast:
        return net
    # TurboDiffusion quantizes the bf16 weights (its converters cast every input tensor to bf16 first).
    for block in net.blocks:
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and "proj_l" not in name:
                module.to(torch.bfloat16)
    return quantize_linears_(net, fmt)


def _output_state(net: WanDiT) -> dict[str, torch.Tensor]:
    """The dtype rule of the module docstring, on CPU and contiguous."""
    out = {}
    for key, value in net.state_dict().items():
        if value.dtype == torch.int8 or key.endswith((".scale", ".weight_scale")):
            v = value
        elif key.startswith("blocks.") and ".norm" in key:
            v = value.to(torch.bfloat16).float()      # TD: bf16 input, widened by its fast norms
        else:
            v = value.to(torch.bfloat16)
        out[key] = v.detach().to("cpu").contiguous()
    return out


def _write_atomic(state: dict[str, torch.Tensor], dst: Path, fmt: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=dst.suffix, dir=dst.parent)
    os.close(fd)
    try:
        if fmt == "fast":
            from safetensors.torch import save_file
            save_file(state, tmp, metadata={"format": "pt", "turbovid": "w8a8-fast"})
        else:
            torch.save(state, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def quantize_checkpoint(src: str | Path, dst: str | Path, *, model: str, fmt: str,
                        device: str | torch.device | None = None) -> Path:
    """Read `src` (any DiT format) for `model` (a MODELS name), quantize it to `fmt` ("td" | "fast") and write
    `dst` atomically (.pth for td, .safetensors for fast); returns the output path. Quantization runs on
    `device` (default: CUDA when available); the kernels give the same bytes as the CPU references."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown int8 format {fmt!r}; choose td (TurboDiffusion -quant .pth) or fast (.safetensors)")
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, fmt)
    if device is not None and str(device).split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {str(device)!r}; use cpu or cuda")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible")
    # Loaded as an SLA model so that proj_l weights in the source are kept (and zero-filled when absent).
    with torch.no_grad():
        net = _quantize_model(load_dit(src, MODELS[model].dit, attention="sla", device=dev), fmt)
        state = _output_state(net)
    del net
    _write_atomic(state, dst, fmt)
    return dst


# ---- command line (wired into turbovid/cli.py) ------------------------------------------------------

def add_quantize_parser(subparsers) -> None:
    p = subparsers.add_parser("quantize", help="DiT checkpoint -> W8A8 INT8 checkpoint (TurboDiffusion -quant .pth "
                                               "or turbovid's fast .safetensors)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model family ({', '.join(MODELS)}); default {DEFAULT_MODEL}")
    p.add_argument("--dit", required=True, help="input DiT checkpoint: official Wan, TurboDiffusion (.pth or -quant "
                                                ".pth), diffusers folder/file")
    p.add_argument("--output", required=True, help="output file: .pth for --format td, .safetensors for --format fast")
    p.add_argument("--format", default="td", help="td: TurboDiffusion -quant (128x128-tile scales, default); "
                                                  "fast: per-channel scales for turbovid's faster INT8 kernels")
    p.add_argument("--device", help="where to quantize: cuda | cpu (default: cuda if available)")


def cmd_quantize(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out = quantize_checkpoint(args.dit, args.output, model=args.model, fmt=args.format, device=args.device)
    print(f"wrote {out} ({args.format} W8A8, {out.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f} s")
    return 0
