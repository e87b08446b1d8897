"""`turbovid generate` end to end on the tiny models, and its one-line errors."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from turbovid.cli import main
from turbovid.config import MODELS, RESOLUTIONS, SampleConfig
from turbovid.pipeline import resolve_size
from turbovid.video import read_video


def run_cli(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_failure(code, err, out_path, needle):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("turbovid: error:")
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out_path.exists()
    assert not any(p.name.startswith(".partial-") for p in out_path.parent.glob("*"))


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "first.png"
    Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(path)
    return path


def test_t2v_writes_mp4_with_frames_and_size(tmp_path, capsys):
    out = tmp_path / "sub" / "t2v.mp4"
    code, stdout, err = run_cli(capsys, "generate", "--prompt", "a red circle moves left", "--output", str(out),
                                "--model", "tiny", "--steps", "2", "--frames", "5", "--quiet")
    assert code == 0, err
    frames = read_video(out)
    width, height = RESOLUTIONS["128p"]["16:9"]
    assert frames.shape == (5, height, width, 3)
    assert "UNTRAINED" in err
    for stage in ("text_encode", "dit_step_1", "dit_step_2", "vae_decode", "write", "total"):
        assert stage in stdout


def test_i2v_and_num_samples_tile_horizontally(tmp_path, capsys, image_path):
    out = tmp_path / "i2v.mp4"
    code, _, err = run_cli(capsys, "generate", "--model", "tiny-i2v", "--image", str(image_path),
                           "--prompt", "the square turns", "--output", str(out), "--frames", "9",
                           "--num-samples", "2", "--aspect-ratio", "1:1", "--ode", "--quiet", "--preset", "medium")
    assert code == 0, err
    frames = read_video(out)
    assert frames.shape == (9, 128, 256, 3)


def test_same_seed_same_video_other_seed_differs(tmp_path, capsys):
    paths = []
    for i, seed in enumerate(("3", "3", "4")):
        out = tmp_path / f"s{i}.mp4"
        code, _, err = run_cli(capsys, "generate", "--prompt", "a blue square", "--output", str(out), "--steps", "1",
                               "--model", "tiny", "--frames", "1", "--seed", seed, "--quiet")
        assert code == 0, err
        paths.append(read_video(out).astype(np.int32))
    assert np.abs(paths[0] - paths[1]).max() == 0
    assert np.abs(paths[0] - paths[2]).max() > 0


@pytest.mark.parametrize("extra, needle", [
    (["--resolution", "1080p"], "unknown resolution"),
    (["--aspect-ratio", "2:1"], "unknown aspect ratio"),
    (["--frames", "10"], "4k+1"),
    (["--steps", "0"], "--steps"),
    (["--topk", "0"], "--topk"),
    (["--topk", "1.5"], "--topk"),
    (["--attention", "flash"], "unknown attention"),
    (["--preset", "quick"], "unknown --preset"),
    (["--model", "Wan9"], "unknown model"),
    (["--image", "missing.png"], "image not found"),
    (["--num-samples", "0"], "--num-samples"),
    (["--mid-angles", "1.0,1.4,0.5"], "--mid-angles must decrease"),
    (["--mid-angles", "1.5;1.4"], "comma-separated numbers"),
    (["--mid-angles", "1.2,0.6"], "4 rCM steps need 3 --mid-angles"),
    (["--dit", "no/such/file.pth"], "checkpoint not found"),
    (["--model", "Wan2.1-1.3B"], "needs checkpoint paths"),
    (["--max-memory", "0.0001"], "needs at least"),
    (["--model", "Wan2.1-14B", "--resolution", "720p", "--quant", "--max-memory", "8"], "needs at least 13"),
])
def test_bad_input_one_line_error_no_file(tmp_path, capsys, extra, needle):
    out = tmp_path / "bad.mp4"
    code, _, err = run_cli(capsys, "generate", "--prompt", "a cat", "--output", str(out), *extra)
    assert_clean_failure(code, err, out, needle)


def test_empty_prompt_and_bad_output_suffix(tmp_path, capsys):
    out = tmp_path / "bad.mp4"
    code, _, err = run_cli(capsys, "generate", "--prompt", "   ", "--output", str(out))
    assert_clean_failure(code, err, out, "prompt is empty")
    code, _, err = run_cli(capsys, "generate", "--prompt", "a cat", "--output", str(tmp_path / "bad.gif"))
    assert_clean_failure(code, err, tmp_path / "bad.gif", ".mp4")


def test_i2v_model_requires_image_t2v_refuses_one(tmp_path, capsys, image_path):
    out = tmp_path / "bad.mp4"
    code, _, err = run_cli(capsys, "generate", "--model", "tiny-i2v", "--prompt", "a cat", "--output", str(out))
    assert_clean_failure(code, err, out, "--image")
    code, _, err = run_cli(capsys, "generate", "--prompt", "a cat", "--output", str(out), "--image", str(image_path))
    assert_clean_failure(code, err, out, "takes no --image")


def test_missing_dependency_is_one_line(tmp_path, capsys, monkeypatch):
    # Prompt cleaning without ftfy: exit 1 (environment, not usage), one line naming it, no file.
    import turbovid.models.text_encoder as te
    monkeypatch.setattr(te, "ftfy", None)
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(capsys, "generate", "--prompt", "a cat", "--output", str(out))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("turbovid: error:") and "ftfy" in lines[0], err
    assert not out.exists() and not any(p.name.startswith(".partial-") for p in tmp_path.glob("*"))


def test_missing_mp4_encoder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, missing_modules):
    # Without imageio-ffmpeg (a bare machine, or an install without the package's dependencies) `generate` stops
    # before it loads a model, with how to install the encoder, instead of failing after the generation with a traceback.
    import turbovid.pipeline
    missing_modules.add("imageio_ffmpeg")
    loaded = []
    monkeypatch.setattr(turbovid.pipeline.Pipeline, "load", classmethod(lambda cls, *a, **k: loaded.append(1)))
    out = tmp_path / "out.mp4"
    code, _, err = run_cli(capsys, "generate", "--model", "tiny", "--prompt", "a cat", "--output", str(out))
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("turbovid: error:"), err
    assert "imageio[ffmpeg]" in lines[0] and "Traceback" not in err
    assert not loaded and not out.exists() and not any(p.name.startswith(".partial-") for p in tmp_path.glob("*"))
    # The server refuses to start the same way (every job writes an mp4).
    code, _, err = run_cli(capsys, "serve", "--model", "tiny", "--output-dir", str(tmp_path / "served"))
    assert code == 1 and err.startswith("turbovid: error:") and "imageio[ffmpeg]" in err and len(err.splitlines()) == 1
    assert not loaded


def test_wrong_checkpoint_is_one_line(tmp_path, capsys):
    # A VAE-like state dict given as the DiT.
    bogus = tmp_path / "vae_as_dit.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(8, 3, 3, 3, 3)}, bogus)
    out = tmp_path / "bad.mp4"
    code, _, err = run_cli(capsys, "generate", "--prompt", "a cat", "--output", str(out), "--dit", str(bogus))
    assert_clean_failure(code, err, out, str(bogus))
    # A file that is not a checkpoint at all.
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip file")
    code, _, err = run_cli(capsys, "generate", "--prompt", "a cat", "--output", str(out), "--dit", str(junk))
    assert_clean_failure(code, err, out, "junk.pth")


def test_real_process_exit_code_and_no_traceback(tmp_path):
    out = tmp_path / "bad.mp4"
    proc = subprocess.run([sys.executable, "-m", "turbovid.cli", "generate", "--prompt", "x", "--output", str(out),
                           "--frames", "8"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "4k+1" in proc.stderr
    assert not out.exists()


def test_adaptive_resolution_keeps_area_and_aspect():
    spec = MODELS["Wan2.2-A14B"]
    sample = SampleConfig(resolution="720p", aspect_ratio="16:9", adaptive_resolution=True)
    # A 4:3 picture at the 1280x720 area: ideal 1108.5 x 831.4 -> multiples of 16 by round().
    w, h = resolve_size(spec, sample, image_size=(800, 600))
    assert (w, h) == (16 * round((1280 * 720 / 0.75) ** 0.5 / 16), 16 * round((1280 * 720 * 0.75) ** 0.5 / 16))
    assert (w, h) == (1104, 832)
    assert resolve_size(spec, SampleConfig(resolution="480p", aspect_ratio="9:16")) == (480, 832)


def test_teacher_sampler_with_cfg_runs_more_steps(tmp_path, capsys):
    out = tmp_path / "teacher.mp4"
    code, stdout, err = run_cli(capsys, "generate", "--prompt", "a green triangle", "--output", str(out),
                                "--model", "tiny", "--steps", "6", "--frames", "1", "--solver", "euler", "--quiet")
    assert code == 0, err
    assert "dit_step_6" in stdout and "dit_step_7" not in stdout
    assert read_video(out).shape[0] == 1


def test_mid_angles_reach_the_rcm_schedule(monkeypatch):
    # SampleConfig.mid_angles (`--mid-angles`) sets the rCM sampler's middle TrigFlow angles; None keeps rCM's.
    import turbovid.pipeline as pipeline
    from turbovid.sampling import rcm_times

    seen = []
    real = pipeline.rcm_sample

    def spy(velocity, noise, times, generator, **kw):
        seen.append(times)
        return real(velocity, noise, times, generator, **kw)
    monkeypatch.setattr(pipeline, "rcm_sample", spy)
    pipe = pipeline.Pipeline.load("tiny")
    for angles in ((1.3, 1.0, 0.6), None):
        pipe.generate("a red circle", SampleConfig(steps=4, num_frames=5, resolution="128p", mid_angles=angles))
    assert seen == [rcm_times(4, 80.0, (1.3, 1.0, 0.6)), rcm_times(4, 80.0)]
