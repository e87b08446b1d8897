"""Fast VAE decode vs the reference decoder: chunking, channels-last, the fused RMSNorm+SiLU kernel, the
sub-pixel upsample identity, spatial tiles. CPU on the tiny config; a full-size check under the gpu marker.

Tolerances: fp32 fast vs fp32 reference within 1e-5 of the output's max (the only change is the order
of additions: summed sub-pixel taps, conv algorithms); bf16 fast within 2x the error of the bf16
reference decoder, both against the fp32 reference (STYLE: at most ~2x as wrong as plain bf16 PyTorch).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from turbovid.config import TINY_VAE, VAEConfig
from turbovid.kernels import interpreting
from turbovid.models import vae as V
from turbovid.models.vae import WanVAE, rms_norm_silu_into, subpixel_weights, tile_spans

needs_kernels = pytest.mark.skipif(not interpreting(), reason="set TRITON_INTERPRET=1 to run Triton kernels on CPU")


def _randomised(vae: WanVAE) -> WanVAE:
    """Random norm gains (all-ones gains would hide a swapped or skipped norm)."""
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return vae.eval()


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return _randomised(WanVAE(TINY_VAE))


def _latent(frames, batch=1, h=2, w=3, seed=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, frames, h, w, generator=g).to(dtype)


def _rel(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@torch.no_grad()
@pytest.mark.parametrize("frames,batch", [(1, 1), (2, 1), (5, 1), (5, 2)])
def test_fast_equals_reference_fp32(vae, frames, batch):
    z = _latent(frames, batch)
    want = vae.decode_reference(z)
    # chunk None: one pass over all frames (tiny config); channels-last runs the Triton norm when interpreting
    for chunk, channels_last in [(1, False), (None, False), (2, False), (2, True)]:
        got = vae.decode(z, fast=True, chunk=chunk, channels_last=channels_last)
        assert got.shape == want.shape == (batch, 3, 1 + 4 * (frames - 1), 16, 24)
        assert _rel(got, want) < 1e-5, (chunk, channels_last)


@torch.no_grad()
def test_cpu_default_is_turbodiffusion_streaming(vae):
    z = _latent(3)
    assert torch.equal(vae.decode(z), vae.decode(z, fast=False, chunk=1))
    assert torch.equal(vae.decode(z, fast=False, chunk=3), vae.decode_reference(z))


@torch.no_grad()
def test_fast_bf16_within_budget(vae):
    vae16 = WanVAE(TINY_VAE).to(torch.bfloat16)
    vae16.load_state_dict(vae.state_dict())
    z = _latent(5)
    want = vae.decode_reference(z)
    budget = _rel(vae16.decode_reference(z), want)
    for channels_last in (False, True):
        got = vae16.decode(z, fast=True, chunk=2, channels_last=channels_last)
        assert got.dtype == torch.float32
        assert 0 < _rel(got, want) < 2 * budget


@torch.no_grad()
def test_subpixel_weights_equal_upsample_then_conv():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    conv = torch.nn.Conv2d(6, 4, 3, padding=1).double()
    want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
    phases = subpixel_weights(conv.weight)
    got = torch.empty_like(want)
    for a in range(2):
        for c in range(2):
            got[:, :, a::2, c::2] = F.conv2d(x, phases[a, c], conv.bias, padding=1)[:, :, a:a + 5, c:c + 7]
    assert (got - want).abs().max() < 1e-12


@needs_kernels
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_silu_kernel(dtype):
    """Awkward shapes: C not a power of two, rows not a multiple of the block, batch 2, an output that
    is a view at an offset (the conv buffer after its cache frames)."""
    g = torch.Generator().manual_seed(7)
    for c in (8, 12, 96):
        norm = V.RMSNorm(c, images=False).to(dtype)
        norm.gamma.copy_(1 + 0.5 * torch.randn(c, 1, 1, 1, generator=g))
        x = (torch.randn(2, c, 3, 5, 7, generator=g) * 3).to(dtype).contiguous(memory_format=torch.channels_last_3d)
        buf = torch.full((2, c, 5, 5, 7), float("nan"), dtype=dtype).contiguous(memory_format=torch.channels_last_3d)
        for bias in (None, (torch.randn(c, generator=g) * 2).to(dtype)):
            buf.fill_(float("nan"))
            rms_norm_silu_into(norm, x, buf[:, :, 2:], bias)
            b = 0 if bias is None else bias.view(1, -1, 1, 1, 1)
            v = x + b                                                      # the conv's bias add, in this dtype
            want = F.silu(F.normalize(x.double() + b, dim=1) * c ** 0.5 * norm.gamma.double())
            got = buf[:, :, 2:]
            assert not got.isnan().any() and buf[:, :, :2].isnan().all()   # every output written, nothing else
            ref_err = (F.silu(norm(v)).double() - want).abs().max()          # plain PyTorch in this dtype
            assert (got.double() - want).abs().max() <= max(2 * ref_err, 1e-6)


@needs_kernels
@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_add_kernel(dtype):
    """h <- h + x + bias on channels-last videos, C not a power of two, batch 2, with and without bias;
    against float64, within 2x the error of the two plain PyTorch adds in this dtype."""
    from turbovid.kernels.rms_norm_silu import residual_add_, residual_add_ref
    g = torch.Generator().manual_seed(8)
    for c in (8, 12, 96):
        h0, x = ((torch.randn(2, c, 3, 5, 7, generator=g) * 3).to(dtype).contiguous(memory_format=torch.channels_last_3d)
                 for _ in range(2))
        for bias in (None, torch.randn(c, generator=g).to(dtype)):
            want = h0.double() + x.double() + (0 if bias is None else bias.double().view(1, -1, 1, 1, 1))
            plain = h0.clone()
            residual_add_ref(plain, x, bias)
            h = h0.clone()
            assert residual_add_(h, x, bias) is h
            ref_err = (plain.double() - want).abs().max()
            assert (h.double() - want).abs().max() <= max(2 * ref_err, 1e-6)
    with pytest.raises(ValueError, match="bias must be"):
        residual_add_(h0.clone(), x, torch.zeros(c + 1, dtype=dtype))
    with pytest.raises(ValueError, match="disagree"):
        residual_add_(h0.clone(), x[:, :, :2])


@needs_kernels
@torch.no_grad()
def test_channels_last_decode_runs_the_kernel(vae, monkeypatch):
    def fail(*args):
        raise AssertionError("channels-last decode fell back to the PyTorch norm")
    import turbovid.kernels.rms_norm_silu as K
    monkeypatch.setattr(K, "rms_norm_silu_ref", fail)
    monkeypatch.setattr(K, "residual_add_ref", fail)
    z = _latent(2, batch=2)
    got = vae.decode(z, fast=True, chunk=1, channels_last=True)
    assert _rel(got, vae.decode_reference(z)) < 1e-5


def test_tile_spans_cover_and_overlap():
    for size, tile, overlap in [(40, 24, 8), (90, 48, 8), (100, 32, 8), (33, 16, 4), (40, 20, 0)]:
        spans = tile_spans(size, tile, overlap, scale=8)
        assert spans[0][0] == 0 and spans[-1][1] == size
        for (s0, e0, w0), (s1, e1, _) in zip(spans, spans[1:]):
            assert e0 - s0 == tile and e0 - s1 >= overlap and s1 > s0
        for i, (_, _, w) in enumerate(spans):
            assert w.shape == (8 * tile,) and 0 < w.min() and w.max() == 1
            if overlap:
                assert (w[0] < 0.1) == (i > 0) and (w[-1] < 0.1) == (i < len(spans) - 1)
    (start, end, weights), = tile_spans(40, 64, 8, 8)   # a tile larger than the frame: one span
    assert (start, end) == (0, 40) and torch.equal(weights, torch.ones(320))


@torch.no_grad()
def test_tiles_blend_without_seams(vae):
    """A smooth latent, decoded whole and in two tiles along W. The middle attention block is switched
    off here: it attends over the whole frame, which no tiling reproduces, so with it every pixel of a
    tile changes a little. Without it the decoder is local (receptive field ~12 latent pixels), hence:
    - far from the tile border the tiled video is the untiled one (same math, other assembly);
    - near the border each tile sees zero padding; a hard cut (tiles 0-20 | 20-40) shows it as a jump
      between neighbouring columns, the 8-latent-pixel linear blend (tiles 0-24 | 16-40) smooths it."""
    local = WanVAE(TINY_VAE)
    local.load_state_dict(vae.state_dict())
    attn = local.decoder.middle[1]
    attn.proj.weight.data.zero_()
    attn.proj.bias.data.zero_()
    h, w = 4, 40
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    amp = torch.randn(16, 3, generator=torch.Generator().manual_seed(3))
    z = torch.stack([amp[c, 0] * torch.sin(2 * math.pi * (xx + c / 16)) + amp[c, 1] * torch.cos(2 * math.pi * yy)
                     + amp[c, 2] * (xx - yy) for c in range(16)])
    z = z[None, :, None].repeat(1, 1, 2, 1, 1)                          # [1, 16, 2, 4, 40]
    whole = local.decode(z, fast=True)
    blend = local.decode(z, fast=True, tile=24, overlap=8) - whole
    cut = local.decode(z, fast=True, tile=20, overlap=0) - whole
    far = torch.cat([blend[..., :8 * 3], blend[..., 8 * 37:]], dim=-1)  # > 12 latent px from both borders
    assert far.abs().max() < 1e-5
    jump_blend, jump_cut = (e.diff(dim=-1).abs().max().item() for e in (blend, cut))
    assert jump_cut > 0.5 * whole.abs().max()        # the hard cut is a visible seam ...
    assert jump_blend < 0.2 * jump_cut               # ... the blend is not
    assert blend.abs().max() < 0.25 * whole.abs().max()


def test_bad_arguments_raise_one_line_errors(vae):
    z = _latent(2)
    for kwargs, message in [(dict(chunk=0), "chunk must be >= 1"), (dict(tile=0), "tile must be >= 1"),
                            (dict(tile=2, overlap=2), "overlap must be in")]:
        with pytest.raises(ValueError, match=message) as err:
            vae.decode(z, fast=True, **kwargs)
        assert "\n" not in str(err.value)


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_full_size_fast_decode():
    """Full-size VAE (random weights, random gains) at 256x384, 9 frames: the fast bf16 decode (channels-
    last, Triton norm, sub-pixel upsample, chunks) vs the fp32 reference with TF32 off; error within 2x
    that of TurboDiffusion's bf16 frame-by-frame decode. Tiles and the NCDHW layout run and stay close."""
    torch.manual_seed(0)
    ref32 = _randomised(WanVAE(VAEConfig())).cuda()
    vae16 = WanVAE(VAEConfig()).to(torch.bfloat16).cuda().eval()
    vae16.load_state_dict(ref32.state_dict())
    z = _latent(3, h=32, w=48).cuda()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        want = ref32.decode_reference(z)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    budget = _rel(vae16.decode(z.bfloat16(), fast=False), want)
    for kwargs in (dict(), dict(chunk=1), dict(chunk=3), dict(channels_last=False)):
        got = vae16.decode(z.bfloat16(), fast=True, **kwargs)
        assert got.shape == want.shape and not got.isnan().any()
        assert _rel(got, want) < 2 * budget, kwargs
    # streamed (what generate does with an mp4 writer): the same passes, the same video
    streamed = torch.cat(list(vae16.decode_stream(z.bfloat16(), clamp=True, fast=True, chunk=1)), dim=2)
    assert torch.equal(streamed, vae16.decode(z.bfloat16(), clamp=True, fast=True, chunk=1))
    tiled = vae16.decode(z.bfloat16(), fast=True, tile=24, overlap=8)
    # approximate by design (border padding, per-tile attention): runs, and stays near on average
    assert tiled.shape == want.shape and tiled.isfinite().all()
    assert ((tiled.float() - want).abs().sum() / want.abs().sum()).item() < 0.5


@pytest.mark.parametrize("fast,chunk,tile", [(True, 2, None), (False, None, None), (True, 1, 2)])
def test_decode_stream_chunks_make_up_decode(vae, fast, chunk, tile):
    z = _latent(5)
    tiling = dict(tile=tile, overlap=1) if tile else {}
    want = vae.decode(z, clamp=True, fast=fast, chunk=chunk, **tiling)
    torch.set_grad_enabled(True)
    chunks = []
    for c in vae.decode_stream(z, clamp=True, fast=fast, chunk=chunk, **tiling):
        assert torch.is_grad_enabled()          # the generator's no_grad does not leak into the consumer
        chunks.append(c)
    # one chunk per pass: 5 latent frames in passes of 2 -> 3 chunks (1 + 8 + 8 pixel frames); tiled: whole video
    expected = 1 if tile else (3 if chunk == 2 else 5)
    assert len(chunks) == expected
    assert torch.equal(torch.cat(chunks, dim=2), want)
    assert not any(c.requires_grad for c in chunks)
