"""HTTP API in the shape of OpenAI's /v1/videos, plus a web page, health and metrics.

    POST   /v1/videos               JSON, or multipart with an `image` file (I2V) -> job object
    GET    /v1/videos?limit=20      newest first
    GET    /v1/videos/{id}          status and progress
    GET    /v1/videos/{id}/content  the mp4 once completed (404 before)
    POST   /v1/videos/{id}/refine   same prompt/seed/settings, more steps (draft -> final)
    DELETE /v1/videos/{id}          cancel a queued/running job; remove a finished one and its files
    GET    /health  /metrics  /

Every error is {"error": {"message", "type", "code"}} with a 4xx/5xx status. Files are written
only inside output_dir, under names the server makes up (job ids are random); no request field
is ever used as a path.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hmac
import io
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from turbovid.config import RESOLUTIONS, SampleConfig
from turbovid.pipeline import MAX_PROMPT_CHARS, MAX_RCM_STEPS, check_prompt, check_sample
from turbovid.serve.jobs import FINISHED, Job, JobQueue, QueueFull, explicit_sample

STATIC = Path(__file__).parent / "static"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
FORM_SLACK = 64 * 1024          # room for the text fields of a multipart body beside the image


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_upload_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_frames: int = 161
    max_num_samples: int = 4
    max_teacher_steps: int = 100


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


class VideoRequest(BaseModel):
    """Unset fields take the server's launch defaults, then the model's."""
    model_config = ConfigDict(extra="forbid")
    prompt: str
    model: str | None = None
    draft: bool = False                                   # 1-step preview, to refine later
    steps: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    resolution: str | None = None
    aspect_ratio: str | None = None
    frames: int | None = Field(None, ge=1)
    sigma_max: float | None = Field(None, ge=0.1, le=1e5)   # bounds on floats also refuse NaN
    ode: bool | None = None
    num_samples: int | None = Field(None, ge=1)
    adaptive_resolution: bool | None = None
    solver: str | None = None                             # teacher sampler (steps > 4) only
    shift: float | None = Field(None, gt=0, le=100)
    guidance: float | None = Field(None, ge=0, le=100)


class RefineRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(MAX_RCM_STEPS, ge=1)


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
    return f"{where}: {err['msg']}"


class _Server:
    """What the routes share: the pipeline (or its loader), the queue, the limits."""

    def __init__(self, pipeline_or_loader, output_dir: Path, token: str | None, queue: JobQueue,
                 allow_teacher: bool, defaults: SampleConfig, limits: Limits):
        if hasattr(pipeline_or_loader, "generate"):
            self.pipeline, self.loader = pipeline_or_loader, None
        elif callable(pipeline_or_loader):
            self.pipeline, self.loader = None, pipeline_or_loader
        else:
            raise ValueError("create_app needs a Pipeline or a function returning one")
        self.output_dir, self.token, self.queue = output_dir, token, queue
        self.allow_teacher, self.defaults, self.limits = allow_teacher, defaults, limits
        self.load_error: str | None = None
        self.started = time.time()

    # -- lifecycle: the loader runs on its own thread so /health answers while big models load --

    def start(self) -> None:
        if self.pipeline is not None:
            self._start_queue(self.pipeline)
            return
        threading.Thread(target=self._load, name="turbovid-load", daemon=True).start()

    def _load(self) -> None:
        try:
            pipeline = self.loader()
        except Exception as e:   # noqa: BLE001 - reported by /health and every POST
            self.load_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return
        self._start_queue(pipeline)
        self.pipeline = pipeline        # ready (/health "ok") once the worker runs

    def _start_queue(self, pipeline) -> None:
        self.queue.generate = pipeline.generate
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()

    # -- requests -----------------------------------------------------------------------------------

    def ready(self):
        if self.load_error is not None:
            raise ApiError(503, f"the model failed to load: {self.load_error}", "server_error")
        if self.pipeline is None:
            raise ApiError(503, "the model is still loading; try again shortly", "server_error",
                           {"Retry-After": "5"})
        return self.pipeline

    def check_token(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes time independent of where the strings differ.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                           "authentication_error", {"WWW-Authenticate": "Bearer"})

    @staticmethod
    def check_origin(request: Request) -> None:
        # A web page elsewhere can make the browser POST a form here without any CORS preflight;
        # browsers mark such requests with an Origin header, which must then name this server.
        origin = request.headers.get("origin")
        if origin and request.method not in ("GET", "HEAD") and urlsplit(origin).netloc != request.headers.get("host"):
            raise ApiError(403, f"cross-origin request from {origin} refused", "permission_error")

    def to_sample(self, req: VideoRequest, has_image: bool) -> SampleConfig:
        """Request -> explicit SampleConfig, or a one-line ValueError."""
        spec, d, lim = self.ready().spec, self.defaults, self.limits
        if req.model is not None and req.model != spec.name:
            raise ValueError(f"this server runs model {spec.name!r}, not {req.model!r}")
        if len(req.prompt) > lim.max_prompt_chars:
            raise ValueError(f"the prompt is {len(req.prompt)} characters long; the limit is {lim.max_prompt_chars}")
        check_prompt(req.prompt)
        steps = req.steps if req.steps is not None else d.steps
        if req.draft:
            if req.steps not in (None, 1):
                raise ValueError("a draft is 1 step: leave steps out (refine it later for more)")
            steps = 1
        if steps > MAX_RCM_STEPS and not self.allow_teacher:
            raise ValueError(f"steps must be 1-{MAX_RCM_STEPS}; this server does not run the many-step "
                             "teacher sampler (start it with --allow-teacher)")
        if steps > lim.max_teacher_steps:
            raise ValueError(f"steps must be at most {lim.max_teacher_steps}, got {steps}")
        if req.frames is not None and req.frames > lim.max_frames:
            raise ValueError(f"frames must be at most {lim.max_frames}, got {req.frames}")
        if req.num_samples is not None and req.num_samples > lim.max_num_samples:
            raise ValueError(f"num_samples must be at most {lim.max_num_samples}, got {req.num_samples}")

        def pick(value, default):
            return default if value is None else value
        sample = SampleConfig(
            steps=steps, seed=pick(req.seed, d.seed), sigma_max=pick(req.sigma_max, d.sigma_max),
            ode=pick(req.ode, d.ode), num_samples=pick(req.num_samples, d.num_samples),
            num_frames=pick(req.frames, d.num_frames), resolution=pick(req.resolution, d.resolution),
            aspect_ratio=pick(req.aspect_ratio, d.aspect_ratio),
            adaptive_resolution=pick(req.adaptive_resolution, d.adaptive_resolution),
            solver=pick(req.solver, d.solver), shift=pick(req.shift, d.shift), guidance=pick(req.guidance, d.guidance))
        try:
            check_sample(spec, sample, has_image)
        except ValueError as e:
            # The pipeline words its errors for the CLI (--frames); the API's fields have no dashes.
            raise ValueError(str(e).replace("--num-samples", "num_samples").replace("--sigma-max", "sigma_max")
                             .replace("--", "")) from None
        return explicit_sample(sample, spec)

    def check_image(self, data: bytes):
        """An upload -> RGB PIL image, if it is a PNG/JPEG/WebP of sane size."""
        from PIL import Image, UnidentifiedImageError

        if not data:
            raise ApiError(400, "the image upload is empty")
        if len(data) > self.limits.max_upload_bytes:
            raise ApiError(413, f"the image is {len(data)} bytes; the limit is {self.limits.max_upload_bytes}")
        try:
            with Image.open(io.BytesIO(data)) as im:   # reads the header only
                if im.format not in IMAGE_FORMATS:
                    raise ApiError(415, f"the image must be PNG, JPEG or WebP, not {im.format}")
                if im.width * im.height > self.limits.max_image_pixels:
                    raise ApiError(413, f"the image is {im.width}x{im.height}; the limit is "
                                        f"{self.limits.max_image_pixels} pixels")
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError):
            raise ApiError(400, "the upload is not a readable image (PNG, JPEG or WebP)") from None

    def save_image(self, image) -> Path:
        """Keep a checked upload as a lossless PNG under a made-up name (refine reuses it)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"input_{secrets.token_hex(12)}.png"
        tmp = path.with_name(".partial-" + path.name)
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
        return path

    def job_json(self, job: Job) -> dict:
        d = job.to_dict()
        d["model"] = self.pipeline.spec.name if self.pipeline is not None else None
        d["url"] = f"/v1/videos/{job.id}/content" if job.status == "completed" else None
        return d

    def find(self, job_id: str) -> Job:
        job = self.queue.get(job_id)
        if job is None:
            raise ApiError(404, f"no video job {job_id!r} (unknown id, or forgotten: the history keeps "
                                f"{self.queue.max_history} jobs)", "not_found")
        return job

    def delete_files(self, job: Job) -> None:
        if job.output is not None:
            job.output.unlink(missing_ok=True)
        if job.image_path is not None and not self.queue.image_in_use(job.image_path):
            job.image_path.unlink(missing_ok=True)

    def health(self) -> tuple[int, dict]:
        if self.load_error is not None:
            return 503, {"status": "error", "error": self.load_error}
        if self.pipeline is None:
            return 503, {"status": "loading"}
        spec = self.pipeline.spec
        return 200, {
            "status": "ok", "model": spec.name, "task": spec.task, "untrained": spec.untrained,
            "token_required": self.token is not None,
            "resolutions": {name: list(sizes) for name, sizes in RESOLUTIONS.items()},
            "defaults": {"steps": self.defaults.steps, "seed": self.defaults.seed,
                         "resolution": self.defaults.resolution or spec.resolution,
                         "aspect_ratio": self.defaults.aspect_ratio or spec.aspect_ratio,
                         "frames": self.defaults.num_frames or spec.num_frames,
                         "sigma_max": self.defaults.sigma_max or spec.sigma_max},
            "max_steps": self.limits.max_teacher_steps if self.allow_teacher else MAX_RCM_STEPS,
            "max_frames": self.limits.max_frames, "max_num_samples": self.limits.max_num_samples,
        }


async def _read_body(request: Request, limits: Limits) -> tuple[dict, bytes | None]:
    """JSON or form fields, and the uploaded image bytes if any. The declared length is checked
    first: uvicorn's HTTP parsers refuse a body longer than its Content-Length, so this bounds
    what is read."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise ApiError(411, "a Content-Length header is required")
    if int(length) > limits.max_upload_bytes + FORM_SLACK:
        raise ApiError(413, f"the request is {length} bytes; the limit is {limits.max_upload_bytes + FORM_SLACK}")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the JSON body must be an object")
        return data, None
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        form = await request.form(max_files=1, max_fields=32)
        fields, image = {}, None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise ApiError(400, f"unexpected file field {key!r}; the image goes in 'image'")
                data = await value.read()
                # A browser sends an empty part for an untouched file input.
                image = data if (data or value.filename) else None
            elif value != "":                       # empty form inputs mean "default"
                fields[key] = value
        await form.close()
        return fields, image
    raise ApiError(415, "send application/json, or multipart/form-data with an 'image' file")


def create_app(pipeline_or_loader, output_dir: str | Path, *, token: str | None = None, max_queue: int = 16,
               max_history: int = 200, allow_teacher: bool = False, defaults: SampleConfig = SampleConfig(),
               limits: Limits = Limits(), allowed_hosts: list[str] | None = None) -> FastAPI:
    """`pipeline_or_loader`: a loaded Pipeline (anything with .spec and .generate), or a function
    returning one, called on a background thread when the app starts. `allowed_hosts`: Host
    header names accepted (None: any); a loopback server should accept only loopback names, or a
    web page could reach it through DNS rebinding."""
    output_dir = Path(output_dir)
    srv = _Server(pipeline_or_loader, output_dir, token, JobQueue(None, output_dir, max_queue=max_queue,
                  max_history=max_history), allow_teacher, defaults, limits)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.start()
        yield
        await run_in_threadpool(srv.stop)

    app = FastAPI(title="turbovid", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error(e.status, e.message, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p not in ("query", "path", "body"))
        return _error(400, f"{where}: {err['msg']}", "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "not_found" if e.status_code == 404 else "invalid_request_error")

    def authorized(request: Request) -> None:
        srv.check_origin(request)
        srv.check_token(request)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    def health():
        status, body = srv.health()
        return JSONResponse(body, status)

    @app.get("/metrics", dependencies=[Depends(authorized)])
    def metrics():
        m = srv.queue.metrics()
        m.update(model=srv.pipeline.spec.name if srv.pipeline is not None else None,
                 uptime_seconds=round(time.time() - srv.started, 1))
        return m

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.post("/videos")
    async def create_video(request: Request):
        srv.ready()
        fields, image = await _read_body(request, limits)
        try:
            req = VideoRequest.model_validate(fields)
        except ValidationError as e:
            raise ApiError(400, _one_line(e)) from None
        picture = await run_in_threadpool(srv.check_image, image) if image is not None else None
        try:
            sample = srv.to_sample(req, picture is not None)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        image_path = await run_in_threadpool(srv.save_image, picture) if picture is not None else None
        try:
            job = srv.queue.submit(req.prompt, sample, image_path=image_path, draft=req.draft)
        except QueueFull as e:
            if image_path is not None:
                image_path.unlink(missing_ok=True)
            raise ApiError(429, str(e), "queue_full", {"Retry-After": "5"}) from None
        return srv.job_json(job)

    @v1.get("/videos")
    def list_videos(limit: int = Query(20, ge=1, le=100)):
        return {"object": "list", "data": [srv.job_json(j) for j in srv.queue.recent(limit)]}

    @v1.get("/videos/{job_id}")
    def get_video(job_id: str):
        return srv.job_json(srv.find(job_id))

    @v1.get("/videos/{job_id}/content")
    def video_content(job_id: str):
        job = srv.find(job_id)
        if job.status != "completed" or job.output is None or not job.output.is_file():
            raise ApiError(404, f"video {job_id} is {job.status}; its content exists once it is completed",
                           "not_found")
        return FileResponse(job.output, media_type="video/mp4")

    @v1.delete("/videos/{job_id}")
    def delete_video(job_id: str):
        job = srv.find(job_id)
        if job.status not in FINISHED:
            return srv.job_json(srv.queue.cancel(job_id) or job)
        forgotten = srv.queue.forget(job_id)
        if forgotten is not None:
            srv.delete_files(forgotten)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    @v1.post("/videos/{job_id}/refine")
    async def refine_video(job_id: str, request: Request):
        srv.ready()
        source = srv.find(job_id)
        length = request.headers.get("content-length")
        if length is None and "transfer-encoding" in request.headers:
            raise ApiError(411, "a Content-Length header is required")
        length = length or "0"
        if not length.isdigit() or int(length) > FORM_SLACK:
            raise ApiError(413, f"a refine body is a small JSON object; got {length} bytes")
        body = await request.body()
        try:
            req = RefineRequest.model_validate_json(body) if body.strip() else RefineRequest()
        except ValidationError as e:
            raise ApiError(400, _one_line(e)) from None
        if req.steps > MAX_RCM_STEPS and not srv.allow_teacher:
            raise ApiError(400, f"steps must be 1-{MAX_RCM_STEPS}; this server does not run the teacher sampler")
        if req.steps > limits.max_teacher_steps:
            raise ApiError(400, f"steps must be at most {limits.max_teacher_steps}, got {req.steps}")
        if source.image_path is not None and not source.image_path.is_file():
            raise ApiError(404, f"the input image of {job_id} is gone", "not_found")
        sample = dataclasses.replace(source.sample, steps=req.steps)
        try:
            job = srv.queue.submit(source.prompt, sample, image_path=source.image_path, draft_of=source.id)
        except QueueFull as e:
            raise ApiError(429, str(e), "queue_full", {"Retry-After": "5"}) from None
        return srv.job_json(job)

    app.include_router(v1)
    return app

