"""Session 30: which rounding of SageSLA costs what, on the mini model's own attention inputs (CPU, fp64 math).

capture OUT.pt [P]  render P held-out prompts (default 2) with the shipped full stack (references) and keep every
                    SageSLA call's bf16 q, k, v [B, H, L, D] and its top-k.
error OUT.pt [N]    for every N-th kept call (default 1: each), the sparse branch O_s at the fp64 block map (64 x 128,
                    the H100's SageSLA blocks until session 30), each rounding alone and the variants below, as rel-L1
                    against the exact fp64 O_s (mean over calls, printed as a table and written to OUT_error.json).
                    Session 30: `capture calls.pt 1` (24 calls of held-out prompt 0), then `error calls.pt`.
"""
import json
import math
import statistics
import sys

import torch

E4M3 = torch.float8_e4m3fn


def e4m3(x):
    return x.float().to(E4M3).double()


def int8(x, rows, mean=None):
    """x [B, H, L, D] through the kernels' INT8 reference (sage_attention.quantize_int8_ref: one scale per `rows`
    tokens, of x - mean when given), dequantized in fp64 with the mean added back."""
    from turbovid.kernels.sage_attention import quantize_int8_ref
    q8, scale = quantize_int8_ref(x, rows, mean=mean)
    out = (q8.double() * scale.double().repeat_interleave(rows, -1)[..., None])[:, :, :x.shape[2]]
    return out if mean is None else out + mean[:, :, None, :].double()


def fp8_v(v, mean, scale):
    """v [B, H, L, D] through the kernels' per-channel e4m3 reference (sage_attention.quantize_v_ref), dequantized."""
    from turbovid.kernels.sage_attention import quantize_v_ref
    vt = quantize_v_ref(v, 128, mean, scale)                 # V^T [B, H, D, L_pad]
    return vt.double().transpose(2, 3)[:, :, :v.shape[2]] * scale[:, :, None, :].double() + \
        mean[:, :, None, :].double()


def sparse_attention(q, k, v, lut, bq, bk, p_round=None):
    """fp64 block-sparse attention; p_round: None (exact) | 'fp32sum' (P e4m3, l from exact P, as the kernel) |
    'roundsum' (P e4m3 and l from the rounded P)."""
    b, h, length, d = q.shape
    s = (q @ k.transpose(-1, -2)) * d ** -0.5
    nq, nk = -(-length // bq), -(-length // bk)
    allowed = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    allowed.scatter_(-1, lut.long(), True)
    mask = allowed.repeat_interleave(bq, 2)[:, :, :length].repeat_interleave(bk, 3)[..., :length]
    s = s.masked_fill(~mask, float("-inf"))
    if p_round is None:
        return torch.softmax(s, -1) @ v
    s2 = s * math.log2(math.e)
    p = torch.exp2(s2 - s2.amax(-1, keepdim=True) + 8.8)
    pr = e4m3(p)
    l = (pr if p_round == "roundsum" else p).sum(-1, keepdim=True)
    return (pr @ v) / l


def capture(path, prompts=2):
    import os
    os.environ["TURBOVID_KERNELS"] = "ref"
    from turbovid.attention.sla import SparseLinearAttention
    from turbovid.config import SampleConfig
    from turbovid.pipeline import Pipeline
    from turbovid.train.data import sample_clip
    pipe = Pipeline.load("mini", device="cpu", attention="sagesla", quant=True, fuse=True)
    calls = []

    def keep(module, args):
        calls.append({"q": args[0].detach().bfloat16().transpose(1, 2).contiguous(),
                      "k": args[1].detach().bfloat16().transpose(1, 2).contiguous(),
                      "v": args[2].detach().bfloat16().transpose(1, 2).contiguous(),
                      "topk": module.topk})
    for m in pipe.dit.modules():
        if isinstance(m, SparseLinearAttention):
            m.register_forward_pre_hook(keep)
    for i in range(prompts):
        pipe.generate(sample_clip(0, "heldout", i).caption,
                      SampleConfig(steps=4, sigma_max=pipe.spec.sigma_max, seed=i))
    torch.save(calls, path)
    print(f"{len(calls)} calls -> {path}")


def error(path, every=1):
    from turbovid.kernels import sla as K
    from turbovid.kernels.sage_attention import FP8_MAX, kv_stats
    calls = torch.load(path, weights_only=True)[::every]
    rows = {}
    for c in calls:
        bq, bk = 64, 128   # the H100's SageSLA blocks before session 30
        q, k, v = (c[n].double() for n in "qkv")
        lut = K.sla_block_map_ref(q, k, c["topk"], bq, bk)
        exact = sparse_attention(q, k, v, lut, bq, bk)
        km, vm, vscale = kv_stats(c["k"], c["v"], "fp8")    # smooth-K / smooth-V means, the FP8 V scale
        q64, q16, k128 = int8(c["q"], 64), int8(c["q"], 16), int8(c["k"], 128, km)
        vq = fp8_v(c["v"], vm, vscale)
        vq_nosmooth = fp8_v(c["v"], torch.zeros_like(vm), c["v"].float().abs().amax(2).clamp_min(1e-6) / FP8_MAX)
        variants = {
            "Q int8 /64 rows": (q64, k, v, None),
            "Q int8 /16 rows": (q16, k, v, None),
            "Q int8 /token": (int8(c["q"], 1), k, v, None),
            "K int8 /128 (smoothed)": (q, k128, v, None),
            "K int8 /token (smoothed)": (q, int8(c["k"], 1, km), v, None),
            "V e4m3 /channel (smoothed)": (q, k, vq, None),
            "V e4m3 /channel (no smooth)": (q, k, vq_nosmooth, None),
            "P e4m3 (l exact)": (q, k, v, "fp32sum"),
            "P e4m3 (l of rounded P)": (q, k, v, "roundsum"),
            "all: shipped (Q/64, K/128, V, P)": (q64, k128, vq, "fp32sum"),
            "all, Q /16 rows": (q16, k128, vq, "fp32sum"),
            "all, l of rounded P": (q64, k128, vq, "roundsum"),
            "all, Q /16, l rounded": (q16, k128, vq, "roundsum"),
            "all but P": (q64, k128, vq, None),
        }
        for name, args in variants.items():
            out = sparse_attention(*args[:3], lut, bq, bk, p_round=args[3])
            rows.setdefault(name, []).append(float((out - exact).abs().sum() / exact.abs().sum()))
        rows.setdefault("bf16 output rounding", []).append(
            float((exact.bfloat16().double() - exact).abs().sum() / exact.abs().sum()))
    table = {name: statistics.mean(v) for name, v in rows.items()}
    for name, val in table.items():
        print(f"{name:40s} {val:.5f}")
    return table


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("capture", "error"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "capture":
        capture(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    else:
        json.dump(error(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1),
                  open(sys.argv[2].replace(".pt", "_error.json"), "w"), indent=1)
