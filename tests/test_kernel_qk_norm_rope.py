"""kernels/qk_norm_rope.py: the fused q/k RMSNorm + RoPE against the module's path, on awkward shapes under the
Triton interpreter, its input checks, and the DiT with the fusion on (tiny model) equal to the plain one."""
import pytest
import torch

from turbovid.config import TINY_DIT
from turbovid.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_ref
from turbovid.models.dit import WanDiT, rope_angles
from turbovid.speedups import apply_speedups, fuse_qk_norm_rope


@pytest.mark.parametrize("B, grid, heads, D, dtype", [
    (2, (3, 2, 5), 3, 64, torch.bfloat16),    # d = 192 (the mini model), L = 30
    (1, (1, 7, 3), 2, 64, torch.float32),     # L = 21, fp32
    (3, (2, 3, 3), 1, 128, torch.float16),    # one head of 128
    (1, (2, 3, 2), 5, 24, torch.bfloat16),    # heads of 24 (pairs padded to 16 lanes), 5 heads
])
def test_kernel_matches_the_module(B, grid, heads, D, dtype):
    g = torch.Generator().manual_seed(0)
    L, d = grid[0] * grid[1] * grid[2], heads * D
    x = (3 * torch.randn(B, L, d, generator=g)).to(dtype)
    w = 1 + 0.1 * torch.randn(d, generator=g)
    angles = rope_angles(D, grid)
    cos, sin = angles.cos(), angles.sin()
    got = qk_norm_rope(x, w, cos, sin, heads, 1e-6)
    want = qk_norm_rope_ref(x, w, cos, sin, heads, 1e-6)
    assert got.shape == (B, L, heads, D) and got.dtype == dtype
    # rsqrt vs 1/sqrt and the summation order may move a value by one unit in the last place
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -22}[dtype]
    assert ((got.float() - want.float()).abs() <= ulp * want.float().abs().clamp_min(1) * 2).all()


def test_kernel_reads_q_and_k_of_a_fused_qkv_output_in_place():
    g = torch.Generator().manual_seed(1)
    B, grid, heads, D = 2, (1, 3, 5), 2, 64
    L, d = grid[0] * grid[1] * grid[2], heads * D
    qkv = (3 * torch.randn(B, L, 3 * d, generator=g)).to(torch.bfloat16)
    w = 1 + 0.1 * torch.randn(d, generator=g)
    angles = rope_angles(D, grid)
    cos, sin = angles.cos(), angles.sin()
    for part in (qkv[..., :d], qkv[..., d:2 * d]):          # rows 3d apart
        assert not part.is_contiguous()
        got, want = qk_norm_rope(part, w, cos, sin, heads, 1e-6), qk_norm_rope_ref(part, w, cos, sin, heads, 1e-6)
        assert ((got.float() - want.float()).abs() <= 2 ** -6 * want.float().abs().clamp_min(1)).all()
    # rows unevenly spaced (a transposed tensor) are copied first and still right
    odd = qkv[..., :d].transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(qk_norm_rope(odd, w, cos, sin, heads, 1e-6),
                               qk_norm_rope(qkv[..., :d].contiguous(), w, cos, sin, heads, 1e-6))


def test_checks_its_inputs():
    x = torch.randn(1, 4, 128)
    cos = sin = torch.zeros(4, 32)
    with pytest.raises(ValueError, match="heads"):
        qk_norm_rope(x, torch.ones(128), cos, sin, 3, 1e-6)
    with pytest.raises(ValueError, match="cos/sin"):
        qk_norm_rope(x, torch.ones(128), torch.zeros(5, 32), sin, 2, 1e-6)
    with pytest.raises(ValueError, match="norm weight"):
        qk_norm_rope(x, torch.ones(64), cos, sin, 2, 1e-6)
    with pytest.raises(ValueError, match=r"\[B, L, d\]"):
        qk_norm_rope(x[0], torch.ones(128), cos, sin, 2, 1e-6)


def test_dit_with_fused_qk_equals_the_plain_model():
    torch.manual_seed(0)
    plain = WanDiT(TINY_DIT).eval()
    fused = WanDiT(TINY_DIT).eval()
    fused.load_state_dict(plain.state_dict())
    fuse_qk_norm_rope(fused)
    x = torch.randn(1, 16, 2, 4, 6)
    t, ctx = torch.tensor([700.0]), torch.randn(1, 16, TINY_DIT.text_dim)
    with torch.no_grad():
        a, b = plain(x, t, ctx), fused(x, t, ctx)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    both = apply_speedups(fused, fuse_norms=True, fuse_qk=True)  # FusedWanBlock with the fused q/k path
    with torch.no_grad():
        torch.testing.assert_close(both(x, t, ctx), a, rtol=1e-4, atol=1e-4)


# --- GPU, Wan shapes ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("B, grid, heads, D", [
    (1, (21, 30, 52), 12, 128),    # Wan2.1-1.3B 480p: 32760 tokens, d 1536
    (2, (5, 17, 23), 12, 128),     # odd token count (1955), two samples
    (1, (21, 45, 80), 40, 128),    # Wan2.1-14B 720p: 75600 tokens, d 5120
])
def test_gpu_kernel_at_wan_shapes(B, grid, heads, D):
    g = torch.Generator("cuda").manual_seed(0)
    L, d = grid[0] * grid[1] * grid[2], heads * D
    x = (3 * torch.randn(B, L, d, generator=g, device="cuda")).to(torch.bfloat16)
    w = 1 + 0.1 * torch.randn(d, generator=g, device="cuda")
    angles = rope_angles(D, grid, "cuda")
    cos, sin = angles.cos(), angles.sin()
    got = qk_norm_rope(x, w, cos, sin, heads, 1e-6)
    want = qk_norm_rope_ref(x, w, cos, sin, heads, 1e-6)
    assert ((got.float() - want.float()).abs() <= 2 ** -6 * want.float().abs().clamp_min(1)).all()


@pytest.mark.gpu
def test_gpu_dit_with_fused_qk_equals_the_plain_model():
    torch.manual_seed(0)
    plain = WanDiT(TINY_DIT).cuda().to(torch.bfloat16).eval()
    fused = fuse_qk_norm_rope(WanDiT(TINY_DIT).cuda().to(torch.bfloat16).eval())
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(1, 16, 3, 8, 12, device="cuda", dtype=torch.bfloat16)
    t, ctx = torch.tensor([700.0], device="cuda"), torch.randn(1, 16, TINY_DIT.text_dim, device="cuda")
    with torch.no_grad():
        a, b = plain(x, t, ctx).float(), fused(x, t, ctx).float()
    assert ((b - a).norm() / a.norm()) < 1e-2
