"""The safetensors dtype names and their torch equivalents."""

from __future__ import annotations

import torch

# safetensors' names, case-sensitive as the format defines them.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# Only these are merged; fp8, ints, bools and complex values are copied from the base
# (negating a uint8 wraps, fp8 has too little precision to hold a difference).
MERGEABLE = frozenset({"F64", "F32", "F16", "BF16"})


def itemsize(dtype: str) -> int:
    return SAFETENSORS_DTYPES[dtype].itemsize


def compute_dtype(dtype: str) -> torch.dtype:
    """float32 for every mergeable dtype but float64, which keeps its precision."""
    return torch.float64 if dtype == "F64" else torch.float32
