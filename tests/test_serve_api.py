"""The /v1/videos API in-process (FastAPI TestClient) against the real tiny pipeline.

A `Gated` wrapper can hold a job at its first denoising step, so "cancel while running" and
"queue full" are tested deterministically, not by racing the worker.
"""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from turbovid.config import SampleConfig
from turbovid.pipeline import Pipeline
from turbovid.serve.app import create_app
from turbovid.video import read_video, write_video

PROMPT = "a red circle moves to the right on a dark background"


class Gated:
    """The real pipeline; while `gate` is clear a job stops inside its first denoise progress call."""

    def __init__(self, pipe: Pipeline):
        self.pipe, self.spec = pipe, pipe.spec
        self.gate, self.held = threading.Event(), threading.Event()
        self.gate.set()
        self.calls: list[tuple[str, SampleConfig]] = []

    def generate(self, prompt, sample, image=None, progress=None, writer=None):
        self.calls.append((prompt, sample))

        def gated(stage, done, total):
            progress(stage, done, total)
            if stage == "denoise" and done == 1 and not self.gate.is_set():
                self.held.set()
                assert self.gate.wait(60), "test never opened the gate"
        return self.pipe.generate(prompt, sample, image=image, progress=gated, writer=writer)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("tiny")


@pytest.fixture(scope="module")
def gated(pipe):
    return Gated(pipe)


@pytest.fixture(scope="module")
def client(gated, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve")
    with TestClient(create_app(gated, out, max_queue=2, max_history=50)) as c:
        c.output_dir = out
        yield c


@pytest.fixture(autouse=True)
def open_gate(gated):
    gated.gate.set()
    yield
    gated.gate.set()


def wait_for(client, job_id, statuses=("completed", "failed", "cancelled"), timeout=60.0, headers=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/videos/{job_id}", headers=headers).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def decode(content: bytes, tmp_path, name="v.mp4") -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(content)
    return read_video(path)


def test_submit_poll_content_matches_direct_generation(client, pipe, tmp_path):
    r = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 2, "seed": 7, "frames": 5})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "video" and job["id"].startswith("video_") and job["status"] in ("queued", "in_progress")
    assert (job["steps"], job["seed"], job["frames"], job["resolution"], job["model"]) == (2, 7, 5, "128p", "tiny")
    done = wait_for(client, job["id"])
    assert done["status"] == "completed", done
    assert done["progress"]["percent"] == 100 and done["completed_at"] >= done["created_at"]
    assert done["url"] == f"/v1/videos/{job['id']}/content" and done["timings"]["vae_decode"] > 0

    r = client.get(done["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    served = decode(r.content, tmp_path)
    assert served.shape == (5, 128, 224, 3)
    # Independent reference: the same request straight through the pipeline, through the same encoder.
    direct = pipe.generate(PROMPT, SampleConfig(steps=2, seed=7, num_frames=5))
    write_video(tmp_path / "direct.mp4", direct.frames)
    np.testing.assert_array_equal(served, read_video(tmp_path / "direct.mp4"))
    # The file lives in the output folder under the job's own name.
    assert (client.output_dir / f"{job['id']}.mp4").is_file()


def test_list_newest_first_and_limit(client):
    ids = [client.post("/v1/videos", json={"prompt": f"{PROMPT} {i}", "steps": 1, "frames": 1}).json()["id"] for i in range(2)]
    listed = client.get("/v1/videos", params={"limit": 2}).json()
    assert listed["object"] == "list" and [j["id"] for j in listed["data"]] == ids[::-1]
    assert client.get("/v1/videos", params={"limit": 0}).status_code == 400
    for job_id in ids:
        assert wait_for(client, job_id)["status"] == "completed"


def test_cancel_queued_and_in_progress_and_queue_full(client, gated):
    gated.gate.clear()
    gated.held.clear()
    running = client.post("/v1/videos", json={"prompt": "held job", "steps": 3}).json()
    assert gated.held.wait(60)
    queued = [client.post("/v1/videos", json={"prompt": f"queued {i}", "steps": 1}).json() for i in range(2)]
    assert [j["status"] for j in queued] == ["queued", "queued"]
    # max_queue=2 waiting jobs: the next one is turned away with a clear error.
    r = client.post("/v1/videos", json={"prompt": "one too many"})
    assert r.status_code == 429 and "queue is full" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "queue_full" and r.headers["retry-after"]

    job = client.get(f"/v1/videos/{running['id']}").json()
    assert job["status"] == "in_progress" and job["progress"]["stage"] == "denoise"
    assert (job["progress"]["step"], job["progress"]["steps"]) == (1, 3)
    assert client.get(f"/v1/videos/{running['id']}/content").status_code == 404

    # queued -> cancelled at once; it never reaches the pipeline.
    r = client.delete(f"/v1/videos/{queued[0]['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # in progress -> aborted at its next step.
    r = client.delete(f"/v1/videos/{running['id']}")
    assert r.status_code == 200 and r.json()["status"] == "in_progress"
    gated.gate.set()
    assert wait_for(client, running["id"])["status"] == "cancelled"
    assert wait_for(client, queued[1]["id"])["status"] == "completed"
    assert wait_for(client, queued[0]["id"])["status"] == "cancelled"
    prompts = [p for p, _ in gated.calls]
    assert "queued 0" not in prompts and prompts.count("held job") == 1 and prompts.count("queued 1") == 1
    assert not (client.output_dir / f"{running['id']}.mp4").exists()
    assert client.get(f"/v1/videos/{running['id']}/content").status_code == 404


def test_unknown_ids_are_404(client):
    for method, path in [("GET", "/v1/videos/video_nope"), ("GET", "/v1/videos/video_nope/content"),
                         ("DELETE", "/v1/videos/video_nope"), ("POST", "/v1/videos/video_nope/refine"),
                         ("GET", "/v1/nothing-here")]:
        r = client.request(method, path)
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["message"]


def png_bytes(fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": ""}, 400, "prompt is empty"),
    ({"prompt": "   "}, 400, "prompt is empty"),
    ({"prompt": PROMPT, "steps": 7}, 400, "--allow-teacher"),
    ({"prompt": PROMPT, "steps": 0}, 400, "steps"),
    ({"prompt": PROMPT, "frames": 10}, 400, "frames must be 4k+1"),
    ({"prompt": PROMPT, "resolution": "999p"}, 400, "unknown resolution '999p'"),
    ({"prompt": PROMPT, "aspect_ratio": "2:1"}, 400, "unknown aspect ratio"),
    ({"prompt": "x" * 5000}, 400, "limit is 4000"),
    ({"prompt": PROMPT, "num_samples": 0}, 400, "num_samples"),
    ({"prompt": PROMPT, "num_samples": 99}, 400, "num_samples must be at most 4"),
    ({"prompt": PROMPT, "sigma_max": 0.01}, 400, "sigma_max"),
    ({"prompt": PROMPT, "steps": "four"}, 400, "steps"),
    ({"prompt": PROMPT, "step": 2}, 400, "step: Extra inputs are not permitted"),
    ({"prompt": PROMPT, "draft": True, "steps": 4}, 400, "a draft is 1 step"),
    ({"prompt": PROMPT, "model": "Wan2.1-14B"}, 400, "runs model 'tiny'"),
    ({"steps": 2}, 400, "prompt: Field required"),
])
def test_bad_json_requests(client, body, status, message):
    r = client.post("/v1/videos", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_bad_bodies_and_uploads(client):
    def post(**kw):
        return client.post("/v1/videos", **kw)
    r = post(content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = post(content=b"prompt", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    r = post(data={"prompt": PROMPT}, files={"image": ("x.png", b"this is not an image", "image/png")})
    assert r.status_code == 400 and "not a readable image" in r.json()["error"]["message"]
    r = post(data={"prompt": PROMPT}, files={"image": ("x.gif", png_bytes("GIF"), "image/gif")})
    assert r.status_code == 415 and "PNG, JPEG or WebP" in r.json()["error"]["message"]
    r = post(data={"prompt": PROMPT}, files={"image": ("x.png", png_bytes(), "image/png")})
    assert r.status_code == 400 and "text-to-video model" in r.json()["error"]["message"]
    r = post(data={"prompt": PROMPT}, files={"other": ("x.png", png_bytes(), "image/png")})
    assert r.status_code == 400 and "'image'" in r.json()["error"]["message"]
    r = post(data={"prompt": PROMPT}, files={"image": ("big.png", b"0" * (11 * 2**20), "image/png")})
    assert r.status_code == 413
    # Nothing rejected left a file behind.
    assert not list(client.output_dir.glob("input_*"))


def test_multipart_form_like_the_web_page(client, tmp_path):
    # Strings everywhere, empty fields meaning "default", a checkbox value "true".
    r = client.post("/v1/videos", data={"prompt": PROMPT, "steps": "1", "seed": "5", "frames": "5",
                                        "sigma_max": "", "ode": "true"})
    assert r.status_code == 200, r.text
    job = r.json()
    assert (job["steps"], job["seed"], job["frames"], job["ode"], job["sigma_max"]) == (1, 5, 5, True, 80.0)
    done = wait_for(client, job["id"])
    assert done["status"] == "completed"
    assert decode(client.get(done["url"]).content, tmp_path).shape[0] == 5


def test_draft_then_refine_keeps_prompt_seed_settings(client, tmp_path):
    draft = client.post("/v1/videos", json={"prompt": PROMPT, "draft": True, "seed": 11, "frames": 5}).json()
    assert draft["steps"] == 1 and draft["draft"] is True and draft["draft_of"] is None
    assert client.post(f"/v1/videos/{draft['id']}/refine", json={"steps": 7}).status_code == 400
    assert client.post(f"/v1/videos/{draft['id']}/refine", json={"seed": 1}).status_code == 400
    r = client.post(f"/v1/videos/{draft['id']}/refine")
    assert r.status_code == 200, r.text
    final = r.json()
    assert final["draft_of"] == draft["id"] and final["steps"] == 4 and final["draft"] is False
    for key in ("prompt", "seed", "frames", "resolution", "aspect_ratio", "sigma_max", "ode", "num_samples"):
        assert final[key] == draft[key], key
    two = client.post(f"/v1/videos/{draft['id']}/refine", json={"steps": 2}).json()
    assert two["steps"] == 2 and two["draft_of"] == draft["id"]
    for job in (draft, final, two):
        done = wait_for(client, job["id"])
        assert done["status"] == "completed"
        assert decode(client.get(done["url"]).content, tmp_path, job["id"] + ".mp4").shape == (5, 128, 224, 3)


def test_delete_finished_removes_job_and_file(client):
    job = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 1, "frames": 1}).json()
    assert wait_for(client, job["id"])["status"] == "completed"
    path = client.output_dir / f"{job['id']}.mp4"
    assert path.is_file()
    r = client.delete(f"/v1/videos/{job['id']}")
    assert r.json() == {"id": job["id"], "object": "video.deleted", "deleted": True}
    assert not path.exists() and client.get(f"/v1/videos/{job['id']}").status_code == 404


def test_health_metrics_and_page(client):
    r = client.get("/health")
    h = r.json()
    assert r.status_code == 200 and h["status"] == "ok" and h["model"] == "tiny" and h["task"] == "t2v"
    assert h["defaults"]["frames"] == 9 and h["max_steps"] == 4 and "128p" in h["resolutions"]
    m = client.get("/metrics").json()
    assert m["model"] == "tiny" and m["queue_length"] == 0 and m["max_queue"] == 2
    assert m["totals"]["completed"] >= 1 and m["mean_seconds_per_job"] > 0
    assert sum(m["jobs_by_status"].values()) == m["history"] <= m["max_history"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in page.text and "/v1/videos" in page.text


def test_bearer_token(pipe, tmp_path):
    token = "s3cret-token-value"
    with TestClient(create_app(pipe, tmp_path, token=token)) as c:
        assert c.get("/health").status_code == 200 and c.get("/health").json()["token_required"] is True
        assert c.get("/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {token}"},
                        {"Authorization": token}):
            for method, path in [("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", "/metrics"),
                                 ("GET", "/v1/videos/video_x/content")]:
                r = c.request(method, path, headers=headers, json={"prompt": PROMPT})
                assert r.status_code == 401, (headers, path)
                assert r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["error"]["message"]
        auth = {"Authorization": f"Bearer {token}"}
        job = c.post("/v1/videos", json={"prompt": PROMPT, "steps": 1, "frames": 1}, headers=auth).json()
        assert wait_for(c, job["id"], headers=auth)["status"] == "completed"
        assert c.get(f"/v1/videos/{job['id']}/content", headers=auth).status_code == 200
    assert not list(tmp_path.glob("*.partial*"))


def test_loader_reports_loading_then_ready_and_load_errors(pipe, tmp_path):
    release = threading.Event()

    def slow_loader():
        assert release.wait(30)
        return pipe
    with TestClient(create_app(slow_loader, tmp_path)) as c:
        assert c.get("/health").json() == {"status": "loading"} and c.get("/health").status_code == 503
        r = c.post("/v1/videos", json={"prompt": PROMPT})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        deadline = time.monotonic() + 30
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.get("/health").json()["status"] == "ok"
        assert c.post("/v1/videos", json={"prompt": PROMPT, "steps": 1, "frames": 1}).status_code == 200

    def broken_loader():
        raise ValueError("Wan2.1-1.3B needs checkpoint paths: --dit")
    with TestClient(create_app(broken_loader, tmp_path)) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.02)
        h = c.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "error" and "--dit" in h.json()["error"]
        r = c.post("/v1/videos", json={"prompt": PROMPT})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]["message"]


def test_cross_origin_posts_and_foreign_host_names_are_refused(pipe, tmp_path):
    with TestClient(create_app(pipe, tmp_path, allowed_hosts=["127.0.0.1", "localhost"]),
                    base_url="http://127.0.0.1:8000") as c:
        assert c.get("/health").status_code == 200
        # DNS rebinding: the browser sends the attacker's name as Host.
        r = c.get("/health", headers={"Host": "evil.example:8000"})
        assert r.status_code == 400
        # A form on another site posting here (no CORS preflight for multipart).
        r = c.post("/v1/videos", data={"prompt": PROMPT}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-origin" in r.json()["error"]["message"]
        r = c.post("/v1/videos", json={"prompt": PROMPT, "steps": 1, "frames": 1},
                   headers={"Origin": "http://127.0.0.1:8000"})
        assert r.status_code == 200, r.text


def test_image_to_video_upload_refine_and_cleanup(tmp_path):
    pipe = Pipeline.load("tiny-i2v")
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=90)
    with TestClient(create_app(pipe, tmp_path)) as c:
        r = c.post("/v1/videos", json={"prompt": PROMPT, "steps": 1, "frames": 1})
        assert r.status_code == 400 and "image-to-video model: give an image" in r.json()["error"]["message"]
        r = c.post("/v1/videos", data={"prompt": PROMPT, "steps": "1", "frames": "1", "adaptive_resolution": "true"},
                   files={"image": ("../../etc/passwd.jpg", buf.getvalue(), "image/jpeg")})
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["image"] is True and job["adaptive_resolution"] is True
        (saved,) = tmp_path.glob("input_*.png")       # a made-up name, never the uploaded one
        refined = c.post(f"/v1/videos/{job['id']}/refine", json={"steps": 2}).json()
        assert refined["image"] is True and refined["draft_of"] == job["id"]
        done = [wait_for(c, j["id"]) for j in (job, refined)]
        assert [d["status"] for d in done] == ["completed", "completed"], done
        served = decode(c.get(done[0]["url"]).content, tmp_path)
        # Reference: the pipeline on the decoded upload (the server keeps it as a lossless PNG).
        from_jpeg = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        direct = pipe.generate(PROMPT, SampleConfig(steps=1, num_frames=1, adaptive_resolution=True), image=from_jpeg)
        write_video(tmp_path / "direct.mp4", direct.frames)
        # Adaptive size keeps the 4:3 picture's shape: 128p 16:9 area -> 192x144.
        assert served.shape == (1, 144, 192, 3)
        np.testing.assert_array_equal(served, read_video(tmp_path / "direct.mp4"))
        # The input image is shared by the draft and its refinement: removed with the last of them.
        c.delete(f"/v1/videos/{job['id']}")
        assert saved.is_file()
        c.delete(f"/v1/videos/{refined['id']}")
        assert not saved.exists() and not list(tmp_path.glob("video_*.mp4"))


def test_teacher_steps_only_when_allowed(pipe, tmp_path):
    with TestClient(create_app(pipe, tmp_path, allow_teacher=True)) as c:
        assert c.get("/health").json()["max_steps"] == 100
        r = c.post("/v1/videos", json={"prompt": PROMPT, "steps": 101})
        assert r.status_code == 400 and "at most 100" in r.json()["error"]["message"]
        job = c.post("/v1/videos", json={"prompt": PROMPT, "steps": 5, "frames": 1, "solver": "euler"}).json()
        assert (job["steps"], job["solver"], job["guidance"]) == (5, "euler", 5.0)
        done = wait_for(c, job["id"])
        assert done["status"] == "completed" and "dit_step_5" in done["timings"]


def test_cli_serve_wiring(monkeypatch, tmp_path):
    import uvicorn

    from turbovid.cli import main
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert main(["serve", "--model", "tiny", "--output-dir", str(tmp_path), "--token", "a-long-token",
                 "--max-queue", "3", "--steps", "2", "--frames", "5", "--seed", "9"]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8000)
    with TestClient(seen["app"], base_url="http://localhost:8000") as c:
        assert c.get("/health", headers={"Host": "attacker.example"}).status_code == 400   # loopback: names checked
        auth = {"Authorization": "Bearer a-long-token"}
        assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers=auth).json()["max_queue"] == 3
        job = c.post("/v1/videos", json={"prompt": PROMPT}, headers=auth).json()
        assert (job["steps"], job["frames"], job["seed"]) == (2, 5, 9)       # launch values are the defaults
        assert wait_for(c, job["id"], headers=auth)["status"] == "completed"
    assert (tmp_path / f"{job['id']}.mp4").is_file()
