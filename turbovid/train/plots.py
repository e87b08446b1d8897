"""Training curves of a run as one PNG: every stage's logged losses against its step (log scale where the
values span decades), smoothed with a running mean over `window` log records beside the raw points.

    turbovid train plot --run-dir runs/mini --output docs/training/mini/curves.png   (needs matplotlib)
"""
from __future__ import annotations

import json
from pathlib import Path

from turbovid.train.recipe import Recipe
from turbovid.train.teacher import teacher_dirs
from turbovid.train.trajectory import ode_dirs

PANELS = (   # (stage, [keys], title, log y)
    ("vae", ["l1", "l2"], "VAE: reconstruction (foreground-weighted)", True),
    ("teacher", ["loss"], "teacher: flow-matching velocity MSE", True),
    ("sla", ["loss", "loss_sla", "loss_dense"], "SLA fine-tune: MSE to the frozen dense network", True),
    ("qat", ["loss_sla", "loss_dense", "loss_quant"], "quantization-aware fine-tune: MSE per output", True),
    ("ode", ["loss_sla", "loss_dense"], "ode (trajectory distillation): velocity MSE to its targets", True),
    ("rcm", ["loss_scm"], "rCM: sCM loss (x loss_scale)", False),
    ("rcm", ["loss_dmd", "loss_fake"], "rCM: DMD loss / fake-score loss", True),
    ("dmd", ["loss_dmd", "loss_anchor", "loss_fake"], "DMD round: DMD / anchor / fake-score loss", True),
    ("teacher", ["lr"], "teacher: learning rate", False),
)


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rounds_log(run_dir: Path, dirs: list[str]) -> list[dict]:
    """The logs of a stage's rounds (the folders `dirs`, in order) as one log, steps counted on."""
    records, offset = [], 0
    for name in dirs:
        if (run_dir / name / "log.jsonl").is_file():
            rows = read_log(run_dir / name / "log.jsonl")
            records += [{**r, "step": r["step"] + offset} for r in rows]
            offset += rows[-1]["step"] + 1 if rows else 0
    return records


def plot_run(run_dir: str | Path, output: str | Path, recipe: Recipe, window: int = 10) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'turbovid[train]'") from None
    run_dir, output = Path(run_dir), Path(output)
    rounds = {"teacher": teacher_dirs(recipe), "ode": ode_dirs(recipe)}     # stages trained in rounds
    stages = {stage for stage, *_ in PANELS if stage not in rounds}
    logs = {s: read_log(run_dir / s / "log.jsonl") for s in stages if (run_dir / s / "log.jsonl").is_file()}
    logs.update({s: log for s, dirs in rounds.items() if (log := rounds_log(run_dir, dirs))})
    if not logs:
        raise ValueError(f"no stage logs (<stage>/log.jsonl) under {run_dir}")
    rows = -(-len(PANELS) // 4)
    fig, axes = plt.subplots(rows, 4, figsize=(20, 4 * rows))
    for ax in axes.flat[len(PANELS):]:
        ax.set_visible(False)
    for ax, (stage, keys, title, log_y) in zip(axes.flat, PANELS):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"{stage} step" + (" (all rounds)" if stage in rounds else ""))
        for key in keys:
            pts = [(r["step"], r[key]) for r in logs.get(stage, []) if isinstance(r.get(key), (int, float))]
            if not pts:
                continue
            xs, ys = zip(*pts)
            line, = ax.plot(xs, ys, ".", alpha=0.25, markersize=3)
            smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, smooth, "-", color=line.get_color(), label=key)
        if ax.lines:
            ax.legend(fontsize=8)
            if log_y:
                ax.set_yscale("log")
        else:   # e.g. an rCM run that ends at its tangent warm-up has no DMD steps
            ax.text(0.5, 0.5, f"not logged in this run ({', '.join(keys)})", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9, color="grey")
    fig.suptitle(f"training curves: {run_dir.name}")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(output)
    return output
