"""A bounded FIFO of video jobs run one at a time by a single worker thread.

One worker is deliberate: the pipeline holds one GPU's worth of models, and two generations at
once would only share it (and double peak memory). The queue is bounded so a burst of requests
gets a fast "try later" instead of unbounded memory and latency; the history of finished jobs is
bounded too (oldest finished job forgotten first; its video file stays on disk).

`generate` is injected — `Pipeline.generate` in the server, a small function in tests — with the
signature generate(prompt, sample, image, progress, writer=None) -> object with `.frames` (uint8 [F, H, W, 3])
and `.timings` (dict of seconds), which appends the frames to `writer` (a turbovid.video.VideoWriter) as
`Pipeline.generate` does while it decodes. Cancelling a running job raises from inside its progress
callback, which is how the pipeline lets a caller abort between steps.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from turbovid.config import ModelSpec, SampleConfig
from turbovid.video import VideoWriter, read_image

log = logging.getLogger("turbovid.serve")

STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")


class QueueFull(Exception):
    """The queue holds max_queue waiting jobs already."""


class Cancelled(Exception):
    """Raised from the progress callback to abort a running job."""


@dataclass
class Job:
    id: str
    prompt: str
    sample: SampleConfig
    image_path: Path | None = None     # saved upload (I2V), inside the output folder
    draft: bool = False                # a quick 1-step preview, meant to be refined
    draft_of: str | None = None        # the job this one refines
    status: str = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    completed_at: float | None = None
    error: str | None = None
    stage: str | None = None           # text_encode | denoise | vae_decode | write
    step: int = 0
    steps: int = 0
    output: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    def percent(self) -> int:
        # A rough whole-job bar: the denoising steps dominate every stage but the decode.
        if self.status == "completed":
            return 100
        if self.stage == "denoise" and self.steps:
            return 5 + 80 * self.step // self.steps
        return {"text_encode": 2, "image_encode": 4, "vae_decode": 85, "write": 95}.get(self.stage or "", 0)

    def to_dict(self) -> dict:
        s = self.sample
        d = {
            "id": self.id, "object": "video", "status": self.status,
            "created_at": int(self.created_at),
            "started_at": None if self.started_at is None else int(self.started_at),
            "completed_at": None if self.completed_at is None else int(self.completed_at),
            "error": self.error,
            "progress": {"stage": self.stage, "step": self.step, "steps": self.steps, "percent": self.percent()},
            "prompt": self.prompt, "steps": s.steps, "seed": s.seed, "resolution": s.resolution,
            "aspect_ratio": s.aspect_ratio, "frames": s.num_frames, "sigma_max": s.sigma_max, "ode": s.ode,
            "num_samples": s.num_samples, "adaptive_resolution": s.adaptive_resolution,
            "image": self.image_path is not None, "draft": self.draft,
            "draft_of": self.draft_of,
            "seconds": None if self.completed_at is None or self.started_at is None
            else round(self.completed_at - self.started_at, 3),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }
        if s.steps > 4:
            d.update(solver=s.solver, shift=s.shift, guidance=s.guidance)
        return d


GenerateFn = Callable[..., object]


class JobQueue:
    def __init__(self, generate: GenerateFn | None, output_dir: str | Path, *, max_queue: int = 16,
                 max_history: int = 200):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        # Every queued or running job must fit in the history, or it could be forgotten unfinished.
        if max_history < max_queue + 1:
            raise ValueError(f"max_history ({max_history}) must exceed max_queue ({max_queue})")
        self.generate = generate
        self.output_dir = Path(output_dir)
        self.max_queue, self.max_history = max_queue, max_history
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()   # oldest first
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._current: Job | None = None
        # Totals over the server's life, not only over the remembered history.
        self.totals = {status: 0 for status in FINISHED}
        self.busy_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.generate is None:
            raise ValueError("JobQueue.start: no generate function")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        thread = threading.Thread(target=self._work, name="turbovid-worker", daemon=True)
        thread.start()
        self._thread = thread    # only a started thread: `stop` on another thread may join it at any moment

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel what is waiting, abort what runs, and wait for the worker to leave."""
        with self._cond:
            self._stop = True
            while self._pending:
                self._finish(self._pending.popleft(), "cancelled", "server shut down")
            if self._current is not None:
                self._current.cancel.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the API's operations ----------------------------------------------------------------------

    def submit(self, prompt: str, sample: SampleConfig, *, image_path: Path | None = None,
               draft: bool = False, draft_of: str | None = None) -> Job:
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting); try again later")
            job = Job(id="video_" + secrets.token_hex(12), prompt=prompt, sample=sample,
                      image_path=image_path, draft=draft, draft_of=draft_of)
            self._jobs[job.id] = job
            self._forget_old()
            self._pending.append(job)
            self._cond.notify_all()
            return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def recent(self, limit: int = 20) -> list[Job]:
        with self._cond:
            return list(reversed(self._jobs.values()))[:limit]

    def cancel(self, job_id: str) -> Job | None:
        """queued -> cancelled now; in_progress -> cancelled at its next progress call; finished: as is."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            if job.status == "queued":
                self._pending.remove(job)
                self._finish(job, "cancelled", None)
            elif job.status == "in_progress":
                job.cancel.set()
            return job

    def forget(self, job_id: str) -> Job | None:
        """Drop a finished job from the history (the caller deletes its files)."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status not in FINISHED:
                return None
            del self._jobs[job_id]
            return job

    def image_in_use(self, path: Path) -> bool:
        with self._cond:
            return any(j.image_path == path for j in self._jobs.values())

    def metrics(self) -> dict:
        with self._cond:
            by_status = {s: 0 for s in STATUSES}
            for job in self._jobs.values():
                by_status[job.status] += 1
            done = self.totals["completed"]
            return {
                "queue_length": len(self._pending),
                "max_queue": self.max_queue,
                "in_progress": self._current.id if self._current else None,
                "jobs_by_status": by_status,
                "history": len(self._jobs),
                "max_history": self.max_history,
                "totals": dict(self.totals),
                "mean_seconds_per_job": round(self.busy_seconds / done, 4) if done else None,
            }

    # -- the worker --------------------------------------------------------------------------------

    def _forget_old(self) -> None:
        # Called with the lock held, after adding one job: drop the oldest finished jobs.
        if len(self._jobs) <= self.max_history:
            return
        for job_id in [j.id for j in self._jobs.values() if j.status in FINISHED]:
            del self._jobs[job_id]
            if len(self._jobs) <= self.max_history:
                return

    def _finish(self, job: Job, status: str, error: str | None) -> None:
        # Called with the lock held.
        job.status, job.error, job.completed_at = status, error, time.time()
        self.totals[status] += 1
        if status == "completed" and job.started_at is not None:
            self.busy_seconds += job.completed_at - job.started_at
        self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self._pending.popleft()
                job.status, job.started_at = "in_progress", time.time()
                self._current = job
            status, error = self._run(job)
            with self._cond:
                self._current = None
                self._finish(job, status, error)

    def _run(self, job: Job) -> tuple[str, str | None]:
        def progress(stage: str, done: int, total: int) -> None:
            if job.cancel.is_set():
                raise Cancelled
            job.stage, job.step, job.steps = stage, done, total

        try:
            image = read_image(job.image_path) if job.image_path is not None else None
            out = self.output_dir / f"{job.id}.mp4"
            # The mp4 is encoded while the VAE decodes; leaving the block by an exception leaves no file behind.
            with VideoWriter(out) as writer:
                video = self.generate(job.prompt, job.sample, image, progress, writer=writer)
                progress("write", 0, 1)          # a cancel during the decode still lands here
            job.output, job.timings = out, dict(video.timings)
            return "completed", None
        except Cancelled:
            return "cancelled", None
        except ValueError as e:
            return "failed", str(e).splitlines()[0] if str(e) else "invalid request"
        except Exception as e:   # noqa: BLE001 - a bad job must not kill the worker; the log keeps the trace
            log.exception("job %s failed", job.id)
            first = str(e).splitlines()[0][:300] if str(e) else ""
            return "failed", f"{type(e).__name__}: {first}" if first else type(e).__name__


def explicit_sample(sample: SampleConfig, spec: ModelSpec) -> SampleConfig:
    """Fill the model's defaults in, so a job records (and a refine repeats) exactly what ran."""
    return dataclasses.replace(sample, resolution=sample.resolution or spec.resolution,
                               aspect_ratio=sample.aspect_ratio or spec.aspect_ratio,
                               num_frames=sample.num_frames or spec.num_frames,
                               sigma_max=sample.sigma_max or spec.sigma_max)
