"""Checkpoint loading: official Wan, TurboDiffusion and diffusers formats -> our modules.

Official names are our names: a TurboDiffusion or official Wan state dict loads into our modules
with `strict=True` after at most a reshape (Conv3d patch embedding) or a prefix strip (`net.`).
Every other format has one explicit mapping function below and a round-trip test.
Pickles are only ever opened with `torch.load(weights_only=True, mmap=True)`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or of the wrong model; the message is one line."""


def _load_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # old (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        # Training-style wrappers ({"state_dict": ...}, {"model": ...}) around the tensors.
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: not a state dict of tensors")
        return dict(obj)
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r} (expected .safetensors or .pth)")


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_load_one(index.parent / shard))
    missing = set(weight_map) - set(state)
    if missing:
        raise CheckpointError(f"{index}: shards lack {len(missing)} tensors named in the index, e.g. {min(missing)}")
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint into CPU memory (memory-mapped where possible).

    `path` may be a .safetensors / .pth file, a `*.safetensors.index.json` shard index, or a folder
    holding one of those (official Wan and diffusers folders). A leading `net.` prefix (training
    exports) is stripped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.is_dir():
            indexes = sorted(path.glob("*.safetensors.index.json"))
            singles = sorted(path.glob("*.safetensors")) or sorted(
                p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if indexes:
                state = _load_sharded(indexes[0])
            elif len(singles) == 1:
                state = _load_one(singles[0])
            elif singles:
                state = {}
                for p in singles:
                    state.update(_load_one(p))
            else:
                raise CheckpointError(f"{path}: folder holds no .safetensors or .pth checkpoint")
        elif path.name.endswith(".index.json"):
            state = _load_sharded(path)
        else:
            state = _load_one(path)
    except CheckpointError:
        raise
    except Exception as e:  # corrupt or truncated files: one line, not a traceback
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if state and all(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items()}
    return state


# ---- DiT formats (official Wan, TurboDiffusion, diffusers) --------------------------------------
# (begin DiT section)
# Four layouts of the same weights (SPEC §1.2, §1.5, §7.4):
#   "wan"         official Wan2.1/2.2: our names, Conv3d patch embedding [d, C, 1, 2, 2];
#   "turbo"       TurboDiffusion .pth: our names, Linear patch embedding [d, C*4], maybe SLA proj_l;
#   "turbo-quant" TurboDiffusion -quant .pth: block Linears as int8_weight/scale/bias buffers;
#   "fast-quant"  turbovid's W8A8 .safetensors (turbovid.quantize): int8_weight/weight_scale/bias buffers;
#   "diffusers"   WanTransformer3DModel: other names, mapped by `diffusers_dit_to_wan`.
import math  # noqa: E402  (imports kept inside this section: others edit the file's head)

from turbovid.config import MODELS, DiTConfig  # noqa: E402
from turbovid.models.dit import WanDiT  # noqa: E402

DIT_FORMATS = ("wan", "turbo", "turbo-quant", "fast-quant", "diffusers")


def detect_dit_format(state: dict[str, torch.Tensor]) -> str:
    if any(k.endswith(".weight_scale") for k in state):   # per-channel scales: our fast format
        return "fast-quant"
    if any(k.endswith(".int8_weight") for k in state):
        return "turbo-quant"
    if "proj_out.weight" in state or any(k.startswith("condition_embedder.") for k in state):
        return "diffusers"
    patch = state.get("patch_embedding.weight")
    if patch is None:
        raise CheckpointError(f"not a Wan DiT checkpoint: no patch_embedding.weight among {len(state)} tensors "
                              f"(e.g. {min(state) if state else 'none'})")
    if patch.ndim == 5:
        return "wan"
    if patch.ndim == 2:
        return "turbo"
    raise CheckpointError(f"not a Wan DiT checkpoint: patch_embedding.weight has shape {tuple(patch.shape)}")


# diffusers module path -> Wan module path (the parameter name, weight/bias, is kept). A full key
# that is a bare parameter (scale_shift_table) is looked up as is.
_DIFFUSERS_TOP = {
    "patch_embedding": "patch_embedding",                         # still Conv3d-shaped, like official Wan
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",      # (1, 2, d) = (shift, scale): Wan's order
}
_DIFFUSERS_BLOCK = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q",
    "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q",
    "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    # diffusers' norm2 is the affine cross-attention norm (Wan's norm3); diffusers' norm1/norm3 (Wan's
    # norm1/norm2) have no weights, so nothing else is renamed.
    "norm2": "norm3",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
    # (1, 6, d) in Wan's order: shift, scale, gate of self-attention, then of the FFN.
    "scale_shift_table": "modulation",
}
# Saved by some diffusers Wan i2v exports but never used by the network (diffusers ignores it too).
_DIFFUSERS_UNUSED = ("attn2.norm_added_q.weight",)


def diffusers_dit_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `WanTransformer3DModel` state dict -> official Wan names (patch weight stays Conv3d)."""
    def rename(name: str, table: dict[str, str]) -> str | None:
        if name in table:
            return table[name]
        module, _, param = name.rpartition(".")
        return f"{table[module]}.{param}" if module in table else None

    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            if rest in _DIFFUSERS_UNUSED:
                continue
            new = rename(rest, _DIFFUSERS_BLOCK)
            new = new and f"blocks.{index}.{new}"
        else:
            new = rename(key, _DIFFUSERS_TOP)
        if new is None:
            raise CheckpointError(f"diffusers Wan DiT: tensor {key!r} has no counterpart in the Wan network")
        out[new] = value
    return out


def infer_dit_config(state: dict[str, torch.Tensor], fallback: DiTConfig | None = None) -> DiTConfig:
    """The DiT architecture a Wan-named state dict (any patch-weight shape, quantized or not) holds.

    Shapes cannot tell the head count: it is taken from `fallback` when the widths agree, else
    dim // 128 (every released Wan model has head dim 128). Patch size, text_len and eps come from
    `fallback` (defaults otherwise)."""
    base = fallback or DiTConfig(dim=0, ffn_dim=0, num_heads=1, num_layers=0)

    def shape(*names: str) -> tuple[int, ...]:
        for name in names:
            if name in state:
                return tuple(state[name].shape)
        raise CheckpointError(f"not a Wan DiT checkpoint: it has no {names[0]}")

    patch = math.prod(base.patch_size)
    dim, *patch_in = shape("patch_embedding.weight")
    if fallback is not None and fallback.dim == dim:
        num_heads = fallback.num_heads
    elif dim % 128 == 0:
        num_heads = dim // 128
    else:
        raise CheckpointError(f"cannot tell the head count of a DiT with dim {dim}; pass the expected config")
    image = "img_emb.proj.1.weight" in state
    return DiTConfig(
        dim=dim,
        ffn_dim=shape("blocks.0.ffn.0.weight", "blocks.0.ffn.0.int8_weight")[0],
        num_heads=num_heads,
        num_layers=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
        in_dim=math.prod(patch_in) // patch,
        out_dim=shape("head.head.weight")[0] // patch,
        freq_dim=shape("time_embedding.0.weight")[1],
        text_dim=shape("text_embedding.0.weight")[1],
        text_len=base.text_len, patch_size=base.patch_size, eps=base.eps,
        image_dim=shape("img_emb.proj.1.weight")[1] if image else None,
    )


def _describe_dit(cfg: DiTConfig, other: DiTConfig) -> str:
    """'dim 1536, 30 blocks, in_dim 16' plus every other field in which cfg and other differ."""
    text = f"dim {cfg.dim}, {cfg.num_layers} blocks, in_dim {cfg.in_dim}"
    for field in ("ffn_dim", "out_dim", "text_dim", "freq_dim", "image_dim"):
        if getattr(cfg, field) != getattr(other, field):
            text += f", {field} {getattr(cfg, field)}"
    return text


def _dit_mismatch(name: str, found: DiTConfig, cfg: DiTConfig) -> str | None:
    fields = ("dim", "ffn_dim", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim", "image_dim")
    if all(getattr(found, f) == getattr(cfg, f) for f in fields):
        return None
    like = [n for n, spec in MODELS.items() if all(getattr(spec.dit, f) == getattr(found, f) for f in fields)]
    return (f"{name}: this DiT has {_describe_dit(found, cfg)}{f' (like {like[0]})' if like else ''}, "
            f"but the model expects {_describe_dit(cfg, found)}")


def load_dit(source: str | Path | dict[str, torch.Tensor], cfg: DiTConfig, *, attention: str = "dense",
             topk: float = 0.1, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> WanDiT:
    """Build a `WanDiT` for `cfg` on the meta device and assign-load any of the four layouts into it.

    Tensors keep their stored dtypes unless `dtype` is given (then every floating tensor is cast,
    except the fp32 int8 scales). SLA `proj_l` weights are dropped for dense/sage attention (they mean
    nothing without SLA) and zero-filled for sla/sagesla when the file lacks them (zero proj_l = pure
    sparse attention). A -quant file gets Int8Linear layers in the blocks before loading."""
    name = "state dict" if isinstance(source, dict) else str(source)
    state = dict(source) if isinstance(source, dict) else read_state_dict(source)
    if state and all(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items()}
    try:
        fmt = detect_dit_format(state)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    if fmt == "diffusers":
        state = diffusers_dit_to_wan(state)
    patch = state.get("patch_embedding.weight")
    if patch is not None and patch.ndim == 5:   # Conv3d [d, C, pt, ph, pw] -> Linear [d, C*pt*ph*pw]: same (c, kt, kh, kw) order
        state["patch_embedding.weight"] = patch.reshape(patch.shape[0], -1)
    mismatch = _dit_mismatch(name, infer_dit_config(state, cfg), cfg)
    if mismatch:
        raise CheckpointError(mismatch)

    with torch.device("meta"):
        model = WanDiT(cfg, attention=attention, topk=topk)
        if fmt in ("turbo-quant", "fast-quant"):   # imported here: only -quant files need the int8 kernels
            from turbovid.quant.int8 import swap_block_linears
            swap_block_linears(model, "td" if fmt == "turbo-quant" else "fast")
    expected = model.state_dict()     # meta tensors: names, shapes and default dtypes
    if attention in ("sla", "sagesla"):
        for key, meta in expected.items():
            if ".proj_l." in key and key not in state:
                state[key] = torch.zeros(meta.shape, dtype=meta.dtype)
    else:
        state = {k: v for k, v in state.items() if ".proj_l." not in k}

    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{name}: {fmt} DiT checkpoint does not fit the model: {len(missing)} missing tensors"
                              f"{f' (e.g. {missing[0]})' if missing else ''}, {len(unexpected)} unexpected"
                              f"{f' (e.g. {unexpected[0]})' if unexpected else ''}")
    for key, meta in expected.items():
        if state[key].shape != meta.shape:
            raise CheckpointError(f"{name}: {key} has shape {tuple(state[key].shape)}, "
                                  f"the model expects {tuple(meta.shape)}")
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() and not k.endswith((".scale", ".weight_scale")) else v
                 for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent state (none today) would still be on the meta device: fail here, not in forward.
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{left[0]} is not in the state dict and was left on the meta device")
    return model.to(device)
# (end DiT section)

# ---- VAE formats (official Wan2.1_VAE.pth, diffusers AutoencoderKLWan) --------------------------
# (begin VAE section)
# Two layouts: official `Wan2.1_VAE.pth` (our names, loads as is) and diffusers `AutoencoderKLWan`
# (same tensors and shapes under other names, mapped by `diffusers_vae_to_wan`).
from turbovid.config import VAEConfig  # noqa: E402  (imports kept inside this section)
from turbovid.models.vae import WanVAE  # noqa: E402

# diffusers module path -> Wan module path; the rest of a key is kept, except the first name inside
# a residual block (_DIFFUSERS_VAE_RESNET). Stage lists (encoder.down_blocks, decoder.up_blocks) are
# added per checkpoint by `_diffusers_vae_table`, since their length depends on the config.
_DIFFUSERS_VAE_MODULES = {
    "quant_conv": "conv1",
    "post_quant_conv": "conv2",
    "encoder.conv_in": "encoder.conv1",
    "encoder.mid_block.resnets.0": "encoder.middle.0",
    "encoder.mid_block.attentions.0": "encoder.middle.1",
    "encoder.mid_block.resnets.1": "encoder.middle.2",
    "encoder.norm_out": "encoder.head.0",
    "encoder.conv_out": "encoder.head.2",
    "decoder.conv_in": "decoder.conv1",
    "decoder.mid_block.resnets.0": "decoder.middle.0",
    "decoder.mid_block.attentions.0": "decoder.middle.1",
    "decoder.mid_block.resnets.1": "decoder.middle.2",
    "decoder.norm_out": "decoder.head.0",
    "decoder.conv_out": "decoder.head.2",
}
# diffusers names the layers of a residual block; Wan indexes an nn.Sequential (1, 4: SiLU; 5: dropout).
_DIFFUSERS_VAE_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                         "conv2": "residual.6", "conv_shortcut": "shortcut"}


def _diffusers_vae_table(keys) -> dict[str, str]:
    table = dict(_DIFFUSERS_VAE_MODULES)
    # encoder.down_blocks.{k} is already one flat list of res blocks and resamples, as in Wan.
    # (Keys that do not fit these patterns find no table entry and are reported by the caller.)
    down = [k.split(".") for k in keys if k.startswith("encoder.down_blocks.")]
    table.update({f"encoder.down_blocks.{p[2]}": f"encoder.downsamples.{p[2]}" for p in down if p[2].isdigit()})
    # decoder.up_blocks.{i}.resnets.{j} / .upsamplers.0 is nested; Wan flattens each stage into
    # (num_res_blocks + 1) res blocks followed by one Upsample (the last stage has none).
    up = [p for p in (k.split(".") for k in keys if k.startswith("decoder.up_blocks.")) if len(p) > 4]
    stages = 1 + max((int(p[2]) for p in up if p[2].isdigit()), default=-1)
    resnets = 1 + max((int(p[4]) for p in up if p[3] == "resnets" and p[4].isdigit()), default=-1)
    for i in range(stages):
        for j in range(resnets):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.upsamples.{i * (resnets + 1) + j}"
        table[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.upsamples.{i * (resnets + 1) + resnets}"
    return table


def diffusers_vae_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers `AutoencoderKLWan` state dict -> official `Wan2.1_VAE.pth` names (tensors unchanged)."""
    table = _diffusers_vae_table(state.keys())
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        # longest module prefix of `key` that the table knows
        n = next((n for n in range(len(parts) - 1, 0, -1) if ".".join(parts[:n]) in table), None)
        if n is None:
            raise CheckpointError(f"diffusers VAE tensor {key!r} has no Wan2.1 VAE counterpart "
                                  f"(another VAE, e.g. Wan2.2?)")
        # norm1/conv1/norm2/conv2/conv_shortcut directly below a module only occur in residual blocks
        inner, *leaf = parts[n:]
        out[".".join([table[".".join(parts[:n])], _DIFFUSERS_VAE_RESNET.get(inner, inner), *leaf])] = tensor
    return out


def _vae_file(path: Path) -> Path:
    """A folder may be an official Wan model folder (holds Wan2.1_VAE.pth next to the DiT) or a diffusers
    pipeline folder (VAE in vae/); anything else is read as is."""
    if path.is_dir():
        if (path / "Wan2.1_VAE.pth").is_file():
            return path / "Wan2.1_VAE.pth"
        if (path / "vae").is_dir():
            return path / "vae"
    return path


def load_vae(source: str | Path | dict[str, torch.Tensor], cfg: VAEConfig = VAEConfig(), *,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> WanVAE:
    """Official or diffusers Wan2.1 VAE weights (file, folder or state dict) -> frozen WanVAE in eval mode.

    TurboDiffusion runs the VAE in bf16 (the default here); the official Wan runs it in fp32."""
    name = "VAE state dict" if isinstance(source, dict) else str(source)
    state = dict(source) if isinstance(source, dict) else read_state_dict(_vae_file(Path(source)))
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) or k == "quant_conv.weight" for k in state):
        state = diffusers_vae_to_wan(state)
    elif not any(k.startswith(("encoder.downsamples.", "decoder.upsamples.")) for k in state):
        raise CheckpointError(f"{name}: not a Wan2.1 VAE checkpoint: no encoder.downsamples.* or diffusers "
                              f"encoder.down_blocks.* tensors among {len(state)} (e.g. {min(state) if state else 'none'})")
    with torch.device("meta"):
        model = WanVAE(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{name}: VAE checkpoint does not fit WanVAE: {len(missing)} missing tensors"
                              f"{f' (e.g. {missing[0]})' if missing else ''}, {len(unexpected)} unexpected"
                              f"{f' (e.g. {unexpected[0]})' if unexpected else ''}")
    for key, meta in expected.items():
        if state[key].shape != meta.shape:
            raise CheckpointError(f"{name}: {key} has shape {tuple(state[key].shape)}, expected {tuple(meta.shape)} "
                                  f"for VAEConfig(dim={cfg.dim}, z_dim={cfg.z_dim}) (the Wan2.2 VAE has z_dim 48)")
    # Allocate directly in the target dtype/device, then copy (no aliasing of the caller's tensors).
    model = model.to(dtype=dtype).to_empty(device=device)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)
# (end VAE section)

# ---- umT5 text encoder formats (Wan models_t5_umt5-xxl-enc-bf16.pth, HF UMT5EncoderModel) -------
# (begin text encoder section)
# Imports kept inside this section: others edit the file's head.
from turbovid.config import TextEncoderConfig  # noqa: E402
from turbovid.models.text_encoder import TextEncoder, Tokenizer, make_umt5  # noqa: E402

UMT5_EXPECTED = "the umT5-xxl encoder (Wan models_t5_umt5-xxl-enc-bf16.pth or HF UMT5EncoderModel weights)"

# Wan `blocks.{i}.<name>` -> HF `encoder.block.{i}.<name>` (SPEC §4.3). HF's gated GELU is
# gelu(wi_0 x) * wi_1 x, so Wan's GELU branch `gate.0` is wi_0 and its linear branch `fc1` is wi_1.
_WAN_T5_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def wan_t5_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan/TurboDiffusion umT5 encoder names -> HF `UMT5EncoderModel` names; tensors are shared, not copied."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        block, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if key == "token_embedding.weight":
            out["shared.weight"] = out["encoder.embed_tokens.weight"] = value  # tied in UMT5EncoderModel
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif block == "blocks" and index.isdigit() and name in _WAN_T5_BLOCK_KEYS:
            out[f"encoder.block.{index}.{_WAN_T5_BLOCK_KEYS[name]}"] = value
        else:
            raise CheckpointError(f"unexpected key {key!r} in a Wan umT5 checkpoint (expected {UMT5_EXPECTED})")
    return out


def _umt5_state_in_hf_names(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    if "token_embedding.weight" in state:
        return wan_t5_to_hf(state)
    if "shared.weight" in state or "encoder.embed_tokens.weight" in state:
        # A full UMT5 (encoder-decoder) checkpoint also holds decoder.* / lm_head.*: the encoder does not use them.
        state = {k: v for k, v in state.items() if k == "shared.weight" or k.startswith("encoder.")}
        # The tied embedding is usually saved once, under either name.
        embed = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
        state["shared.weight"] = state["encoder.embed_tokens.weight"] = embed
        return state
    raise CheckpointError(f"{name}: not a umT5 text encoder checkpoint (expected {UMT5_EXPECTED}); "
                          f"first key {next(iter(state), None)!r}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The umT5 SentencePiece tokenizer from local files only: a folder holding `tokenizer.json` (read with
    transformers, like the official `AutoTokenizer`) or `spiece.model`, or a `.model` file. A bare
    spiece.model is read with sentencepiece itself: transformers can only convert it with protobuf installed."""
    path = Path(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{path}: cannot read tokenizer.json ({type(e).__name__}: {first_line})") from None
        vocab = tok.get_vocab()
        if "<pad>" not in vocab or "</s>" not in vocab:
            raise CheckpointError(f"{path}: tokenizer has no <pad>/</s> tokens (expected google/umt5-xxl's)")
        return Tokenizer(lambda text: tok.encode(text, add_special_tokens=False), vocab["<pad>"], vocab["</s>"],
                         len(tok))
    model_file = path / "spiece.model" if path.is_dir() else path
    if not model_file.is_file() or model_file.suffix != ".model":
        raise CheckpointError(f"{path}: no umT5 tokenizer here (expected a folder with tokenizer.json or spiece.model, "
                              "or a spiece.model file, from google/umt5-xxl)")
    import sentencepiece
    try:
        sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except Exception as e:
        raise CheckpointError(f"{model_file}: not a SentencePiece model ({type(e).__name__})") from None
    if sp.pad_id() < 0 or sp.eos_id() < 0:
        raise CheckpointError(f"{model_file}: SentencePiece model has no pad/eos ids (expected google/umt5-xxl's)")
    return Tokenizer(sp.encode, sp.pad_id(), sp.eos_id(), sp.get_piece_size())


def load_text_encoder(source: str | Path | dict[str, torch.Tensor], tokenizer_path: str | Path,
                      cfg: TextEncoderConfig = TextEncoderConfig(), *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.bfloat16) -> TextEncoder:
    """umT5 encoder from a Wan .pth, a HF folder/.safetensors (`shared.weight` + `encoder.*`) or a state dict.
    Built on the meta device and assign-loaded strictly, so the weights are materialised once, on `device`."""
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{tokenizer_path}: tokenizer has {tokenizer.vocab_size} tokens but the encoder embeds "
                              f"{cfg.vocab_size} (expected the google/umt5-xxl tokenizer)")
    name = "state dict" if isinstance(source, dict) else str(source)
    state = _umt5_state_in_hf_names(dict(source) if isinstance(source, dict) else read_state_dict(source), name)
    with torch.device("meta"):
        model = make_umt5(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{name}: does not match {UMT5_EXPECTED} with {cfg}: {len(missing)} missing keys "
                              f"{missing[:1]}, {len(unexpected)} unexpected keys {unexpected[:1]}")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{name}: {key} has shape {tuple(value.shape)} but {cfg} expects "
                                  f"{tuple(expected[key].shape)}")
    # Convert the tied embedding once, then give both names the same tensor.
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.encoder.embed_tokens.weight = model.shared.weight  # assign-loading gave each name its own Parameter
    return TextEncoder(model, tokenizer, cfg.text_len)
# (end text encoder section)
