"""The interactive terminal mode driven through stdin: in-process with a scripted sys.stdin for the
whole command set, and once through the real `turbovid serve --tui` command in a subprocess."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import turbovid

from turbovid.config import SampleConfig
from turbovid.pipeline import Pipeline
from turbovid.serve.jobs import explicit_sample
from turbovid.serve.tui import parse_setting, run_tui
from turbovid.video import read_video


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load("tiny")


def test_scripted_session(pipe, tmp_path, monkeypatch, capsys):
    (tmp_path / "folder.mp4").mkdir()
    script = "\n".join([
        "/help",
        "/set steps 2",
        "/show",
        "a red ball bounces \\",               # continued on the next line
        "on green grass",
        str(tmp_path / "first"),              # .mp4 appended
        "/set steps 9",
        "/set frames 10",
        "/set sigma_max 0.05",
        "/set num_samples 0",
        "/set colour red",
        "/set steps",
        "/bogus",
        "a prompt whose output path is a folder",
        str(tmp_path / "folder.mp4"),
        "/set frames 1",
        "/set num_samples 2",
        "a blue square",
        "",                                   # default: the last path given (first.mp4)
        "/reset",
        "/show",
        "/set steps 1",
        "/set frames 1",
        "the same prompt twice",
        str(tmp_path / "a.mp4"),
        "the same prompt twice",
        str(tmp_path / "b.mp4"),
        "/quit",
        "never read",
    ]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    launch = explicit_sample(SampleConfig(steps=4, seed=3, num_frames=5), pipe.spec)
    rc = run_tui(pipe, launch, {"model": "tiny", "attention": "dense"})
    out = capsys.readouterr().out
    assert rc == 0
    assert "/set <param> <value>" in out and "/quit" in out                          # /help
    assert "steps = 2" in out
    shows = out.split("launch (fixed):")[1:]
    assert len(shows) == 2
    assert "steps               2  * (launch: 4)" in shows[0] and "frames              5\n" in shows[0]
    assert "seed                3" in shows[0] and "attention           dense" in shows[0]
    assert "steps               4\n" in shows[1] and "*" not in shows[1]               # after /reset
    for message in ["error: steps must be 1-4, got 9", "error: frames must be 4k+1", "error: sigma_max must be >= 0.1",
                    "error: num_samples must be >= 1", "error: unknown parameter 'colour'",
                    "error: usage: /set <param> <value>", "error: unknown command /bogus",
                    "is a folder"]:
        assert message in out, message
    assert "never read" not in out and out.count("saved ") == 4
    # The 2nd generation (1 frame, 2 samples side by side) went to the default path, replacing the 1st.
    assert read_video(tmp_path / "first.mp4").shape == (1, 128, 2 * 224, 3)
    # Same seed for every generation: same prompt and settings give the same video.
    a, b = read_video(tmp_path / "a.mp4"), read_video(tmp_path / "b.mp4")
    assert a.shape == (1, 128, 224, 3)
    np.testing.assert_array_equal(a, b)


def test_parse_setting():
    assert parse_setting("steps", "3") == ("steps", 3)
    assert parse_setting("num_steps", "1") == ("steps", 1)
    assert parse_setting("frames", "81") == ("num_frames", 81)
    assert parse_setting("sigma_max", "1600") == ("sigma_max", 1600.0)
    for name, value, message in [("steps", "0", "1-4"), ("steps", "2.5", "integer"), ("frames", "0", "4k+1"),
                                 ("sigma_max", "nan", ">= 0.1"), ("sigma_max", "x", "a number")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_setting(name, value)


def test_cli_tui_through_stdin_ends_on_eof(tmp_path):
    script = "/set steps 1\n/show\na green triangle\n" + str(tmp_path / "out" / "tri") + "\n"
    # The child imports the same turbovid as this test, installed or not.
    root = os.path.dirname(os.path.dirname(turbovid.__file__))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "turbovid.cli", "serve", "--tui", "--model", "tiny", "--seed", "4",
                           "--frames", "5"], input=script, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "model tiny (t2v)" in proc.stdout and "seed                4" in proc.stdout
    assert "frames              5" in proc.stdout and "saved " in proc.stdout
    assert read_video(tmp_path / "out" / "tri.mp4").shape == (5, 128, 224, 3)


def test_cli_bad_launch_values_are_one_line_errors(capsys):
    from turbovid.cli import main
    for argv, message in [(["--frames", "6"], "frames must be 4k+1"), (["--steps", "5"], "--steps must be 1-4"),
                          (["--resolution", "99p"], "unknown resolution"), (["--model", "nope"], "unknown model")]:
        assert main(["serve", "--tui", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("turbovid: error: ") and message in err and len(err.splitlines()) == 1, err
    assert main(["serve", "--max-queue", "0"]) == 2 and "--max-queue" in capsys.readouterr().err
    assert main(["serve", "--token", "short"]) == 2 and "at least 8" in capsys.readouterr().err


def test_image_to_video_session_asks_for_the_image(tmp_path, monkeypatch, capsys):
    from PIL import Image

    pipe = Pipeline.load("tiny-i2v")
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "first.png")
    script = "\n".join([
        "a green field", str(tmp_path / "missing.png"),                 # error, loop continues
        "a green field", str(tmp_path / "first.png"), str(tmp_path / "one.mp4"),
        "a green field, again", "", str(tmp_path / "two.mp4"),          # default: the last image
    ]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    launch = explicit_sample(SampleConfig(steps=1, num_frames=1), pipe.spec)
    assert run_tui(pipe, launch, {"model": "tiny-i2v"}) == 0
    out = capsys.readouterr().out
    assert "error: image not found" in out and out.count("saved ") == 2
    assert f"image path [{tmp_path / 'first.png'}]" in out
    assert read_video(tmp_path / "two.mp4").shape == (1, 128, 224, 3)
