"""Seeds derived from names, and the global generators timm's transforms draw from.

timm's transforms draw from the process's global generators: python `random` (RandomResizedCrop,
RandAugment magnitudes, RandomErasing boxes), `numpy.random` (RandAugment op choice, mix parameters,
CutMix box) and torch's default CPU generator (horizontal flip, erasing pixels, stochastic depth). A view
or a training step that must come out the same in any process runs inside `seeded_global_rngs`, which seeds
those three from a key and restores their states afterwards.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from contextlib import contextmanager

import numpy as np
import torch

# Serialises seeded scopes between threads of one process (they share the global generators).
# Loader workers are processes and need no lock.
_GLOBAL_RNG_LOCK = threading.RLock()


def view_key(*parts) -> np.random.SeedSequence:
    """A SeedSequence that depends on `parts` (str/int) only: hashed, so nearby ids give unrelated streams."""
    blob = json.dumps(parts, separators=(",", ":")).encode()
    return np.random.SeedSequence(int.from_bytes(hashlib.blake2b(blob, digest_size=16).digest(), "little"))


_saved_depth = 0  # nesting depth of isolated_global_rngs scopes (guarded by the lock)


@contextmanager
def isolated_global_rngs():
    """Restore python `random`, `numpy.random` and torch's default CPU generator on leaving the scope.

    Nested scopes save nothing (the outermost one restores), so a loop over many views pays for one save
    and restore, not one per view.
    """
    global _saved_depth
    with _GLOBAL_RNG_LOCK:
        outermost = _saved_depth == 0
        if outermost:
            saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        _saved_depth += 1
        try:
            yield
        finally:
            _saved_depth -= 1
            if outermost:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.default_generator.set_state(saved[2])


@contextmanager
def seeded_global_rngs(key: np.random.SeedSequence):
    """Seed python `random`, `numpy.random` and torch's default CPU generator from `key`; restore them after.

    What runs inside neither depends on nor disturbs the process's RNG state.
    """
    words = key.generate_state(6)  # uint32
    with isolated_global_rngs():
        random.seed(int(words[0]) | int(words[1]) << 32)
        np.random.seed(words[2:4])
        torch.default_generator.manual_seed(int(words[4]) | int(words[5]) << 32)
        yield


def hash_seed(*parts: int) -> int:
    """A 63-bit seed that depends on `parts` only (torch.manual_seed of a training step)."""
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest(), "little") >> 1
