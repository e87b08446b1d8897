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
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn


def e4m3(x):
    return x.float().to(E4M3).double()


def int8_blocks(x, rows):
    """Symmetric INT8 with one scale per `rows` consecutive tokens (x [B, H, L, D] fp64, L padded)."""
    b, h, length, d = x.shape
    n = -(-length // rows)
    xp = F.pad(x, (0, 0, 0, n * rows - length)).view(b, h, n, rows, d)
    scale = xp.abs().amax(dim=(3, 4), keepdim=True) / 127 + 1e-7
    y = (xp / scale)
    q = torch.where(y >= 0, y + 0.5, y - 0.5).trunc().clamp(-127, 127)
    return (q * scale).view(b, h, n * rows, d)[:, :, :length]


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
    calls = torch.load(path, weights_only=True)[::every]
    rows = {}
    for c in calls:
        bq, bk = 64, 128   # the H100's SageSLA blocks before session 30
        q, k, v = (c[n].double() for n in "qkv")
        lut = K.sla_block_map_ref(q, k, c["topk"], bq, bk)
        exact = sparse_attention(q, k, v, lut, bq, bk)
        km = k.mean(2, keepdim=True)
        vm = v.mean(2, keepdim=True)
        vscale = (v - vm).abs().amax(2, keepdim=True) / 448
        vq = e4m3((v - vm) / vscale) * vscale + vm
        vq_nosmooth = e4m3(v / (v.abs().amax(2, keepdim=True) / 448)) * (v.abs().amax(2, keepdim=True) / 448)
        variants = {
            "Q int8 /64 rows": (int8_blocks(q, 64), k, v, None),
            "Q int8 /16 rows": (int8_blocks(q, 16), k, v, None),
            "Q int8 /token": (int8_blocks(q, 1), k, v, None),
            "K int8 /128 (smoothed)": (q, int8_blocks(k - km, 128) + km, v, None),
            "K int8 /token (smoothed)": (q, int8_blocks(k - km, 1) + km, v, None),
            "V e4m3 /channel (smoothed)": (q, k, vq, None),
            "V e4m3 /channel (no smooth)": (q, k, vq_nosmooth, None),
            "P e4m3 (l exact)": (q, k, v, "fp32sum"),
            "P e4m3 (l of rounded P)": (q, k, v, "roundsum"),
            "all: shipped (Q/64, K/128, V, P)": (int8_blocks(q, 64), int8_blocks(k - km, 128) + km, vq, "fp32sum"),
            "all, Q /16 rows": (int8_blocks(q, 16), int8_blocks(k - km, 128) + km, vq, "fp32sum"),
            "all, l of rounded P": (int8_blocks(q, 64), int8_blocks(k - km, 128) + km, vq, "roundsum"),
            "all, Q /16, l rounded": (int8_blocks(q, 16), int8_blocks(k - km, 128) + km, vq, "roundsum"),
            "all but P": (int8_blocks(q, 64), int8_blocks(k - km, 128) + km, vq, None),
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
