"""WanDiT against SPEC §1 and against diffusers' independent implementation (WanTransformer3DModel).

diffusers differs from TurboDiffusion only in rounding (it keeps the time path in the activation
dtype, adds gated residuals in fp32, computes RoPE tables in float64), so in fp32 both must agree to
fp32 accuracy, and in bf16 our error against the fp32 result may be at most ~2x diffusers' own.
"""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import WanTransformer3DModel

from turbovid.config import MODELS, DiTConfig
from turbovid.loading import diffusers_dit_to_wan
from turbovid.models.dit import WanDiT, apply_rope, rope_angles, rope_split, sinusoidal_embedding

TEXT_DIM, FREQ_DIM, FFN_DIM = 32, 32, 256


# ---- structure -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, total", [("Wan2.1-1.3B", 1_418_996_800), ("Wan2.1-14B", 14_288_491_584),
                                         ("Wan2.2-A14B", 14_288_901_184)])
def test_parameter_count_matches_official(name, total):
    with torch.device("meta"):
        model = WanDiT(MODELS[name].dit)
    assert sum(p.numel() for p in model.parameters()) == total


def test_state_dict_keys_are_the_official_ones():
    """Every key and shape of SPEC §1.2 for Wan2.1-1.3B (d 1536, ffn 8960), and nothing else."""
    d, f = 1536, 8960
    expected = {
        "patch_embedding.weight": (d, 64), "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, 4096), "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d), "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, 256), "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d), "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d), "time_projection.1.bias": (6 * d,),
        "head.modulation": (1, 2, d), "head.head.weight": (64, d), "head.head.bias": (64,),
    }
    for n in range(30):
        b = f"blocks.{n}."
        expected[b + "modulation"] = (1, 6, d)
        for attn in ("self_attn", "cross_attn"):
            for lin in "qkvo":
                expected[f"{b}{attn}.{lin}.weight"], expected[f"{b}{attn}.{lin}.bias"] = (d, d), (d,)
            expected[f"{b}{attn}.norm_q.weight"] = expected[f"{b}{attn}.norm_k.weight"] = (d,)
        expected[b + "norm3.weight"] = expected[b + "norm3.bias"] = (d,)
        expected[b + "ffn.0.weight"], expected[b + "ffn.0.bias"] = (f, d), (f,)
        expected[b + "ffn.2.weight"], expected[b + "ffn.2.bias"] = (d, f), (d,)
    with torch.device("meta"):
        model = WanDiT(MODELS["Wan2.1-1.3B"].dit)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def test_sla_parameters_sit_at_the_official_path():
    cfg = MODELS["Wan2.1-1.3B"].dit
    with torch.device("meta"):
        dense, sla = WanDiT(cfg), WanDiT(cfg, attention="sla", topk=0.15)
    extra = {k: tuple(v.shape) for k, v in sla.state_dict().items() if k not in dense.state_dict()}
    assert extra == {f"blocks.{n}.self_attn.attn_op.local_attn.proj_l.{w}": s
                     for n in range(30) for w, s in (("weight", (128, 128)), ("bias", (128,)))}
    assert sum(p.numel() for p in sla.parameters()) == 1_418_996_800 + 30 * 16_512   # SPEC §1.1


# ---- hand-computed pieces ------------------------------------------------------------------------

def test_sinusoid_is_cos_first_in_float64():
    t = torch.tensor([988.0, 3.5], dtype=torch.bfloat16)
    half = 4
    freqs = [10000 ** (-k / half) for k in range(half)]
    expected = [[math.cos(v * w) for w in freqs] + [math.sin(v * w) for w in freqs] for v in (988.0, 3.5)]
    out = sinusoidal_embedding(t, 2 * half)
    assert out.dtype == torch.float32
    # fp32 rounding of float64 values only (a float32 computation of cos(988) is off by ~1e-5).
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-7)


def test_rope_split_and_angles_by_hand():
    assert rope_split(128) == (44, 42, 42)            # 22 / 21 / 21 rotation pairs
    assert rope_split(64) == (24, 20, 20)
    grid = (2, 3, 4)
    angles = rope_angles(128, grid)
    assert angles.shape == (24, 64) and angles.dtype == torch.float32
    it, ih, iw = 1, 2, 3                              # token index = (t * H + h) * W + w
    expected = ([it * 10000 ** (-2 * j / 44) for j in range(22)] + [ih * 10000 ** (-2 * j / 42) for j in range(21)]
                + [iw * 10000 ** (-2 * j / 42) for j in range(21)])
    torch.testing.assert_close(angles[(it * 3 + ih) * 4 + iw], torch.tensor(expected), rtol=1e-6, atol=0)


def test_rope_rotates_interleaved_pairs():
    x = torch.randn(1, 2, 3, 4, dtype=torch.bfloat16)          # [B, L, H, D]: pairs (0,1), (2,3)
    theta = torch.tensor([[0.3, -1.2], [2.0, 0.7]])           # [L, D/2]
    out = apply_rope(x, theta.cos(), theta.sin())
    assert out.dtype == torch.bfloat16
    xf = x.float()
    for l in range(2):
        for j in range(2):
            a, b, c, s = xf[0, l, :, 2 * j], xf[0, l, :, 2 * j + 1], math.cos(theta[l, j]), math.sin(theta[l, j])
            torch.testing.assert_close(out[0, l, :, 2 * j].float(), (a * c - b * s).bfloat16().float())
            torch.testing.assert_close(out[0, l, :, 2 * j + 1].float(), (a * s + b * c).bfloat16().float())


# ---- against diffusers ---------------------------------------------------------------------------

def make_pair(num_heads: int, head_dim: int, in_dim: int = 16, image_dim: int | None = None):
    """A random diffusers WanTransformer3DModel and our WanDiT holding the same weights (fp32)."""
    torch.manual_seed(0)
    dim = num_heads * head_dim
    ref = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=num_heads, attention_head_dim=head_dim,
                                in_channels=in_dim, out_channels=16, text_dim=TEXT_DIM, freq_dim=FREQ_DIM,
                                ffn_dim=FFN_DIM, num_layers=2, image_dim=image_dim,
                                added_kv_proj_dim=dim if image_dim else None).eval()
    with torch.no_grad():  # move every weight (norm gains, zero biases) off its initial value
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = diffusers_dit_to_wan(ref.state_dict())
    state["patch_embedding.weight"] = state["patch_embedding.weight"].flatten(1)   # Conv3d -> Linear
    cfg = DiTConfig(dim=dim, ffn_dim=FFN_DIM, num_heads=num_heads, num_layers=2, in_dim=in_dim,
                    text_dim=TEXT_DIM, text_len=16, freq_dim=FREQ_DIM, image_dim=image_dim)
    ours = WanDiT(cfg).eval()
    ours.load_state_dict(state, strict=True)
    return ref, ours


def inputs(in_dim: int = 16, text_len: int = 16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, in_dim, 3, 6, 10, generator=g)          # odd grid: T'=3, H'=3, W'=5 (45 tokens)
    t = torch.tensor([988.0, 251.0])
    context = torch.randn(2, text_len, TEXT_DIM, generator=g)
    return x, t, context


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("num_heads, head_dim", [(2, 64), (1, 128)])
def test_matches_diffusers_fp32(num_heads, head_dim):
    ref, ours = make_pair(num_heads, head_dim)
    x, t, context = inputs()
    with torch.no_grad():
        expected = ref(x, t, context, return_dict=False)[0]
        out = ours(x, t[:, None], context)                      # [B, 1] times, as TurboDiffusion passes them
    assert out.shape == (2, 16, 3, 6, 10) and out.dtype == torch.float32
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("fp32_norms", [False, True])
def test_bf16_error_within_twice_diffusers_bf16(fp32_norms):
    ref, ours = make_pair(1, 128)
    x, t, context = inputs()
    with torch.no_grad():
        exact = ref(x, t, context, return_dict=False)[0]
        ref_bf16 = ref.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16(), return_dict=False)[0]
        ours = ours.to(torch.bfloat16)
        if fp32_norms:   # the released-file layout: bf16 Linears, fp32 norm weights (SPEC §1.4)
            for name, p in ours.named_parameters():
                if ".norm" in name:
                    p.data = p.data.float()
        out = ours(x.bfloat16(), t.bfloat16(), context.bfloat16())
    assert out.dtype == torch.float32
    assert rel_err(out, exact) <= 2 * rel_err(ref_bf16, exact)
    assert (out - exact).abs().max() <= 2 * (ref_bf16.float() - exact).abs().max()


def test_residual_stream_stays_bf16():
    _, ours = make_pair(2, 64)
    ours = ours.to(torch.bfloat16)
    for name, p in ours.named_parameters():
        if ".norm" in name:
            p.data = p.data.float()
    seen = []
    for block in ours.blocks:
        block.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
        block.self_attn.attn_op.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    x, t, context = inputs()
    with torch.no_grad():
        ours(x, t, context)          # fp32 inputs are cast to the parameter dtype
    assert seen and all(s == (torch.bfloat16, torch.bfloat16) for s in seen)


def test_block_rounding_follows_spec():
    """SPEC §1.3 7: bf16 LN output, modulate in fp32 then cast once, gate cast to bf16 before a bf16
    multiply-add (diffusers rounds differently here, so this pins TurboDiffusion's order by hand)."""
    torch.manual_seed(0)
    block = WanDiT(MODELS["tiny"].dit).blocks[0].to(torch.bfloat16)
    x = torch.randn(2, 45, 128).bfloat16()
    e0 = torch.randn(2, 6, 128)
    y_attn, y_ffn = torch.randn(2, 45, 128).bfloat16(), torch.randn(2, 45, 128).bfloat16()
    seen = {}

    class Fixed(torch.nn.Module):   # records its input, returns a fixed branch output
        def __init__(self, key, out):
            super().__init__()
            self.key, self.out = key, out

        def forward(self, u, *rest):
            seen[self.key] = u
            return self.out

    block.self_attn, block.ffn = Fixed("attn", y_attn), Fixed("ffn", y_ffn)
    block.cross_attn = Fixed("cross", torch.zeros_like(x))
    with torch.no_grad():
        out = block(x, e0, None, None, None)
        m = block.modulation.float() + e0                                    # [B, 6, d] fp32
        ln = lambda u: torch.nn.functional.layer_norm(u.float(), (128,), eps=1e-6).bfloat16()  # noqa: E731
        z1 = (ln(x).float() * (1 + m[:, 1:2]) + m[:, 0:1]).bfloat16()
        x1 = x + y_attn * m[:, 2:3].bfloat16()
        z2 = (ln(x1).float() * (1 + m[:, 4:5]) + m[:, 3:4]).bfloat16()
        expected = x1 + y_ffn * m[:, 5:6].bfloat16()
        n3 = torch.nn.functional.layer_norm(x1.float(), (128,), block.norm3.weight.float(), block.norm3.bias.float(),
                                            eps=1e-6).bfloat16()
    assert torch.equal(seen["attn"], z1) and torch.equal(seen["cross"], n3)
    assert torch.equal(seen["ffn"], z2) and torch.equal(out, expected)


def test_wan22_i2v_with_y_matches_diffusers():
    """Wan2.2 i2v: in_dim 36 = 16 noise + 20 (mask + image latent) concatenated after x."""
    ref, ours = make_pair(2, 64, in_dim=36)
    x, t, context = inputs()
    y = torch.randn(2, 20, 3, 6, 10)
    with torch.no_grad():
        expected = ref(torch.cat([x, y], 1), t, context, return_dict=False)[0]
        out = ours(x, t, context, y=y)
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_wan21_i2v_clip_branch_matches_diffusers():
    """Wan2.1 i2v: img_emb + k_img/v_img attention over CLIP tokens (diffusers hard-codes 512 text tokens)."""
    ref, ours = make_pair(2, 64, in_dim=36, image_dim=48)
    x, t, context = inputs(text_len=512)
    y, clip = torch.randn(2, 20, 3, 6, 10), torch.randn(2, 257, 48)
    with torch.no_grad():
        expected = ref(torch.cat([x, y], 1), t, context, encoder_hidden_states_image=clip, return_dict=False)[0]
        out = ours(x, t, context, y=y, clip=clip)
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_backward_reaches_every_parameter():
    model = WanDiT(MODELS["tiny"].dit)
    x, t, context = inputs()
    model(x, t, context).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bad_inputs_raise_one_line_errors():
    model = WanDiT(MODELS["tiny"].dit)
    x, t, context = inputs()
    with pytest.raises(ValueError, match="16 channels"):
        model(x[:, :8], t, context)
    with pytest.raises(ValueError, match="divisible"):
        model(x[..., :5], t, context)
    with pytest.raises(ValueError, match=r"\[B\] or \[B, 1\]"):
        model(x, t[:1], context)
    with pytest.raises(ValueError, match="heads"):
        WanDiT(DiTConfig(dim=96, ffn_dim=64, num_heads=5, num_layers=1))
