"""Throughput accounting: peak FLOPs of known accelerators and peak memory of the training device."""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name(). Order matters:
# more specific names first. Sources: NVIDIA/AMD datasheets as tabulated by TorchTitan (tools/utils.py)
# and the Huginn report (MI250X per GCD).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H20", 148e12),
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("RTX 6000 Ada", 210.6e12),
    ("A6000", 154.85e12),
    ("MI300X", 1307e12),
    ("MI325X", 1307e12),
    ("MI250X", 191.5e12),
]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for `dtype` matmuls, or None when unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak if dtype == torch.bfloat16 else peak / 2  # fp32 matmuls run as TF32: half rate
    return None


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """Peak memory since the last reset: CUDA allocated bytes, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20), "rss"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
