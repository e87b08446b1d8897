"""benchmarks/e2e.py --only-14b on the CPU with tiny shapes: what the 14B run measures, in which order, and what it
saves, without a GPU. Module constants shrink the models; the CUDA-only calls (sync, peak memory, CUDA-event timing)
become no-ops, and the turbo accelerations (Triton kernels) are reduced to the text K/V cache the row clears."""
import gc
import json
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import e2e as E  # noqa: E402
from diffusers import WanTransformer3DModel  # noqa: E402

from turbovid.config import MODELS  # noqa: E402
from turbovid.speedups import enable_text_kv_cache  # noqa: E402

TINY = MODELS["tiny"]


@pytest.fixture
def cpu_e2e(monkeypatch):
    for name, value in {"DEVICE": "cpu", "DIT_14B": TINY.dit, "DIT_1P3B": TINY.dit, "TEXT": TINY.text,
                        "VAE": TINY.vae, "LATENT_720P": (1, 16, 3, 4, 6), "START": time.perf_counter(),
                        "sync": lambda: None, "peak_gb": lambda: 0.0}.items():
        monkeypatch.setattr(E, name, value)

    def time_cpu(fn, warmup=1, iters=1):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1e3 * (time.perf_counter() - t0) / iters
    monkeypatch.setattr(E, "time_cuda", time_cpu)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    return E


def run(monkeypatch, tmp_path, *flags) -> dict:
    monkeypatch.setattr(sys, "argv", ["e2e.py", "--only-14b", "--quick", "--out", str(tmp_path), *flags])
    E.main()
    (path,) = tmp_path.glob("e2e_14b_*.json")
    return json.loads(path.read_text())


def test_only_14b_times_one_video(cpu_e2e, monkeypatch, tmp_path):
    def turbo(net):      # the diffusers model must be gone: ours' bf16 weights are shared with it
        gc.collect()
        assert not any(type(o) is WanTransformer3DModel for o in gc.get_objects())
        return enable_text_kv_cache(net)
    monkeypatch.setattr(E, "turbo_14b_", turbo)
    out = run(monkeypatch, tmp_path)

    rows = {r["config"]: r for r in out["dit_14b"]}
    assert list(rows) == [f"14B 720p {c}" for c in E.BASELINES] + ["14B 720p bf16 dense (SDPA)", E.TURBO_14B]
    ref, ours = (rows[f"14B 720p {c}"] for c in E.BASELINES)
    for r in (ref, ours):
        assert r["dit_s"] == pytest.approx(50 * r["forward_s"])
        assert "one batch-2 forward, no warm-up" in r["measured"] and r["measured"].startswith("extrapolated: 50 x")
    # Same tensors in both models (and the RoPE tables rebuilt after to_empty): the velocities agree.
    assert ref["rel_l2"] < 0.02 and ref["cos"] > 0.999
    assert len(rows[E.TURBO_14B]["steps_ms"]) == 4

    stages = {r["stage"]: r for r in out["stages"]}
    assert list(stages) == ["text_encode", "dit_4_steps", "vae_decode", "vae_decode_and_mp4", "end_to_end"]
    assert stages["dit_4_steps"]["s"] == rows[E.TURBO_14B]["dit_4step_s"]
    assert stages["end_to_end"]["s"] == pytest.approx(
        sum(stages[k]["s"] for k in ("text_encode", "dit_4_steps", "vae_decode_and_mp4")))
    assert "(1, 3, 9, 32, 48)" in stages["vae_decode"]["note"]        # the turbo latent, decoded

    verdict = out["verdict"]
    assert list(verdict) == ["dit_4step_14b_s", "e2e_14b_s"]
    assert verdict["e2e_14b_s"]["target"] == 12.0 and verdict["e2e_14b_s"]["measured"] == stages["end_to_end"]["s"]
    assert verdict["dit_4step_14b_s"]["measured"] == rows[E.TURBO_14B]["dit_4step_s"]


def test_only_14b_out_of_time_skips_and_says_so(cpu_e2e, monkeypatch, tmp_path):
    out = run(monkeypatch, tmp_path, "--deadline", "0")
    assert [r["measured"] for r in out["dit_14b"]] == ["skipped: time limit"] * 4
    assert [r["stage"] for r in out["stages"]] == ["text_encode", "dit_4_steps", "vae_decode_and_mp4"]
    assert {k: v["measured"] for k, v in out["verdict"].items()} == {"dit_4step_14b_s": None, "e2e_14b_s": None}


def test_meta_built_diffusers_dit_has_its_rope_tables(cpu_e2e):
    ref, fresh = E.diffusers_dit(TINY.dit, meta=True), E.diffusers_dit(TINY.dit)    # to_empty vs diffusers' init
    for name in ("freqs_cos", "freqs_sin"):
        assert torch.equal(getattr(ref.rope, name), getattr(fresh.rope, name))
    assert all(p.dtype == torch.bfloat16 and p.isfinite().all() for p in ref.parameters())


def test_baseline_rows_of_the_1p3b_waterfall_keep_their_keys(cpu_e2e):
    cfg = TINY.dit
    ref = E.diffusers_dit(cfg)
    ours = E.load_dit(ref.state_dict(), cfg).eval().requires_grad_(False)
    noise = torch.randn(1, 16, 3, 4, 6)
    context = torch.randn(1, cfg.text_len, cfg.text_dim).to(torch.bfloat16)
    rows = E.baseline_forwards(ref, ours, noise, context, iters=2)
    assert [r["config"] for r in rows] == list(E.BASELINES)
    assert set(rows[0]) == {"config", "steps", "dit_s", "step_ms", "peak_gb", "measured", "rel_l2", "cos",
                            "quality_of"}
    assert set(rows[1]) == {"config", "steps", "dit_s", "step_ms", "peak_gb", "measured", "quality_of"}
    assert rows[0]["measured"].endswith("(median of 2 batch-2 forwards)")
