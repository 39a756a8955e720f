"""How the adapter travels in a Flower message: one safetensors file in one Array.

Flower moves every Array of a message as its own object, each with its own requests
to the SuperLink. Gemma2-9B's adapter is 168 tensors, and sending them one by one cost
about 45 s of a ~20 s round (bench/round_time/historical_h100/RESULTS.md); as one file it is a handful of objects.
safetensors keeps each tensor's name, shape and dtype, so both ends still check them,
and a warm trainer takes the very same bytes.

By default (`strategy.wire-dtype`) the file carries bfloat16, half of float32's bytes
(8.97 MB instead of 17.9 MB for the r=8 adapter, issue 24), the precision the GPU computes
with the adapter in anyway (bf16 compute dtype). Both ends work in float32 (training) and
float64 (aggregation); only the wire rounds, and the upcast on arrival is exact.

torch is imported in the functions that convert, not here: the thin ClientApp, a fresh
process per message, only passes the bytes on and must not pay torch's import (about 4 s
on two cores).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord

if TYPE_CHECKING:
    import torch

KEY = "adapter.safetensors"


class WireError(ValueError):
    """The bytes are not a packed adapter; the message is one line."""


def encode(state: Mapping[str, torch.Tensor], dtype: str) -> bytes:
    """`dtype`: strategy.wire-dtype, a torch dtype's name."""
    import torch
    from safetensors.torch import save

    return save({k: v.detach().to("cpu", getattr(torch, dtype)).contiguous() for k, v in state.items()})


def decode(data: bytes, dtype: str) -> dict[str, torch.Tensor]:
    """The adapter in float32; a file in any other dtype than `dtype` is refused."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(data)
    except SafetensorError as err:
        raise WireError(f"{KEY} is not a safetensors file: {err}") from None
    for key, tensor in sorted(state.items()):  # the file's order is not the writer's: name the first by name
        if tensor.dtype != getattr(torch, dtype):
            raise WireError(f"{KEY}: {key} is {tensor.dtype}, the wire carries torch.{dtype} (strategy.wire-dtype)")
    return {k: v.float() for k, v in state.items()}


def pack_bytes(data: bytes) -> ArrayRecord:
    return ArrayRecord({KEY: Array(np.frombuffer(data, dtype=np.uint8))})


def pack(tensors: Mapping[str, np.ndarray] | ArrayRecord, dtype: str) -> ArrayRecord:
    import torch

    arrays = {k: (v.numpy() if isinstance(v, Array) else v) for k, v in tensors.items()}
    return pack_bytes(encode({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, dtype))


def packed_bytes(record: ArrayRecord) -> bytes:
    if list(record) != [KEY]:
        raise WireError(f"expected one array named {KEY}, got {len(record)} ({', '.join(list(record)[:3])})")
    return record[KEY].numpy().tobytes()


def unpack(record: ArrayRecord, dtype: str) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in decode(packed_bytes(record), dtype).items()}
