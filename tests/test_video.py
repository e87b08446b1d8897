"""turbovid.video: atomic mp4 writing, one shot and streamed through the encoder thread (VideoWriter)."""
import importlib.util

import numpy as np
import pytest

from turbovid.video import VideoWriter, read_video, write_video


def _frames(n=9, h=48, w=64):
    """A smooth colour gradient with a bright square moving right (noise would not survive H.264)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / w, 255 * y / h, np.full((h, w), 96.0)], axis=-1)
    frames = np.repeat(base[None], n, axis=0)
    for i in range(n):
        frames[i, 16:32, 4 * i:4 * i + 16] = 240
    return frames.astype(np.uint8)


@pytest.mark.parametrize("backend", ["ffmpeg", "opencv"])
def test_streamed_chunks_equal_one_shot_write(tmp_path, backend):
    if backend == "opencv":
        pytest.importorskip("cv2")
    frames = _frames()
    one = write_video(tmp_path / "one.mp4", frames, backend=backend)
    with VideoWriter(tmp_path / "streamed.mp4", backend=backend) as writer:
        for chunk in (frames[:1], frames[1:5], frames[5:]):
            writer.append(chunk)
    assert writer.frames == len(frames)
    a, b = read_video(one), read_video(tmp_path / "streamed.mp4")
    assert a.shape == b.shape == frames.shape and np.array_equal(a, b)
    assert np.abs(a.astype(int) - frames).mean() < 20          # lossy, but the same pictures
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.mp4", "streamed.mp4"]
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert (one.stat().st_mode & 0o777) == 0o666 & ~umask          # an ordinary file, not mkstemp's 0600


def test_an_error_in_the_block_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "v.mp4") as writer:
            writer.append(_frames(3))
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_an_encoder_error_is_raised_and_leaves_no_file(tmp_path, monkeypatch):
    def broken(self, h, w):
        raise OSError("disk full")
    monkeypatch.setattr(VideoWriter, "_open", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        with VideoWriter(tmp_path / "v.mp4", depth=1) as writer:
            for _ in range(5):                   # the queue keeps draining: append never blocks for good
                writer.append(_frames(2))
    assert list(tmp_path.iterdir()) == []


def test_bad_frames_and_empty_videos_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="uint8 frames"):
        write_video(tmp_path / "v.mp4", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="size changed"):
        with VideoWriter(tmp_path / "v.mp4") as writer:
            writer.append(_frames(2, 16, 16))
            writer.append(_frames(2, 16, 32))
    with pytest.raises(ValueError, match="no frames"):
        with VideoWriter(tmp_path / "v.mp4"):
            pass
    with pytest.raises(ValueError, match="unknown video backend"):
        VideoWriter(tmp_path / "v.mp4", backend="gif")
    assert list(tmp_path.iterdir()) == []


def test_backends_are_checked_before_any_file(tmp_path, missing_modules):
    from turbovid.video import available_backend, require_backend
    missing = missing_modules
    cv2_installed = importlib.util.find_spec("cv2") is not None   # before "cv2" is made missing
    assert require_backend("ffmpeg") == "ffmpeg" and available_backend() == "ffmpeg"
    missing.add("imageio_ffmpeg")
    with pytest.raises(ModuleNotFoundError, match=r"imageio\[ffmpeg\]") as e:
        VideoWriter(tmp_path / "v.mp4")
    assert e.value.name == "imageio_ffmpeg"
    assert available_backend() == ("opencv" if cv2_installed else None)
    missing.add("cv2")
    assert available_backend() is None
    with pytest.raises(ModuleNotFoundError, match="opencv-python-headless"):
        write_video(tmp_path / "v.mp4", _frames(), backend="opencv")
    assert list(tmp_path.iterdir()) == []


def test_x264_preset_is_applied_and_checked(tmp_path, monkeypatch):
    """The preset reaches ffmpeg's command line and both presets keep the pictures; an unknown preset is a
    one-line error before any file exists."""
    import imageio_ffmpeg

    seen = []
    real = imageio_ffmpeg.write_frames

    def spy(*args, **kwargs):
        seen.append(kwargs.get("output_params"))
        return real(*args, **kwargs)

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", spy)
    frames = _frames(n=17, h=96, w=128)
    fast = write_video(tmp_path / "fast.mp4", frames)
    slow = write_video(tmp_path / "slow.mp4", frames, preset="medium")
    assert seen == [["-preset", "veryfast"], ["-preset", "medium"]]
    a, b = read_video(fast), read_video(slow)
    assert a.shape == b.shape == frames.shape
    assert np.abs(a.astype(int) - frames).mean() < 20 and np.abs(b.astype(int) - frames).mean() < 20
    with pytest.raises(ValueError, match="unknown x264 preset 'quick'"):
        VideoWriter(tmp_path / "bad.mp4", preset="quick")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.mp4", "slow.mp4"]
