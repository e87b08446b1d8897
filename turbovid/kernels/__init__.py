"""Triton kernels, one op per file, each with a plain-PyTorch `<op>_ref` beside it.

`use_triton` is the one place that decides whether a kernel or its reference runs.
"""
from __future__ import annotations

import os

import torch


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1: kernels then run (slowly, exactly) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor, min_capability: tuple[int, int] = (8, 0)) -> bool:
    """Run the Triton kernel for tensor `x`, or fall back to the PyTorch reference?

    Kernels run on CUDA GPUs of at least `min_capability`, and on CPU tensors under the Triton
    interpreter (tests). TURBOVID_KERNELS=ref forces the references everywhere.
    """
    if os.environ.get("TURBOVID_KERNELS", "auto") == "ref" or not triton_available():
        return False
    if x.is_cuda:
        return torch.cuda.get_device_capability(x.device) >= min_capability
    return interpreting()


def collect_after_tuning(tuner):
    """Make a `triton.autotune`d kernel follow every call that tunes (a new key: it benchmarks every config) with
    `gc.collect()`: tuning leaves a reference cycle that holds the frames of the calling stack, so the whole
    forward's activations outlive the forward until Python's next full collection (Wan2.1-14B 720p, first W8A8
    forward on an H100: 9.8 GB; benchmarks/mem_14b.py --holders, benchmarks/results/mem_14b_h100_2026-11-22_run4.log).
    Calls with a known key cost one dict length. `kernel[grid](...)` dispatches through `kernel.run`, which this
    wraps on the instance."""
    import gc

    run = tuner.run

    def run_then_collect(*args, **kwargs):
        known = len(tuner.cache)
        out = run(*args, **kwargs)
        if len(tuner.cache) != known:
            gc.collect()
        return out

    tuner.run = run_then_collect
    return tuner


def autotune(configs, key, **kwargs):
    """`triton.autotune` for this package's kernels: the same tuner, with `collect_after_tuning`."""
    import triton

    return lambda fn: collect_after_tuning(triton.autotune(configs, key=key, **kwargs)(fn))
