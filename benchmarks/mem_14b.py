"""Where the memory of e2e.py's Wan2.1-14B 720p turbo row goes: allocated / peak GPU memory after each step of
that row's setup (e2e.random_dit, one bf16 forward, e2e.turbo_14b_), then turbo forwards: two with the text K/V
cache kept, one after clearing it, and the row's own 4-step video after clearing it again. After each forward it
also sums the bytes of the storages the text K/V cache holds (views keep a whole storage alive). Prints only
(H100 output: benchmarks/results/mem_14b_h100_2026-11-22*.log).

    PYTHONPATH=. python benchmarks/mem_14b.py
"""
from __future__ import annotations

import sys
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


def main() -> None:
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
        with torch.no_grad():
            net(x, t, context)
        report(f"turbo fwd {i}", net)
    net.text_kv.clear()
    torch.cuda.reset_peak_memory_stats()
    _, step_s, total = E.video_dit(net, noise, context)
    report(f"4-step video after clearing ({total:.2f} s)", net)


if __name__ == "__main__":
    main()
