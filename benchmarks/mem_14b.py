"""Where the memory of e2e.py's Wan2.1-14B 720p turbo row goes: allocated / peak GPU memory after each step of
that row's setup (e2e.random_dit, one bf16 forward, e2e.turbo_14b_), then turbo forwards: two with the text K/V
cache kept, one after clearing it, and the row's own 4-step video after clearing it again; after each forward
also the bytes the text K/V cache's storages hold. Prints only (H100 output:
benchmarks/results/mem_14b_h100_2026-11-22*.log).

    PYTHONPATH=. python benchmarks/mem_14b.py [--history N] [--holders]

--history N: record the caching allocator's history (torch.cuda.memory._record_memory_history) through the
first turbo forward, then print the N largest allocations still alive after it, each with the Python frames
that made it (the frames of turbovid, benchmarks and triton).
--holders: after the first turbo forward, the referrer chains of the large tensors still alive, then what
gc.collect() frees. This found the first forward's extra 9.8 GB: activations held by a reference cycle of the
autotuner's tuning call (`_run4.log`), collected since by `turbovid.kernels.autotune` (`_run5.log`).
"""
from __future__ import annotations

import argparse
import gc
import sys
import types
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import e2e as E  # noqa: E402

GB = 1e9


def report(tag: str, net=None) -> None:
    torch.cuda.synchronize()
    line = f"{tag}: alloc {torch.cuda.memory_allocated() / GB:.2f} GB, peak {torch.cuda.max_memory_allocated() / GB:.2f} GB"
    value = getattr(net, "text_kv", None) and net.text_kv.value
    if value:
        tensors = [t for pair in value for kv in pair if kv is not None for t in kv]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        line += (f"; text K/V cache: {len(tensors)} tensors, {sum(t.nbytes for t in tensors) / GB:.2f} GB of values, "
                 f"{sum(storages.values()) / GB:.2f} GB of storage")
    print(line, flush=True)


def live_allocations(top: int) -> None:
    """The `top` largest live blocks of the allocator snapshot, grouped by the Python frames that allocated them."""
    snapshot = torch.cuda.memory._snapshot()
    groups: Counter = Counter()
    counts: Counter = Counter()
    for segment in snapshot["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = [f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in block.get("frames", [])
                      if any(k in f["filename"] for k in ("turbovid", "benchmarks", "triton"))]
            where = " <- ".join(frames[:6]) or "(no Python frames recorded)"
            groups[where] += block["size"]
            counts[where] += 1
    print(f"live allocations after the first turbo forward, by allocating frames (top {top}):")
    for where, size in groups.most_common(top):
        print(f"  {size / GB:7.2f} GB in {counts[where]:4d} blocks: {where}")


def describe(obj) -> str:
    if isinstance(obj, types.FrameType):
        return f"frame {Path(obj.f_code.co_filename).name}:{obj.f_lineno} {obj.f_code.co_name}"
    if isinstance(obj, types.TracebackType):
        return f"traceback at {Path(obj.tb_frame.f_code.co_filename).name}:{obj.tb_lineno}"
    if isinstance(obj, BaseException):
        return f"exception {type(obj).__name__}: {str(obj)[:80]}"
    if isinstance(obj, dict):
        return f"dict of {len(obj)} keys {list(obj)[:6]}"
    return type(obj).__name__


def holders(min_bytes: float = 1.0e9, depth: int = 6) -> None:
    """Who refers to the large non-parameter CUDA tensors still alive: the referrer chain upward from each
    (first referrer at each level, skipping this function's own frames and lists), then whether the cyclic
    garbage collector frees them."""
    with warnings.catch_warnings():   # isinstance on every object touches deprecated module attributes
        warnings.simplefilter("ignore")
        big = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not isinstance(o, torch.nn.Parameter)
               and o.is_cuda and o.nbytes >= min_bytes]
    print(f"{len(big)} CUDA tensors of >= {min_bytes / GB:.1f} GB alive (not parameters):")
    here = sys._getframe()
    for t in big[:4]:   # (the loop's names are deleted below: they would hold the last tensor themselves)
        chain, obj = [f"tensor {tuple(t.shape)} {t.dtype}"], t
        for _ in range(depth):
            refs = [r for r in gc.get_referrers(obj) if r is not here and r is not big and not isinstance(r, list)]
            if not refs:
                break
            obj = refs[0]
            chain.append(describe(obj) + (f" (+{len(refs) - 1} more)" if len(refs) > 1 else ""))
        print("  " + "\n    <- ".join(chain))
        del t, obj, refs
    del big
    before = torch.cuda.memory_allocated()
    found = gc.collect()
    print(f"gc.collect(): {found} unreachable objects, frees {(before - torch.cuda.memory_allocated()) / GB:.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=0, metavar="N",
                        help="print the N largest live allocations after the first turbo forward (0: off)")
    parser.add_argument("--holders", action="store_true",
                        help="after the first turbo forward: who refers to the large tensors still alive, and "
                             "what gc.collect() frees")
    args = parser.parse_args()
    net = E.random_dit(E.DIT_14B)
    report("bf16 init")
    context = torch.randn(1, E.TEXT.text_len, E.TEXT.d_model, device=E.DEVICE, dtype=torch.bfloat16)
    noise = torch.randn(E.LATENT_720P, device=E.DEVICE, generator=torch.Generator(E.DEVICE).manual_seed(0))
    x, t = noise.to(torch.bfloat16), torch.tensor([988.0], device=E.DEVICE)
    with torch.no_grad():
        net(x, t, context)
    report("after bf16 dense fwd")
    E.turbo_14b_(net)
    torch.cuda.empty_cache()
    report("turbo modules")
    for i in range(3):
        if i == 2:
            net.text_kv.clear()
            report("kv cleared")
        torch.cuda.reset_peak_memory_stats()
        if i == 0 and args.history:
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=200000)
        with torch.no_grad():
            net(x, t, context)
        report(f"turbo fwd {i}", net)
        if i == 0 and args.holders:
            holders()
            report("after gc.collect()", net)
        if i == 0 and args.history:
            live_allocations(args.history)
            torch.cuda.memory._record_memory_history(enabled=None)
    net.text_kv.clear()
    torch.cuda.reset_peak_memory_stats()
    _, step_s, total = E.video_dit(net, noise, context)
    report(f"4-step video after clearing ({total:.2f} s)", net)


if __name__ == "__main__":
    main()
