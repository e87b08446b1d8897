"""turbovid eval (turbovid/eval.py): the clip descriptor and Fréchet distance, argument checks, and one real
configuration on the shipped mini model (2 prompts, CPU)."""
import json

import pytest
import torch

from turbovid.cli import main
from turbovid.eval import CONFIGS, clip_features, frechet_distance, run_eval
from turbovid.train.data import ProceduralVideos


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 5, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shifted = a + torch.tensor([3.0, 0, 0, 0, 0], dtype=torch.float64)
    assert frechet_distance(a, shifted) == pytest.approx(9.0, rel=1e-9)     # same covariance: |d|^2
    wider = a * 2             # covariance 4S: tr(S + 4S - 2 * 2S) = tr(S), plus the means' distance |mean(a)|^2
    expected = float(torch.cov(a.T).trace() + a.mean(0).pow(2).sum())
    assert frechet_distance(a, wider) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a[:1], a)


def test_clip_features_see_colour_motion_and_sharpness():
    data = ProceduralVideos("train", 64, 9, seed=0)
    video, _ = data.batch([0])
    f = clip_features(video[0])
    assert f.shape == (28,) and torch.isfinite(f).all()
    still = video[0, :, :1].expand_as(video[0])
    assert clip_features(still)[6:9].abs().max() == 0                       # no motion energy
    padded = torch.nn.functional.pad(video, (2, 2, 2, 2, 0, 0), mode="replicate")
    blurred = torch.nn.functional.avg_pool3d(padded, (1, 5, 5), stride=1)[0]
    assert clip_features(blurred)[9:12].sum() < f[9:12].sum()               # less spatial gradient


def test_eval_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown eval config"):
        run_eval(["nope"], count=2)
    with pytest.raises(ValueError, match="not one"):
        run_eval(["student"], model="tiny", count=2)
    with pytest.raises(ValueError, match="--count"):
        run_eval(["student"], count=1)
    with pytest.raises(ValueError, match="--topk must be in"):
        run_eval(["student_sla"], count=2, topk=0)
    with pytest.raises(ValueError, match="--start"):
        run_eval(["student"], count=2, start=-1)
    with pytest.raises(ValueError, match="--sigma-max"):
        run_eval(["student"], count=2, sigma_max=0.0)
    with pytest.raises(ValueError, match="--mid-angles must decrease"):
        run_eval(["student"], count=2, mid_angles=(1.0, 1.4))
    with pytest.raises(ValueError, match="4 rCM steps need 3 --mid-angles"):
        run_eval(["student"], count=2, mid_angles=(1.2, 0.6))
    assert set(CONFIGS) >= {"teacher", "student", "student_sla", "student_sagesla", "student_sagesla_w8a8", "turbo"}


def test_eval_command_on_the_shipped_model(tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval.json"
    assert main(["eval", "--configs", "student", "--count", "2", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "student" in printed and "drift" in printed
    result = json.loads(out.read_text())
    row = result["rows"][0]
    assert row["config"] == "student" and row["count"] == 2 and len(row["seconds"]) == 2
    assert 0 <= row["all"] <= 1 and row["frechet"] >= 0 and result["real_vs_real_frechet"] >= 0
    assert row["hue_drift"] is None or 0 <= row["hue_drift"] <= 180      # mean |degrees| (detect.hue_drift)
    assert all("hue_drift" in d for d in row["detections"])
    assert main(["eval", "--configs", "bogus"]) == 2
    # --topk and --sla-blocks reach the SLA configurations, and each row records what it ran at. (SLA through its
    # PyTorch reference, as on any CPU without the Triton interpreter that `make test` sets.)
    monkeypatch.setenv("TURBOVID_KERNELS", "ref")
    assert main(["eval", "--configs", "student,student_sla", "--count", "2", "--device", "cpu", "--topk", "0.75",
                 "--sla-blocks", "64x128", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["topk"], r["sla_blocks"]) for r in rows] == [(None, None), (0.75, [64, 128])]
    assert main(["eval", "--configs", "student_sla", "--count", "2", "--sla-blocks", "128x48"]) == 2


def test_eval_start_and_sampler_options_reach_generate(tmp_path, monkeypatch):
    """--start picks held-out prompts start.., --sigma-max / --ode / --mid-angles reach the few-step rows'
    SampleConfig (the 50-step teacher row keeps its own sampler), and every row records what it ran."""
    from turbovid.pipeline import Pipeline
    from turbovid.train.data import sample_clip

    seen, rendered = [], []
    real_generate = Pipeline.generate

    def spy(self, prompt, sample):
        seen.append((prompt, sample))
        if not rendered:       # one real clip, then reused: this test is about what reaches generate()
            rendered.append(real_generate(self, prompt, sample))
        return rendered[0]
    monkeypatch.setattr(Pipeline, "generate", spy)
    monkeypatch.setenv("TURBOVID_KERNELS", "ref")     # the kernels' PyTorch references: no interpreter
    out = tmp_path / "eval.json"
    assert main(["eval", "--configs", "student,teacher", "--count", "2", "--start", "7", "--seed", "3",
                 "--sigma-max", "20", "--ode", "--mid-angles", "1.3,1.0,0.6", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert [p for p, _ in seen] == [sample_clip(0, "heldout", i).caption for i in (7, 8)] * 2
    student, teacher = [s for _, s in seen[:2]], [s for _, s in seen[2:]]
    assert [(s.steps, s.sigma_max, s.ode, s.seed) for s in student] == [(4, 20.0, True, 3), (4, 20.0, True, 4)]
    assert [s.mid_angles for s in student] == [(1.3, 1.0, 0.6)] * 2
    assert [(s.steps, s.sigma_max, s.ode, s.mid_angles) for s in teacher] == [(50, None, False, None)] * 2
    result = json.loads(out.read_text())
    assert result["start"] == 7
    rows = {r["config"]: r for r in result["rows"]}
    assert (rows["student"]["sigma_max"], rows["student"]["ode"], rows["student"]["mid_angles"]) == (20.0, True,
                                                                                                    [1.3, 1.0, 0.6])
    assert not {"sigma_max", "ode", "mid_angles"} & set(rows["teacher"])
