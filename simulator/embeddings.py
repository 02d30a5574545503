"""Deterministic embeddings: a unit vector per input, drawn from a generator seeded by a hash of the input."""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
from functools import lru_cache

__all__ = ["embedding_vector", "encode_base64"]

VECTOR_CACHE_SIZE = 4096


def _as_float32(values: list[float]) -> tuple[float, ...]:
    """``values`` rounded to float32, as a model's output would be."""
    packed = struct.pack(f"<{len(values)}f", *values)
    return struct.unpack(f"<{len(values)}f", packed)


def _normalized(values: list[float]) -> list[float]:
    """``values`` scaled to unit length."""
    norm = math.sqrt(sum(value * value for value in values)) or 1.0
    return [value / norm for value in values]


@lru_cache(maxsize=VECTOR_CACHE_SIZE)
def _full_vector(key: str, dim: int) -> tuple[float, ...]:
    """The unit vector of ``key`` in ``dim`` dimensions (float64, before rounding)."""
    generator = random.Random(hashlib.sha256(key.encode("utf-8")).digest())
    return tuple(_normalized([generator.gauss(0.0, 1.0) for _ in range(dim)]))


def embedding_vector(key: str, dim: int, dimensions: int | None = None) -> tuple[float, ...]:
    """The float32 unit embedding of ``key``; ``dimensions`` truncates it (Matryoshka) and renormalizes."""
    full = _full_vector(key, dim)
    if dimensions is None or dimensions >= dim:
        return _as_float32(list(full))
    return _as_float32(_normalized(list(full[:dimensions])))


def encode_base64(vector: tuple[float, ...]) -> str:
    """The vector as base64 of little-endian float32 values (vLLM's ``encoding_format: base64``)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
