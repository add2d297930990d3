"""Seeds and random generators that make every generated number reproducible.

Two derivations, both from numpy's ``SeedSequence`` (independent streams for any two
distinct key tuples, whatever the size of the run):

* :func:`key_seed` — a 63-bit seed from any integer keys; training steps use
  ``(seed, purpose, rank, step)`` and evaluation ``(seed, purpose, store index, member)``;
* :func:`member_seed` — the seed of member ``k`` of parameter set ``j`` of an ensemble,
  ``(base_seed, j, k)``; stored with every ensemble (its ``seed`` variable), so it never
  changes.

Generators are CPU generators, so the numbers do not depend on the device the model
runs on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def key_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (``numpy.random.SeedSequence``).

    >>> key_seed(0, 1, 2) == key_seed(0, 1, 2) != key_seed(0, 2, 1)
    True
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with :func:`key_seed` of ``keys`` (CPU unless ``device`` says otherwise)."""
    return torch.Generator(device=device).manual_seed(key_seed(*keys))


def member_seed(base_seed: int, sample: int, member: int) -> int:
    """The seed of member ``member`` of parameter set ``sample``: a 63-bit integer from
    numpy's ``SeedSequence((base_seed, sample, member))``."""
    if min(base_seed, sample, member) < 0:
        raise ValueError(f"seeds need non-negative (base_seed, sample, member), got {(base_seed, sample, member)}")
    state = np.random.SeedSequence((int(base_seed), int(sample), int(member))).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


def member_seeds(base_seed: int, num_samples: int, num_members: int) -> np.ndarray:
    """``[N, M]`` int64 of :func:`member_seed`."""
    return np.array([[member_seed(base_seed, j, k) for k in range(num_members)] for j in range(num_samples)],
                    dtype=np.int64)


def member_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per member, seeded with its seed."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


__all__ = ["generator", "key_seed", "member_generators", "member_seed", "member_seeds"]
