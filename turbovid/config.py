"""Model and sampling configurations: frozen dataclasses in plain dicts.

Official checkpoint/model names are our names ("Wan2.1-1.3B", ...). Every family has a `tiny`
entry so that each model test runs in seconds on a CPU.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Wan2.1 VAE latent normalisation (SPEC §3.2). TurboDiffusion builds these in bf16, so the
# effective values are the bf16-rounded ones; the VAE module rounds them itself.
WAN_VAE_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN_VAE_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

# Default Wan negative prompt (SPEC §4.4), used as the unconditional branch of teacher CFG.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 16            # 16 for t2v, 36 (= 16 noise + 4 mask + 16 image latent) for Wan2.2 i2v
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    image_dim: int | None = None  # Wan2.1 i2v CLIP token width (1280) -> img_emb, k_img/v_img; None otherwise

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    mean: tuple[float, ...] = WAN_VAE_MEAN
    std: tuple[float, ...] = WAN_VAE_STD

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5 encoder (transformers `UMT5Config` fields)."""
    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    text_len: int = 512


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: str                              # "t2v" | "i2v"
    dit: DiTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    two_experts: bool = False              # Wan2.2 A14B: high-noise + low-noise DiT
    boundary: float = 0.9                  # RF time at which the low-noise expert takes over
    sigma_max: float = 80.0                # rCM default initial sigma (SPEC §5.1: t2v 80, i2v 200)
    resolution: str = "480p"
    aspect_ratio: str = "16:9"
    num_frames: int = 81
    untrained: bool = False                # random weights: say so whenever a video is written
    assets: str | None = None              # shipped weights: folder under turbovid/assets (pipeline.shipped_files)
    sla_topk: float = 0.1                  # default SLA key-block ratio: TurboDiffusion's --sla_topk, or a shipped
                                           # student's config.json sla_topk (`turbovid train ship`)
    sla_blocks: tuple[int, int] | None = None  # SLA / SageSLA (b_q, b_k) on every device by default: a shipped
                                           # student's config.json sla_blocks, the blocks its SLA was tuned at; None:
                                           # TurboDiffusion's per-GPU choice (attention/sla.py default_block_sizes)


WAN21_1P3B = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
WAN21_14B = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
WAN22_A14B_I2V = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36)
WAN22_A14B_T2V = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)

# Tiny configs: same code paths, widths small enough for CPU tests. head_dim 64 is the smallest
# head the attention kernels support, so the tiny model can run every --attention mode.
TINY_DIT = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, text_dim=32, text_len=16, freq_dim=32)
TINY_DIT_I2V = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=36, text_dim=32,
                         text_len=16, freq_dim=32)
TINY_VAE = VAEConfig(dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1)
TINY_TEXT = TextEncoderConfig(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                              text_len=16)

def _shipped_config(folder: str) -> dict:
    """The config.json `turbovid train ship` wrote beside a shipped model's weights (the one copy of its measured
    latent statistics and its SLA top-k); {} if the folder is absent (then loading its weights fails anyway, with
    a clear error from pipeline.shipped_files)."""
    path = Path(__file__).resolve().parent / "assets" / folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _shipped_latent_stats(config: dict) -> dict[str, tuple[float, ...]]:
    """{"mean", "std"} of a shipped model's VAE latents; identity without a config."""
    stats = config.get("vae_latent_stats", {"mean": (0.0,) * 16, "std": (1.0,) * 16})
    return {"mean": tuple(stats["mean"]), "std": tuple(stats["std"])}


_MINI_SHIPPED = _shipped_config("mini")


# The embedded model "mini" (trained here: turbovid/train, recipe "mini"; weights in turbovid/assets/mini):
# Wan2.1 architecture at 240x240x33 frames -> latent 9 x 30 x 30 -> 2025 DiT tokens. DiT 3.5M parameters,
# VAE dim 16 (2.6M), umT5 2 layers of 256 over a 512-piece caption SentencePiece. The VAE's latent
# mean/std are the ones measured after its training, read from turbovid/assets/mini/config.json.
MINI_DIT = DiTConfig(dim=192, ffn_dim=576, num_heads=3, num_layers=6, text_dim=256, text_len=32)
MINI_TEXT = TextEncoderConfig(vocab_size=512, d_model=256, d_kv=32, d_ff=512, num_layers=2, num_heads=8,
                              text_len=32)
MINI_VAE = VAEConfig(dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1, **_shipped_latent_stats(_MINI_SHIPPED))

MODELS: dict[str, ModelSpec] = {
    "Wan2.1-1.3B": ModelSpec("Wan2.1-1.3B", "t2v", WAN21_1P3B),
    "Wan2.1-14B": ModelSpec("Wan2.1-14B", "t2v", WAN21_14B, resolution="720p"),
    "Wan2.2-A14B": ModelSpec("Wan2.2-A14B", "i2v", WAN22_A14B_I2V, two_experts=True, boundary=0.9,
                             sigma_max=200.0, resolution="720p"),
    "Wan2.2-T2V-A14B": ModelSpec("Wan2.2-T2V-A14B", "t2v", WAN22_A14B_T2V, two_experts=True,
                                 boundary=0.875, resolution="720p"),
    "mini": ModelSpec("mini", "t2v", MINI_DIT, MINI_VAE, MINI_TEXT, resolution="240p", aspect_ratio="1:1",
                      num_frames=33, assets="mini", sla_topk=_MINI_SHIPPED.get("sla_topk", 0.1),
                      sla_blocks=tuple(_MINI_SHIPPED["sla_blocks"]) if "sla_blocks" in _MINI_SHIPPED else None),
    "tiny": ModelSpec("tiny", "t2v", TINY_DIT, TINY_VAE, TINY_TEXT, resolution="128p",
                      num_frames=9, untrained=True),
    "tiny-i2v": ModelSpec("tiny-i2v", "i2v", TINY_DIT_I2V, TINY_VAE, TINY_TEXT, two_experts=True,
                          sigma_max=200.0, resolution="128p", num_frames=9, untrained=True),
}
DEFAULT_MODEL = "mini"

# (width, height) per resolution and aspect ratio W:H (SPEC §11.3), plus small sizes of our own
# for CPU models ("128p", "240p"). Every size is a multiple of 16 (VAE 8x * patch 2x).
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"1:1": (640, 640), "4:3": (640, 480), "3:4": (480, 640), "16:9": (832, 480), "9:16": (480, 832)},
    "720p": {"1:1": (960, 960), "4:3": (960, 720), "3:4": (720, 960), "16:9": (1280, 720), "9:16": (720, 1280)},
    "480": {"1:1": (480, 480), "4:3": (640, 480), "3:4": (480, 640), "16:9": (768, 432), "9:16": (432, 768)},
    "512": {"1:1": (512, 512), "4:3": (640, 512), "3:4": (512, 640), "16:9": (640, 384), "9:16": (384, 640)},
    "720": {"1:1": (960, 960), "4:3": (960, 704), "3:4": (704, 960), "16:9": (1280, 704), "9:16": (704, 1280)},
    "240p": {"1:1": (240, 240), "4:3": (320, 240), "3:4": (240, 320), "16:9": (416, 240), "9:16": (240, 416)},
    "128p": {"1:1": (128, 128), "4:3": (176, 128), "3:4": (128, 176), "16:9": (224, 128), "9:16": (128, 224)},
}
FPS = 16
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
DEFAULT_PRESET = "veryfast"   # the mp4's x264 preset (turbovid.video.VideoWriter measures it against "medium")


def parse_floats(text: str, flag: str, count: int | None = None, example: str = "1.5,1.4,1.0") -> tuple[float, ...]:
    """A command line's comma-separated numbers ("1.3, 1.0,0.6" -> (1.3, 1.0, 0.6)); `count`, when given, how many."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count):
        raise ValueError(f"{flag} takes {'' if count is None else f'{count} '}comma-separated numbers such as "
                         f"{example}, got {text!r}")
    return values


@dataclass(frozen=True)
class SampleConfig:
    """What one generate() call does. Model-side accelerations (attention kind, top-k, W8A8) are
    chosen when the pipeline is loaded, because they change the modules."""
    steps: int = 4                   # 1-4: rCM few-step sampler; >4: teacher flow matching
    sigma_max: float | None = None   # None -> the model's default
    mid_angles: tuple[float, ...] | None = None   # the rCM sampler's middle TrigFlow angles; None -> rCM's
    ode: bool = False
    seed: int = 0
    num_samples: int = 1
    num_frames: int | None = None
    resolution: str | None = None
    aspect_ratio: str | None = None
    adaptive_resolution: bool = False
    # teacher sampler
    solver: str = "unipc"            # unipc | euler
    shift: float = 5.0
    guidance: float = 5.0
