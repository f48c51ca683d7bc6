"""Uniform random numbers from a counter: the number for (seed, tensor, input, element) is a
hash of those four, so a random mask is the same on every run, thread count and machine, and any
chunk of it can be drawn alone, in any order (no generator state to carry)."""

from __future__ import annotations

import hashlib

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of 64-bit words that scatters every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def stream_key(seed: int, tensor: str, input_index: int) -> int:
    """The 64-bit key of one input's mask of one tensor."""
    digest = hashlib.blake2b(f"{seed}\0{tensor}\0{input_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def uniform(key: int, start: int, n: int) -> np.ndarray:
    """Elements ``start .. start + n`` of the stream ``key``: float64 in [0, 1), 53 random bits each."""
    index = np.arange(start, start + n, dtype=np.uint64) + np.uint64(1)
    z = _mix(np.full(n, key, dtype=np.uint64) + index * _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
