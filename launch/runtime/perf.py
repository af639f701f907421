"""Model FLOPs utilisation, for the training log (``train/mfu``) and the benchmarks.

MFU = (FLOPs of one train step, counted by ``torch.utils.flop_counter`` on the eager model) /
step time / peak. The peak is ``run.peak_tflops`` / ``--peak-tflops`` if given; on CUDA the
card's dense bf16 tensor rate from a small table (H100 / H200 SXM 989, A100 312 TFLOP/s); on a
CPU the fp32 GEMM rate measured here (a square matmul, best of 5), so CPU MFU says how close a
step gets to this machine's own matmul speed.
"""
from __future__ import annotations

import time

import torch

DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def step_flops(run_step) -> float:
    """FLOPs (forward + backward) of one call of ``run_step``, counted on the eager model."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run_step()
    return float(counter.get_total_flops())


def cpu_gemm_tflops(n: int = 1024, repeats: int = 5) -> float:
    g = torch.Generator().manual_seed(0)  # its own: measuring must not move the run's random stream
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e12


def peak_tflops(device: torch.device, override: float | None = None) -> tuple[float, str]:
    """(peak TFLOP/s, where the figure comes from)."""
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in DENSE_BF16_TFLOPS.items():
            if key in name:
                return tflops, f"{name} dense bf16"
        return float("nan"), f"{name}: unknown peak, set run.peak_tflops / --peak-tflops"
    return cpu_gemm_tflops(), "this CPU's measured fp32 GEMM rate"


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
