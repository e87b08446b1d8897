"""Prompt (+ image) -> video: encode_prompt -> make_noise -> denoise -> decode, one screen each.

`Pipeline` keeps the models resident on one device so the CLI runs it once and the server many
times. Steps 1-4 use the rCM few-step sampler (TurboDiffusion); more steps use the teacher flow
matching sampler with classifier-free guidance against the Wan negative prompt.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from turbovid.attention import ATTENTION_KINDS
from turbovid.attention.sla import check_blocks
from turbovid.config import DEFAULT_MODEL, MODELS, RESOLUTIONS, WAN_NEGATIVE_PROMPT, ModelSpec, SampleConfig
from turbovid.loading import load_dit, load_text_encoder, load_vae
from turbovid.memory import MemoryPlan, activate_expert, plan_memory, prepare_stage, track_peak
from turbovid.models.dit import WanDiT
from turbovid.models.text_encoder import TextEncoder, Tokenizer, make_umt5
from turbovid.models.vae import WanVAE
from turbovid.sampling import (MID_ANGLES, cfg_velocity, check_mid_angles, euler_sample, expert_for_step, flow_times,
                               rcm_sample, rcm_times, unipc_sample)
from turbovid.speedups import QUANT_FORMATS, apply_speedups, set_sla_blocks
from turbovid.video import VideoWriter, image_to_tensor, tile_samples, to_uint8_frames

MAX_RCM_STEPS = 4
MAX_PROMPT_CHARS = 4000


@dataclass
class Video:
    frames: np.ndarray                 # uint8 [F, H, W, 3]; several samples side by side
    timings: dict[str, float]          # seconds per stage: text_encode, dit_step_<i>, vae_decode
    width: int
    height: int
    seed: int
    prompt: str
    untrained: bool = False
    peak_memory_gb: dict[str, float] = field(default_factory=dict)


ProgressFn = Callable[[str, int, int], None]   # (stage, done, total)


# ---- request checks: one-line ValueErrors before any work is done --------------------------------

def resolve_size(spec: ModelSpec, sample: SampleConfig, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) from the resolution/aspect table; adaptive mode keeps the table's pixel area
    with the input image's aspect ratio, rounded to multiples of 16 (SPEC §2.2.1)."""
    resolution = sample.resolution or spec.resolution
    aspect = sample.aspect_ratio or spec.aspect_ratio
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; choose one of {', '.join(RESOLUTIONS)}")
    if aspect not in RESOLUTIONS[resolution]:
        raise ValueError(f"unknown aspect ratio {aspect!r}; choose one of {', '.join(RESOLUTIONS[resolution])}")
    width, height = RESOLUTIONS[resolution][aspect]
    if sample.adaptive_resolution and image_size is not None:
        area = width * height
        ratio = image_size[1] / image_size[0]           # H_img / W_img
        # Python round() ties to even, as the official script.
        width = 16 * round(math.sqrt(area / ratio) / 16)
        height = 16 * round(math.sqrt(area * ratio) / 16)
    return width, height


def check_sample(spec: ModelSpec, sample: SampleConfig, has_image: bool) -> None:
    frames = sample.num_frames or spec.num_frames
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"--frames must be 4k+1 (1, 5, 9, ..., 81), got {frames}")
    if sample.steps < 1:
        raise ValueError(f"--steps must be 1-4 (rCM) or more (teacher sampler), got {sample.steps}")
    if sample.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {sample.num_samples}")
    if sample.sigma_max is not None and not sample.sigma_max >= 0.1:
        raise ValueError(f"--sigma-max must be >= 0.1, got {sample.sigma_max}")
    if sample.mid_angles is not None:
        check_mid_angles(sample.mid_angles)
        if sample.steps <= MAX_RCM_STEPS and len(sample.mid_angles) < sample.steps - 1:
            raise ValueError(f"{sample.steps} rCM steps need {sample.steps - 1} --mid-angles, "
                             f"got {list(sample.mid_angles)}")
    if sample.solver not in ("unipc", "euler"):
        raise ValueError(f"unknown solver {sample.solver!r}; choose unipc or euler")
    if spec.task == "i2v" and not has_image:
        raise ValueError(f"{spec.name} is an image-to-video model: give an --image")
    if spec.task == "t2v" and has_image:
        raise ValueError(f"{spec.name} is a text-to-video model: it takes no --image")
    resolve_size(spec, sample)


def check_prompt(prompt: str) -> str:
    if not prompt or not prompt.strip():
        raise ValueError("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}")
    return prompt


def byte_tokenizer() -> Tokenizer:
    """UTF-8 bytes as token ids 3..258 (0 pad, 1 EOS, 2 unknown): the tokenizer of untrained models,
    which ship no SentencePiece file."""
    return Tokenizer(lambda text: [3 + b for b in text.encode("utf-8")], pad_id=0, eos_id=1, vocab_size=259)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SHIPPED = {"dit": "dit.safetensors", "dit_int8": "dit_int8.safetensors", "dit_teacher": "dit_teacher.safetensors",
           "vae": "vae.safetensors", "text_encoder": "text_encoder.safetensors", "tokenizer": "spiece.model"}


def decode_to_frames(vae: WanVAE, latent: torch.Tensor, writer: VideoWriter | None = None,
                     **decode: object) -> np.ndarray:
    """VAE decode pass by pass (`WanVAE.decode_stream`, clamped) -> uint8 frames [F, H, B*W, 3], samples side by
    side; each pass's frames go to `writer` (the mp4 encoder thread) as soon as they exist."""
    chunks = []
    for video in vae.decode_stream(latent, clamp=True, **decode):
        chunks.append(to_uint8_frames(tile_samples(video)))
        if writer is not None:
            writer.append(chunks[-1])
    return np.concatenate(chunks)


def shipped_files(spec: ModelSpec) -> dict[str, str]:
    """Paths of the weights a model ships in turbovid/assets/<spec.assets>/ (`turbovid train ship` writes them)."""
    folder = Path(__file__).resolve().parent / "assets" / str(spec.assets)
    files = {role: folder / name for role, name in SHIPPED.items()}
    missing = [p.name for p in files.values() if not p.is_file()]
    if missing:
        raise ValueError(f"model {spec.name!r}: shipped weights missing from {folder}: {', '.join(missing)} "
                         "(reinstall turbovid, or give --dit/--vae/--text-encoder/--tokenizer)")
    return {role: str(p) for role, p in files.items()}


class Pipeline:
    def __init__(self, spec: ModelSpec, text_encoder: TextEncoder, vae: WanVAE, dit: WanDiT,
                 dit_low: WanDiT | None = None, device: str | torch.device = "cpu"):
        if spec.two_experts and dit_low is None:
            raise ValueError(f"{spec.name} needs two experts: give --dit (high noise) and --dit-low")
        self.spec, self.text_encoder, self.vae, self.dit, self.dit_low = spec, text_encoder, vae, dit, dit_low
        self.device = torch.device(device)
        # Memory plan (turbovid.memory): with a budget, models live on the CPU and each stage brings in
        # what it needs; without one, everything stays resident on `device`.
        self.max_memory: float | None = None
        self.quant, self.attention, self.topk, self.sla_blocks = False, "dense", spec.sla_topk, None
        self.reuse_text_encoder = False      # the server keeps the encoder between requests
        self._plan: MemoryPlan | None = None

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, *, dit: str | None = None, dit_low: str | None = None,
             vae: str | None = None, text_encoder: str | None = None, tokenizer: str | None = None,
             attention: str = "dense", topk: float | None = None, sla_blocks: tuple[int, int] | str | None = None,
             quant: bool = False, quant_format: str = "fast",
             fuse: bool | None = None, compile: bool = False, max_memory: float | None = None,
             device: str | None = None, dtype: torch.dtype | None = None, teacher: bool = False) -> "Pipeline":
        """Build a pipeline from checkpoint paths; a model marked `untrained` (the tiny configs) may
        omit them and then gets seeded random weights; a model that ships weights (`mini`) fills every
        path left out from turbovid/assets: the 4-step student (its config.json says which: merged rCM + SLA, the
        SLA-tuned rCM student or the rCM student; its INT8 file with `quant`), or with `teacher` the 50-step teacher.

        Accelerations (turbovid.speedups): `topk` is SLA's kept key-block ratio (default: the model's
        `sla_topk`: a shipped student's config.json value, else 0.1); `sla_blocks` fixes SLA's (b_q, b_k) on every
        device (default: the model's `sla_blocks`, the blocks a shipped student's SLA was tuned at; "auto", and the
        default of a model without them: TurboDiffusion's per-GPU choice); `quant` makes the block linears W8A8
        INT8 — `quant_format` "fast" (per-channel weights, per-token activations; TurboDiffusion -quant files are
        converted) or "td" (TurboDiffusion's exact 128x128-tile format); `fuse` (default: on CUDA) fuses norm +
        modulation (+ INT8 emit) and GEMM epilogues; `compile` compiles the blocks. Text K/V caching
        across steps is always on: it is exact. `max_memory` (GB) keeps the models on the CPU and moves
        them to the GPU stage by stage as turbovid.memory's plan says."""
        if model not in MODELS:
            raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention {attention!r}; choose one of {', '.join(ATTENTION_KINDS)}")
        if quant_format not in QUANT_FORMATS:
            raise ValueError(f"unknown --quant-format {quant_format!r}; choose one of {', '.join(QUANT_FORMATS)}")
        spec = MODELS[model]
        topk = spec.sla_topk if topk is None else topk
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"--topk must be in (0, 1], got {topk}")
        # None: the model's tuned blocks if it has them, else "auto" (TurboDiffusion's per-device choice)
        sla_blocks = spec.sla_blocks if sla_blocks is None else sla_blocks
        sla_blocks = None if sla_blocks in (None, "auto") else check_blocks(sla_blocks)
        if spec.assets:
            files = shipped_files(spec)
            role = "dit_teacher" if teacher else ("dit_int8" if quant and quant_format == "fast" else "dit")
            dit, vae = dit or files[role], vae or files["vae"]
            text_encoder, tokenizer = text_encoder or files["text_encoder"], tokenizer or files["tokenizer"]
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # bf16 is the official inference dtype; on CPU fp32 is faster and as exact.
        dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
        fuse = dev.type == "cuda" if fuse is None else fuse
        planned = max_memory is not None and dev.type == "cuda"
        home = torch.device("cpu") if planned else dev   # where the weights wait between stages
        missing = [flag for flag, path in (("--dit", dit), ("--vae", vae), ("--text-encoder", text_encoder),
                                           ("--tokenizer", tokenizer)) if path is None]
        if spec.two_experts and dit_low is None:
            missing.append("--dit-low")
        if missing and not spec.untrained:
            raise ValueError(f"{spec.name} needs checkpoint paths: {' '.join(missing)}")

        def make_dit(path: str | None, seed: int) -> WanDiT:
            if path is not None:
                net = load_dit(path, spec.dit, attention=attention, topk=topk, device=home, dtype=dtype)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    net = WanDiT(spec.dit, attention=attention, topk=topk)
                net = net.to(device=home, dtype=dtype)
            quantized_file = any(n.endswith("int8_weight") for n, _ in net.named_buffers())
            apply_speedups(net, quant=quant_format if (quant or quantized_file) else None, fuse_norms=fuse,
                           cache_text_kv=True, compile=compile)
            set_sla_blocks(net, sla_blocks)
            return net.eval().requires_grad_(False)

        if vae is not None:
            vae_net = load_vae(vae, spec.vae, device=home, dtype=dtype)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                vae_net = WanVAE(spec.vae).to(device=home, dtype=dtype)
        if text_encoder is not None:
            encoder = load_text_encoder(text_encoder, tokenizer, spec.text, device=home, dtype=dtype)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(2)
                encoder = TextEncoder(make_umt5(spec.text).to(home, dtype), byte_tokenizer(), spec.text.text_len)
        high = make_dit(dit, seed=3)
        low = make_dit(dit_low, seed=4) if spec.two_experts else None
        pipe = cls(spec, encoder, vae_net.eval().requires_grad_(False), high, low, device=dev)
        pipe.max_memory, pipe.quant, pipe.attention = (max_memory if planned else None), quant, attention
        pipe.topk, pipe.sla_blocks = topk, sla_blocks
        return pipe

    @property
    def dtype(self) -> torch.dtype:
        return next(self.dit.parameters()).dtype

    # -- the steps ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """[B, text_len, text_dim] umT5 embedding, padded rows zeroed."""
        return self.text_encoder.encode(prompts).to(self.device, self.dtype)

    def latent_shape(self, num_samples: int, frames: int, width: int, height: int) -> tuple[int, ...]:
        s, t = self.spec.vae.spatial_factor, self.spec.vae.temporal_factor
        return (num_samples, self.spec.vae.z_dim, (frames - 1) // t + 1, height // s, width // s)

    @torch.no_grad()
    def image_condition(self, image, frames: int, width: int, height: int, num_samples: int) -> torch.Tensor:
        """y = [mask(4) ; image latent(16)] on the latent grid (SPEC §2.2): the picture as frame 0
        followed by black frames, VAE-encoded; the mask is 1 on latent frame 0 only."""
        pixels = image_to_tensor(image, width, height)                      # [3, h, w]
        clip = torch.zeros(1, 3, frames, height, width)
        clip[0, :, 0] = pixels
        latent = self.vae.encode(clip.to(self.device, self.dtype))        # [1, 16, T, h/8, w/8]
        mask = torch.zeros(1, 4, *latent.shape[2:], device=self.device, dtype=latent.dtype)
        mask[:, :, 0] = 1
        y = torch.cat([mask, latent], dim=1).to(self.dtype)
        return y.expand(num_samples, -1, -1, -1, -1)

    def _net_for(self, s_cur: float) -> WanDiT:
        net = self.dit if self.dit_low is None or expert_for_step(s_cur, self.spec.boundary) == "high" else self.dit_low
        return activate_expert(self, self._plan, net) if self._plan else net

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, context: torch.Tensor, sample: SampleConfig,
                generator: torch.Generator, y: torch.Tensor | None = None, negative: torch.Tensor | None = None,
                step_times: list[float] | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
        """Noise [B, 16, T, h, w] -> clean latent (fp32). rCM for 1-4 steps, teacher sampler otherwise."""
        step_times = [] if step_times is None else step_times
        n = sample.steps

        def timed(fn):
            def wrapped(*args):
                _sync(self.device)
                t0 = time.perf_counter()
                out = fn(*args)
                _sync(self.device)
                step_times.append(time.perf_counter() - t0)
                if progress:
                    progress("denoise", len(step_times), n)
                return out
            return wrapped

        if n <= MAX_RCM_STEPS:
            @timed
            def velocity(x, t_net, step, s_cur):
                return self._net_for(s_cur)(x.to(self.dtype), t_net, context, y=y)
            sigma_max = sample.sigma_max or self.spec.sigma_max
            times = rcm_times(n, sigma_max, sample.mid_angles or MID_ANGLES)
            return rcm_sample(velocity, noise, times, generator, ode=sample.ode)

        # Teacher: CFG as one batch of [cond ; uncond].
        ctx2 = torch.cat([context, negative.expand_as(context)])
        y2 = None if y is None else torch.cat([y, y])

        @timed
        def guided(x, t_net, step, s_cur):
            x2 = torch.cat([x, x]).to(self.dtype)
            v = self._net_for(s_cur)(x2, torch.cat([t_net, t_net]), ctx2, y=y2)
            v_cond, v_uncond = v.chunk(2)
            return cfg_velocity(v_cond, v_uncond, sample.guidance)
        times = flow_times(n, sample.shift)
        solve = unipc_sample if sample.solver == "unipc" else euler_sample
        return solve(guided, noise, times)

    def decode_frames(self, latent: torch.Tensor, writer: VideoWriter | None = None) -> np.ndarray:
        """Latent [B, 16, T, h, w] -> uint8 frames [F, H, B*W, 3] (samples side by side). With `writer` each
        decoder pass's frames go to the mp4 encoder thread as soon as they exist, so encoding overlaps decoding."""
        plan = self._plan
        tiling = dict(chunk=plan.vae_chunk, tile=plan.vae_tile, overlap=plan.vae_overlap) if plan else {}
        # The fast decoder, channels-last, on every device (the VAE's own CPU default is TurboDiffusion's
        # frame-by-frame path; the fast one is 3.4x quicker for the mini model on a 2-core CPU).
        return decode_to_frames(self.vae, latent.to(self.dtype), writer, fast=True, channels_last=True, **tiling)

    # -- the whole job -----------------------------------------------------------------------------

    @contextmanager
    def _stage(self, name: str, timings: dict[str, float], peaks: dict[str, float]):
        """Time a stage (seconds, GPU work included) and record its peak GPU memory (GB)."""
        if self._plan:
            prepare_stage(self, self._plan, name)
        with track_peak(peaks, name, self.device):
            _sync(self.device)
            t0 = time.perf_counter()
            yield
            _sync(self.device)
            timings[name] = time.perf_counter() - t0

    def generate(self, prompt: str, sample: SampleConfig = SampleConfig(), image=None,
                 progress: ProgressFn | None = None, writer: VideoWriter | None = None) -> Video:
        """One video. `writer` (a turbovid.video.VideoWriter) receives the frames while the VAE decodes; the
        caller closes it (`with VideoWriter(path) as w: pipe.generate(..., writer=w)`)."""
        check_prompt(prompt)
        check_sample(self.spec, sample, image is not None)
        frames = sample.num_frames or self.spec.num_frames
        width, height = resolve_size(self.spec, sample, image.size if image is not None else None)
        timings: dict[str, float] = {}
        peaks: dict[str, float] = {}
        self._plan = None if self.max_memory is None else plan_memory(
            self.spec, width, height, frames, quant=self.quant, attention=self.attention, budget_gb=self.max_memory,
            num_samples=sample.num_samples, cfg=sample.steps > MAX_RCM_STEPS, reuse_text_encoder=self.reuse_text_encoder)

        if progress:
            progress("text_encode", 0, 1)
        with self._stage("text_encode", timings, peaks):
            context = self.encode_prompt([prompt])
            negative = self.encode_prompt([WAN_NEGATIVE_PROMPT]) if sample.steps > MAX_RCM_STEPS else None

        y = None
        if image is not None:
            with self._stage("image_encode", timings, peaks):
                y = self.image_condition(image, frames, width, height, sample.num_samples)

        # RNG order (SPEC §5.1.3): one generator, initial noise first, then one draw per step.
        generator = torch.Generator(self.device).manual_seed(sample.seed)
        shape = self.latent_shape(sample.num_samples, frames, width, height)
        noise = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)
        context = context.expand(sample.num_samples, -1, -1)
        step_times: list[float] = []
        if self._plan:
            prepare_stage(self, self._plan, "denoise")
        with track_peak(peaks, "denoise", self.device):
            latent = self.denoise(noise, context, sample, generator, y=y, negative=negative,
                                  step_times=step_times, progress=progress)
        for i, t in enumerate(step_times):
            timings[f"dit_step_{i + 1}"] = t

        if progress:
            progress("vae_decode", 0, 1)
        with self._stage("vae_decode", timings, peaks):
            frames_u8 = self.decode_frames(latent, writer)
        return Video(frames_u8, timings, width, height, sample.seed, prompt, untrained=self.spec.untrained,
                     peak_memory_gb=peaks)
