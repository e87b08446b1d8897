"""`turbovid serve`: the HTTP API + web page, or with --tui the interactive terminal mode."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from turbovid.config import MODELS, RESOLUTIONS, SampleConfig


def add_serve_parser(subparsers, add_model_args) -> None:
    p = subparsers.add_parser("serve", help="HTTP API and web page (or --tui: interactive terminal)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--output-dir", default="outputs/serve", help="where videos are written (default outputs/serve)")
    g.add_argument("--token", default=os.environ.get("TURBOVID_TOKEN"),
                   help="bearer token every /v1 route and /metrics require (default: $TURBOVID_TOKEN, else none)")
    g.add_argument("--max-queue", type=int, default=16, help="waiting jobs before new ones get 429 (default 16)")
    g.add_argument("--max-history", type=int, default=200, help="jobs remembered (default 200)")
    g.add_argument("--allow-teacher", action="store_true", help="accept steps > 4 (slow teacher sampler)")
    g.add_argument("--tui", action="store_true", help="interactive terminal mode instead of HTTP")
    d = p.add_argument_group("generation defaults (HTTP: for fields a request leaves out; TUI: launch values)")
    d.add_argument("--steps", type=int, default=4, help="1-4 (default 4)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--resolution", help=f"one of {', '.join(RESOLUTIONS)} (default: the model's)")
    d.add_argument("--aspect-ratio", help="W:H (default: the model's)")
    d.add_argument("--frames", type=int, help="4k+1 (default: the model's)")
    d.add_argument("--num-samples", type=int, default=1)
    d.add_argument("--sigma-max", type=float, help="initial rCM sigma (default: 80 t2v, 200 i2v)")
    d.add_argument("--ode", action="store_true")
    d.add_argument("--adaptive-resolution", action="store_true", help="I2V: keep the image's aspect ratio")
    d.add_argument("--image", help="TUI, I2V: the default first-frame image")
    add_model_args(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from turbovid.cli import sla_blocks_arg
    from turbovid.pipeline import Pipeline, check_sample
    from turbovid.serve.jobs import explicit_sample
    from turbovid.video import require_backend

    if args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[args.model]
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0-65535, got {args.port}")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    if args.max_history <= args.max_queue:
        raise ValueError(f"--max-history ({args.max_history}) must be larger than --max-queue ({args.max_queue})")
    if args.token is not None and len(args.token) < 8:
        raise ValueError("--token must be at least 8 characters")
    if args.tui and not 1 <= args.steps <= 4:
        raise ValueError(f"--steps must be 1-4 in the terminal mode, got {args.steps}")
    defaults = SampleConfig(steps=args.steps, seed=args.seed, resolution=args.resolution,
                            aspect_ratio=args.aspect_ratio, num_frames=args.frames, num_samples=args.num_samples,
                            sigma_max=args.sigma_max, ode=args.ode, adaptive_resolution=args.adaptive_resolution)
    check_sample(spec, defaults, has_image=spec.task == "i2v")
    if args.steps > 4 and not args.allow_teacher:
        raise ValueError("--steps above 4 needs --allow-teacher")
    require_backend("ffmpeg")   # every job writes an mp4: refuse to start, not fail each job

    print(f"loading {spec.name} ...", file=sys.stderr, flush=True)
    pipe = Pipeline.load(args.model, dit=args.dit, dit_low=args.dit_low, vae=args.vae,
                         text_encoder=args.text_encoder, tokenizer=args.tokenizer, attention=args.attention,
                         topk=args.topk, sla_blocks=sla_blocks_arg(args), quant=args.quant,
                         quant_format=args.quant_format,
                         fuse=False if args.no_fuse else None, compile=args.compile, max_memory=args.max_memory,
                         device=args.device)
    pipe.reuse_text_encoder = True   # resident model: the memory plan may park the encoder on the CPU, never free it
    if spec.untrained and not args.dit and not args.tui:
        print(f"note: model {spec.name!r} has random, UNTRAINED weights — videos show noise-like patterns, "
              "not the prompt", file=sys.stderr)
    if args.tui:
        from turbovid.serve.tui import run_tui
        info = {"model": spec.name, "task": spec.task, "attention": args.attention, "topk": pipe.topk,
                "quant": args.quant, "device": str(pipe.device)}
        return run_tui(pipe, explicit_sample(defaults, spec), info, image=args.image)

    import uvicorn

    from turbovid.serve.app import create_app

    loopback = _is_loopback(args.host)
    if not loopback and args.token is None:
        print(f"warning: serving on {args.host} without --token: anyone who can reach this port can "
              "run jobs", file=sys.stderr)
    app = create_app(pipe, args.output_dir, token=args.token, max_queue=args.max_queue,
                     max_history=args.max_history, allow_teacher=args.allow_teacher, defaults=defaults,
                     allowed_hosts=["127.0.0.1", "localhost", "[::1]"] if loopback else None)
    print(f"turbovid: http://{args.host}:{args.port}/  (videos in {args.output_dir})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
