"""A real uvicorn server on 127.0.0.1 under a burst of concurrent clients.

Invariants checked: every accepted job runs exactly once and completes, every rejected one gets
429 and never runs, accepted + rejected = submitted, results are not mixed between jobs, and the
job history and the process memory stay bounded over many jobs.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import uvicorn

from turbovid.config import MODELS
from turbovid.pipeline import Pipeline
from turbovid.serve.app import create_app
from turbovid.video import read_video

MAX_QUEUE = 8
MAX_HISTORY = 12
BURST = 50


@contextlib.contextmanager
def serving(app):
    """uvicorn on a free loopback port, in a thread; stopped (lifespan shutdown included) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@dataclass
class FakeVideo:
    frames: np.ndarray
    timings: dict = field(default_factory=dict)


class FastPipeline:
    """Stands in for the pipeline: instant, records every call, and paints each video a grey level
    that encodes its seed, so a mix-up between jobs would show in the served files."""
    spec = MODELS["tiny"]

    def __init__(self):
        self.gate = threading.Event()
        self.calls: list[str] = []

    def generate(self, prompt, sample, image=None, progress=None, writer=None):
        progress("text_encode", 0, 1)
        assert self.gate.wait(60)
        self.calls.append(prompt)
        for i in range(sample.steps):
            progress("denoise", i + 1, sample.steps)
        progress("vae_decode", 0, 1)
        frames = np.full((sample.num_frames, 32, 32, 3), grey(sample.seed), np.uint8)
        if writer is not None:
            writer.append(frames)
        return FakeVideo(frames, {"denoise": 0.001})


def grey(seed: int) -> int:
    return 40 + 3 * seed


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def burst(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post("/v1/videos", json=b) for b in bodies))


async def wait_all(url: str, ids: list[str], timeout: float = 60) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while True:
            jobs = await asyncio.gather(*(client.get(f"/v1/videos/{i}") for i in ids))
            jobs = {j.json()["id"]: j.json() for j in jobs}
            if all(j["status"] in ("completed", "failed", "cancelled") for j in jobs.values()):
                return jobs
            assert time.monotonic() < deadline, "jobs did not finish in time"
            await asyncio.sleep(0.05)


async def feed(url: str, waves: int) -> tuple[list[str], float]:
    """Waves of MAX_QUEUE jobs, each wave waited for; one client, so the client's own allocations
    do not count. Returns the job ids and the RSS growth (MB) after the first two (warm-up) waves."""
    ids, rss_start = [], 0.0
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for w in range(waves):
            if w == 2:
                rss_start = rss_mb()
            responses = await asyncio.gather(*(client.post("/v1/videos", json={
                "prompt": f"wave {w} job {k}", "seed": k, "steps": 1, "frames": 1}) for k in range(MAX_QUEUE)))
            assert all(r.status_code in (200, 429) for r in responses)
            wave = [r.json()["id"] for r in responses if r.status_code == 200]
            deadline = time.monotonic() + 60
            while True:
                jobs = await asyncio.gather(*(client.get(f"/v1/videos/{i}") for i in wave))
                if all(j.json()["status"] == "completed" for j in jobs):
                    break
                assert time.monotonic() < deadline, "jobs did not finish in time"
                await asyncio.sleep(0.05)
            ids += wave
    return ids, rss_mb() - rss_start


def test_burst_of_50_against_a_small_queue(tmp_path):
    fake = FastPipeline()
    app = create_app(fake, tmp_path, max_queue=MAX_QUEUE, max_history=MAX_HISTORY)
    with serving(app) as url:
        # 1. All 50 arrive while the worker is held at its first job: exactly the queue (plus the
        #    one job the worker may already have taken) gets in, everything else is a 429.
        bodies = [{"prompt": f"job {i}", "seed": i, "steps": 1 + i % 4, "frames": 5} for i in range(BURST)]
        t0 = time.monotonic()
        responses = asyncio.run(burst(url, bodies))
        assert time.monotonic() - t0 < 30
        accepted = {r.json()["prompt"]: r.json() for r in responses if r.status_code == 200}
        rejected = [r for r in responses if r.status_code == 429]
        assert len(accepted) + len(rejected) == BURST, [r.status_code for r in responses]
        assert MAX_QUEUE <= len(accepted) <= MAX_QUEUE + 1
        assert all(r.json()["error"]["type"] == "queue_full" and "full" in r.json()["error"]["message"]
                   for r in rejected)
        assert len({j["id"] for j in accepted.values()}) == len(accepted)    # ids are unique

        fake.gate.set()
        jobs = asyncio.run(wait_all(url, [j["id"] for j in accepted.values()]))
        assert all(j["status"] == "completed" for j in jobs.values()), jobs
        # Exactly once each; rejected prompts never ran; run in the order the server accepted them
        # (the job list is newest first).
        assert collections.Counter(fake.calls) == collections.Counter(list(accepted))
        with httpx.Client(base_url=url, timeout=30) as client:
            listed = client.get("/v1/videos", params={"limit": 100}).json()["data"]
            assert fake.calls == [j["prompt"] for j in reversed(listed)]
            for job in accepted.values():
                content = client.get(f"/v1/videos/{job['id']}/content")
                assert content.status_code == 200
                path = tmp_path / "check.mp4"
                path.write_bytes(content.content)
                frames = read_video(path)
                assert frames.shape == (5, 32, 32, 3)
                assert abs(frames.mean() - grey(job["seed"])) < 2, job["prompt"]

        # 2. Many more jobs, fed as fast as the queue takes them: history and memory stay bounded.
        done_ids, growth = asyncio.run(feed(url, waves=6))
        submitted = len(done_ids)
        print(f"RSS growth over the last {submitted - 2 * MAX_QUEUE} jobs: {growth:.1f} MB")
        with httpx.Client(base_url=url, timeout=30) as client:
            m = client.get("/metrics").json()
            assert m["history"] <= MAX_HISTORY and m["queue_length"] == 0
            assert m["totals"]["completed"] == len(accepted) + submitted
            # The oldest jobs were forgotten (404), the newest are still there.
            assert client.get(f"/v1/videos/{done_ids[0]}").status_code == 404
            assert client.get(f"/v1/videos/{done_ids[-1]}").json()["status"] == "completed"
            assert len(client.get("/v1/videos", params={"limit": 100}).json()["data"]) <= MAX_HISTORY
        assert len(fake.calls) == len(accepted) + submitted
        # Nothing per job stays behind beyond the bounded history (measured: under 1 MB over 32 jobs).
        assert growth < 10, f"RSS grew {growth:.1f} MB over {submitted - 2 * MAX_QUEUE} jobs"


def test_burst_with_the_real_tiny_pipeline(tmp_path):
    n = 5
    app = create_app(Pipeline.load("tiny"), tmp_path, max_queue=2, max_history=10)
    with serving(app) as url:
        bodies = [{"prompt": f"a red circle, take {i}", "steps": 1, "seed": i, "frames": 5} for i in range(n)]
        responses = asyncio.run(burst(url, bodies))
        accepted = [r.json() for r in responses if r.status_code == 200]
        assert all(r.status_code in (200, 429) for r in responses) and 2 <= len(accepted) <= 3
        jobs = asyncio.run(wait_all(url, [j["id"] for j in accepted], timeout=120))
        assert all(j["status"] == "completed" for j in jobs.values()), jobs
        with httpx.Client(base_url=url, timeout=30) as client:
            for job in jobs.values():
                path = tmp_path / "check.mp4"
                path.write_bytes(client.get(job["url"]).content)
                assert read_video(path).shape == (5, 128, 224, 3)
