"""The one command line: `turbovid generate | quantize | serve | train`.

Bad input gets one line on stderr and exit code 2 — never a traceback, never a partial file.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from turbovid.config import DEFAULT_MODEL, DEFAULT_PRESET, MODELS, RESOLUTIONS, SampleConfig

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the user's input; printed as one line."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and checkpoints")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"model family ({', '.join(MODELS)}); default {DEFAULT_MODEL}")
    g.add_argument("--dit", help="DiT checkpoint (TurboWan .pth, -quant .pth, official Wan or diffusers); "
                                 "the high-noise expert for Wan2.2")
    g.add_argument("--dit-low", help="Wan2.2 low-noise expert checkpoint")
    g.add_argument("--vae", help="Wan2.1 VAE checkpoint (Wan2.1_VAE.pth or a diffusers folder)")
    g.add_argument("--text-encoder", help="umT5 encoder (models_t5_umt5-xxl-enc-bf16.pth or an HF folder)")
    g.add_argument("--tokenizer", help="umT5 tokenizer folder or spiece.model")
    g.add_argument("--attention", default="dense", help="dense | sage | sla | sagesla (default dense)")
    g.add_argument("--topk", type=float, help="SLA key-block ratio kept per query block (default: the shipped "
                   "model's, 0.75 for mini; else 0.1)")
    g.add_argument("--sla-blocks", metavar="BQxBK", help="SLA / SageSLA query x key block sizes, 64 or 128 each, "
                   "e.g. 128x64, or auto: TurboDiffusion's per GPU (SageSLA 64x128 on H100/H200, 128x64 elsewhere). "
                   "Default: the shipped model's tuned blocks (128x64 for mini), else auto")
    g.add_argument("--quant", action="store_true", help="W8A8 INT8 block linears (loads -quant files, "
                                                        "quantizes bf16 ones on the fly)")
    g.add_argument("--quant-format", default="fast", help="fast: per-channel/per-token INT8 (default; -quant "
                                                          "files are converted); td: TurboDiffusion's exact format")
    g.add_argument("--no-fuse", action="store_true", help="keep plain PyTorch norms (fused kernels are the "
                                                          "default on CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (first video compiles)")
    g.add_argument("--max-memory", type=float, metavar="GB", help="GPU memory budget: models wait on the CPU and "
                   "come in stage by stage (text encoder freed, experts swapped, blocks streamed, VAE tiled as needed)")
    g.add_argument("--device", help="cuda | cpu (default: cuda if available)")


def sla_blocks_arg(args: argparse.Namespace) -> tuple[int, int] | str | None:
    """--sla-blocks "128x64" -> (128, 64), "auto" -> "auto" (TurboDiffusion's per-GPU sizes); None when not given
    (the model's default)."""
    from turbovid.attention.sla import parse_blocks
    return parse_blocks(args.sla_blocks) if getattr(args, "sla_blocks", None) else None


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="text/image -> mp4")
    p.add_argument("--prompt", required=True, help="what the video shows")
    p.add_argument("--output", required=True, help="output .mp4 path")
    p.add_argument("--image", help="first frame for image-to-video models")
    p.add_argument("--steps", type=int, default=4, help="1-4: rCM few-step sampler; >4: teacher sampler with CFG")
    p.add_argument("--sigma-max", type=float, help="initial sigma for rCM (default: 80 t2v, 200 i2v)")
    p.add_argument("--mid-angles", help="rCM: the TrigFlow angles between sigma-max and 0, e.g. 1.5,1.4,1.0 "
                                        "(the default, rCM's)")
    p.add_argument("--resolution", help=f"one of {', '.join(RESOLUTIONS)} (default: the model's)")
    p.add_argument("--aspect-ratio", help="W:H, e.g. 16:9, 9:16, 1:1, 4:3, 3:4")
    p.add_argument("--adaptive-resolution", action="store_true", help="I2V: keep the image's aspect ratio")
    p.add_argument("--frames", type=int, help="pixel frames, 4k+1 (default: the model's, 81 for Wan)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="videos side by side in one file")
    p.add_argument("--ode", action="store_true", help="deterministic Euler ODE steps instead of SDE re-noising")
    p.add_argument("--solver", default="unipc", help="teacher sampler: unipc | euler")
    p.add_argument("--shift", type=float, default=5.0, help="teacher sampler flow shift")
    p.add_argument("--guidance", type=float, default=5.0, help="teacher sampler CFG scale")
    p.add_argument("--preset", default=DEFAULT_PRESET, help="x264 preset of the mp4: ultrafast .. veryslow (default "
                   f"{DEFAULT_PRESET}; slower presets write smaller files of the same quality)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_model_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbovid", description="Fast Wan video generation (TurboDiffusion method).")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    from turbovid.serve.cli import add_serve_parser
    add_serve_parser(sub, _add_model_args)
    from turbovid.quantize import add_quantize_parser
    add_quantize_parser(sub)
    from turbovid.train.cli import add_train_parser
    add_train_parser(sub)
    from turbovid.eval import add_eval_parser
    add_eval_parser(sub)
    return parser


def _check_output(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"--output must end in .mp4, got {path!r}")
    if out.is_dir():
        raise UsageError(f"--output {path!r} is a folder")
    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot create {path!r}: {existing} is not a folder")
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from turbovid.pipeline import MAX_RCM_STEPS, Pipeline, check_prompt, check_sample
    from turbovid.sampling import parse_mid_angles
    from turbovid.video import VideoWriter, check_preset, read_image, require_backend

    out = _check_output(args.output)
    check_preset(args.preset, "--preset")   # before any model loads
    if args.model not in MODELS:
        raise UsageError(f"unknown model {args.model!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[args.model]
    sample = SampleConfig(steps=args.steps, sigma_max=args.sigma_max, mid_angles=parse_mid_angles(args.mid_angles),
                          ode=args.ode, seed=args.seed, num_samples=args.num_samples, num_frames=args.frames,
                          resolution=args.resolution, aspect_ratio=args.aspect_ratio,
                          adaptive_resolution=args.adaptive_resolution,
                          solver=args.solver, shift=args.shift, guidance=args.guidance)
    # Everything the user typed is checked before any model is loaded.
    check_prompt(args.prompt)
    image = read_image(args.image) if args.image else None
    check_sample(spec, sample, image is not None)
    if args.max_memory is not None:   # pure arithmetic: a budget that cannot fit fails before any loading
        from turbovid.memory import plan_memory
        from turbovid.pipeline import resolve_size
        width, height = resolve_size(spec, sample)
        plan = plan_memory(spec, width, height, sample.num_frames or spec.num_frames, quant=args.quant,
                           attention=args.attention, budget_gb=args.max_memory, num_samples=sample.num_samples,
                           cfg=sample.steps > MAX_RCM_STEPS)
        print(plan.summary(), file=sys.stderr)
    if args.device and args.device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {args.device!r}; use cpu or cuda")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is visible")

    require_backend("ffmpeg")   # before the model loads: the mp4 is the last thing written
    pipe = Pipeline.load(args.model, dit=args.dit, dit_low=args.dit_low, vae=args.vae,
                         text_encoder=args.text_encoder, tokenizer=args.tokenizer, attention=args.attention,
                         topk=args.topk, sla_blocks=sla_blocks_arg(args), quant=args.quant,
                         quant_format=args.quant_format,
                         fuse=False if args.no_fuse else None, compile=args.compile, max_memory=args.max_memory,
                         device=args.device, teacher=args.steps > MAX_RCM_STEPS)
    if spec.untrained and not args.dit:
        print(f"note: model {spec.name!r} has random, UNTRAINED weights — the video shows noise-like "
              "patterns, not the prompt", file=sys.stderr)

    bar = None

    def progress(stage: str, done: int, total: int) -> None:
        nonlocal bar
        if args.quiet or stage != "denoise":
            return
        if bar is None:
            bar = tqdm(total=total, desc="denoise", unit="step", file=sys.stderr)
        bar.update(done - bar.n)

    # The mp4 is encoded by a thread while the VAE decodes; "write" is what is left of it after the decode.
    with VideoWriter(out, preset=args.preset) as writer:
        video = pipe.generate(args.prompt, sample, image=image, progress=progress, writer=writer)
        if bar is not None:
            bar.close()
        t0 = time.perf_counter()
    video.timings["write"] = time.perf_counter() - t0

    total = sum(video.timings.values())
    print(f"wrote {out} ({video.frames.shape[0]} frames, {video.frames.shape[2]}x{video.frames.shape[1]}, 16 fps)")
    for name, seconds in video.timings.items():
        print(f"  {name:<14}{seconds:9.3f} s")
    print(f"  {'total':<14}{total:9.3f} s")
    if video.peak_memory_gb:
        print("peak GPU memory: " + ", ".join(f"{k} {v:.2f} GB" for k, v in video.peak_memory_gb.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    import torch

    from turbovid.loading import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return cmd_generate(args)
        if args.command == "train":
            from turbovid.train.cli import cmd_train
            return cmd_train(args)
        if args.command == "eval":
            from turbovid.eval import cmd_eval
            return cmd_eval(args)
        if args.command == "quantize":
            from turbovid.quantize import cmd_quantize
            return cmd_quantize(args)
        if args.command == "serve":
            from turbovid.serve.cli import cmd_serve
            return cmd_serve(args)
        raise UsageError(f"unknown command {args.command!r}")
    except (UsageError, ValueError, CheckpointError) as e:
        print(f"turbovid: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as e:   # a missing third-party dependency (e.g. ftfy for prompt cleaning)
        if (e.name or "").split(".")[0] == "turbovid":
            raise                          # our own broken import is a bug: keep its traceback
        print(f"turbovid: error: {e}", file=sys.stderr)
        return 1
    except (MemoryError, torch.OutOfMemoryError) as e:
        print(f"turbovid: error: out of memory ({str(e).splitlines()[0][:200]}); try --quant, a lower "
              "--resolution or fewer --frames", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("turbovid: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
