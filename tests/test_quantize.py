"""`turbovid quantize`: file contents against SPEC §7.4 computed from the source tensors, round trips through
load_dit and `turbovid generate --quant`, atomic writes, and one-line errors.

The tiny weights start in a diffusers WanTransformer3DModel (an independent implementation) and are written
in the other layouts the way test_loading_dit does: official Wan (Conv3d patch weight, safetensors),
TurboDiffusion .pth (Linear patch weight, fp32 norms, trained-looking SLA proj_l).
"""
from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file, save_file

from turbovid.cli import main
from tests.diffusers_ref import tiny_diffusers_dit
from turbovid.config import MODELS
from turbovid.kernels import int8_gemm as K
from turbovid.loading import CheckpointError, detect_dit_format, diffusers_dit_to_wan, load_dit
from turbovid.models.dit import WanDiT
from turbovid.quant.int8 import FastInt8Linear, Int8Linear, swap_block_linears
from turbovid.quantize import add_quantize_parser, cmd_quantize, quantize_checkpoint
from turbovid.video import read_video

CFG = MODELS["tiny"].dit
LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{format: path} of one set of tiny weights, plus the weights themselves in Wan names ("state")."""
    root = tmp_path_factory.mktemp("src")
    ref = tiny_diffusers_dit()
    diffusers_state = {k: v.contiguous() for k, v in ref.state_dict().items()}    # fp32, like a diffusers export
    save_file(diffusers_state, str(root / "diffusers.safetensors"))
    wan = diffusers_dit_to_wan({k: v.clone() for k, v in diffusers_state.items()})
    save_file(wan, str(root / "wan.safetensors"))
    turbo = {k: v.float() if ".norm" in k else v.bfloat16() for k, v in wan.items()}
    turbo["patch_embedding.weight"] = turbo["patch_embedding.weight"].reshape(128, 64)
    g = torch.Generator().manual_seed(3)
    for n in range(CFG.num_layers):
        prefix = f"blocks.{n}.self_attn.attn_op.local_attn.proj_l."
        turbo[prefix + "weight"] = (0.05 * torch.randn(64, 64, generator=g)).bfloat16()
        turbo[prefix + "bias"] = (0.05 * torch.randn(64, generator=g)).bfloat16()
    torch.save(turbo, root / "turbo.pth")
    wan["patch_embedding.weight"] = wan["patch_embedding.weight"].reshape(128, 64)
    return {"diffusers": root / "diffusers.safetensors", "wan": root / "wan.safetensors", "turbo": root / "turbo.pth",
            "state": wan, "turbo_state": turbo}


def expected_keys(fmt: str) -> set[str]:
    with torch.device("meta"):
        return set(swap_block_linears(WanDiT(CFG, attention="sla"), fmt).state_dict())


def check_contents(out: dict[str, torch.Tensor], src: dict[str, torch.Tensor], fmt: str) -> None:
    """SPEC §7.4 from the source tensors: bf16 weights quantized by the format's rule, bf16 biases, norms
    fp32(bf16(.)), SLA proj_l (zero if the source has none), everything else bf16."""
    assert set(out) == expected_keys(fmt)
    for key, value in out.items():
        module, _, leaf = key.rpartition(".")
        if module.split(".", 2)[-1] in LINEARS:
            w, b = src[f"{module}.weight"].bfloat16(), src[f"{module}.bias"]
            if fmt == "td":
                q, s = K.quant_td_ref(w)
                expect = {"int8_weight": q, "scale": s, "bias": b.bfloat16()}[leaf]
            else:
                q, s = K.quant_per_token_ref(w)
                expect = {"int8_weight": q, "weight_scale": s, "bias": b.bfloat16()}[leaf]
        elif ".proj_l." in key:
            expect = src[key].bfloat16() if key in src else torch.zeros_like(value)
        elif key.startswith("blocks.") and ".norm" in key:
            expect = src[key].bfloat16().float()
        else:
            expect = src[key].bfloat16()
        assert value.dtype == expect.dtype and torch.equal(value, expect), key
    scale = "scale" if fmt == "td" else "weight_scale"
    assert out[f"blocks.0.ffn.0.{scale}"].shape == ((2, 1) if fmt == "td" else (256,))   # N=256, K=128
    assert out["blocks.1.ffn.2.int8_weight"].dtype == torch.int8


@pytest.mark.parametrize("source", ["diffusers", "wan", "turbo"])
def test_td_output_is_spec_74_from_every_input_format(sources, source, tmp_path):
    out = quantize_checkpoint(sources[source], tmp_path / "model-quant.pth", model="tiny", fmt="td")
    state = torch.load(out, weights_only=True)          # a plain state dict: no wrapper, as modify_model saves
    check_contents(state, sources["turbo_state"] if source == "turbo" else sources["state"], "td")
    assert detect_dit_format(state) == "turbo-quant"
    assert not any(tmp_path.glob(".partial-*"))


def test_fast_output_and_td_to_fast_conversion(sources, tmp_path):
    fast = quantize_checkpoint(sources["turbo"], tmp_path / "fast.safetensors", model="tiny", fmt="fast")
    check_contents(load_file(str(fast)), sources["turbo_state"], "fast")
    td = quantize_checkpoint(sources["turbo"], tmp_path / "td.pth", model="tiny", fmt="td")
    converted = load_file(str(quantize_checkpoint(td, tmp_path / "from-td.safetensors", model="tiny", fmt="fast")))
    td_state = torch.load(td, weights_only=True)
    for module in ("blocks.0.self_attn.q", "blocks.1.ffn.2"):
        q, s = K.quant_per_token_ref(K.dequant_td_ref(td_state[f"{module}.int8_weight"], td_state[f"{module}.scale"]))
        assert torch.equal(converted[f"{module}.int8_weight"], q)
        assert torch.equal(converted[f"{module}.weight_scale"], s)
    assert set(converted) == expected_keys("fast")


@pytest.mark.parametrize("fmt, cls, suffix", [("td", Int8Linear, ".pth"), ("fast", FastInt8Linear, ".safetensors")])
def test_round_trip_load_and_generate(sources, tmp_path, capsys, fmt, cls, suffix):
    out = quantize_checkpoint(sources["wan"], tmp_path / f"q{suffix}", model="tiny", fmt=fmt)
    # load_dit recognises the file; the W8A8 model stays within the int8 budget of the bf16 source model.
    net = load_dit(out, CFG)
    assert isinstance(net.blocks[1].cross_attn.o, cls) and net.blocks[0].self_attn.norm_q.weight.dtype == torch.float32
    ref = load_dit(sources["wan"], CFG, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    x, t, c = torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([800.0]), torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        got, want = net(x, t, c), ref(x, t, c)
    assert ((got - want).norm() / want.norm()).item() <= 0.03
    # ... and `turbovid generate --quant --dit OUT` writes a video from it.
    video = tmp_path / "v.mp4"
    code = main(["generate", "--prompt", "a quantized fox", "--output", str(video), "--quant", "--dit", str(out),
                 "--model", "tiny", "--steps", "1", "--frames", "1", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert read_video(video).shape[0] == 1


def test_atomic_write_leaves_no_partial_file(sources, tmp_path, monkeypatch):
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"previous")

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("No space left on device")
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        quantize_checkpoint(sources["turbo"], dst, model="tiny", fmt="td")
    assert dst.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.pth"]


def run_cmd(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_quantize_parser(parser.add_subparsers(dest="command"))
    return cmd_quantize(parser.parse_args(["quantize", *argv]))


def test_cli_command_prints_what_it_wrote(sources, tmp_path, capsys):
    assert run_cmd("--dit", str(sources["wan"]), "--output", str(tmp_path / "w.safetensors"), "--format", "fast",
                   "--model", "tiny") == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'w.safetensors'} (fast W8A8")


@pytest.mark.parametrize("argv, error, needle", [
    (["--format", "int4"], ValueError, "unknown int8 format 'int4'"),
    (["--model", "Wan3"], ValueError, "unknown model 'Wan3'"),
    (["--output", "{tmp}/x.safetensors"], ValueError, "the td format is written as .pth or .pt"),
    (["--format", "fast", "--output", "{tmp}/x.pth"], ValueError, "the fast format is written as .safetensors"),
    (["--output", "{tmp}/missing/x.pth"], ValueError, "does not exist"),
    (["--output", "{tmp}"], ValueError, "is written as"),
    (["--dit", "{tmp}/nothing.pth"], CheckpointError, "checkpoint not found"),
    (["--dit", "{tmp}/vae.pth"], CheckpointError, "not a Wan DiT checkpoint"),
    (["--model", "Wan2.1-1.3B"], CheckpointError, "this DiT has dim 128, 2 blocks"),
    (["--dit", "{fast}", "--output", "{tmp}/back.pth"], ValueError, "already in the fast int8 format"),
    (["--device", "tpu"], ValueError, "unknown device 'tpu'"),
])
def test_bad_inputs_are_one_line_errors(sources, tmp_path, argv, error, needle):
    fast = tmp_path / "f.safetensors"
    quantize_checkpoint(sources["wan"], fast, model="tiny", fmt="fast")
    torch.save({"decoder.conv1.weight": torch.zeros(3)}, tmp_path / "vae.pth")
    args = {"--dit": str(sources["wan"]), "--output": str(tmp_path / "o.pth"), "--model": "tiny"}
    it = iter(argv)
    args.update({k: v.format(tmp=tmp_path, fast=fast) for k, v in zip(it, it)})
    with pytest.raises(error) as info:
        run_cmd(*[x for kv in args.items() for x in kv])
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o.pth").exists() and not any(tmp_path.glob(".partial-*"))


def test_output_equal_to_input_is_refused(sources, tmp_path):
    td = quantize_checkpoint(sources["turbo"], tmp_path / "t.pth", model="tiny", fmt="td")
    with pytest.raises(ValueError, match="is the input checkpoint"):
        quantize_checkpoint(td, td, model="tiny", fmt="td")
