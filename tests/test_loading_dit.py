"""load_dit: the same tiny weights written in every official layout load to bit-identical models.

The weights start in a diffusers WanTransformer3DModel (saved with its own `save_pretrained`); the
other layouts are derived from them the way the official tools write them: official Wan (Conv3d
patch weight; sharded safetensors + index, or one .pth), TurboDiffusion .pth (Linear patch weight,
SLA proj_l, fp32 norm weights, optionally `net.`-prefixed) and TurboDiffusion -quant .pth
(Int8Linear buffers from turbovid.quant.int8). Everything is stored in bf16, as the released files.
"""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from tests.diffusers_ref import tiny_diffusers_dit
from turbovid.config import MODELS
from turbovid.loading import (CheckpointError, detect_dit_format, diffusers_dit_to_wan, infer_dit_config,
                              load_dit, read_state_dict)
from turbovid.models.dit import WanDiT
from turbovid.quant.int8 import Int8Linear, quantize_linears_

CFG = MODELS["tiny"].dit      # dim 128 = 2 heads of 64, 2 blocks, text_dim 32, freq_dim 32
PROJ_L = ".self_attn.attn_op.local_attn.proj_l."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    ref = tiny_diffusers_dit()
    ref = ref.to(torch.bfloat16)
    ref.save_pretrained(root / "diffusers")

    # Official Wan: our names, Conv3d patch weight; sharded like the Wan2.1 releases.
    wan = diffusers_dit_to_wan({k: v.clone() for k, v in ref.state_dict().items()})
    assert wan["patch_embedding.weight"].shape == (128, 16, 1, 2, 2)
    (root / "wan").mkdir()
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": [k for k in wan if not k.startswith("blocks.1.")],
              "diffusion_pytorch_model-00002-of-00002.safetensors": [k for k in wan if k.startswith("blocks.1.")]}
    for shard, keys in shards.items():
        save_file({k: wan[k] for k in keys}, str(root / "wan" / shard))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in wan.values())},
             "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (root / "wan" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    torch.save(wan, root / "wan.pth")

    # TurboDiffusion: Linear patch weight, SLA proj_l (non-zero, as after SLA fine-tuning), norm
    # weights re-created in fp32 by modify_model.py.
    turbo = {k: v.float() if ".norm" in k else v for k, v in wan.items()}
    turbo["patch_embedding.weight"] = wan["patch_embedding.weight"].reshape(128, 64)
    g = torch.Generator().manual_seed(2)
    for n in range(CFG.num_layers):
        turbo[f"blocks.{n}{PROJ_L}weight"] = (0.05 * torch.randn(64, 64, generator=g)).bfloat16()
        turbo[f"blocks.{n}{PROJ_L}bias"] = (0.05 * torch.randn(64, generator=g)).bfloat16()
    torch.save(turbo, root / "TurboWan-tiny.pth")
    torch.save({f"net.{k}": v for k, v in turbo.items()}, root / "net-prefixed.pth")

    # Reference model built without the loader, and its -quant export.
    dense = {k: v for k, v in turbo.items() if PROJ_L not in k}
    model, quant_model = _loaded(dense), quantize_linears_(_loaded(dense))
    quant = dict(quant_model.state_dict())
    quant.update({k: v for k, v in turbo.items() if PROJ_L in k})
    torch.save(quant, root / "TurboWan-tiny-quant.pth")
    return {"root": root, "turbo": turbo, "model": model.eval(), "quant_model": quant_model.eval()}


def _loaded(state):
    model = WanDiT(CFG)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 3, 6, 10, generator=g).bfloat16()
    t = torch.tensor([[988.0], [251.0]], dtype=torch.bfloat16)
    return x, t, torch.randn(2, CFG.text_len, CFG.text_dim, generator=g).bfloat16()


@torch.no_grad()
def _run(model):
    return model.eval()(*_inputs())


@pytest.mark.parametrize("source", ["wan", "wan/diffusion_pytorch_model.safetensors.index.json", "wan.pth",
                                    "TurboWan-tiny.pth", "net-prefixed.pth", "diffusers"])
def test_every_layout_loads_to_the_same_model(files, source):
    model = load_dit(files["root"] / source, CFG)
    assert torch.equal(_run(model), _run(files["model"]))
    assert model.patch_embedding.weight.dtype == torch.bfloat16


def test_dtypes_are_kept_as_stored_unless_asked(files):
    model = load_dit(files["root"] / "TurboWan-tiny.pth", CFG)
    assert model.blocks[0].self_attn.norm_q.weight.dtype == torch.float32        # stored fp32
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert not any(PROJ_L in k for k in model.state_dict())                     # dense: proj_l dropped
    model32 = load_dit(files["root"] / "TurboWan-tiny.pth", CFG, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model32.parameters())


def test_state_dict_source_with_net_prefix(files):
    model = load_dit({f"net.{k}": v for k, v in files["turbo"].items()}, CFG)
    assert torch.equal(_run(model), _run(files["model"]))


def test_sla_keeps_file_proj_l_or_zero_fills_it(files):
    turbo = load_dit(files["root"] / "TurboWan-tiny.pth", CFG, attention="sla", topk=1.0)
    for n, block in enumerate(turbo.blocks):
        stored = files["turbo"][f"blocks.{n}{PROJ_L}weight"]
        assert torch.equal(block.self_attn.attn_op.local_attn.proj_l.weight, stored)
    wan = load_dit(files["root"] / "wan.pth", CFG, attention="sla", topk=1.0)
    proj_l = [p for k, p in wan.named_parameters() if PROJ_L in k]
    assert len(proj_l) == 2 * CFG.num_layers and all(not p.is_meta and not p.any() for p in proj_l)
    # topk 1.0 selects every block: with zero proj_l, SLA is exact attention; the file's proj_l adds to it.
    dense = _run(files["model"])
    assert ((_run(wan) - dense).norm() / dense.norm()).item() < 1e-2
    assert ((_run(turbo) - dense).norm() / dense.norm()).item() > 1e-2


def test_quant_file_loads_int8_layers(files):
    path = files["root"] / "TurboWan-tiny-quant.pth"
    assert detect_dit_format(torch.load(path, weights_only=True)) == "turbo-quant"
    model = load_dit(path, CFG, dtype=torch.bfloat16)
    q = model.blocks[1].ffn[2]
    assert isinstance(q, Int8Linear) and q.int8_weight.dtype == torch.int8 and q.scale.dtype == torch.float32
    assert isinstance(model.patch_embedding, torch.nn.Linear) and not isinstance(model.head.head, Int8Linear)
    out, exact = _run(model), _run(files["model"])
    assert torch.equal(out, _run(files["quant_model"]))
    assert ((out - exact).norm() / exact.norm()).item() < 0.05


def test_detect_and_infer(files):
    root = files["root"]
    assert detect_dit_format(torch.load(root / "wan.pth", weights_only=True)) == "wan"
    assert detect_dit_format(files["turbo"]) == "turbo"
    assert detect_dit_format(read_state_dict(root / "diffusers")) == "diffusers"
    assert infer_dit_config(files["turbo"], CFG) == CFG
    for name in ("Wan2.1-14B", "Wan2.2-A14B"):
        with torch.device("meta"):
            state = WanDiT(MODELS[name].dit).state_dict()
        assert infer_dit_config(state) == MODELS[name].dit


def test_wrong_model_is_one_line_error(files):
    with pytest.raises(CheckpointError) as err:
        load_dit(files["root"] / "TurboWan-tiny.pth", MODELS["Wan2.1-1.3B"].dit)
    assert "\n" not in str(err.value)
    assert "this DiT has dim 128, 2 blocks, in_dim 16" in str(err.value)
    assert "(like tiny), but the model expects dim 1536, 30 blocks, in_dim 16" in str(err.value)
    with torch.device("meta"):
        state = WanDiT(MODELS["Wan2.1-1.3B"].dit).state_dict()
    with pytest.raises(CheckpointError) as err:
        load_dit(state, MODELS["Wan2.1-14B"].dit)
    assert str(err.value) == ("state dict: this DiT has dim 1536, 30 blocks, in_dim 16, ffn_dim 8960 "
                              "(like Wan2.1-1.3B), but the model expects dim 5120, 40 blocks, in_dim 16, ffn_dim 13824")


def test_incomplete_or_foreign_files_are_one_line_errors(files):
    turbo = files["turbo"]
    cases = [
        ({k: v for k, v in turbo.items() if k != "blocks.1.ffn.2.bias"},
         "1 missing tensors (e.g. blocks.1.ffn.2.bias)"),
        ({**turbo, "blocks.0.cross_attn.k.weight": turbo["blocks.0.cross_attn.k.weight"][:, :64]},
         "blocks.0.cross_attn.k.weight has shape (128, 64), the model expects (128, 128)"),
        ({**turbo, "blocks.0.extra.weight": torch.zeros(1)}, "1 unexpected (e.g. blocks.0.extra.weight)"),
        ({"decoder.conv.weight": torch.zeros(1)}, "no patch_embedding.weight"),
        ({"proj_out.weight": torch.zeros(1), "rope.freqs": torch.zeros(1)}, "'rope.freqs' has no counterpart"),
    ]
    for state, message in cases:
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            load_dit(state, CFG)
        assert "\n" not in str(err.value)


_UNPICKLED = []


class _Payload:
    """Unpickling this object would call _UNPICKLED.append: only a full (unsafe) unpickler does that."""

    def __reduce__(self):
        return (_UNPICKLED.append, ("code ran",))


def test_pickles_are_opened_with_weights_only(files, tmp_path, monkeypatch):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"patch_embedding.weight": _Payload()}, f, protocol=2)
    torch.save({**files["turbo"], "extra": _Payload()}, tmp_path / "evil-zip.pth")
    for bad in (path, tmp_path / "evil-zip.pth"):
        with pytest.raises(CheckpointError):
            load_dit(bad, CFG)
    assert _UNPICKLED == []

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw.get("weights_only")) or real_load(*a, **kw))
    load_dit(files["root"] / "TurboWan-tiny.pth", CFG)
    assert calls and all(w is True for w in calls)
