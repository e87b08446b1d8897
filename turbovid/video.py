"""Frames <-> tensors, mp4 writing, and image reading for I2V.

Files are written atomically (a temporary file in the same folder, renamed at the end), so an
error or Ctrl-C never leaves a half-written video behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from turbovid.config import FPS


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


def write_video(path: str | Path, frames: np.ndarray, fps: int = FPS) -> Path:
    """Write uint8 [F, H, W, 3] frames as an H.264 mp4, atomically."""
    import imageio.v2 as imageio

    path = Path(path)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix or ".mp4", prefix=".partial-", dir=path.parent)
    os.close(fd)
    try:
        # macro_block_size=1 keeps sizes that are not multiples of 16 (quality 5 as TurboDiffusion).
        writer = imageio.get_writer(tmp, fps=fps, quality=5, macro_block_size=1, codec="libx264",
                                    format="FFMPEG", ffmpeg_log_level="error")
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
