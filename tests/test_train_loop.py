"""Every training stage on the tiny recipe on CPU: finite losses, learning on a fixed batch, text conditioning
learned end to end, exact resume, merge / eval / export through the `turbovid train` command (turbovid/train/*)."""
import argparse
import dataclasses
import json
import math
import shutil

import pytest
import torch

from turbovid.attention import DenseAttention
from turbovid.attention.sla import SparseLinearAttention
from turbovid.loading import load_dit, load_vae
from turbovid.train.checkpoint import LATEST, history_metadata, load_weights, save_weights, weights_history
from turbovid.train.cli import add_train_parser, cmd_train
from turbovid.train.data import ProceduralVideos, latent_object_estimate, object_weights
from turbovid.train.distill import RCMTrainer
from turbovid.train.evaluate import generate_latents
from turbovid.train.inputs import LatentBatches, encode_videos, trained_vae_file, vae_config
from turbovid.train.loop import Env, drive
from turbovid.train.losses import flow_matching_pair, shifted_logit_normal, velocity_loss
from turbovid.train.recipe import RECIPES, Optim
from turbovid.train.teacher import SLATrainer, TeacherTrainer, frozen_dit, new_dit, run_teacher
from turbovid.train.trigflow import rf_velocity
from turbovid.train.vae import run_vae

TINY = RECIPES["tiny"]
ENV = Env(torch.device("cpu"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run directory with the VAE and the teacher trained (4 steps each), shared by the tests.
    SLA uses the PyTorch references (the Triton interpreter would only make this slow)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TURBOVID_KERNELS", "ref")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("run")
    run_vae(TINY, run_dir, ENV)
    run_vae(TINY, run_dir, ENV, decoder=True)
    run_teacher(TINY, run_dir, ENV)
    yield run_dir, LatentBatches(TINY, run_dir, ENV)
    torch.set_num_threads(threads)
    mp.undo()


def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _stage(recipe, name, **changes):
    cfg = getattr(recipe, name)
    return dataclasses.replace(recipe, **{name: dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **changes))})


def _parser():
    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers(dest="command"))
    return parser


def _cli(*argv):
    return cmd_train(_parser().parse_args(["train", *argv]))


def _resume_copy(src, dst, step):
    """A run folder whose newest checkpoint is src's checkpoint at `step`."""
    (dst / "checkpoints").mkdir(parents=True)
    name = f"step_{step:08d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / LATEST).write_text(name + "\n")


def test_vae_stage_trains_and_normalises_latents(run):
    run_dir, _ = run
    records = _log(run_dir / "vae" / "log.jsonl")
    assert [r["step"] for r in records] == list(range(TINY.vae_stage.run.steps))
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 for r in records)
    # With the measured statistics the latents of the measuring clips have per-channel mean 0, std 1
    # (up to the bf16 rounding TurboDiffusion applies to the constants).
    cfg = vae_config(TINY, run_dir)
    vae = load_vae(str(run_dir / "vae" / "final.safetensors"), cfg, dtype=torch.float32)
    videos, _ = ProceduralVideos("train", TINY.size, TINY.frames, TINY.data_seed + 1).batch(
        list(range(TINY.vae_stage.stats_clips)))
    z = encode_videos(vae, videos).transpose(0, 1).flatten(1)   # [16, N]
    assert z.mean(1).abs().max() < 0.02 and (z.std(1, unbiased=False) - 1).abs().max() < 0.02
    report = json.loads((run_dir / "vae" / "reconstruction.json").read_text())
    assert report["count"] == TINY.vae_stage.eval_clips and math.isfinite(report["psnr"]) and 0 <= report["all"] <= 1
    by_size = report["shape_by_size"]
    assert sum(v["clips"] for v in by_size.values()) == report["count"]
    assert sum(v["right"] for v in by_size.values()) == round(report["shape"] * report["count"])
    # logvar half of conv1 started at the recipe's value and moved only by a few (lr 1e-3) steps
    state = load_weights(run_dir / "vae" / "final.safetensors")
    assert (state["conv1.bias"][16:] - TINY.vae_stage.logvar_init).abs().max() < 0.1


def test_vae_decoder_stage_trains_the_decoder_only(run, tmp_path):
    run_dir, _ = run
    before, after = (load_weights(run_dir / d / "final.safetensors") for d in ("vae", "vae_decoder"))
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith(("encoder.", "conv1."))]
    trained = [k for k in before if k.startswith(("decoder.", "conv2."))]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in frozen)         # latents and their statistics unchanged
    assert sum(not torch.equal(before[k], after[k]) for k in trained) > len(trained) // 2
    records = _log(run_dir / "vae_decoder" / "log.jsonl")
    assert [r["stage"] for r in records] == ["vae_decoder"] * TINY.vae_decoder.run.steps
    assert all(math.isfinite(r["loss"]) for r in records)
    assert json.loads((run_dir / "vae_decoder" / "reconstruction.json").read_text())["count"] == 2
    assert not (run_dir / "vae_decoder" / "latent_stats.json").exists()
    # Decoding uses the fine-tuned decoder, encoding (latent pool) the vae stage's file
    assert trained_vae_file(TINY, run_dir) == run_dir / "vae_decoder" / "final.safetensors"
    assert trained_vae_file(TINY, run_dir, decode=False) == run_dir / "vae" / "final.safetensors"
    # On one fixed batch the decoder's reconstruction loss goes down
    shutil.copytree(run_dir / "vae", tmp_path / "vae")
    recipe = _stage(TINY, "vae_decoder", steps=8)
    recipe = dataclasses.replace(recipe, vae_decoder=dataclasses.replace(recipe.vae_decoder, optim=dataclasses.replace(
        recipe.vae_decoder.optim, lr=3e-3)))
    from turbovid.train.vae import VAETrainer
    trainer = VAETrainer(recipe, ENV, fixed_batch=True, decoder_of=tmp_path / "vae" / "final.safetensors")
    losses = [trainer.train_step(i)["loss"] for i in range(8)]
    assert losses[-1] < losses[0]
    no_stage = dataclasses.replace(TINY, vae_decoder=None)
    with pytest.raises(ValueError, match="no vae_decoder stage"):
        VAETrainer(no_stage, ENV, decoder_of=tmp_path / "vae" / "final.safetensors")


def test_latent_pool_matches_on_the_fly_encoding_and_is_cached(run):
    run_dir, direct = run
    pool = LatentBatches(TINY, run_dir, ENV, pool=6)
    assert (run_dir / "pool" / "train_6_rank0of1.safetensors").is_file()
    latents, context, clips = pool.get(list(range(12)))            # two passes over the 6 clips
    assert sorted(c.caption for c in clips[:6]) == sorted(pool.data.clip(i).caption for i in range(6))
    assert sorted(c.caption for c in clips[6:]) == sorted(c.caption for c in clips[:6])
    # Each pooled latent is the (bf16-stored) encoding of its clip; contexts are its caption's embedding.
    ref_latents, ref_context, _ = direct.get([pool.pool_indices[pool._slot(i)] for i in range(12)])
    assert torch.allclose(latents, ref_latents, atol=0.02 * ref_latents.abs().max().item())
    assert torch.equal(context, ref_context)
    again = LatentBatches(TINY, run_dir, ENV, pool=6)              # read back from the cache
    assert torch.equal(again.pool_latents, pool.pool_latents)
    assert torch.equal(again.get([3, 7])[0], pool.get([3, 7])[0])


def test_oversampling_repeats_the_named_clips_in_each_pass(run):
    run_dir, _ = run
    plain = LatentBatches(TINY, run_dir, ENV, pool=6)
    # Without oversampling a pass is one seeded permutation of the pool (the order every run so far trained in).
    g = torch.Generator().manual_seed(TINY.data_seed * 100_003 + 1)
    assert [plain._slot(6 + i) for i in range(6)] == torch.randperm(6, generator=g).tolist()
    clips = [plain.data.clip(i) for i in plain.pool_indices]
    sizes = [c.size for c in clips]
    value = max(set(sizes), key=lambda v: (sizes.count(v), v))     # a size some but not all of the 6 clips have
    assert 0 < sizes.count(value) < 6
    other = next(c.speed for c in clips)                           # a second value; factors multiply
    many = LatentBatches(TINY, run_dir, ENV, pool=6, oversample=((value, 3), (other, 2)))
    factor = [(3 if c.size == value else 1) * (2 if c.speed == other else 1) for c in clips]
    length = sum(factor)
    for epoch in range(2):                                         # each pass holds slot s factor[s] times
        slots = [many._slot(epoch * length + i) for i in range(length)]
        assert sorted(slots) == sorted(s for s in range(6) for _ in range(factor[s]))
    _, context, got = many.get(list(range(length)))
    assert sum(c.size == value for c in got) == sum(f for f, c in zip(factor, clips) if c.size == value)
    assert torch.equal(context, many.text.encode([c.caption for c in got]).float())
    with pytest.raises(ValueError, match="needs pool_clips > 0"):
        LatentBatches(TINY, run_dir, ENV, oversample=(("small", 2),))
    # RCMStage.oversample reaches the stage's inputs; bad settings are one-line errors
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    recipe = dataclasses.replace(TINY, pool_clips=6)
    recipe = dataclasses.replace(recipe, rcm=dataclasses.replace(recipe.rcm, scm=False, oversample=((value, 3),)))
    trainer = RCMTrainer(recipe, run_dir, ENV, teacher)
    assert len(trainer.inputs._slots) == 6 + 2 * sizes.count(value)
    for bad, match in (((("tiny", 2),), "'tiny' is no attribute value"), ((("small", 0),), "integer >= 1"),
                       ((("small", 2), ("small", 3)), "names a value twice")):
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(recipe.rcm, oversample=bad)
    from turbovid.train.cli import _recipe
    parser = _parser()
    assert _recipe(parser.parse_args(["train", "dmd", "--oversample", "small:2, slow:3"])).dmd_round.oversample == \
        (("small", 2), ("slow", 3))
    with pytest.raises(ValueError, match="VALUE:K pairs"):
        _recipe(parser.parse_args(["train", "dmd", "--oversample", "small"]))


def test_teacher_loss_decreases_on_fixed_batch(run, tmp_path):
    run_dir, inputs = run
    recipe = _stage(TINY, "teacher", steps=30, ckpt_every=1000, log_every=1000)
    trainer = TeacherTrainer(recipe, run_dir, ENV, fixed_batch=True, inputs=inputs)
    losses = [r["loss"] for r in drive(trainer, tmp_path / "teacher", ENV, quiet=True)]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses


def test_text_conditioning_is_learned_through_the_frozen_text_encoder(run):
    """Four captions, each paired with its own fixed latent: the flow-matching objective with caption dropout
    to the negative prompt, through the seeded random umT5, must make CFG sampling (the evaluation sampler)
    produce each caption's latent, i.e. the text path carries the words."""
    run_dir, inputs = run
    captions = ["a small red circle moves to the left on a black background",
                "a large blue square zooms upward across a white background",
                "a tiny green triangle drifts down on a navy background",
                "a big yellow cross races right over a beige background"]
    context, negative = inputs.text.encode(captions).float(), inputs.negative
    g = torch.Generator().manual_seed(0)
    targets = torch.randn(4, 16, 2, 4, 4, generator=g)
    net = new_dit(TINY)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(250):
        pick = torch.randint(0, 4, (16,), generator=g)
        ctx = torch.where((torch.rand(16, generator=g) < 0.1).view(-1, 1, 1), negative, context[pick])
        s = shifted_logit_normal(16, g, 0.0, 1.0, 3.0)
        x_s, v = flow_matching_pair(targets[pick], torch.randn(16, 16, 2, 4, 4, generator=g), s)
        loss = velocity_loss(rf_velocity(net, x_s, s, ctx), v)
        opt.zero_grad()
        loss.backward()
        opt.step()
    z = generate_latents(net.eval(), context, negative, tuple(targets.shape), ENV, sampler="teacher", steps=20, seed=1)
    cos = torch.nn.functional.cosine_similarity(z.flatten(1)[:, None], targets.flatten(1)[None], dim=-1)   # [4, 4]
    assert torch.equal(cos.argmax(1), torch.arange(4)), cos
    assert cos.diagonal().min() > 0.5 and (cos - torch.eye(4) * cos).abs().max() < 0.35, cos


def test_time_budget_checkpoints_and_resume_finishes(run, tmp_path):
    """--max-minutes: past the deadline, drive checkpoints after the current step and writes no final weights;
    the same call without a deadline resumes there and finishes with the same losses as an uninterrupted run."""
    run_dir, inputs = run
    recipe = _stage(TINY, "teacher", steps=4, ckpt_every=4)
    late = dataclasses.replace(ENV, deadline=0.0)            # time.monotonic() > 0: out of time at once
    first = drive(TeacherTrainer(recipe, run_dir, late, inputs=inputs), tmp_path / "a", late, quiet=True)
    assert [r["step"] for r in first] == [0]
    assert (tmp_path / "a" / "checkpoints" / "step_00000001").is_dir()
    assert not (tmp_path / "a" / "final.safetensors").exists()
    rest = drive(TeacherTrainer(recipe, run_dir, ENV, inputs=inputs), tmp_path / "a", ENV, quiet=True)
    assert [r["step"] for r in rest] == [1, 2, 3]
    assert (tmp_path / "a" / "final.safetensors").is_file()
    straight = drive(TeacherTrainer(recipe, run_dir, ENV, inputs=inputs), tmp_path / "b", ENV, quiet=True)
    assert [r["loss"] for r in first + rest] == [r["loss"] for r in straight]


def test_fit_minutes_shortens_a_fresh_schedule_and_resume_keeps_it(run, tmp_path):
    import time

    from turbovid.train.loop import FIT_PROBE
    run_dir, inputs = run
    recipe = _stage(TINY, "teacher", steps=40, ckpt_every=10, log_every=100)
    hurried = dataclasses.replace(ENV, fit_until=time.monotonic())     # no time left after the probe
    trainer = TeacherTrainer(recipe, run_dir, hurried, inputs=inputs)
    records = drive(trainer, tmp_path / "a", hurried, quiet=True)
    assert len(records) == FIT_PROBE[1] and trainer.schedule.steps == FIT_PROBE[1]
    assert records[-1]["lr"] == pytest.approx(recipe.teacher.optim.lr)          # the last step of the new schedule
    assert (tmp_path / "a" / "final.safetensors").is_file()
    # resumed from its last checkpoint, a stage keeps the fitted length (and has nothing left to do)
    again = TeacherTrainer(recipe, run_dir, ENV, inputs=inputs)
    assert drive(again, tmp_path / "a", ENV, quiet=True) == [] and again.schedule.steps == FIT_PROBE[1]
    # with time to spare the schedule is never lengthened
    relaxed = dataclasses.replace(ENV, fit_until=time.monotonic() + 3600)
    trainer = TeacherTrainer(_stage(TINY, "teacher", steps=30, ckpt_every=30), run_dir, relaxed, inputs=inputs)
    assert len(drive(trainer, tmp_path / "b", relaxed, quiet=True)) == 30


def test_teacher_resume_gives_identical_next_step_loss(run, tmp_path):
    run_dir, inputs = run
    recipe = _stage(TINY, "teacher", steps=4, ckpt_every=2)
    full = drive(TeacherTrainer(recipe, run_dir, ENV, inputs=inputs), tmp_path / "a", ENV, until=3, quiet=True)
    _resume_copy(tmp_path / "a", tmp_path / "b", 2)
    resumed = drive(TeacherTrainer(recipe, run_dir, ENV, inputs=inputs), tmp_path / "b", ENV, until=3, quiet=True)
    assert [r["step"] for r in resumed] == [2]
    assert resumed[0]["loss"] == full[2]["loss"]
    assert resumed[0]["grad_norm"] == full[2]["grad_norm"]


def test_sla_stage_tunes_student_against_frozen_teacher(run, tmp_path):
    run_dir, inputs = run
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    trainer = SLATrainer(TINY, run_dir, ENV, teacher, inputs=inputs)
    records = drive(trainer, tmp_path / "sla", ENV, quiet=True)
    assert len(records) == TINY.sla.run.steps and all(math.isfinite(r["loss"]) for r in records)
    final = load_weights(tmp_path / "sla" / "final.safetensors")
    proj = [k for k in final if "proj_l" in k]
    assert len(proj) == 2 * TINY.dit.num_layers
    assert any(final[k].abs().sum() > 0 for k in proj)          # proj_l (zero-initialised) was trained
    assert all(torch.equal(v, teacher[k]) for k, v in trainer.teacher.state_dict().items())


def test_sla_on_the_rcm_student_trains_on_its_own_sampling_states(run, tmp_path):
    from turbovid.config import MODELS
    from turbovid.sampling import network_time, rcm_times
    from turbovid.train.reproduce import ship

    run_dir, inputs = run
    student = load_weights(run_dir / "teacher" / "final.safetensors")   # stands in for an rCM student
    sla = dataclasses.replace(TINY.sla, base="rcm", run=dataclasses.replace(TINY.sla.run, steps=6, batch=4),
                              optim=dataclasses.replace(TINY.sla.optim, lr=1e-5))
    # 128 px x 9 frames: 192 DiT tokens = 3 key blocks, of which SLA keeps one (tiny's own clips fit in one block)
    recipe = dataclasses.replace(TINY, sla=sla, ship_student="sla", size=128, frames=9)
    trainer = SLATrainer(recipe, run_dir, ENV, student, fixed_batch=True)
    assert trainer.inputs.pool_latents is None                   # captions only: nothing encoded
    x, t_net, v, context = trainer._trajectory(0)
    steps = recipe.eval_rcm_steps
    assert x.shape[0] == t_net.shape[0] == v.shape[0] == context.shape[0] == 4      # 2 captions x 2 steps
    times = rcm_times(steps, MODELS["tiny"].sigma_max)[:-1]
    assert torch.equal(t_net, torch.cat([network_time(s, 2) for s in times]))
    with torch.no_grad():
        assert torch.allclose(v, trainer.teacher(x, t_net, context).float(), atol=1e-5)
    # the first state of each trajectory is the scaled initial noise, the second is not
    assert x[:2].std() > 0.9 * times[0] and not torch.allclose(x[:2], x[2:])
    records = drive(trainer, tmp_path / "sla", ENV, quiet=True)
    losses = [r["loss"] for r in records]
    assert losses[0] > 0 and losses[-1] < 0.85 * losses[0]      # block-sparse at first, then fitting
    assert all(math.isfinite(v) for v in losses)
    # run_sla on this recipe wants the rCM student; ship takes the SLA-tuned student as the 4-step dit
    from turbovid.train.teacher import run_sla
    with pytest.raises(ValueError, match="SLA-tunes the rCM student"):
        run_sla(recipe, tmp_path / "empty", ENV)
    for name in ("vae", "vae_decoder", "teacher"):
        shutil.copytree(run_dir / name, tmp_path / name)
    for name in ("text_encoder.safetensors", "spiece.model"):
        shutil.copyfile(run_dir / name, tmp_path / name)
    dest = ship(recipe, tmp_path, tmp_path / "export")
    key = "blocks.0.self_attn.attn_op.local_attn.proj_l.weight"
    shipped = load_weights(dest / "dit.safetensors")
    assert torch.equal(shipped[key], load_weights(tmp_path / "sla" / "final.safetensors")[key].to(torch.bfloat16))
    config = json.loads((dest / "config.json").read_text())
    assert config["student"] == "sla" and config["stages"]["vae_decoder"]["steps"] == TINY.vae_decoder.run.steps
    # the release VAE is the decoder stage's (the tiny recipe has one), with its round-trip report
    key = "decoder.head.2.weight"
    assert torch.equal(load_weights(dest / "vae.safetensors")[key],
                       load_weights(tmp_path / "vae_decoder" / "final.safetensors")[key].to(torch.bfloat16))
    assert config["vae_reconstruction"]["count"] == TINY.vae_decoder.eval_clips


def test_sla_dense_weight_also_fits_the_dense_output(run, tmp_path):
    from turbovid.train.trigflow import swap_attention

    run_dir, _ = run
    weights = load_weights(run_dir / "teacher" / "final.safetensors")
    recipe = dataclasses.replace(TINY, sla=dataclasses.replace(TINY.sla, dense_weight=0.5), size=128, frames=9)
    trainer = SLATrainer(recipe, run_dir, ENV, weights, fixed_batch=True)   # 128 px clips: 3 key blocks
    sla_ops = [b.self_attn.attn_op.local_attn for b in trainer.net.blocks]
    with swap_attention(trainer.net, SparseLinearAttention, lambda _: DenseAttention()):
        assert all(type(b.self_attn.attn_op.local_attn).__name__ == "DenseAttention" for b in trainer.net.blocks)
    assert [b.self_attn.attn_op.local_attn for b in trainer.net.blocks] == sla_ops   # put back
    record = trainer.train_step(0)
    # at step 0 the student is the teacher: its dense output is the target, the SLA one is not
    assert record["loss_dense"] < 1e-10 < record["loss_sla"]
    assert record["loss"] == pytest.approx(record["loss_sla"] + 0.5 * record["loss_dense"], rel=1e-6)


def test_sla_proj_l_only_trains_the_linear_branch_alone(run, tmp_path):
    from turbovid.train.cli import _recipe

    run_dir, _ = run
    weights = load_weights(run_dir / "teacher" / "final.safetensors")
    sla = dataclasses.replace(TINY.sla, proj_l_only=True, run=dataclasses.replace(TINY.sla.run, steps=3),
                              optim=dataclasses.replace(TINY.sla.optim, lr=1e-2))
    recipe = dataclasses.replace(TINY, sla=sla, size=128, frames=9)
    trainer = SLATrainer(recipe, run_dir, ENV, weights, fixed_batch=True)
    assert {n for n, p in trainer.net.named_parameters() if p.requires_grad} == \
        {n for n, _ in trainer.net.named_parameters() if "proj_l" in n} != set()
    drive(trainer, tmp_path / "sla", ENV, quiet=True)
    final = load_weights(tmp_path / "sla" / "final.safetensors")
    assert all(torch.equal(final[k], v.to(final[k].dtype)) for k, v in weights.items())   # the rest is untouched
    assert any(final[k].abs().sum() > 0 for k in final if "proj_l" in k)
    parser = _parser()
    cli = _recipe(parser.parse_args(["train", "sla", "--proj-l-only"])).sla
    assert cli.proj_l_only and cli.dense_weight == 0
    with pytest.raises(ValueError, match="sla stage only"):
        cmd_train(parser.parse_args(["train", "teacher", "--proj-l-only", "--run-dir", str(tmp_path)]))
    with pytest.raises(ValueError, match="--topk applies to the sla, qat, ode, rcm, eval, ship stages only"):
        cmd_train(parser.parse_args(["train", "teacher", "--topk", "0.5", "--run-dir", str(tmp_path)]))


def test_recipe_rejects_a_student_its_sla_stage_does_not_make():
    with pytest.raises(ValueError, match="sla.base"):
        dataclasses.replace(TINY, sla=dataclasses.replace(TINY.sla, base="fake"))
    with pytest.raises(ValueError, match="needs sla.base='rcm'"):
        dataclasses.replace(TINY, ship_student="sla")
    with pytest.raises(ValueError, match="needs sla.base='teacher'"):
        dataclasses.replace(TINY, sla=dataclasses.replace(TINY.sla, base="rcm"))
    with pytest.raises(ValueError, match="ship_student must be"):
        dataclasses.replace(TINY, ship_student="best")


def test_rcm_stage_runs_scm_dmd_critic_and_resumes_exactly(run, tmp_path):
    run_dir, inputs = run
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    recipe = _stage(TINY, "rcm", steps=6, ckpt_every=3)
    # tiny: tangent warm-up 2, student every 2nd step -> steps 0, 1 sCM; 2, 4 sCM + DMD; 3, 5 critic
    full = drive(RCMTrainer(recipe, run_dir, ENV, teacher, inputs=inputs), tmp_path / "a", ENV, until=5, quiet=True)
    assert [r["student"] for r in full] == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert "loss_dmd" not in full[1] and "loss_dmd" in full[2] and "loss_fake" in full[3]
    assert [r["warmup_ratio"] for r in full if r["student"]] == [0.0, 0.5, 1.0, 1.0]
    assert all(math.isfinite(v) for r in full for v in r.values() if isinstance(v, float))
    _resume_copy(tmp_path / "a", tmp_path / "b", 3)
    resumed = drive(RCMTrainer(recipe, run_dir, ENV, teacher, inputs=inputs), tmp_path / "b", ENV, until=5, quiet=True)
    assert [r["step"] for r in resumed] == [3, 4]
    assert resumed[0]["loss_fake"] == full[3]["loss_fake"]
    assert resumed[1]["loss"] == full[4]["loss"] and resumed[1]["loss_dmd"] == full[4]["loss_dmd"]


def test_rcm_without_dmd_is_scm_alone_every_step(run, tmp_path):
    # RCMStage.dmd off: no critic steps and no DMD term after the warm-up (tiny: 2 steps); the first steps are
    # exactly those of the recipe with DMD (the same draws), after the warm-up the tangent stays at full weight.
    run_dir, inputs = run
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    recipe = _stage(TINY, "rcm", steps=5, ckpt_every=3)
    plain = dataclasses.replace(recipe, rcm=dataclasses.replace(recipe.rcm, dmd=False))
    with_dmd = drive(RCMTrainer(recipe, run_dir, ENV, teacher, inputs=inputs), tmp_path / "a", ENV, until=2,
                     quiet=True)
    logs = drive(RCMTrainer(plain, run_dir, ENV, teacher, inputs=inputs), tmp_path / "b", ENV, quiet=True)
    assert [r["student"] for r in logs] == [1.0] * 5
    assert not any("loss_dmd" in r or "loss_fake" in r for r in logs)
    assert [r["warmup_ratio"] for r in logs] == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert [r["loss"] for r in logs[:2]] == [r["loss"] for r in with_dmd]
    assert all(math.isfinite(r["loss"]) for r in logs)
    assert (tmp_path / "b" / "final.safetensors").is_file()
    # no fake score to build, train or checkpoint; a resumed run repeats the same steps
    assert sorted(f.name for f in (tmp_path / "b" / "checkpoints" / "step_00000003").glob("*.safetensors")) == [
        "ema.safetensors", "student.safetensors"]
    _resume_copy(tmp_path / "b", tmp_path / "c", 3)
    resumed = drive(RCMTrainer(plain, run_dir, ENV, teacher, inputs=inputs), tmp_path / "c", ENV, quiet=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in logs[3:]]
    with pytest.raises(ValueError, match="resume it with --no-dmd"):     # the same checkpoint, DMD on
        drive(RCMTrainer(recipe, run_dir, ENV, teacher, inputs=inputs), tmp_path / "c", ENV, quiet=True)


def test_rcm_dmd_alone_from_an_init_student(run, tmp_path):
    # RCMStage.scm off (--no-scm): the warm-up's steps train the fake score alone on the start student's samples (the
    # student does not move), then one student step every student_update_freq whose loss is the DMD term alone (no
    # sCM term), plus an anchor term when asked; the teacher never moves and a resumed run repeats the same steps.
    run_dir, inputs = run
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    start = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in teacher.items()}
    recipe = _stage(TINY, "rcm", steps=6, ckpt_every=3)
    alone = dataclasses.replace(recipe, rcm=dataclasses.replace(recipe.rcm, scm=False))
    trainer = RCMTrainer(alone, run_dir, ENV, teacher, inputs=inputs, student_weights=start)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    fake_before = trainer.fake.state_dict()["head.head.weight"].clone()
    # tiny: warm-up 2, student every 2nd step -> steps 0, 1 critic; 2 student; 3 critic; 4 student; 5 critic
    logs = drive(trainer, tmp_path / "a", ENV, until=2, quiet=True)
    assert [r["student"] for r in logs] == [0.0, 0.0]
    assert all(torch.equal(v, before[k]) for k, v in trainer.student.state_dict().items())    # only the critic
    assert not torch.equal(trainer.fake.state_dict()["head.head.weight"], fake_before)
    logs += drive(trainer, tmp_path / "a", ENV, quiet=True)
    assert [r["student"] for r in logs] == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    students = [r for r in logs if r["student"]]
    assert all("loss_scm" not in r and r["loss"] == pytest.approx(r["loss_dmd"]) for r in students)
    assert all(math.isfinite(v) for r in logs for v in r.values() if isinstance(v, float))
    assert not torch.equal(trainer.student.state_dict()["head.head.weight"], before["head.head.weight"])
    assert all(torch.equal(v, teacher[k].to(v.dtype)) for k, v in trainer.teacher.state_dict().items())
    _resume_copy(tmp_path / "a", tmp_path / "b", 3)
    resumed = drive(RCMTrainer(alone, run_dir, ENV, teacher, inputs=inputs, student_weights=start), tmp_path / "b",
                    ENV, quiet=True)
    assert [r["step"] for r in resumed] == [3, 4, 5]
    assert resumed[1]["loss_dmd"] == logs[4]["loss_dmd"] and resumed[0]["loss_fake"] == logs[3]["loss_fake"]
    with pytest.raises(ValueError, match="rcm needs sCM or DMD"):
        dataclasses.replace(alone.rcm, dmd=False)
    # the anchor (anchor_weight): the frozen start student's x0 from the same states; zero while the student is still
    # its start (the first student step, after the critic's warm-up), then it pulls back what DMD moved
    anchored = dataclasses.replace(alone, rcm=dataclasses.replace(alone.rcm, anchor_weight=2.0))
    trainer = RCMTrainer(anchored, run_dir, ENV, teacher, inputs=inputs, student_weights=start)
    assert not any(p.requires_grad for p in trainer.anchor.parameters())
    held = drive(trainer, tmp_path / "anchored", ENV, quiet=True)
    first, second = [r for r in held if r["student"]]
    assert first["loss_anchor"] == 0.0 and first["loss_dmd"] == logs[2]["loss_dmd"]
    assert second["loss_anchor"] > 0 and second["loss"] == pytest.approx(second["loss_dmd"] + 2 * second["loss_anchor"])
    assert all(torch.equal(v, start[k].to(v.dtype)) for k, v in trainer.anchor.state_dict().items())
    # pooled (anchor_pool): the same steps (the first student step's anchor is zero, so is its gradient), the anchor
    # now the block averages' part of the same distance: less, not nothing
    pooled = dataclasses.replace(alone, rcm=dataclasses.replace(alone.rcm, anchor_weight=2.0, anchor_pool=3))
    trainer = RCMTrainer(pooled, run_dir, ENV, teacher, inputs=inputs, student_weights=start)
    first_p, second_p = [r for r in drive(trainer, tmp_path / "pooled", ENV, quiet=True) if r["student"]]
    assert first_p["loss_anchor"] == 0.0 and second_p["loss_dmd"] == pytest.approx(second["loss_dmd"], rel=1e-5)
    assert 0 < second_p["loss_anchor"] < second["loss_anchor"]
    # per size (anchor_size_scale): each sample's anchor times its caption's size factor; the factors 0 and 1 split
    # the same batch's anchor (the steps are the same as above: the first student step's anchor is zero)
    parts = {}
    for size in ("small", "medium", "large"):
        scale = tuple(float(s == size) for s in ("small", "medium", "large"))
        scaled = dataclasses.replace(alone, rcm=dataclasses.replace(alone.rcm, anchor_weight=2.0,
                                                                    anchor_size_scale=scale))
        trainer = RCMTrainer(scaled, run_dir, ENV, teacher, inputs=inputs, student_weights=start)
        parts[size] = [r for r in drive(trainer, tmp_path / f"sized_{size}", ENV, quiet=True) if r["student"]][1]
    assert sum(r["loss_anchor"] for r in parts.values()) == pytest.approx(second["loss_anchor"], rel=1e-4)
    assert parts["small"]["loss_anchor"] > 0 and parts["medium"]["loss_anchor"] > 0   # that batch: small and medium
    with pytest.raises(ValueError, match="needs anchor_weight > 0"):
        dataclasses.replace(alone.rcm, anchor_pool=2)
    with pytest.raises(ValueError, match="anchor_size_scale scales the anchor"):
        dataclasses.replace(alone.rcm, anchor_size_scale=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="three factors >= 0"):
        dataclasses.replace(alone.rcm, anchor_weight=1.0, anchor_size_scale=(-1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="anchor_pool must be >= 1"):
        dataclasses.replace(alone.rcm, anchor_weight=1.0, anchor_pool=0)
    with pytest.raises(ValueError, match="anchor_weight goes with DMD alone"):
        dataclasses.replace(recipe.rcm, anchor_weight=1.0)
    with pytest.raises(ValueError, match="anchor_weight must be >= 0"):
        dataclasses.replace(alone.rcm, anchor_weight=-1.0)
    with pytest.raises(ValueError, match="does not have"):
        dataclasses.replace(alone.rcm, fg_share=0.5)
    from turbovid.train.cli import _recipe
    parser = _parser()
    assert not _recipe(parser.parse_args(["train", "rcm", "--no-scm"])).rcm.scm
    assert _recipe(parser.parse_args(["train", "rcm", "--no-scm", "--anchor-weight", "3"])).rcm.anchor_weight == 3.0
    assert _recipe(parser.parse_args(["train", "rcm", "--no-scm", "--anchor-weight", "3", "--anchor-pool", "5"])
                   ).rcm.anchor_pool == 5
    assert _recipe(parser.parse_args(["train", "rcm", "--no-scm", "--anchor-weight", "3", "--anchor-size-scale",
                                      "0,1,3"])).rcm.anchor_size_scale == (0.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="--anchor-size-scale takes 3 comma-separated numbers"):
        _recipe(parser.parse_args(["train", "rcm", "--no-scm", "--anchor-weight", "3", "--anchor-size-scale", "0,x,3"]))
    with pytest.raises(ValueError, match="anchor_weight goes with DMD alone"):    # sCM still on
        _recipe(parser.parse_args(["train", "rcm", "--anchor-weight", "1"]))
    with pytest.raises(ValueError, match="--no-scm applies to the rcm stage only"):
        cmd_train(parser.parse_args(["train", "sla", "--no-scm", "--run-dir", str(tmp_path)]))


def test_dmd_alone_with_the_adversarial_term(run, tmp_path):
    # RCMStage.adv_weight (DMD alone): the critic steps also train heads on the frozen teacher's features, the batch's
    # data latents (its captions' clips) against the student's samples; a student step adds the weight times the
    # latent elements of a sample times the hinge generator loss, its gradient reaching the student and not the heads;
    # the teacher never moves and the checkpoints carry the heads, so a resumed run repeats the same steps.
    run_dir, inputs = run
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    start = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in teacher.items()}
    recipe = _stage(TINY, "rcm", steps=5, ckpt_every=3)
    adv = dataclasses.replace(recipe, rcm=dataclasses.replace(recipe.rcm, scm=False, adv_weight=0.01,
                                                              adv_layers=(0, 1), adv_optim=Optim(lr=1e-2, warmup=0)))
    trainer = RCMTrainer(adv, run_dir, ENV, teacher, inputs=inputs, student_weights=start)
    heads = {k: v.clone() for k, v in trainer.adv.disc.state_dict().items()}
    # tiny: warm-up 2, student every 2nd step -> steps 0, 1 critic; 2 student; 3 critic; 4 student
    logs = drive(trainer, tmp_path / "a", ENV, until=1, quiet=True)
    assert all(math.isfinite(logs[0][k]) for k in ("loss_fake", "loss_disc", "d_real", "d_fake"))
    assert any(not torch.equal(heads[k], v) for k, v in trainer.adv.disc.state_dict().items())
    logs += drive(trainer, tmp_path / "a", ENV, quiet=True)
    students = [r for r in logs if r["student"]]
    elements = math.prod(TINY.latent_shape)
    assert len(students) == 2 and all(math.isfinite(r["loss_adv"]) for r in students)
    assert all(r["loss"] == pytest.approx(r["loss_dmd"] + 0.01 * elements * r["loss_adv"], rel=1e-5)
               for r in students)
    assert all(torch.equal(v, teacher[k].to(v.dtype)) for k, v in trainer.teacher.state_dict().items())
    assert (tmp_path / "a" / "checkpoints" / "step_00000003" / "disc.safetensors").is_file()
    # a student step's loss: its gradient reaches the student, not the heads
    x0, context, clips = inputs.get(list(range(2)))
    loss, _ = trainer._dmd_alone_loss(1, x0, context, torch.Generator().manual_seed(0), clips)
    trainer.student.zero_grad()
    loss.mean().backward()
    assert trainer.student.head.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None or not p.grad.any() for p in trainer.adv.disc.parameters())
    _resume_copy(tmp_path / "a", tmp_path / "b", 3)
    resumed = drive(RCMTrainer(adv, run_dir, ENV, teacher, inputs=inputs, student_weights=start), tmp_path / "b",
                    ENV, quiet=True)
    assert [r["step"] for r in resumed] == [3, 4]
    assert resumed[0]["loss_disc"] == logs[3]["loss_disc"] and resumed[1]["loss_adv"] == logs[4]["loss_adv"]
    with pytest.raises(ValueError, match="adv_weight goes with DMD alone"):
        dataclasses.replace(recipe.rcm, adv_weight=0.1)
    with pytest.raises(ValueError, match="rcm.adv_weight must be >= 0"):
        dataclasses.replace(adv.rcm, adv_weight=-1.0)
    from turbovid.train.cli import _recipe
    parser = _parser()
    dmd = _recipe(parser.parse_args(["train", "dmd", "--adv-weight", "0.03", "--adv-lr", "3e-4"])).dmd_round
    assert dmd.adv_weight == 0.03 and dmd.adv_optim.lr == 3e-4
    assert _recipe(parser.parse_args(["train", "rcm", "--no-scm", "--adv-weight", "0.1"])).rcm.adv_weight == 0.1
    with pytest.raises(ValueError, match="adv_weight goes with DMD alone"):     # sCM still on
        _recipe(parser.parse_args(["train", "rcm", "--adv-weight", "0.1"]))
    with pytest.raises(ValueError, match="--adv-lr goes with the adversarial term"):
        _recipe(parser.parse_args(["train", "dmd", "--adv-lr", "1e-3"]))


def test_teacher_guidance_per_object_size(run, tmp_path):
    # guidance_size_scale: the teacher's CFG per sample, guidance times its caption's size factor. A uniform factor
    # is the same run as that guidance; per-sample factors give each sample the x0 of its own scale.
    run_dir, inputs = run
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    start = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in teacher.items()}
    recipe = _stage(TINY, "rcm", steps=5, ckpt_every=5)
    alone = dataclasses.replace(recipe, rcm=dataclasses.replace(recipe.rcm, scm=False, guidance=6.0))

    def logs(**rcm):
        r = dataclasses.replace(alone, rcm=dataclasses.replace(alone.rcm, **rcm))
        trainer = RCMTrainer(r, run_dir, ENV, teacher, inputs=inputs, student_weights=start)
        return [x for x in drive(trainer, tmp_path / str(len(list(tmp_path.iterdir()))), ENV, quiet=True)
                if x["student"]]
    plain = logs()
    assert [r["loss_dmd"] for r in logs(guidance=3.0, guidance_size_scale=(2.0, 2.0, 2.0))] == \
        pytest.approx([r["loss_dmd"] for r in plain], rel=1e-6)
    assert logs(guidance_size_scale=(1.0, 1.0, 0.5))[0]["loss_dmd"] != pytest.approx(plain[0]["loss_dmd"], rel=1e-6)
    # the per-sample form of guided_denoise: each row as if guided alone at its own scale
    from turbovid.train.trigflow import guided_denoise
    net = RCMTrainer(alone, run_dir, ENV, teacher, inputs=inputs).teacher
    x0, context, _ = inputs.get(list(range(2)))
    t = torch.full((2,), 0.7, dtype=torch.float64)
    both = guided_denoise(net, x0, t, context, inputs.negative, torch.tensor([2.0, 5.0]))
    for i, g in enumerate((2.0, 5.0)):
        one = guided_denoise(net, x0[i:i + 1], t[i:i + 1], context[i:i + 1], inputs.negative, g)
        assert torch.allclose(both[i:i + 1], one, atol=1e-5)
    with pytest.raises(ValueError, match="three factors > 0"):
        dataclasses.replace(alone.rcm, guidance_size_scale=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="must stay >= 1"):
        dataclasses.replace(alone.rcm, guidance=2.0, guidance_size_scale=(0.4, 1.0, 1.0))
    from turbovid.train.cli import _recipe
    parser = _parser()
    assert _recipe(parser.parse_args(["train", "dmd", "--guidance-size-scale", "2,1,1"])
                   ).dmd_round.guidance_size_scale == (2.0, 1.0, 1.0)
    assert _recipe(parser.parse_args(["train", "rcm", "--guidance-size-scale", "1,1,2"])
                   ).rcm.guidance_size_scale == (1.0, 1.0, 2.0)
    with pytest.raises(ValueError, match="--guidance-size-scale applies to the rcm, dmd stages only"):
        cmd_train(parser.parse_args(["train", "sla", "--guidance-size-scale", "2,1,1", "--run-dir", str(tmp_path)]))


def test_dmd_times_at_their_own_shift(run, tmp_path, monkeypatch):
    # RCMStage.dmd_shift: the DMD term's and the critic's t_D are drawn at that shift; the backward simulation's
    # re-noising keeps shift_d. dmd_shift equal to shift_d is the plain run.
    import turbovid.train.distill as distill
    run_dir, inputs = run
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    recipe = _stage(TINY, "rcm", steps=6, ckpt_every=6)
    alone = dataclasses.replace(recipe, rcm=dataclasses.replace(recipe.rcm, scm=False, tangent_warmup=2))
    real, shifts = distill.sample_p_d, []

    def recorded(n, g, shift, device="cpu"):
        shifts.append(shift)
        return real(n, g, shift, device)
    monkeypatch.setattr(distill, "sample_p_d", recorded)

    def run_with(**rcm):
        shifts.clear()
        r = dataclasses.replace(alone, rcm=dataclasses.replace(alone.rcm, **rcm))
        trainer = RCMTrainer(r, run_dir, ENV, teacher, inputs=inputs)
        out = list(drive(trainer, tmp_path / str(len(list(tmp_path.iterdir()))), ENV, quiet=True))
        return out, list(shifts)
    plain, plain_shifts = run_with()
    assert set(plain_shifts) == {5.0}
    same, _ = run_with(dmd_shift=5.0)
    loss = lambda r: r.get("loss_dmd", r.get("loss_fake"))  # noqa: E731   the student's or the critic's
    assert [loss(r) for r in same] == [loss(r) for r in plain]
    low, low_shifts = run_with(dmd_shift=1.0)
    assert len(low_shifts) == len(plain_shifts) and set(low_shifts) == {1.0, 5.0}
    # one t_D per critic step and per student step, each drawn after that step's simulation
    assert low_shifts.count(1.0) == len(low)
    assert all(math.isfinite(loss(r)) for r in low)
    assert low[0]["loss_fake"] != pytest.approx(plain[0]["loss_fake"], rel=1e-6)
    with pytest.raises(ValueError, match="dmd_shift must be >= 0"):
        dataclasses.replace(alone.rcm, dmd_shift=-1.0)
    with pytest.raises(ValueError, match="needs dmd on"):
        dataclasses.replace(recipe.rcm, dmd=False, dmd_shift=1.0)
    from turbovid.train.cli import _recipe
    assert _recipe(_parser().parse_args(["train", "dmd", "--dmd-shift", "1"])).dmd_round.dmd_shift == 1.0
    with pytest.raises(ValueError, match="--dmd-shift must be > 0"):
        _recipe(_parser().parse_args(["train", "dmd", "--dmd-shift", "0"]))


def test_rcm_on_the_teachers_samples(run, tmp_path):
    # RCMStage.teacher_data: x0 are the frozen teacher's own samples of the pooled training captions (its eval
    # sampler, seeded per chunk), generated once and cached beside the stage's checkpoints; the captions of a batch
    # are those the samples were drawn for.
    from turbovid.train.distill import TeacherSamples
    run_dir, _ = run
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    recipe = _stage(TINY, "rcm", steps=2, batch=2)
    recipe = dataclasses.replace(recipe, rcm=dataclasses.replace(recipe.rcm, teacher_data=3, dmd=False))
    trainer = RCMTrainer(recipe, run_dir, ENV, teacher)
    data = trainer.inputs
    assert isinstance(data, TeacherSamples) and data.pool_latents.shape == (3, *TINY.latent_shape)
    cached = run_dir / "rcm" / "teacher_data_train_3_rank0of1.safetensors"
    assert cached.is_file()
    context, clips = data.captions([0, 1, 2])
    want = generate_latents(trainer.teacher, context, data.negative, (3, *TINY.latent_shape), ENV,
                            sampler="teacher", steps=TINY.eval_teacher_steps, seed=0)
    torch.testing.assert_close(data.pool_latents.float(), want, atol=0.02 * want.abs().max().item(), rtol=0)
    latents, batch_context, batch_clips = data.get([0, 1, 2])
    for latent, ctx, clip in zip(latents, batch_context, batch_clips):   # each sample keeps its caption
        i = [c.caption for c in clips].index(clip.caption)
        assert torch.equal(latent, data.pool_latents[i].float()) and torch.equal(ctx, context[i])
    logs = drive(trainer, tmp_path / "a", ENV, quiet=True)
    assert len(logs) == 2 and all(math.isfinite(r["loss"]) for r in logs)
    again = TeacherSamples(recipe, run_dir, ENV, trainer.teacher, 3)      # read back, not sampled again
    assert torch.equal(again.pool_latents, data.pool_latents)
    with pytest.raises(ValueError, match="no object masks"):
        dataclasses.replace(recipe.rcm, fg_share=0.5)


def test_rcm_object_weighted_scm_loss(run, tmp_path):
    # RCMStage.fg_share: the sCM loss of each sample weighs its object's latent cells (data.object_weights); with
    # weights of mean 1 the loss changes, the update stays finite.
    from turbovid.train.losses import scm_loss
    F, g = torch.randn(2, 3, 2, 4, 4), torch.randn(2, 3, 2, 4, 4)
    w = torch.ones(2, 1, 2, 4, 4)
    torch.testing.assert_close(scm_loss(F, g, 10.0, w), scm_loss(F, g, 10.0))
    w[:, :, :, :2] = 2.0
    manual = 10.0 * (w.double() * g.double().pow(2)).flatten(1).sum(1)
    torch.testing.assert_close(scm_loss(F, g, 10.0, w), manual)
    run_dir, inputs = run
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    plain = _stage(TINY, "rcm", steps=1)
    weighted = dataclasses.replace(plain, rcm=dataclasses.replace(plain.rcm, fg_share=0.5))
    a = drive(RCMTrainer(plain, run_dir, ENV, teacher, inputs=inputs), tmp_path / "a", ENV, quiet=True)
    b = drive(RCMTrainer(weighted, run_dir, ENV, teacher, inputs=inputs), tmp_path / "b", ENV, quiet=True)
    assert math.isfinite(b[0]["loss_scm"]) and b[0]["loss_scm"] != a[0]["loss_scm"]
    with pytest.raises(ValueError, match="object weighting"):
        dataclasses.replace(TINY.rcm, fg_share=1.0)


def test_rcm_with_an_sla_student_from_init_weights(run, tmp_path):
    # --sla-student --init FILE --tangent-warmup 0: the student starts from given weights (here the teacher's with
    # a non-zero proj_l), distils with SLA attention (its JVP through MathSLA), DMD from the first student step;
    # the export is an SLA network whose proj_l moved.
    run_dir, inputs = run
    teacher = load_weights(run_dir / "teacher" / "final.safetensors")
    parser = _parser()
    from turbovid.train.cli import _recipe
    recipe = _recipe(parser.parse_args(["train", "rcm", "--recipe", "tiny", "--sla-student", "--topk", "0.5",
                                        "--tangent-warmup", "0", "--steps", "3"]))
    assert (recipe.rcm.student_attention, recipe.rcm.tangent_warmup, recipe.sla.topk) == ("sla", 0, 0.5)
    start = {**teacher, **{f"blocks.{i}.self_attn.attn_op.local_attn.proj_l.{n}": torch.full(shape, 0.01)
                           for i in range(TINY.dit.num_layers)
                           for n, shape in (("weight", (64, 64)), ("bias", (64,)))}}
    trainer = RCMTrainer(recipe, run_dir, ENV, teacher, inputs=inputs, student_weights=start)
    assert isinstance(trainer.student.blocks[0].self_attn.attn_op.local_attn, SparseLinearAttention)
    assert isinstance(trainer.fake.blocks[0].self_attn.attn_op.local_attn, DenseAttention)
    logs = drive(trainer, tmp_path / "rcm", ENV, quiet=True)
    assert [r["student"] for r in logs] == [1.0, 0.0, 1.0] and "loss_dmd" in logs[0]
    assert all(math.isfinite(v) for r in logs for v in r.values() if isinstance(v, float))
    out = load_weights(tmp_path / "rcm" / "final.safetensors")
    key = "blocks.0.self_attn.attn_op.local_attn.proj_l.weight"
    assert key in out and not torch.allclose(out[key], start[key])
    with pytest.raises(ValueError, match="rcm.student_attention must be dense or sla"):
        dataclasses.replace(TINY.rcm, student_attention="sparse")
    with pytest.raises(ValueError, match="--sla-student applies to the rcm, dmd stages only"):
        cmd_train(parser.parse_args(["train", "sla", "--sla-student", "--run-dir", str(tmp_path)]))




def test_cli_sla_rcm_merge_eval_and_export_load(run, capsys):
    run_dir, _ = run
    common = ["--run-dir", str(run_dir), "--recipe", "tiny", "--device", "cpu"]
    assert _cli("sla", *common) == 0
    assert _cli("rcm", *common, "--steps", "3") == 0
    assert _cli("merge", *common) == 0
    merged = load_weights(run_dir / "merged" / "model.safetensors")
    rcm, teacher, sla = (load_weights(run_dir / s / "final.safetensors") for s in ("rcm", "teacher", "sla"))
    key = "blocks.0.ffn.0.weight"
    assert torch.allclose(merged[key], rcm[key] + sla[key] - teacher[key])
    assert set(merged) == set(sla)   # proj_l came from the SLA model
    # The merged file loads as an SLA DiT through the inference loader.
    net = load_dit(str(run_dir / "merged" / "model.safetensors"), TINY.dit, attention="sla", dtype=torch.float32)
    assert type(net.blocks[0].self_attn.attn_op.local_attn).__name__ == "SparseLinearAttention"
    # ship: bf16 teacher / student, the student's INT8 file, VAE, text encoder, tokenizer, config.json
    dest = run_dir / "shipped"
    assert _cli("ship", *common, "--output", str(dest)) == 0
    assert {p.name for p in dest.iterdir()} == {"dit.safetensors", "dit_int8.safetensors", "dit_teacher.safetensors",
                                               "vae.safetensors", "text_encoder.safetensors", "spiece.model",
                                               "config.json"}
    shipped = load_weights(dest / "dit.safetensors")
    assert shipped[key].dtype == torch.bfloat16 and torch.equal(shipped[key], merged[key].to(torch.bfloat16))
    int8 = load_weights(dest / "dit_int8.safetensors")
    assert int8["blocks.0.ffn.0.int8_weight"].dtype == torch.int8
    config = json.loads((dest / "config.json").read_text())
    assert config["stages"]["rcm"]["steps"] == 3 and len(config["vae_latent_stats"]["mean"]) == 16
    assert config["sla_topk"] == config["sla_topk_tuned"] == TINY.sla.topk
    # ship --topk: the release's default top-k; the one it was tuned at is kept beside it.
    assert _cli("ship", *common, "--output", str(dest), "--topk", "0.3") == 0
    config = json.loads((dest / "config.json").read_text())
    assert (config["sla_topk"], config["sla_topk_tuned"]) == (0.3, TINY.sla.topk)
    quant = load_dit(str(dest / "dit_int8.safetensors"), TINY.dit, dtype=torch.float32)
    assert any(n.endswith("int8_weight") for n, _ in quant.named_buffers())
    assert _cli("plot", *common, "--output", str(run_dir / "curves.png")) == 0
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _cli("eval", *common, "--count", "2") == 0
    assert "adherence" in capsys.readouterr().out
    result = json.loads(next((run_dir / "eval").glob("*.json")).read_text())
    assert result["count"] == 2 and len(result["clips"]) == 2 and 0 <= result["all"] <= 1
    with pytest.raises(ValueError, match="--steps"):
        _cli("teacher", *common, "--steps", "0")


def test_frozen_dit_drops_sla_weights_for_dense_and_rejects_missing_ones():
    sla_weights = new_dit(TINY, attention="sla").state_dict()
    assert any(".proj_l." in k for k in sla_weights)
    net = frozen_dit(TINY, sla_weights, Env(torch.device("cpu")), attention="dense")   # merged student, dense
    assert not any(".proj_l." in k for k in net.state_dict())
    dense_weights = new_dit(TINY).state_dict()
    with pytest.raises(ValueError, match="do not fit a tiny DiT with sla attention: .* missing"):
        frozen_dit(TINY, dense_weights, Env(torch.device("cpu")), attention="sla")


def test_teacher_object_weight_trains_and_changes_the_loss(run):
    run_dir, inputs = run
    plain = TeacherTrainer(TINY, run_dir, ENV, fixed_batch=True, inputs=inputs)
    weighted_recipe = dataclasses.replace(TINY, teacher=dataclasses.replace(TINY.teacher, fg_weight=10.0))
    weighted = TeacherTrainer(weighted_recipe, run_dir, ENV, fixed_batch=True, inputs=inputs)
    a, b = plain.train_step(0)["loss"], weighted.train_step(0)["loss"]   # same weights, noise and batch
    assert math.isfinite(b) and a != b
    losses = [weighted.train_step(i)["loss"] for i in range(1, 6)]
    assert all(math.isfinite(x) for x in losses)
    shared_recipe = dataclasses.replace(TINY, teacher=dataclasses.replace(TINY.teacher, fg_share=0.5))
    shared = TeacherTrainer(shared_recipe, run_dir, ENV, fixed_batch=True, inputs=inputs)
    c = shared.train_step(0)["loss"]
    assert math.isfinite(c) and c not in (a, b)
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(TINY.teacher, fg_weight=4.0, fg_share=0.5)


def test_teacher_init_starts_from_given_weights(run, tmp_path):
    run_dir, inputs = run
    final = run_dir / "teacher" / "final.safetensors"
    trainer = TeacherTrainer(TINY, run_dir, ENV, inputs=inputs, init=final)
    want = load_weights(final)
    assert all(torch.equal(v, want[k]) for k, v in trainer.net.state_dict().items())
    assert all(p.requires_grad for p in trainer.net.parameters())
    with pytest.raises(ValueError, match="no such file"):
        TeacherTrainer(TINY, run_dir, ENV, inputs=inputs, init=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        TeacherTrainer(TINY, run_dir, ENV, inputs=inputs, init=run_dir / "vae" / "final.safetensors")


def test_vae_init_fine_tunes_the_whole_vae_from_given_weights(run, tmp_path):
    from turbovid.train.vae import VAETrainer
    run_dir, _ = run
    src = run_dir / "vae" / "final.safetensors"
    want = load_weights(src)
    trainer = VAETrainer(TINY, ENV, fixed_batch=True, init=src)
    assert all(torch.equal(v, want[k]) for k, v in trainer.vae.state_dict().items())   # logvar bias kept too
    assert all(p.requires_grad for p in trainer.vae.parameters())                         # encoder trains
    with pytest.raises(ValueError, match="no such file"):
        VAETrainer(TINY, ENV, init=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="applies to the vae stage"):
        VAETrainer(TINY, ENV, init=src, decoder_of=src)
    with pytest.raises(ValueError, match="not the weights of a tiny VAE"):
        VAETrainer(TINY, ENV, init=run_dir / "teacher" / "final.safetensors")
    # The stage from `init` writes new latent statistics and a reconstruction report; its encoder moved
    out = run_vae(_stage(TINY, "vae_stage", steps=2), tmp_path, ENV, init=src)
    tuned = load_weights(out)
    assert not torch.equal(tuned["encoder.conv1.weight"], want["encoder.conv1.weight"])
    assert (tmp_path / "vae" / "latent_stats.json").is_file() and (tmp_path / "vae" / "reconstruction.json").is_file()
    assert [r["step"] for r in _log(tmp_path / "vae" / "log.jsonl")] == [0, 1]


def test_object_centred_vae_crops_hold_the_object():
    # With object_crops = 1 every 96 px crop of a 240 px clip is centred (jitter <= a quarter of the crop) on the
    # object at one of its frames, so each crop holds object pixels, and more of them than uniform crops do.
    from turbovid.train.vae import VAETrainer, foreground_weights
    mini = RECIPES["mini"]

    def crops(frac):
        run = dataclasses.replace(mini.vae_stage.run, batch=4)
        recipe = dataclasses.replace(mini, vae_stage=dataclasses.replace(mini.vae_stage, object_crops=frac, run=run))
        out = torch.cat([VAETrainer(recipe, ENV)._crops(step) for step in range(3)])
        assert out.shape[2:] == (33, 96, 96)
        w = foreground_weights(out, 10.0).flatten(1)
        return (w > w.amin(1, keepdim=True)).float().mean(1)          # object-pixel fraction per crop

    centred, uniform = crops(1.0), crops(0.0)
    assert (centred > 0).all()
    assert centred.mean() > 1.5 * uniform.mean()


def test_reproduce_runs_the_whole_tiny_recipe_and_skips_finished_stages(tmp_path, monkeypatch, capsys):
    # `turbovid train reproduce` as one piece: tokenizer, text encoder, VAE, VAE decoder, teacher, rCM, SLA, merge,
    # the evaluations and the export; run again, every finished stage is skipped (its weights stay byte-identical).
    monkeypatch.setenv("TURBOVID_KERNELS", "ref")
    run_dir = tmp_path / "tiny"
    common = ["--run-dir", str(run_dir), "--recipe", "tiny", "--device", "cpu"]
    assert _cli("reproduce", *common) == 0
    export = run_dir / "export"
    assert {p.name for p in export.iterdir()} == {"dit.safetensors", "dit_int8.safetensors", "dit_teacher.safetensors",
                                                 "vae.safetensors", "text_encoder.safetensors", "spiece.model",
                                                 "config.json"}
    config = json.loads((export / "config.json").read_text())
    assert {k: v["steps"] for k, v in config["stages"].items()} == {
        "vae": TINY.vae_stage.run.steps, "vae_decoder": TINY.vae_decoder.run.steps, "teacher": TINY.teacher.run.steps,
        "rcm": TINY.rcm.run.steps, "sla": TINY.sla.run.steps}
    assert set(config["eval"]) == {"teacher", "teacher_4step", "rcm", "merged_sla"}
    assert all(0 <= r["all"] <= 1 for r in config["eval"].values())
    merged = load_weights(run_dir / "merged" / "model.safetensors")
    key = "blocks.0.ffn.0.weight"
    assert torch.equal(load_weights(export / "dit.safetensors")[key], merged[key].to(torch.bfloat16))
    # the shipped files keep their weights' history: the merged student is the rCM student plus the SLA change
    teacher_steps = {"stage": "teacher", "steps": TINY.teacher.run.steps}
    assert weights_history(export / "dit_teacher.safetensors") == [teacher_steps]
    assert weights_history(export / "dit.safetensors") == [
        teacher_steps, {"stage": "rcm", "steps": TINY.rcm.run.steps}, {"stage": "sla", "steps": TINY.sla.run.steps},
        {"stage": "merge", "weight": TINY.merge_weight}]
    assert [e["stage"] for e in weights_history(export / "vae.safetensors")] == ["vae", "vae_decoder"]
    finals = sorted(run_dir.glob("*/final.safetensors"))
    assert [p.parent.name for p in finals] == ["rcm", "sla", "teacher", "vae", "vae_decoder"]
    assert sorted(p.name for p in (run_dir / "eval").glob("*.mp4")) == [
        "merged_sla.mp4", "rcm.mp4", "teacher.mp4", "teacher_4step.mp4"]
    before = {p: p.read_bytes() for p in finals}
    assert _cli("reproduce", *common, "--no-eval") == 0
    assert {p: p.read_bytes() for p in finals} == before
    # Without an mp4 encoder the run says so before its first stage and its evaluations write scores, no videos.
    import turbovid.train.reproduce
    monkeypatch.setattr(turbovid.train.reproduce, "available_backend", lambda: None)
    shutil.rmtree(run_dir / "eval")
    capsys.readouterr()
    assert _cli("reproduce", *common) == 0
    assert capsys.readouterr().out.startswith("note: no mp4 encoder is installed")
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == [
        "merged_sla.json", "rcm.json", "teacher.json", "teacher_4step.json"]
    assert {p: p.read_bytes() for p in finals} == before


def test_cli_overrides_reach_the_stage_recipe():
    from turbovid.train.cli import _recipe
    parser = _parser()
    args = parser.parse_args(["train", "teacher", "--compile", "--batch", "64", "--lr", "1e-4", "--steps", "10"])
    teacher = _recipe(args).teacher
    assert teacher.compile and teacher.run.batch == 64 and teacher.optim.lr == 1e-4 and teacher.run.steps == 10
    assert not _recipe(parser.parse_args(["train", "teacher"])).teacher.compile
    sla = _recipe(parser.parse_args(["train", "reproduce", "--compile"]))
    assert sla.teacher.compile and sla.sla.compile
    vae = _recipe(parser.parse_args(["train", "vae", "--edge", "0.5", "--lr", "2e-4"])).vae_stage
    assert vae.edge == 0.5 and vae.optim.lr == 2e-4
    assert _recipe(parser.parse_args(["train", "vae"])).vae_stage.edge == 0.0
    weighted = _recipe(parser.parse_args(["train", "teacher", "--fg-weight", "4"]))
    assert weighted.teacher.fg_weight == 4 and all(r.fg_weight == 4 for r in weighted.teacher_rounds)
    assert weighted.teacher_rounds and _recipe(parser.parse_args(["train", "teacher"])).teacher.fg_weight == 0
    shared = _recipe(parser.parse_args(["train", "teacher", "--fg-share", "0.5"]))   # replaces the rounds' fg_weight
    assert all(r.fg_share == 0.5 and r.fg_weight == 0 for r in (shared.teacher, *shared.teacher_rounds))
    with pytest.raises(ValueError, match="give one"):
        _recipe(parser.parse_args(["train", "teacher", "--fg-share", "0.5", "--fg-weight", "4"]))
    with pytest.raises(ValueError, match=r"--fg-share must be in \[0, 1\)"):
        _recipe(parser.parse_args(["train", "teacher", "--fg-share", "1"]))
    # rcm --guidance: the CFG scale of the teacher it distils (the recipe's 6 unless given)
    assert _recipe(parser.parse_args(["train", "rcm", "--guidance", "5"])).rcm.guidance == 5
    assert _recipe(parser.parse_args(["train", "rcm"])).rcm.guidance == 6
    assert _recipe(parser.parse_args(["train", "eval", "--guidance", "4"])).rcm.guidance == 6
    with pytest.raises(ValueError, match="--guidance must be >= 1"):
        _recipe(parser.parse_args(["train", "rcm", "--guidance", "0.5"]))
    from turbovid.train.cli import cmd_train
    with pytest.raises(ValueError, match="--guidance applies to the rcm, dmd, eval stages only"):
        cmd_train(parser.parse_args(["train", "teacher", "--guidance", "5"]))
    # rcm --fg-share weighs the sCM loss, and leaves the teacher's settings alone
    rcm = _recipe(parser.parse_args(["train", "rcm", "--fg-share", "0.5"]))
    assert rcm.rcm.fg_share == 0.5 and rcm.teacher == RECIPES["mini"].teacher
    with pytest.raises(ValueError, match=r"--fg-share must be in \[0, 1\)"):
        _recipe(parser.parse_args(["train", "rcm", "--fg-share", "1"]))
    # rcm --no-dmd: sCM alone
    assert not _recipe(parser.parse_args(["train", "rcm", "--no-dmd"])).rcm.dmd
    assert _recipe(parser.parse_args(["train", "rcm"])).rcm.dmd
    with pytest.raises(ValueError, match="--no-dmd applies to the rcm stage only"):
        cmd_train(parser.parse_args(["train", "sla", "--no-dmd"]))
    # rcm --teacher-data N: the teacher's samples as data (none unless given)
    assert _recipe(parser.parse_args(["train", "rcm", "--teacher-data", "2048"])).rcm.teacher_data == 2048
    assert _recipe(parser.parse_args(["train", "rcm"])).rcm.teacher_data == 0
    with pytest.raises(ValueError, match="--teacher-data must be >= 1"):
        _recipe(parser.parse_args(["train", "rcm", "--teacher-data", "0"]))
    with pytest.raises(ValueError, match="no object masks"):
        _recipe(parser.parse_args(["train", "rcm", "--teacher-data", "8", "--fg-share", "0.5"]))
    with pytest.raises(ValueError, match="--teacher-data applies to the rcm stage only"):
        cmd_train(parser.parse_args(["train", "teacher", "--teacher-data", "8"]))
    # qat: its own settings take --steps / --lr / --topk / --quant-weight; sla's stay as they are
    qat = _recipe(parser.parse_args(["train", "qat", "--steps", "7", "--lr", "1e-5", "--topk", "0.6",
                                     "--quant-weight", "2"]))
    assert (qat.qat.run.steps, qat.qat.optim.lr, qat.qat.topk, qat.qat.quant_weight) == (7, 1e-5, 0.6, 2.0)
    assert qat.sla == RECIPES["mini"].sla
    with pytest.raises(ValueError, match="> 0 for qat"):
        _recipe(parser.parse_args(["train", "qat", "--quant-weight", "0"]))


def test_teacher_rounds_chain_their_weights_and_logs(run, tmp_path):
    from turbovid.train.plots import rounds_log
    from turbovid.train.recipe import Optim, Schedule, TeacherStage
    from turbovid.train.teacher import teacher_dirs
    src, _ = run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("vae", "spiece.model", "text_encoder.safetensors"):
        (shutil.copytree if (src / name).is_dir() else shutil.copyfile)(src / name, run_dir / name)
    # round 2 at a negligible learning rate: its weights stay round 1's, so "starts from round 1" is checkable
    still = TeacherStage(Schedule(steps=3, batch=2, log_every=1, ckpt_every=3), Optim(lr=1e-12, warmup=0))
    recipe = dataclasses.replace(TINY, teacher_rounds=(still,))
    assert teacher_dirs(recipe) == ["teacher_round1", "teacher"]
    out = run_teacher(recipe, run_dir, ENV)
    assert out == run_dir / "teacher" / "final.safetensors"
    first, second = load_weights(run_dir / "teacher_round1" / "final.safetensors"), load_weights(out)
    assert all(torch.allclose(second[k], v, atol=1e-6) for k, v in first.items())
    assert not torch.equal(first["head.head.weight"], new_dit(TINY).state_dict()["head.head.weight"])
    steps = [r["step"] for r in rounds_log(run_dir, teacher_dirs(recipe))]
    assert steps == list(range(TINY.teacher.run.steps + 3))   # round 2's steps counted on after round 1's
    assert run_teacher(recipe, run_dir, ENV) == out          # finished rounds are skipped
    # the last round's weights record both rounds (what `train ship` reports)
    assert weights_history(out) == [{"stage": "teacher", "steps": TINY.teacher.run.steps},
                                    {"stage": "teacher", "steps": 3}]


def test_weights_history_reads_old_files_and_other_formats(tmp_path):
    state = {"w": torch.zeros(2)}
    assert weights_history(save_weights(tmp_path / "plain.safetensors", state)) == []
    old = save_weights(tmp_path / "old.safetensors", state, metadata={"stage": "rcm", "steps": "7"})
    assert weights_history(old) == [{"stage": "rcm", "steps": 7}]   # written before histories existed
    new = save_weights(tmp_path / "new.safetensors", state, metadata={"stage": "rcm", "steps": "7",
                                                                     **history_metadata([{"stage": "vae", "steps": 1}])})
    assert weights_history(new) == [{"stage": "vae", "steps": 1}]
    torch.save(state, tmp_path / "official.pth")
    assert weights_history(tmp_path / "official.pth") == []


def test_ship_from_a_run_assembled_from_a_release_counts_every_stage_behind_it(run, tmp_path):
    # A run directory built from shipped files (docs/training/mini/device/assemble.py) holds only the release's
    # teacher; the stages run on it and the new release still record the teacher's earlier rounds.
    src, _ = run
    run_dir = tmp_path / "assembled"
    run_dir.mkdir()
    for name in ("vae", "vae_decoder", "spiece.model", "text_encoder.safetensors"):
        (shutil.copytree if (src / name).is_dir() else shutil.copyfile)(src / name, run_dir / name)
    rounds = [{"stage": "teacher", "steps": 11}, {"stage": "teacher", "steps": 5}]
    save_weights(run_dir / "teacher" / "final.safetensors", load_weights(src / "teacher" / "final.safetensors"),
                 metadata=history_metadata(rounds))
    common = ["--run-dir", str(run_dir), "--recipe", "tiny", "--device", "cpu"]
    assert _cli("rcm", *common, "--steps", "2") == 0
    assert weights_history(run_dir / "rcm" / "final.safetensors") == [*rounds, {"stage": "rcm", "steps": 2}]
    assert _cli("sla", *common, "--steps", "1") == 0 and _cli("merge", *common) == 0
    assert _cli("ship", *common, "--output", str(run_dir / "release")) == 0
    config = json.loads((run_dir / "release" / "config.json").read_text())
    stages = config["stages"]
    assert stages["teacher"] == {"steps": 16, "rounds": [11, 5]}
    assert config["student_history"] == [*rounds, {"stage": "rcm", "steps": 2}, {"stage": "sla", "steps": 1},
                                         {"stage": "merge", "weight": 1.0}]
    assert (stages["rcm"]["steps"], stages["sla"]["steps"]) == (2, 1)
    assert (stages["vae"]["steps"], stages["vae_decoder"]["steps"]) == (TINY.vae_stage.run.steps,
                                                                         TINY.vae_decoder.run.steps)
    assert weights_history(run_dir / "release" / "dit_teacher.safetensors") == rounds


def test_for_world_keeps_the_global_batch():
    from turbovid.train.recipe import for_world
    mini = RECIPES["mini"]
    assert mini.teacher.run.gpus == 4 and mini.teacher_rounds[0].run.gpus == 1
    one = for_world(mini, 1)
    assert (one.teacher.run.batch, one.vae_stage.run.batch, one.teacher_rounds[0].run.batch) == (128, 64, 32)
    four = for_world(mini, 4)
    assert (four.teacher.run.batch, four.rcm.run.batch) == (32, 2)
    with pytest.raises(ValueError, match="does not split over 3 GPUs"):
        for_world(mini, 3)


def _run_with_rcm_student(src, dst):
    """dst: a run directory with src's VAE, teacher, text encoder and tokenizer, and the teacher's weights standing in
    for an rCM student (rcm/final.safetensors, 3 steps in its history); returns the rcm history."""
    for name in ("vae", "vae_decoder", "teacher"):
        shutil.copytree(src / name, dst / name)
    for name in ("text_encoder.safetensors", "spiece.model"):
        shutil.copyfile(src / name, dst / name)
    rcm_history = [{"stage": "rcm", "steps": 3}]
    save_weights(dst / "rcm" / "final.safetensors", load_weights(src / "teacher" / "final.safetensors"),
                 metadata=history_metadata(rcm_history))
    return rcm_history


def test_qat_stage_continues_the_sla_student_quantization_aware(run, tmp_path):
    # The qat stage (teacher.QATTrainer): the SLA-tuned rCM student, trained against the frozen rCM student on the
    # sla stage's loss terms plus the loss of its output run as the turbo path runs it (SageSLA + W8A8 rounding).
    from turbovid.train.reproduce import ship
    from turbovid.train.teacher import QATTrainer, quantization_aware, run_qat, run_sla

    src, _ = run
    rcm_history = _run_with_rcm_student(src, tmp_path)
    sla = dataclasses.replace(TINY.sla, base="rcm", dense_weight=0.5, run=dataclasses.replace(TINY.sla.run, steps=2))
    qat = dataclasses.replace(sla, quant_weight=2.0, run=dataclasses.replace(TINY.sla.run, steps=3),
                              optim=dataclasses.replace(TINY.sla.optim, lr=1e-5))
    recipe = dataclasses.replace(TINY, sla=sla, qat=qat, ship_student="qat", size=128, frames=9)
    with pytest.raises(ValueError, match="missing"):
        run_qat(recipe, tmp_path, ENV)                 # the sla stage first
    run_sla(recipe, tmp_path, ENV)
    trainer = QATTrainer(recipe, tmp_path, ENV, load_weights(tmp_path / "rcm" / "final.safetensors"),
                         fixed_batch=True, start_weights=load_weights(tmp_path / "sla" / "final.safetensors"))
    start = load_weights(tmp_path / "sla" / "final.safetensors")
    assert all(torch.equal(v, start[k]) for k, v in trainer.net.state_dict().items())   # starts as the SLA student
    modules = list(trainer.net.modules())
    with quantization_aware(trainer.net):
        kinds = {type(m).__name__ for m in trainer.net.modules()}
        assert "FakeQuantLinear" in kinds and all(b.self_attn.attn_op.local_attn.quantized for b in trainer.net.blocks)
    assert list(trainer.net.modules()) == modules and not any(
        b.self_attn.attn_op.local_attn.quantized for b in trainer.net.blocks)                # put back
    record = trainer.train_step(0)
    assert record["loss"] == pytest.approx(record["loss_sla"] + 0.5 * record["loss_dense"] + 2.0 * record["loss_quant"],
                                           rel=1e-6)
    assert math.isfinite(record["loss_quant"]) and record["loss_quant"] != record["loss_sla"]
    out = run_qat(recipe, tmp_path, ENV)
    logs = _log(tmp_path / "qat" / "log.jsonl")
    assert len(logs) == 3 and all(math.isfinite(r["loss_quant"]) for r in logs)
    assert weights_history(out) == [*rcm_history, {"stage": "sla", "steps": 2}, {"stage": "qat", "steps": 3}]
    dest = ship(recipe, tmp_path, tmp_path / "export")
    config = json.loads((dest / "config.json").read_text())
    assert config["student"] == "qat" and (config["stages"]["sla"], config["stages"]["qat"]) == ({"steps": 2},
                                                                                               {"steps": 3})
    key = "blocks.0.ffn.0.weight"
    assert torch.equal(load_weights(dest / "dit.safetensors")[key], load_weights(out)[key].to(torch.bfloat16))
    with pytest.raises(ValueError, match="has no qat stage"):
        _cli("qat", "--recipe", "tiny", "--run-dir", str(tmp_path), "--device", "cpu")
    with pytest.raises(ValueError, match="--quant-weight applies to the sla, qat, ode stages only"):
        _cli("teacher", "--quant-weight", "1", "--recipe", "tiny", "--run-dir", str(tmp_path), "--device", "cpu")
    with pytest.raises(ValueError, match="qat stage continues"):
        dataclasses.replace(recipe, qat=dataclasses.replace(qat, quant_weight=0.0))


def test_generate_latents_records_the_teacher_states():
    # `record`: the state the teacher sampler evaluates the network at, per requested step. For a constant
    # velocity c the flow path is x(s) = eps + (s - s_0) c, which UniPC follows exactly.
    from turbovid.config import SampleConfig
    from turbovid.sampling import flow_times
    shape = (2, *TINY.latent_shape)
    c = torch.randn(shape[1:], generator=torch.Generator().manual_seed(5))
    net = lambda x, t, ctx: c.expand_as(x)  # noqa: E731
    context, negative = torch.zeros(2, 3, 4), torch.zeros(1, 3, 4)
    record = dict.fromkeys([0, 2, 4])
    out = generate_latents(net, context, negative, shape, ENV, sampler="teacher", steps=6, seed=7, record=record)
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    times = flow_times(6, SampleConfig.shift)
    for k, x in record.items():
        torch.testing.assert_close(x, eps + (times[k] - times[0]) * c, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, eps - times[0] * c, atol=1e-5, rtol=0)
    # entered late, at state x and time s: the same path from there, over the schedule's times below s
    late = generate_latents(net, context, negative, shape, ENV, sampler="teacher", steps=6, seed=7, start=(eps, 0.5))
    torch.testing.assert_close(late, eps - 0.5 * c, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="for the teacher sampler"):
        generate_latents(net, context, negative, shape, ENV, sampler="rcm", steps=2, seed=7, start=(eps, 0.5))


def test_ode_stage_fits_the_teachers_trajectories(run, tmp_path):
    # The ode stage (trajectory.ODETrainer): the SLA-tuned student regresses onto the teacher's own samples from the
    # states the teacher's sampler passes at the few-step sampler's times (the first: the scaled start noise).
    from turbovid.config import MODELS
    from turbovid.sampling import rcm_times
    from turbovid.train.recipe import ODEStage, Optim, Schedule
    from turbovid.train.reproduce import ship
    from turbovid.train.teacher import run_sla
    from turbovid.train.trajectory import ODETrainer, TeacherTrajectories, run_ode, trajectory_steps

    src, _ = run
    rcm_history = _run_with_rcm_student(src, tmp_path)
    teacher = load_weights(src / "teacher" / "final.safetensors")
    sla = dataclasses.replace(TINY.sla, base="rcm", dense_weight=0.5, run=dataclasses.replace(TINY.sla.run, steps=2))
    ode = ODEStage(Schedule(steps=3, batch=4, log_every=1, ckpt_every=3), Optim(lr=1e-3, warmup=0), trajectories=3,
                   topk=0.6, dense_weight=0.5)
    recipe = dataclasses.replace(TINY, sla=sla, ode=ode, ship_student="ode", size=128, frames=9)
    with pytest.raises(ValueError, match="run `turbovid train sla` first"):
        run_ode(recipe, tmp_path, ENV)
    run_sla(recipe, tmp_path, ENV)

    steps, times = trajectory_steps(recipe)     # 2 few-step calls for the tiny recipe: the start and one more
    few = rcm_times(recipe.eval_rcm_steps, MODELS[recipe.name].sigma_max)
    assert len(steps) == recipe.eval_rcm_steps and steps[0] == 0 and times[0] == few[0]
    assert all(abs(t - s) < 0.3 for t, s in zip(times[1:], few[1:-1]))
    start = load_weights(tmp_path / "sla" / "final.safetensors")
    trainer = ODETrainer(recipe, tmp_path, ENV, teacher, start, fixed_batch=True)
    assert all(torch.equal(v, start[k]) for k, v in trainer.net.state_dict().items())   # starts as the SLA student
    assert all(b.self_attn.attn_op.local_attn.topk == 0.6 for b in trainer.net.blocks)
    data = trainer.inputs
    assert isinstance(data, TeacherTrajectories)
    assert data.pool_latents.shape == (3, len(steps) + 1, *recipe.latent_shape)
    assert (tmp_path / "ode" / "trajectories_train_3_rank0of1.safetensors").is_file()
    context, _ = data.captions([0, 1, 2])
    shape = (3, *recipe.latent_shape)
    record = dict.fromkeys(steps)
    want = generate_latents(trainer.teacher, context, data.negative, shape, ENV, sampler="teacher",
                            steps=recipe.eval_teacher_steps, seed=0, record=record)
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    pool = data.pool_latents.float()
    tol = dict(atol=0.02 * want.abs().max().item(), rtol=0)
    torch.testing.assert_close(pool[:, -1], want, **tol)                  # the end point: the teacher's sample
    torch.testing.assert_close(pool[:, 0], times[0] * eps, **tol)         # the few-step sampler's first input
    for j, k in enumerate(steps[1:], 1):
        torch.testing.assert_close(pool[:, j], record[k], **tol)

    x, t_net, v_target, batch_context = trainer._batch(0)
    n = len(steps)
    assert x.shape == (2 * n, *recipe.latent_shape) and batch_context.shape[0] == 2 * n
    paths, ctx, _ = data.get([0, 1])
    s = torch.tensor(times).repeat(2).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(x - s * v_target, paths[:, -1].repeat_interleave(n, 0))   # x0 prediction = the sample
    torch.testing.assert_close(t_net, 1000 * s.flatten())
    assert torch.equal(batch_context, ctx.repeat_interleave(n, 0))
    logs = drive(trainer, tmp_path / "fixed", ENV, quiet=True)
    assert all(math.isfinite(r["loss_sla"]) and math.isfinite(r["loss_dense"]) for r in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]                              # one fixed batch: it fits
    assert logs[0]["loss"] == pytest.approx(logs[0]["loss_sla"] + 0.5 * logs[0]["loss_dense"], rel=1e-6)
    again = TeacherTrajectories(recipe, tmp_path, ENV, trainer.teacher, 3)      # read back, not sampled again
    assert torch.equal(again.pool_latents, data.pool_latents)

    out = run_ode(recipe, tmp_path, ENV)
    assert weights_history(out) == [*rcm_history, {"stage": "sla", "steps": 2}, {"stage": "ode", "steps": 3}]
    config = json.loads((ship(recipe, tmp_path, tmp_path / "export") / "config.json").read_text())
    assert config["student"] == "ode" and config["stages"]["ode"] == {"steps": 3, "rounds": [3]}
    assert config["sla_topk_tuned"] == 0.6
    with pytest.raises(ValueError, match="ship_student='ode' needs an ode stage"):
        dataclasses.replace(recipe, ode=None)
    with pytest.raises(ValueError, match="needs sla.base 'rcm'"):
        dataclasses.replace(recipe, sla=TINY.sla, ship_student="merged")
    with pytest.raises(ValueError, match="has no ode stage"):
        _cli("ode", "--recipe", "tiny", "--run-dir", str(tmp_path), "--device", "cpu")
    with pytest.raises(ValueError, match="--trajectories applies to the ode stage only"):
        _cli("sla", "--trajectories", "4", "--recipe", "tiny", "--run-dir", str(tmp_path), "--device", "cpu")


def test_ode_stage_on_policy_fits_the_teachers_completion_of_the_last_step(run, tmp_path):
    # recipe.ode.on_policy: the frozen start student's own sampling states, the last one's target the teacher's
    # sampler run from it, the others' the frozen student's outputs; nothing pooled.
    from turbovid.config import MODELS
    from turbovid.sampling import rcm_times
    from turbovid.train.recipe import ODEStage, Optim, Schedule
    from turbovid.train.trajectory import ODETrainer

    src, _ = run
    teacher = load_weights(src / "teacher" / "final.safetensors")
    student = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in teacher.items()}
    ode = ODEStage(Schedule(steps=3, batch=4, log_every=1, ckpt_every=3), Optim(lr=1e-3, warmup=0), topk=0.6,
                   dense_weight=0.5, on_policy=True)
    recipe = dataclasses.replace(TINY, sla=dataclasses.replace(TINY.sla, base="rcm"), ode=ode, ship_student="sla")
    trainer = ODETrainer(recipe, src, ENV, teacher, student, fixed_batch=True)
    assert trainer.inputs.pool_latents is None and not (src / "ode").exists()
    x, t_net, v_target, context = trainer._batch(0)
    fx, ft, fv, fc = trainer._trajectory(0, trainer.frozen)
    steps = recipe.eval_rcm_steps
    clips = x.shape[0] // steps
    assert torch.equal(x, fx) and torch.equal(t_net, ft) and torch.equal(context, fc) and clips == 2
    assert torch.equal(v_target[:-clips], fv[:-clips])                   # the earlier steps keep their outputs
    s = rcm_times(steps, MODELS[recipe.name].sigma_max)[-2]
    want = generate_latents(trainer.teacher, context[-clips:], trainer.inputs.negative, tuple(x[-clips:].shape), ENV,
                            sampler="teacher", steps=recipe.eval_teacher_steps, seed=0, start=(x[-clips:], s))
    torch.testing.assert_close(x[-clips:] - s * v_target[-clips:], want)   # the last: the teacher's completion
    assert not torch.allclose(v_target[-clips:], fv[-clips:])
    logs = drive(trainer, tmp_path / "a", ENV, quiet=True)
    assert len(logs) == 3 and all(math.isfinite(r["loss_sla"]) and math.isfinite(r["loss_dense"]) for r in logs)
    # fg_share: each row's loss weighs the object read off its target x0 (data.latent_object_estimate); no weight
    # without it
    assert trainer._loss_weight(x, t_net, v_target) is None
    shared = ODETrainer(dataclasses.replace(recipe, ode=dataclasses.replace(ode, fg_share=0.5)), src, ENV, teacher,
                        student, fixed_batch=True)
    weight = shared._loss_weight(x, t_net, v_target)
    mask = latent_object_estimate(x - (t_net.float() / 1000).view(-1, 1, 1, 1, 1) * v_target)
    torch.testing.assert_close(weight, object_weights(mask, fg_share=0.5).unsqueeze(1))
    assert weight.shape == (x.shape[0], 1, *x.shape[2:])
    x0 = torch.zeros_like(x)
    x0[..., 0, 0] = 5.0                                          # an object in the top-left cell of every target
    s = (t_net.float() / 1000).view(-1, 1, 1, 1, 1)
    drawn = shared._loss_weight(x, t_net, (x - x0) / s)
    corner = torch.zeros(x.shape[-2:])
    corner[:2, :2] = 1                                           # the cell and its neighbours (a 3 x 3 dilation)
    torch.testing.assert_close(drawn, object_weights(corner.expand(x.shape[0], x.shape[2], -1, -1), fg_share=0.5)
                               .unsqueeze(1), atol=1e-3, rtol=1e-3)
    weighted = drive(shared, tmp_path / "w", ENV, quiet=True)
    assert len(weighted) == 3 and all(math.isfinite(r["loss_sla"]) for r in weighted)
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(ode, fg_share=1.0)
    # the completed call named by its index: call 1 is the tiny schedule's last
    named = dataclasses.replace(recipe, ode=dataclasses.replace(ode, on_policy_step=1))
    again = ODETrainer(named, src, ENV, teacher, student, fixed_batch=True)._batch(0)
    assert all(torch.equal(a, b) for a, b in zip(again, (x, t_net, v_target, context)))
    with pytest.raises(ValueError, match="pure-noise start"):
        dataclasses.replace(ode, on_policy_step=0)
    for outside in (2, -2):     # the tiny recipe's sampler has calls 0 and 1 only
        with pytest.raises(ValueError, match="must name one of the 2-step sampler's calls"):
            dataclasses.replace(recipe, ode=dataclasses.replace(ode, on_policy_step=outside))


def test_ode_stage_adversarial_term_at_one_call(run, tmp_path):
    # recipe.ode.adv_weight: call on_policy_step keeps the frozen student's outputs as targets (no teacher completion),
    # and the student's x0 there gets the generator loss of heads on frozen-teacher features (train/adversarial.py),
    # the heads trained each step against the captions' own clips; checkpoints carry the heads and their optimizer.
    from turbovid.config import MODELS
    from turbovid.sampling import rcm_times
    from turbovid.train.adversarial import FeatureDiscriminator, block_outputs
    from turbovid.train.checkpoint import latest_checkpoint, load_checkpoint
    from turbovid.train.recipe import ODEStage, Optim, Schedule
    from turbovid.train.trajectory import ODETrainer

    src, _ = run
    teacher = load_weights(src / "teacher" / "final.safetensors")
    student = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in teacher.items()}
    ode = ODEStage(Schedule(steps=3, batch=4, log_every=1, ckpt_every=2), Optim(lr=1e-3, warmup=0), topk=0.6,
                   on_policy=True, adv_weight=0.5, adv_layers=(0, 1), adv_optim=Optim(lr=1e-2, warmup=0))
    recipe = dataclasses.replace(TINY, sla=dataclasses.replace(TINY.sla, base="rcm"), ode=ode, ship_student="sla")
    trainer = ODETrainer(recipe, src, ENV, teacher, student, fixed_batch=True)
    x, t_net, v_target, context = trainer._batch(0)
    _, _, fv, _ = trainer._trajectory(0, trainer.frozen)
    assert torch.equal(v_target, fv)                     # every call keeps its frozen outputs: nothing completed
    # the generator term reaches the student's output at the last call's rows only, and not the heads
    v = v_target.clone().requires_grad_()
    (weight, term), = trainer._output_terms(0, x, t_net, v, context).values()
    assert weight == 0.5 and term.requires_grad
    term.backward()
    clips = x.shape[0] // recipe.eval_rcm_steps
    assert v.grad[-clips:].abs().sum() > 0 and v.grad[:-clips].abs().sum() == 0
    assert all(p.grad is None for p in trainer.adv.disc.parameters())
    assert all(p.grad is None for p in trainer.teacher.parameters())
    s = rcm_times(recipe.eval_rcm_steps, MODELS[recipe.name].sigma_max)[-2]
    kept = trainer._fake
    feats, caption, s_d, noise, n = kept["feats"], kept["caption"], kept["s"], kept["noise"], len(kept["indices"])
    assert n == clips and ((s_d >= 0.05) & (s_d <= 0.6)).all()
    want = trainer.adv.disc.features(trainer.teacher, x[-clips:] - s * v_target[-clips:], context[-clips:], s_d, noise,
                                    ENV.autocast)
    assert all(torch.allclose(a, b) for a, b in zip(feats, want))   # the features of its x0 = x - s v
    assert not trainer.teacher.blocks[0]._forward_hooks              # the hooks are gone after each pass
    # training: finite losses, the heads move, the frozen teacher does not; resumable with the heads
    heads = {k: v.clone() for k, v in trainer.adv.disc.state_dict().items()}
    frozen = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    logs = drive(trainer, tmp_path / "a", ENV, quiet=True, until=2)
    assert all(math.isfinite(r[k]) for r in logs for k in ("loss_sla", "loss_adv", "loss_disc", "d_real", "d_fake"))
    assert logs[0]["loss"] == pytest.approx(logs[0]["loss_sla"] + 0.5 * logs[0]["loss_adv"], rel=1e-5)
    assert any(not torch.equal(heads[k], v) for k, v in trainer.adv.disc.state_dict().items())
    assert all(torch.equal(frozen[k], v) for k, v in trainer.teacher.state_dict().items())
    ckpt = latest_checkpoint(tmp_path / "a" / "checkpoints")
    assert (ckpt / "disc.safetensors").is_file()
    resumed = ODETrainer(recipe, src, ENV, teacher, student, fixed_batch=True)
    weights, state = load_checkpoint(ckpt)
    resumed.load_weights(weights)
    resumed.load_optimizer_states(state["optimizers"])
    assert all(torch.equal(v, resumed.adv.disc.state_dict()[k]) for k, v in trainer.adv.disc.state_dict().items())
    assert resumed.adv.optimizer.state_dict()["state"].keys() == trainer.adv.optimizer.state_dict()["state"].keys()
    rest = drive(resumed, tmp_path / "a", ENV, quiet=True)
    assert [r["step"] for r in rest] == [2] and (tmp_path / "a" / "final.safetensors").is_file()
    # the heads read the named blocks, one logit per token of each
    with block_outputs(trainer.teacher, (1,)) as found:
        trainer.teacher(x[:1], t_net[:1], context[:1])
    assert len(found) == 1 and found[0].shape[:2] == (1, TINY.latent_tokens)
    assert trainer.adv.disc(feats, caption).shape == (clips, 2 * TINY.latent_tokens)
    with pytest.raises(ValueError, match="adversarial layers must be distinct block indices in 0..1"):
        FeatureDiscriminator(TINY.dit.dim, TINY.dit.num_layers, (0, 2))
    with pytest.raises(ValueError, match="adv_weight goes with the on-policy"):
        dataclasses.replace(ode, on_policy=False)
    with pytest.raises(ValueError, match="adv_weight must be >= 0"):
        dataclasses.replace(ode, adv_weight=-1.0)
    with pytest.raises(ValueError, match="adv_noise"):
        dataclasses.replace(ode, adv_noise=(0.5, 0.2))


def test_ode_rounds_continue_each_other(run, tmp_path):
    # recipe.ode_rounds: round 2 starts from round 1's exported student (its frozen sampler and its weights), the
    # histories and the logs chain, finished rounds are skipped, and `ship` reports every round.
    from turbovid.train.plots import rounds_log
    from turbovid.train.recipe import ODEStage, Optim, Schedule
    from turbovid.train.reproduce import ship
    from turbovid.train.trajectory import ode_dirs, run_ode

    src, _ = run
    for entry in src.iterdir():
        if entry.name not in ("sla", "eval") and not entry.name.startswith("ode"):
            (tmp_path / entry.name).symlink_to(entry)
    teacher = load_weights(src / "teacher" / "final.safetensors")
    start = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in teacher.items()}
    save_weights(tmp_path / "sla" / "final.safetensors", start, history_metadata([{"stage": "sla", "steps": 5}]))
    first = ODEStage(Schedule(steps=2, batch=4, log_every=1, ckpt_every=2), Optim(lr=1e-3, warmup=0), topk=0.6,
                     on_policy=True)
    # round 2 at a negligible learning rate: its weights stay its start's, so "continues round 1" is checkable
    still = dataclasses.replace(first, run=dataclasses.replace(first.run, steps=1), optim=Optim(lr=1e-12, warmup=0))
    recipe = dataclasses.replace(TINY, sla=dataclasses.replace(TINY.sla, base="rcm"), ode=first, ode_rounds=(still,),
                                 ship_student="ode")
    assert ode_dirs(recipe) == ["ode_round1", "ode"] and ode_dirs(dataclasses.replace(recipe, ode_rounds=())) == ["ode"]
    out = run_ode(recipe, tmp_path, ENV)
    assert out == tmp_path / "ode" / "final.safetensors"
    one, two = load_weights(tmp_path / "ode_round1" / "final.safetensors"), load_weights(out)
    assert all(torch.allclose(two[k], v, atol=1e-6) for k, v in one.items())
    assert not torch.allclose(one["head.head.weight"], start["head.head.weight"], atol=1e-6)
    assert weights_history(out) == [{"stage": "sla", "steps": 5}, {"stage": "ode", "steps": 2},
                                    {"stage": "ode", "steps": 1}]
    assert [r["step"] for r in rounds_log(tmp_path, ode_dirs(recipe))] == [0, 1, 2]
    assert run_ode(recipe, tmp_path, ENV) == out              # finished rounds are skipped
    config = json.loads((ship(recipe, tmp_path, tmp_path / "export") / "config.json").read_text())
    assert config["stages"]["ode"] == {"steps": 3, "rounds": [2, 1]}
    with pytest.raises(ValueError, match="ode_rounds continue the ode stage"):
        dataclasses.replace(TINY, ode_rounds=(first,))
    with pytest.raises(ValueError, match="must name one of the 2-step sampler's calls"):
        dataclasses.replace(recipe, ode_rounds=(dataclasses.replace(still, on_policy_step=2),))


def test_dmd_round_continues_the_ode_student(run, tmp_path, monkeypatch):
    # recipe.dmd_round (ship_student "dmd"): `reproduce` runs DMD alone from ode/final.safetensors into dmd/, the
    # student and its anchor at the last ode round's top-k; the history continues the ode student's; `ship` reports
    # the round as "dmd" and the rCM stage's own steps as "rcm", though both records read "rcm".
    from turbovid.train import distill
    from turbovid.train.recipe import ODEStage, Optim, Schedule
    from turbovid.train.reproduce import reproduce

    src, _ = run
    for entry in src.iterdir():
        if entry.name not in ("rcm", "sla", "eval", "export") and not entry.name.startswith(("ode", "dmd")):
            (tmp_path / entry.name).symlink_to(entry)
    teacher = load_weights(src / "teacher" / "final.safetensors")
    start = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in teacher.items()}
    history = [{"stage": "rcm", "steps": 3}, {"stage": "sla", "steps": 5}, {"stage": "ode", "steps": 2}]
    for name, n in (("rcm", 1), ("sla", 2), ("ode", 3)):
        save_weights(tmp_path / name / "final.safetensors", start, history_metadata(history[:n]))
    ode = ODEStage(Schedule(steps=2, batch=4), Optim(lr=1e-3, warmup=0), topk=0.6, on_policy=True)
    dmd = dataclasses.replace(TINY.rcm, run=Schedule(steps=4, batch=2, log_every=1, ckpt_every=4), scm=False,
                              anchor_weight=1.0, student_attention="sla")
    recipe = dataclasses.replace(TINY, sla=dataclasses.replace(TINY.sla, base="rcm", topk=0.3), ode=ode,
                                 dmd_round=dmd, ship_student="dmd")
    seen = []

    class Spy(RCMTrainer):
        def __init__(self, recipe, *args, **kwargs):
            seen.append((recipe.rcm, recipe.sla.topk))
            super().__init__(recipe, *args, **kwargs)
            assert all(torch.equal(v, start[k].to(v.dtype)) for k, v in self.anchor.state_dict().items() if k in start)

    monkeypatch.setattr(distill, "RCMTrainer", Spy)
    export = reproduce(recipe, tmp_path, ENV, evaluate_models=False)
    assert seen == [(dmd, 0.6)]
    out = tmp_path / "dmd" / "final.safetensors"
    assert weights_history(out) == [*history, {"stage": "rcm", "steps": 4}]
    assert not torch.allclose(load_weights(out)["head.head.weight"], start["head.head.weight"], atol=1e-6)
    logs = [json.loads(line) for line in (tmp_path / "dmd" / "log.jsonl").read_text().splitlines()]
    assert [r["student"] for r in logs] == [0.0, 0.0, 1.0, 0.0] and "loss_anchor" in logs[2] and "loss_scm" not in logs[2]
    config = json.loads((export / "config.json").read_text())
    assert config["student"] == "dmd" and config["stages"]["rcm"] == {"steps": 3}
    assert config["stages"]["dmd"] == {"steps": 4} and config["stages"]["ode"] == {"steps": 2, "rounds": [2]}
    assert config["student_history"][-1] == {"stage": "rcm", "steps": 4} and config["sla_topk_tuned"] == 0.6
    with pytest.raises(ValueError, match="ship_student='dmd' needs a dmd_round stage"):
        dataclasses.replace(recipe, dmd_round=None)
    with pytest.raises(ValueError, match="continues the ode stage's student: the recipe has no ode stage"):
        dataclasses.replace(TINY, dmd_round=dmd)
    with pytest.raises(ValueError, match="dmd_round is DMD alone"):
        dataclasses.replace(recipe, dmd_round=TINY.rcm)
    (tmp_path / "ode" / "final.safetensors").unlink()
    with pytest.raises(ValueError, match="continues the ode stage's student; missing"):
        distill.run_dmd(recipe, tmp_path, ENV)
    with pytest.raises(ValueError, match="has no DMD round"):
        distill.run_dmd(TINY, tmp_path, ENV)


def test_cli_overrides_reach_the_dmd_round():
    from turbovid.train.cli import _recipe

    parser = _parser()
    mini = RECIPES["mini"]
    dmd = _recipe(parser.parse_args(["train", "dmd", "--steps", "9", "--lr", "1e-5", "--anchor-weight", "5",
                                     "--anchor-size-scale", "0,2,4", "--guidance", "3"]))
    assert dmd.dmd_round.run.steps == 9 and dmd.dmd_round.optim.lr == 1e-5 and dmd.dmd_round.guidance == 3
    assert dmd.dmd_round.anchor_weight == 5 and dmd.dmd_round.anchor_size_scale == (0, 2, 4)
    assert dmd.rcm == mini.rcm and dmd.ode_stages == mini.ode_stages
    rcm = _recipe(parser.parse_args(["train", "rcm", "--no-scm", "--anchor-weight", "5"]))
    assert rcm.rcm.anchor_weight == 5 and rcm.dmd_round == mini.dmd_round
    with pytest.raises(ValueError, match="has no dmd stage"):
        _cli("dmd", "--recipe", "tiny", "--device", "cpu")
    with pytest.raises(ValueError, match="--topk applies to"):
        _cli("dmd", "--topk", "0.5", "--device", "cpu")


def test_cli_overrides_reach_the_ode_stage():
    from turbovid.train.cli import _recipe
    parser = _parser()
    ode = _recipe(parser.parse_args(["train", "ode", "--steps", "9", "--lr", "1e-5", "--topk", "0.6",
                                     "--off-policy", "--trajectories", "64"]))
    assert (ode.ode.run.steps, ode.ode.optim.lr, ode.ode.topk, ode.ode.trajectories) == (9, 1e-5, 0.6, 64)
    assert ode.sla == RECIPES["mini"].sla and not ode.ode.on_policy
    mini = RECIPES["mini"].ode                  # the shipped student's first ode stage: on policy, call 1
    assert mini.on_policy and mini.on_policy_step == 1 and RECIPES["mini"].ship_student == "dmd"
    assert _recipe(parser.parse_args(["train", "ode"])).ode == mini
    # its rounds walk down the sampler: the second call, then the third from that student, then the last one
    # anchored, with the adversarial term
    assert [(o.on_policy_step, o.run.steps) for o in RECIPES["mini"].ode_stages] == [(1, 416), (2, 371), (-1, 511)]
    assert [o.adv_weight for o in RECIPES["mini"].ode_stages] == [0.0, 0.0, 0.1]
    assert _recipe(parser.parse_args(["train", "ode"])).ode_rounds == RECIPES["mini"].ode_rounds
    assert _recipe(parser.parse_args(["train", "sla", "--steps", "5"])).ode_rounds == RECIPES["mini"].ode_rounds
    assert all(o.compile for o in _recipe(parser.parse_args(["train", "ode", "--compile"])).ode_stages)
    step2 = _recipe(parser.parse_args(["train", "ode", "--on-policy-step", "2"]))
    assert step2.ode.on_policy_step == 2 and step2.ode_rounds == ()       # a setting given: one round, as given
    for flags in (["--steps", "9"], ["--batch", "8"], ["--lr", "1e-5"], ["--topk", "0.5"]):
        assert _recipe(parser.parse_args(["train", "ode", *flags])).ode_rounds == (), flags
    halved = _recipe(parser.parse_args(["train", "ode"]), world=2)      # the global batch of every round kept
    assert [(o.run.batch, o.run.gpus) for o in halved.ode_stages] == [(16, 2)] * 3
    on = _recipe(parser.parse_args(["train", "ode", "--on-policy", "--on-policy-step", "-1"])).ode
    assert on.on_policy and on.on_policy_step == -1
    shared = _recipe(parser.parse_args(["train", "ode", "--fg-share", "0.5"]))    # the ode stage's, not the teacher's
    assert shared.ode.fg_share == 0.5 and shared.ode_rounds == () and shared.teacher == RECIPES["mini"].teacher
    with pytest.raises(ValueError, match="--fg-share must be in"):
        _recipe(parser.parse_args(["train", "ode", "--fg-share", "1"]))
    with pytest.raises(ValueError, match="--fg-share applies to the teacher, rcm, ode stages only"):
        cmd_train(parser.parse_args(["train", "sla", "--fg-share", "0.5"]))
    with pytest.raises(ValueError, match="--on-policy-step goes with the on-policy ode stage"):
        _recipe(parser.parse_args(["train", "ode", "--off-policy", "--on-policy-step", "2"]))
    with pytest.raises(ValueError, match="--trajectories goes with the off-policy ode stage"):
        _recipe(parser.parse_args(["train", "ode", "--trajectories", "64"]))
    with pytest.raises(SystemExit):                              # argparse: not allowed with each other
        parser.parse_args(["train", "ode", "--on-policy", "--off-policy"])
    for flag in ("--on-policy", "--off-policy"):
        with pytest.raises(ValueError, match=f"{flag} applies to the ode stage only"):
            cmd_train(parser.parse_args(["train", "sla", flag]))
    with pytest.raises(ValueError, match="--trajectories must be >= 1"):
        _recipe(parser.parse_args(["train", "ode", "--trajectories", "0"]))
    adv = _recipe(parser.parse_args(["train", "ode", "--on-policy-step", "-1", "--adv-weight", "0.1"]))
    assert adv.ode.adv_weight == 0.1 and adv.ode.on_policy_step == -1 and adv.ode_rounds == ()
    fast = _recipe(parser.parse_args(["train", "ode", "--adv-weight", "0.1", "--adv-lr", "1e-3"])).ode.adv_optim
    assert fast == dataclasses.replace(RECIPES["mini"].ode.adv_optim, lr=1e-3)
    with pytest.raises(ValueError, match="--adv-lr goes with the adversarial term"):
        _recipe(parser.parse_args(["train", "ode", "--adv-lr", "1e-3"]))
    with pytest.raises(ValueError, match="--adv-weight goes with the on-policy ode stage"):
        _recipe(parser.parse_args(["train", "ode", "--off-policy", "--adv-weight", "0.1"]))
    with pytest.raises(ValueError, match="--adv-weight must be >= 0"):
        _recipe(parser.parse_args(["train", "ode", "--adv-weight", "-1"]))
    with pytest.raises(ValueError, match="--adv-weight applies to the ode, rcm, dmd stages only"):
        cmd_train(parser.parse_args(["train", "sla", "--adv-weight", "0.1"]))


def test_device_scripts_parse_and_the_current_ones_use_known_flags():
    # docs/training/mini/device/*.sh are what a session runs on the GPU, where a typo costs a command of its budget:
    # every script is valid bash, and the ones still in use (prelude.sh and the latest session script, which carries
    # the next session's plan) pass only options that `turbovid` or the benchmark they run knows, besides pip's and
    # nvidia-smi's.
    import re
    import subprocess
    from pathlib import Path

    from turbovid.cli import build_parser

    device = Path(__file__).resolve().parents[1] / "docs" / "training" / "mini" / "device"
    scripts = sorted(device.glob("*.sh"))
    assert scripts
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
    known = set()

    def walk(parser):
        for action in parser._actions:
            known.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(sub)

    walk(build_parser())
    # the benchmarks' own options (a session script may run one)
    for bench in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"):
        known.update(re.findall(r'add_argument\(\s*"(--[a-z][a-z0-9-]*)"', bench.read_text()))
    latest = max((s for s in scripts if re.fullmatch(r"session\d+\.sh", s.name)), key=lambda s: int(s.stem[7:]))
    for script in (device / "prelude.sh", latest):
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", script.read_text()))
        assert flags - known <= {"--no-deps", "--query-gpu", "--format"}, (script.name, flags - known)
