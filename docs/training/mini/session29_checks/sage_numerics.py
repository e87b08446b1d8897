"""Session 29: where the H100's SageSLA loses the clips the CPU's does not.

Over every H100 table run since session 21 the SageSLA row reads 2-5 clips of 128 below the SLA row (29 lost, 3
gained), on this CPU 0-1 either way. The CPU runs the SageSLA references (the same INT8 / FP8 rounding, exact
accumulation), the H100 the fused kernels. Two subcommands, on one GPU:

  numerics OUT.json     the shipped full stack renders 2 held-out prompts; every SageSLA call's q, k, v is kept and
                        recomputed by each path below, each against the exact (fp64) SLA at the same blocks:
                        fused = what the H100 runs; promote = fused with two-level FP8 P·V accumulation;
                        ref = sagesla_forward_ref (what the CPU runs); sla = the bf16 SLA kernels (the SLA row).
  eval VARIANT ARGS...  `turbovid eval ARGS` with SageSLA run as VARIANT: fused | promote | ref; with STUDENT=DIR in
                        the environment, the student's dit.safetensors and / or dit_int8.safetensors (what DIR holds)
                        come from DIR (a candidate graded beside others on one GPU; the rest stays the shipped files).
"""
import json
import os
import statistics
import sys

import torch


def patch(variant: str) -> None:
    import turbovid.kernels.sage_attention as sa
    if variant == "promote":
        sa.FP8_PV_PROMOTE = True
    elif variant == "ref":
        sa._sagesla_fused = sa.sagesla_forward_ref
    elif variant != "fused":
        raise SystemExit(f"unknown variant {variant!r}: fused | promote | ref")


def use_student(folder: str) -> None:
    from pathlib import Path

    import turbovid.pipeline as P
    shipped = P.shipped_files

    def files(spec):
        paths = shipped(spec)
        mine = {role: Path(folder) / P.SHIPPED[role] for role in ("dit", "dit_int8")}
        if not any(p.is_file() for p in mine.values()):
            raise SystemExit(f"STUDENT={folder}: neither dit.safetensors nor dit_int8.safetensors")
        return {**paths, **{role: str(p) for role, p in mine.items() if p.is_file()}}
    P.shipped_files = files


def compare(out: torch.Tensor, exact: torch.Tensor) -> dict:
    o, e = out.double().flatten(), exact.flatten()
    return {"rel_l1": float((o - e).abs().sum() / e.abs().sum()),
            "cos": float(torch.nn.functional.cosine_similarity(o, e, dim=0)),
            "gain": float((o * e).sum() / (e * e).sum())}   # <1: the output shrinks along the exact one


def numerics(path: str) -> None:
    import turbovid.kernels.sage_attention as sa
    from turbovid.attention.sla import SparseLinearAttention
    from turbovid.kernels import sla as K
    from turbovid.pipeline import Pipeline
    from turbovid.config import SampleConfig
    from turbovid.train.data import sample_clip

    device = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: a smoke test under TRITON_INTERPRET=1
    pipe = Pipeline.load("mini", device=device, attention="sagesla", quant=True, fuse=True)
    calls = []

    def keep(module, args):
        calls.append((module, [a.detach().clone() for a in args[:3]]))
    hooks = [m.register_forward_pre_hook(keep) for m in pipe.dit.modules() if isinstance(m, SparseLinearAttention)]
    if device == "cpu":
        os.environ["TURBOVID_KERNELS"] = "ref"     # render by the references; the kernels below interpreted
    for i in range(int(os.environ.get("PROMPTS", 2))):
        pipe.generate(sample_clip(0, "heldout", i).caption,
                      SampleConfig(steps=4, sigma_max=pipe.spec.sigma_max, seed=i))
    os.environ.pop("TURBOVID_KERNELS", None)
    for h in hooks:
        h.remove()
    per_call = []
    for module, (q, k, v) in calls[:int(os.environ.get("CALLS", len(calls)))]:
        bq, bk = module.block_sizes(q.device)
        qh, kh, vh = (x.bfloat16().transpose(1, 2) for x in (q, k, v))
        w, b = module.proj_l.weight.bfloat16(), module.proj_l.bias.bfloat16()
        q64, k64, v64 = (x.double() for x in (qh, kh, vh))
        lut64 = K.sla_block_map_ref(q64, k64, module.topk, bq, bk)
        s, z = K.sla_linear_stats_ref(k64, v64)
        exact = K.sla_linear_apply_ref(q64, K.sla_sparse_ref(q64, k64, v64, lut64, bq, bk), s, z, w.double(),
                                       b.double())
        row = {"blocks": [bq, bk], "topk": module.topk, "shape": list(qh.shape)}
        for name, fn in (("fused", lambda: sa._sagesla_fused(qh, kh, vh, w, b, module.topk, bq, bk)),
                         ("promote", lambda: sa._sagesla_fused(qh, kh, vh, w, b, module.topk, bq, bk)),
                         ("ref", lambda: sa.sagesla_forward_ref(qh, kh, vh, w, b, module.topk, bq, bk)),
                         ("sla", lambda: K.sla_forward(qh, kh, vh, module.topk, bq, bk, w, b))):
            sa.FP8_PV_PROMOTE = name == "promote"
            row[name] = compare(fn(), exact)
        sa.FP8_PV_PROMOTE = False
        # The fused path's block map (pooled q, smoothed k in bf16) against the fp64 reference's.
        stats = sa.sagesla_stats(kh, vh)
        _, qp, kp, _ = sa.sagesla_prep(qh, kh, vh, stats, w, b, bq, bk)
        lut = sa._sla.topk_lut(torch.matmul(qp, kp.transpose(-1, -2)), lut64.shape[-1])
        same = (torch.nn.functional.one_hot(lut.long(), kp.shape[2]).sum(-2)
                * torch.nn.functional.one_hot(lut64.long(), kp.shape[2]).sum(-2)).sum()
        row["lut_agreement"] = float(same / lut64.numel())
        per_call.append(row)
    summary = {}
    for name in ("fused", "promote", "ref", "sla"):
        summary[name] = {m: statistics.mean(r[name][m] for r in per_call) for m in ("rel_l1", "cos", "gain")}
        summary[name]["rel_l1_max"] = max(r[name]["rel_l1"] for r in per_call)
    summary["lut_agreement"] = statistics.mean(r["lut_agreement"] for r in per_call)
    result = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "calls": len(per_call),
              "summary": summary, "per_call": per_call}
    json.dump(result, open(path, "w"), indent=1)
    print(json.dumps({"calls": len(per_call), **summary}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("numerics", "eval"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "numerics":
        numerics(sys.argv[2])
    else:
        patch(sys.argv[2])
        if os.environ.get("STUDENT"):
            use_student(os.environ["STUDENT"])
        from turbovid.cli import main
        sys.exit(main(["eval", *sys.argv[3:]]))
