"""Names of dtypes as recipes and safetensors headers spell them."""

from __future__ import annotations

import torch

from hivemerge.protocol.errors import UserInputError

# Recipe spellings (mergekit accepts these) -> torch dtype.
RECIPE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}

# safetensors header codes <-> torch dtypes.
SAFETENSORS_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
DTYPE_OF_CODE: dict[str, torch.dtype] = {code: dt for dt, code in SAFETENSORS_CODES.items()}


def parse_dtype(name: str, key: str) -> torch.dtype:
    try:
        return RECIPE_DTYPES[str(name).lower()]
    except KeyError:
        raise UserInputError(f"{key}: unknown dtype {name!r}; expected one of {sorted(RECIPE_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
