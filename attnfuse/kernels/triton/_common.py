"""What every kernel wrapper checks before launching."""
from __future__ import annotations

import os

import torch
import triton

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreted() -> bool:
    """Whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_launchable(*tensors: torch.Tensor) -> None:
    """Tensors must be on one device the kernels can run on: CUDA, or CPU when interpreted."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreted():
        raise ValueError("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on CUDA (or CPU when interpreted), got {device}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {tensor.dtype}")


def check_vector(name: str, tensor: torch.Tensor | None, size: int) -> None:
    """An optional per-channel parameter of shape [size]."""
    if tensor is not None and tuple(tensor.shape) != (size,):
        raise ValueError(f"{name} must have shape ({size},), got {tuple(tensor.shape)}")


def padded_dim(size: int) -> int:
    """Block size covering `size` (a power of two; tl.dot needs at least 16)."""
    return max(16, triton.next_power_of_2(size))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full fp32 products; half inputs lose nothing to tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def sequence_block() -> int:
    """Rows per tile along a sequence: small when interpreted (the interpreter is slow)."""
    return 16 if interpreted() else 64
