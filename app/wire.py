"""How the adapter travels in a Flower message: one safetensors file in one Array.

Flower moves every Array of a message as its own object, each with its own requests
to the SuperLink. Gemma2-9B's adapter is 168 tensors, and sending them one by one cost
about 45 s of a ~20 s round (bench/round_time/historical_h100/RESULTS.md); as one file it is a handful of objects.
safetensors keeps each tensor's name, shape and dtype, so both ends still check them,
and a warm trainer takes the very same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord
from safetensors import SafetensorError
from safetensors.numpy import load, save

KEY = "adapter.safetensors"


class WireError(ValueError):
    """The bytes are not a packed adapter; the message is one line."""


def pack_bytes(data: bytes) -> ArrayRecord:
    return ArrayRecord({KEY: Array(np.frombuffer(data, dtype=np.uint8))})


def pack(tensors: Mapping[str, np.ndarray] | ArrayRecord) -> ArrayRecord:
    arrays = {k: (v.numpy() if isinstance(v, Array) else v) for k, v in tensors.items()}
    return pack_bytes(save(arrays))


def packed_bytes(record: ArrayRecord) -> bytes:
    if list(record) != [KEY]:
        raise WireError(f"expected one array named {KEY}, got {len(record)} ({', '.join(list(record)[:3])})")
    return record[KEY].numpy().tobytes()


def unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    try:
        return load(packed_bytes(record))
    except SafetensorError as err:
        raise WireError(f"{KEY} is not a safetensors file: {err}") from None
