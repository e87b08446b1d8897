"""Frames <-> tensors, mp4 writing, and image reading for I2V.

Files are written atomically (a temporary file in the same folder, renamed at the end), so an
error or Ctrl-C never leaves a half-written video behind.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

import numpy as np
import torch

from turbovid.config import DEFAULT_PRESET, FPS, X264_PRESETS


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """[3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3] as TurboDiffusion saves it: floor(255·(v+1)/2 + 0.5)."""
    v = (video.float().clamp(-1, 1) + 1) / 2
    v = torch.floor(255 * v + 0.5).clamp(0, 255).to(torch.uint8)
    return v.permute(1, 2, 3, 0).cpu().numpy()


def from_uint8_frames(frames: np.ndarray) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> [3, F, H, W] fp32 in [-1, 1] (the inverse of to_uint8_frames up to rounding)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1


def tile_samples(videos: torch.Tensor) -> torch.Tensor:
    """[N, 3, F, H, W] -> [3, F, H, N·W]: several samples side by side in one video (SPEC §5.1.7)."""
    return torch.cat(list(videos), dim=-1)


def check_preset(preset: str, what: str = "x264 preset") -> str:
    """`preset` if x264 knows it, else a one-line ValueError naming `what` (the CLI names its flag)."""
    if preset not in X264_PRESETS:
        raise ValueError(f"unknown {what} {preset!r}; choose one of {', '.join(X264_PRESETS)}")
    return preset


# The package each mp4 backend needs, and how to install it.
BACKEND_PACKAGES = {"ffmpeg": ("imageio_ffmpeg", "pip install 'imageio[ffmpeg]'"),
                    "opencv": ("cv2", "pip install opencv-python-headless")}


def _installed(backend: str) -> bool:
    return importlib.util.find_spec(BACKEND_PACKAGES[backend][0]) is not None


def require_backend(backend: str) -> str:
    """`backend` if its encoder package is installed, else a one-line ModuleNotFoundError saying how to install it
    (raised before any work, not after a generation when the first frames reach the encoder)."""
    if backend not in BACKEND_PACKAGES:
        raise ValueError(f"unknown video backend {backend!r}; choose {' or '.join(BACKEND_PACKAGES)}")
    if not _installed(backend):
        module, hint = BACKEND_PACKAGES[backend]
        raise ModuleNotFoundError(f"writing mp4 with the {backend} backend needs {module}: {hint}", name=module)
    return backend


def available_backend() -> str | None:
    """The first mp4 backend whose package is installed (ffmpeg, then opencv), or None."""
    return next((backend for backend in BACKEND_PACKAGES if _installed(backend)), None)


class VideoWriter:
    """An mp4 written while frames are still being made: `append` hands uint8 [F, H, W, 3] chunks to an encoder
    thread (a queue of `depth` chunks) and returns at once, so encoding overlaps the GPU work that makes the next
    chunk. Atomic: the file appears under `path` only when the `with` block ends without an exception; otherwise
    the partial file is removed. An encoder error is raised by the next `append` or by `close`.

    backend "ffmpeg": H.264 (libx264) through imageio-ffmpeg, quality 5 (CRF 25) as TurboDiffusion, x264 preset
    `preset` (default "veryfast": on a 2-core CPU, 81 frames of a textured 832 x 480 test clip encode in 0.54 s
    against 1.01 s with x264's default "medium", into an 8% smaller file of 0.21 dB lower PSNR); "opencv": OpenCV's
    MPEG-4 part 2 (mp4v), for machines without imageio-ffmpeg."""

    def __init__(self, path: str | Path, fps: int = FPS, backend: str = "ffmpeg", depth: int = 4,
                 preset: str = DEFAULT_PRESET):
        import queue
        import threading

        require_backend(backend)
        self.path, self.fps, self.backend, self.preset = Path(path), fps, backend, check_preset(preset)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Created like any new file (mode 0666 minus the umask; mkstemp would make it 0600), exclusively.
        tmp = self.path.parent / f".partial-{secrets.token_hex(6)}{self.path.suffix or '.mp4'}"
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        self._tmp, self._size, self._error, self._closed = tmp, None, None, False
        self.frames = 0                  # frames appended so far
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._encode, name="turbovid-mp4", daemon=True)
        self._thread.start()

    def _open(self, height: int, width: int):
        if self.backend == "opencv":
            import cv2

            writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (width, height))
            if not writer.isOpened():
                raise RuntimeError(f"OpenCV cannot write {self._tmp}")
            return (lambda frame: writer.write(frame[:, :, ::-1])), writer.release
        import imageio.v2 as imageio

        # macro_block_size=1 keeps sizes that are not multiples of 16 (quality 5 as TurboDiffusion).
        writer = imageio.get_writer(str(self._tmp), fps=self.fps, quality=5, macro_block_size=1, codec="libx264",
                                    format="FFMPEG", ffmpeg_log_level="error",
                                    output_params=["-preset", self.preset])
        return writer.append_data, writer.close

    def _encode(self) -> None:
        put = close = None
        try:
            while (frames := self._queue.get()) is not None:
                if put is None:
                    put, close = self._open(*frames.shape[1:3])
                for frame in frames:
                    put(np.ascontiguousarray(frame))
        except BaseException as e:   # kept for the caller; keep draining so append never blocks forever
            self._error = e
            while self._queue.get() is not None:
                pass
        finally:
            if close is not None:
                try:
                    close()
                except BaseException as e:
                    self._error = self._error or e

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error

    def append(self, frames: np.ndarray) -> None:
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        if self._size is None:
            self._size = frames.shape[1:3]
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frame size changed from {self._size} to {frames.shape[1:3]}")
        if self._closed:
            raise ValueError("the video is already closed")
        self._raise()
        self._queue.put(frames)
        self.frames += len(frames)

    def close(self, commit: bool = True) -> Path:
        """Wait for the encoder; with `commit` (and at least one frame, no error) rename the file into place,
        else remove it."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        try:
            if commit:
                if self._size is None:
                    raise ValueError(f"no frames were written to {self.path}")
                self._raise()
                os.replace(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)
        return self.path

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(commit=exc_type is None)


def write_video(path: str | Path, frames: np.ndarray, fps: int = FPS, backend: str = "ffmpeg",
                preset: str = DEFAULT_PRESET) -> Path:
    """Write uint8 [F, H, W, 3] frames as an mp4 (H.264 by default), atomically."""
    with VideoWriter(path, fps, backend, preset=preset) as writer:
        writer.append(frames)
    return Path(path)


def read_video(path: str | Path) -> np.ndarray:
    """uint8 [F, H, W, 3] frames of a video file (tests, evaluation)."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        return np.stack([np.asarray(f) for f in reader])
    finally:
        reader.close()


def read_image(path: str | Path):
    """Open an image as RGB PIL; a missing or unreadable file is a one-line ValueError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def image_to_tensor(image, width: int, height: int) -> torch.Tensor:
    """PIL RGB -> [3, height, width] in [-1, 1], resized exactly (aspect not kept) with antialiased
    bilinear filtering, as TurboDiffusion's I2V preprocessing (SPEC §2.2.2)."""
    from PIL import Image

    resized = image.resize((width, height), Image.BILINEAR, reducing_gap=None)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5
