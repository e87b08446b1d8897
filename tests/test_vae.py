"""Wan2.1 VAE: numerics against diffusers' AutoencoderKLWan, streaming vs one-pass, checkpoint formats."""
import copy

import pytest
import torch
from diffusers import AutoencoderKLWan

from turbovid.config import TINY_VAE, VAEConfig
from turbovid.loading import CheckpointError, diffusers_vae_to_wan, load_vae
from turbovid.models.vae import WanVAE, latent_constants

# SPEC §3.2: the effective (bf16-rounded) latent mean and 1/std of TurboDiffusion.
SPEC_MEAN_BF16 = [-0.7578125, -0.70703125, -0.91015625, 0.107421875, -0.1748046875, 0.96484375,
                  -0.1513671875, 1.5546875, 0.4140625, -0.0712890625, 0.55078125, -0.36328125,
                  -0.1923828125, -0.94921875, 0.25, -0.29296875]
SPEC_INV_STD_BF16 = [0.35546875, 0.6875, 0.4296875, 0.376953125, 0.8203125, 0.5625, 0.3828125,
                     0.48046875, 0.306640625, 0.462890625, 0.349609375, 0.64453125, 0.609375, 0.890625,
                     0.353515625, 0.5234375]

# diffusers config equal to TINY_VAE (dim 8, dim_mult (1,2,2,2), 1 res block, temporal (F, T, T)).
TINY_DIFFUSERS = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                      temperal_downsample=[False, True, True])
H, W = 16, 24  # pixels; latent 2 x 3 (non-square to catch H/W mix-ups)


def _spec_constants():
    return (torch.tensor(SPEC_MEAN_BF16).view(1, -1, 1, 1, 1), torch.tensor(SPEC_INV_STD_BF16).view(1, -1, 1, 1, 1))


@pytest.fixture(scope="module")
def reference():
    """Random tiny diffusers VAE. Norm gains are randomised too (all-ones gains would hide swapped
    norms), and the last decoder conv is scaled down so that decoded pixels stay inside [-1, 1],
    where diffusers' built-in clamp changes nothing and the comparison sees every value."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**TINY_DIFFUSERS).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
        ref.decoder.conv_out.weight.mul_(0.5)
        ref.decoder.conv_out.bias.mul_(0.5)
    return ref


@pytest.fixture(scope="module")
def vae(reference):
    return load_vae(reference.state_dict(), TINY_VAE, dtype=torch.float32)


def _video(frames, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, H, W, generator=g) * 2 - 1


def _latent(frames, batch=1, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, frames, H // 8, W // 8, generator=g)


def test_bf16_latent_constants_match_spec():
    mean, inv_std = latent_constants(VAEConfig())
    assert mean.dtype == inv_std.dtype == torch.bfloat16
    assert mean.float().tolist() == SPEC_MEAN_BF16
    assert inv_std.float().tolist() == SPEC_INV_STD_BF16


def test_full_size_parameter_count():
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    state = model.state_dict()
    assert len(state) == 194
    assert sum(t.numel() for t in state.values()) == 126_892_531
    # spot checks of SPEC §3.5 names and shapes
    assert state["decoder.upsamples.3.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert state["decoder.upsamples.4.shortcut.weight"].shape == (384, 192, 1, 1, 1)
    assert state["decoder.upsamples.11.resample.1.weight"].shape == (96, 192, 3, 3)
    assert state["encoder.middle.1.to_qkv.weight"].shape == (1152, 384, 1, 1)
    assert state["encoder.downsamples.8.time_conv.weight"].shape == (384, 384, 3, 1, 1)


@torch.no_grad()
def test_encode_matches_diffusers(reference, vae):
    video = _video(13, batch=2)
    mean, inv_std = _spec_constants()
    # diffusers returns the raw posterior mean; normalise it here with SPEC's constants
    expected = (reference.encode(video).latent_dist.mean - mean) * inv_std
    got = vae.encode(video)
    assert got.shape == (2, 16, 4, H // 8, W // 8)
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


@torch.no_grad()
def test_decode_matches_diffusers(reference, vae):
    z = _latent(4, batch=2)
    mean, inv_std = _spec_constants()
    expected = reference.decode(z / inv_std + mean).sample  # diffusers decodes raw latents and clamps
    got = vae.decode(z)
    assert got.shape == (2, 3, 13, H, W)
    assert 0.3 < got.abs().max() < 0.99, "outputs must stay inside diffusers' clamp for the test to see them"
    assert (got - expected).abs().max() < 1e-5 * expected.abs().max()


@torch.no_grad()
def test_streaming_equals_one_pass(vae):
    z = _latent(4)  # 4 latent frames: the first-frame rule and several cached chunks after it
    decoded = vae.decode(z)
    assert (decoded - vae.decode_reference(z)).abs().max() < 1e-5
    video = _video(13)
    encoded = vae.encode(video)
    assert (encoded - vae.encode_reference(video)).abs().max() < 1e-5 * encoded.abs().max()


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_shapes(vae, frames):
    z = vae.encode(_video(frames))
    assert z.shape == (1, 16, 1 + (frames - 1) // 4, H // 8, W // 8)
    assert vae.decode(z).shape == vae.decode_reference(z).shape == (1, 3, frames, H, W)


@torch.no_grad()
def test_clamp(reference):
    state = diffusers_vae_to_wan(reference.state_dict())
    state["decoder.head.2.bias"] = state["decoder.head.2.bias"] + 2.0  # push pixels above 1
    shifted = load_vae(state, TINY_VAE, dtype=torch.float32)
    z = _latent(2)
    unclamped, clamped = shifted.decode(z), shifted.decode(z, clamp=True)
    assert unclamped.max() > 1.5
    assert torch.equal(clamped, unclamped.clamp(-1, 1))
    assert torch.equal(shifted.decode_reference(z, clamp=True), clamped)


@torch.no_grad()
def test_bf16(reference, vae):
    """TurboDiffusion's path: bf16 module, fp32 in and out. Its error against our fp32 run may be at
    most 2x that of diffusers' own bf16 run against diffusers fp32 (the two bf16 paths differ on
    purpose: diffusers upcasts inside RMSNorm, TurboDiffusion does not)."""
    vae16 = load_vae(reference.state_dict(), TINY_VAE, dtype=torch.bfloat16)
    assert vae16.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in vae16.state_dict().values())
    reference16 = copy.deepcopy(reference).to(torch.bfloat16)
    video, z = _video(5), _latent(2)
    mean, inv_std = _spec_constants()
    raw_z = z / inv_std + mean

    def err(got, want):
        return (got.float() - want).abs().max() / want.abs().max()

    enc_budget = err(reference16.encode(video.bfloat16()).latent_dist.mean, reference.encode(video).latent_dist.mean)
    dec_budget = err(reference16.decode(raw_z.bfloat16()).sample, reference.decode(raw_z).sample)
    want_z, want_x = vae.encode(video), vae.decode(z)
    for got, want, budget in [(vae16.encode(video), want_z, enc_budget), (vae16.decode(z), want_x, dec_budget),
                              (vae16.decode_reference(z), want_x, dec_budget)]:
        assert got.dtype == torch.float32
        assert 0 < err(got, want) < 2 * budget
    assert vae16.decode(z.bfloat16()).dtype == torch.bfloat16


@torch.no_grad()
def test_official_and_diffusers_files_load_identically(reference, vae, tmp_path):
    official = diffusers_vae_to_wan(reference.state_dict())
    (tmp_path / "wan").mkdir()
    torch.save(official, tmp_path / "wan" / "Wan2.1_VAE.pth")  # plain state dict, as released
    reference.save_pretrained(tmp_path / "pipeline" / "vae")   # diffusers pipeline folder layout
    sources = [tmp_path / "wan" / "Wan2.1_VAE.pth", tmp_path / "wan", tmp_path / "pipeline",
               tmp_path / "pipeline" / "vae"]
    video, z = _video(5), _latent(2)
    want_z, want_x = vae.encode(video), vae.decode(z)
    for i, source in enumerate(sources):
        loaded = load_vae(source, TINY_VAE, dtype=torch.float32)
        for key, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, official[key]), (source, key)
        if i % 2 == 0:  # one official, one diffusers source: outputs too
            assert torch.equal(loaded.encode(video), want_z) and torch.equal(loaded.decode(z), want_x)


def test_wrong_checkpoints_raise_one_line_errors(reference):
    state = diffusers_vae_to_wan(reference.state_dict())
    bad = [
        ({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, TINY_VAE, "not a Wan2.1 VAE"),
        ({k: v for k, v in state.items() if k != "conv2.bias"}, TINY_VAE, "1 missing tensors"),
        (state, VAEConfig(dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1), "has shape"),
        ({**reference.state_dict(), "encoder.extra.weight": torch.zeros(1)}, TINY_VAE, "no Wan2.1 VAE counterpart"),
    ]
    for source, cfg, message in bad:
        with pytest.raises(CheckpointError, match=message) as err:
            load_vae(source, cfg, dtype=torch.float32)
        assert "\n" not in str(err.value)


def test_bad_inputs_raise(vae):
    with pytest.raises(ValueError, match="4k\\+1"):
        vae.encode(torch.zeros(1, 3, 6, H, W))
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, W))
    with pytest.raises(ValueError, match="latent must be"):
        vae.decode(torch.zeros(1, 4, 2, 2, 3))
