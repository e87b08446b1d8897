"""What every training stage shares: process setup (single process or torchrun + DDP), bf16 autocast,
per-step random generators, the optimizer step, JSONL logging, and `drive`, the resumable step loop.

Determinism. Every random draw of step n on rank r comes from `step_generator(seed, n, r)` and the
data of step n are clips (n * world + r) * batch + i, so a resumed run repeats exactly what an
uninterrupted one would have done (tested: identical next-step loss after save -> load on CPU).

Distributed. `torchrun --nproc-per-node N -m turbovid.cli train <stage> ...` sets RANK/WORLD_SIZE; each
process drives one GPU, trainable networks are wrapped in DistributedDataParallel (gradients all-reduced
in the backward), rank 0 writes logs and checkpoints, everyone reads them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from turbovid.train.checkpoint import (history_metadata, latest_checkpoint, load_checkpoint, save_checkpoint,
                                       save_weights, weights_history)
from turbovid.train.recipe import Optim, Schedule, lr_at


FIT_PROBE = (5, 25)   # steps timed by a time-fitted schedule (after 5 steps of warm-up: compile, autotune)


@dataclass(frozen=True)
class Env:
    device: torch.device
    rank: int = 0
    world: int = 1
    deadline: float | None = None   # time.monotonic() after which `drive` checkpoints and stops (--max-minutes)
    fit_until: float | None = None  # time.monotonic() by which a fresh stage's schedule should end (--fit-minutes)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def autocast(self):
        """bf16 autocast on GPUs (fp32 master weights); plain fp32 on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def out_of_time(self) -> bool:
        """True once the deadline has passed on any rank (all ranks agree, so they stop at the same step)."""
        if self.deadline is None:
            return False
        late = time.monotonic() > self.deadline
        if self.distributed:
            flag = torch.tensor([float(late)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            late = bool(flag.item())
        return late


def setup_env(device: str | None = None, max_minutes: float | None = None, fit_minutes: float | None = None) -> Env:
    """One process per GPU under torchrun (NCCL; gloo on CPU), else a single process. `max_minutes`: wall-clock
    budget from now, after which the running stage checkpoints and stops (resume by running it again).
    `fit_minutes`: a stage started from scratch shortens its schedule to what fits in that time (see `drive`)."""
    now = time.monotonic()
    deadline = None if max_minutes is None else now + 60 * max_minutes
    fit_until = None if fit_minutes is None else now + 60 * fit_minutes
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True   # fixed shapes in every stage: let cuDNN pick the conv3d kernels
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device != "cpu"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(local)
        return Env(torch.device(f"cuda:{local}" if use_cuda else "cpu"), rank, world, deadline, fit_until)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible")
    return Env(dev, deadline=deadline, fit_until=fit_until)


def teardown_env(env: Env) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, env: Env) -> nn.Module:
    if not env.distributed:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of all random draws of one step on one rank (independent of everything before)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 4099 + rank + 1)
    return g


def step_indices(step: int, env: Env, batch: int) -> list[int]:
    """Clip indices of this rank's batch at `step` (disjoint across steps and ranks)."""
    first = (step * env.world + env.rank) * batch
    return list(range(first, first + batch))


def make_optimizer(params, optim: Optim, env: Env) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    fused = env.device.type == "cuda"
    return torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=fused)


def optimizer_step(optimizer: torch.optim.Optimizer, optim: Optim, step: int, total: int) -> tuple[float, float]:
    """Set the scheduled lr, sanitise and clip the gradients, step, zero. Returns (lr, grad norm)."""
    lr = lr_at(optim, step, total)
    for group in optimizer.param_groups:
        group["lr"] = lr
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    for p in params:   # as rCM: a NaN/inf gradient entry is dropped, not propagated into the weights
        torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    max_norm = optim.grad_clip if optim.grad_clip > 0 else float("inf")
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, norm


def mean_across_ranks(values: dict[str, float], env: Env) -> dict[str, float]:
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=env.device, dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / env.world for k, v in zip(keys, t)}


class JsonlLog:
    """Append-only JSON-lines log (rank 0 only); one object per line, flushed at once."""

    def __init__(self, path: Path, env: Env):
        self.path, self.env = Path(path), env
        if env.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        if self.env.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Stage(Protocol):
    """A training stage: networks + optimizers + one `train_step`. `drive` does the rest."""
    name: str
    schedule: Schedule

    def train_step(self, step: int) -> dict[str, float]: ...
    def weights(self) -> dict[str, dict[str, torch.Tensor]]: ...
    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None: ...
    def optimizer_states(self) -> dict: ...
    def load_optimizer_states(self, state: dict) -> None: ...
    def export(self) -> dict[str, torch.Tensor]: ...


class TrainedNetworks:
    """The checkpoint side of a `Stage` whose networks sit in `self.trained` (name -> (network, possibly DDP-wrapped,
    its optimizer)) and whose export is the power EMA `self.ema` of its main network."""
    trained: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]

    def weights(self) -> dict[str, dict[str, torch.Tensor]]:
        return {**{name: unwrap(net).state_dict() for name, (net, _) in self.trained.items()},
                "ema": self.ema.state_dict()}

    def load_weights(self, weights: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, (net, _) in self.trained.items():
            unwrap(net).load_state_dict(weights[name])
        self.ema.load_state_dict(weights["ema"])

    def optimizer_states(self) -> dict:
        return {name: opt.state_dict() for name, (_, opt) in self.trained.items()}

    def load_optimizer_states(self, state: dict) -> None:
        for name, (_, opt) in self.trained.items():
            opt.load_state_dict(state[name])

    def export(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict()


def drive(stage: Stage, out_dir: str | Path, env: Env, until: int | None = None, resume: bool = True,
          quiet: bool = False, init: str | Path | None = None) -> list[dict]:
    """Run `stage` from its newest checkpoint (if any) up to `until` (default: schedule.steps) steps,
    checkpointing every `ckpt_every` steps and at the end, logging to out_dir/log.jsonl. When the schedule is
    complete, the exported weights go to out_dir/final.safetensors, their history (checkpoint.weights_history) being
    that of `init`, the weights file the stage started from (if any), followed by this stage. Returns the records of
    the steps run.

    Time-fitted schedules (env.fit_until, `--fit-minutes`): a stage starting from step 0 times steps
    FIT_PROBE[0]..FIT_PROBE[1] and then shortens its schedule (never lengthens) to the steps that fit before
    fit_until; learning-rate warm-up and decay follow the new length (the probe steps lie inside the warm-up,
    whose learning rates do not depend on it). The length is saved in every checkpoint, so a resumed run keeps
    it, and in the final weights' metadata."""
    out_dir = Path(out_dir)
    sched = stage.schedule
    total = sched.steps
    until = total if until is None else min(until, total)
    ckpt_root = out_dir / "checkpoints"
    start = 0
    found = latest_checkpoint(ckpt_root) if resume else None
    if found is not None:
        weights, state = load_checkpoint(found, env.device)
        stage.load_weights(weights)
        stage.load_optimizer_states(state["optimizers"])
        start = int(state["step"])
        if "total" in state and int(state["total"]) != total:
            total = int(state["total"])
            stage.schedule = dataclasses.replace(sched, steps=total)
            until = min(until, total)
    fit = env.fit_until is not None and start == 0
    log = JsonlLog(out_dir / "log.jsonl", env)
    if start == 0 and env.main and (out_dir / "log.jsonl").exists() and found is None:
        (out_dir / "log.jsonl").unlink()   # a fresh run starts a fresh log
    records = []
    t_last, n_last = time.perf_counter(), start
    for step in range(start, total):
        if step >= until:
            break
        if fit and step == FIT_PROBE[0]:
            t_probe = time.monotonic()
        values = stage.train_step(step)
        if fit and step + 1 == FIT_PROBE[1]:
            rate = (FIT_PROBE[1] - FIT_PROBE[0]) / max(time.monotonic() - t_probe, 1e-9)
            fitted = torch.tensor([float(step + 1 + rate * max(env.fit_until - time.monotonic(), 0.0))])
            if env.distributed:
                fitted = fitted.to(env.device)
                dist.all_reduce(fitted, op=dist.ReduceOp.MIN)
            total = max(step + 1, min(total, int(fitted.item())))
            stage.schedule = dataclasses.replace(sched, steps=total)
            until = min(until, total)
            if env.main:
                print(f"[{stage.name}] {rate:.2f} steps/s: schedule fitted to {total} steps", flush=True)
        record = {"stage": stage.name, "step": step, **values}
        records.append(record)
        if step % sched.log_every == 0 or step + 1 == until:
            now = time.perf_counter()
            record["steps_per_s"] = (step + 1 - n_last) / max(now - t_last, 1e-9)
            t_last, n_last = now, step + 1
            log.write(record)
            if env.main and not quiet:
                shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
                print(f"[{stage.name}] step {step + 1}/{total} {shown}", flush=True)
        done = step + 1
        if done < until and env.out_of_time():
            until = done          # checkpoint below, no final weights: the next run resumes here
            if env.main:
                print(f"[{stage.name}] out of time after step {done}/{total}: checkpointed, run again to resume",
                      flush=True)
        if done % sched.ckpt_every == 0 or done == until:
            if env.main:
                save_checkpoint(ckpt_root, done, stage.weights(),
                                {"optimizers": stage.optimizer_states(), "stage": stage.name, "total": total},
                                keep=sched.keep_checkpoints)
            env.barrier()
    if until == total and env.main:
        history = [*(weights_history(init) if init is not None else []), {"stage": stage.name, "steps": total}]
        save_weights(out_dir / "final.safetensors", stage.export(),
                     metadata={"stage": stage.name, "steps": str(total), **history_metadata(history)})
    env.barrier()
    return records


def round_dirs(stage: str, count: int) -> list[str]:
    """Run-directory folders of a stage trained in `count` rounds: <stage>_round1, ..., and <stage> for the last (the
    weights the later stages and `ship` read)."""
    return [f"{stage}_round{i + 1}" for i in range(count - 1)] + [stage]


def drive_rounds(build, rounds: list[tuple[str, object]], run_dir: Path, env: Env, init: str | Path | None = None,
                 until: int | None = None) -> Path:
    """A stage's rounds in turn (`rounds`: [(folder, settings)], folders from round_dirs): round i is
    `build(settings, init, inputs)`, a Stage started from `init` (round i > 0: round i-1's exported weights) with a
    fresh optimizer, handed the previous round's `inputs` (None for the first) to reuse where they fit; `until`
    counts steps of the round being run. Finished rounds are skipped, an interrupted one resumes. Returns the last
    round's weights path (still missing when `--max-minutes` stopped a round)."""
    inputs = None
    for name, settings in rounds:
        out = Path(run_dir) / name
        if not (out / "final.safetensors").is_file():
            stage = build(settings, init, inputs)
            inputs = stage.inputs
            drive(stage, out, env, until=until, init=init)
            if not (out / "final.safetensors").is_file():
                break
        init = out / "final.safetensors"
    return out / "final.safetensors"
