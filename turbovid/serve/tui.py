"""Interactive terminal mode (SPEC §9): the models stay loaded; each prompt makes one video.

Plain input(), so a script can drive it through stdin. Launch settings (model, resolution, seed,
...) are fixed; steps, num_samples, frames and sigma_max change with /set. The seed is the same
for every generation, so the same prompt and settings give the same video.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable

from turbovid.config import SampleConfig
from turbovid.pipeline import MAX_RCM_STEPS
from turbovid.video import VideoWriter, read_image

DEFAULT_OUTPUT = "output/generated_video.mp4"
# /set name -> SampleConfig field; num_steps and num_frames are the official server's names.
SETTABLE = {"steps": "steps", "num_steps": "steps", "num_samples": "num_samples", "frames": "num_frames",
            "num_frames": "num_frames", "sigma_max": "sigma_max"}
HELP = f"""Type a prompt and press Enter (end a line with \\ to continue on the next one).
Commands:
  /help                 this text
  /show                 launch and runtime settings (* = changed with /set)
  /set <param> <value>  steps 1-{MAX_RCM_STEPS} | num_samples >= 1 | frames 4k+1 | sigma_max >= 0.1
  /reset                runtime settings back to the launch values
  /quit                 leave (Ctrl-D works too)"""


def parse_setting(name: str, text: str) -> tuple[str, int | float]:
    """('steps', '2') -> ('steps', 2); a one-line ValueError for anything out of range."""
    if name not in SETTABLE:
        raise ValueError(f"unknown parameter {name!r}; settable: steps, num_samples, frames, sigma_max")
    field = SETTABLE[name]
    try:
        value = float(text) if field == "sigma_max" else int(text)
    except ValueError:
        kind = "a number" if field == "sigma_max" else "an integer"
        raise ValueError(f"{name} must be {kind}, got {text!r}") from None
    if field == "steps" and not 1 <= value <= MAX_RCM_STEPS:
        raise ValueError(f"steps must be 1-{MAX_RCM_STEPS}, got {value}")
    if field == "num_samples" and value < 1:
        raise ValueError(f"num_samples must be >= 1, got {value}")
    if field == "num_frames" and (value < 1 or (value - 1) % 4):
        raise ValueError(f"frames must be 4k+1 (1, 5, 9, ..., 81), got {value}")
    if field == "sigma_max" and not (math.isfinite(value) and value >= 0.1):
        raise ValueError(f"sigma_max must be >= 0.1, got {text}")
    return field, value


def run_tui(pipe, launch: SampleConfig, launch_info: dict[str, object], *, image: str | None = None,
            output: str = DEFAULT_OUTPUT, read: Callable[[str], str] = input, out=None) -> int:
    """`launch` must be explicit (resolution, frames, sigma_max filled in); `launch_info` lists the
    other launch-only settings for /show (model, attention, ...)."""
    def say(*parts: object) -> None:
        print(*parts, file=out or sys.stdout, flush=True)

    spec = pipe.spec
    runtime = launch
    last_image, last_output = image, output
    say(f"turbovid interactive mode: model {spec.name} ({spec.task}), loaded. /help lists the commands.")
    if spec.untrained:
        say(f"note: model {spec.name!r} has random, UNTRAINED weights — videos show noise-like patterns")

    def read_prompt() -> str:
        lines = [read("prompt> ")]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(read("...> "))
        return "\n".join(lines)

    def show() -> None:
        say("launch (fixed):")
        for key, value in {**launch_info, "resolution": launch.resolution, "aspect_ratio": launch.aspect_ratio,
                           "seed": launch.seed, "ode": launch.ode,
                           "adaptive_resolution": launch.adaptive_resolution}.items():
            say(f"  {key:<20}{value}")
        say("runtime (/set):")
        for name in ("steps", "num_samples", "frames", "sigma_max"):
            field = SETTABLE[name]
            now, then = getattr(runtime, field), getattr(launch, field)
            say(f"  {name:<20}{now}" + ("  * (launch: %s)" % then if now != then else ""))

    def command(line: str) -> bool:
        """Run a /command; False means quit."""
        cmd, *args = line.split()
        nonlocal runtime
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/help":
            say(HELP)
        elif cmd == "/show":
            show()
        elif cmd == "/reset":
            runtime = launch
            say("runtime settings reset to the launch values")
        elif cmd == "/set":
            if len(args) != 2:
                raise ValueError("usage: /set <param> <value>")
            field, value = parse_setting(*args)
            runtime = dataclasses.replace(runtime, **{field: value})
            say(f"{args[0]} = {value}")
        else:
            raise ValueError(f"unknown command {cmd}; /help lists the commands")
        return True

    def ask_path(question: str, default: str | None) -> str:
        answer = read(f"{question} [{default}]: " if default else f"{question}: ").strip()
        return answer or (default or "")

    def generate(prompt: str) -> None:
        nonlocal last_image, last_output
        picture = None
        if spec.task == "i2v":
            path = ask_path("image path", last_image)
            picture = read_image(path)                 # ValueError if missing or unreadable
            last_image = path
        target = ask_path("output path", last_output)
        if not target.lower().endswith(".mp4"):
            target += ".mp4"
        if Path(target).is_dir():
            raise ValueError(f"{target} is a folder")
        last_output = target

        def progress(stage: str, done: int, total: int) -> None:
            if stage == "denoise":
                say(f"  step {done}/{total}")
        with VideoWriter(target) as writer:               # encoded while the VAE decodes
            video = pipe.generate(prompt, runtime, image=picture, progress=progress, writer=writer)
        frames, height, width = video.frames.shape[:3]
        say(f"saved {target} ({frames} frames, {width}x{height}, {sum(video.timings.values()):.2f} s)")

    while True:
        try:
            line = read_prompt().strip()
        except (EOFError, KeyboardInterrupt):
            say("")
            return 0
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not command(line):
                    return 0
            else:
                generate(line)
        except EOFError:
            say("")
            return 0
        except KeyboardInterrupt:
            say("interrupted")
        except Exception as e:   # noqa: BLE001 - report and keep the models loaded for the next prompt
            message = str(e).splitlines()[0] if str(e) else ""
            say(f"error: {message}" if isinstance(e, ValueError) else f"error: {type(e).__name__}: {message}")
