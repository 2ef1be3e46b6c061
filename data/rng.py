"""Every seed deit-pipe derives, from one function, and the global generators timm's transforms draw from.

`seed_sequence(*parts)` turns names and numbers into a numpy SeedSequence (blake2b of their compact JSON, so
nearby ids give unrelated streams and no process or library version changes it). Everything random that must
replay is drawn under such a key: a view's transform and mixing, a shard's pairing, a split's sample order, a
group's shard walk, a training step's stochastic depth. Orders come from `permutation`, numpy's legacy
RandomState stream, which numpy keeps frozen across versions (Generator's is not).

timm's transforms draw from the process's global generators: python `random` (RandomResizedCrop,
RandAugment magnitudes, RandomErasing boxes), `numpy.random` (RandAugment op choice, mix parameters,
CutMix box) and torch's default CPU generator (horizontal flip, erasing pixels, stochastic depth). Whatever
must come out the same in any process runs inside `seeded_global_rngs`, which seeds those three from a key
and restores their states afterwards.
"""

from __future__ import annotations

import hashlib
import json
import operator
import random
import threading
from contextlib import contextmanager

import numpy as np

from deit_pipe.rng_lock import GLOBAL_RNG_LOCK

_scope = threading.local()  # how deep this thread is in `global_rngs_restored`


def seed_sequence(*parts: str | int) -> np.random.SeedSequence:
    """A SeedSequence that depends on `parts` (str/int) only."""
    # operator.index: numpy integers count as the int they hold; a float or a bool is refused, not rounded.
    blob = json.dumps([p if isinstance(p, str) else _integer(p) for p in parts], separators=(",", ":")).encode()
    return np.random.SeedSequence(int.from_bytes(hashlib.blake2b(blob, digest_size=16).digest(), "little"))


def _integer(part) -> int:
    if isinstance(part, bool):
        raise TypeError(f"a seed part must be a str or an integer, not {part!r}")
    return operator.index(part)


def permutation(n: int, *parts: str | int) -> np.ndarray:
    """A permutation of range(n) that depends on `parts` only, in any numpy version."""
    return np.random.RandomState(seed_sequence(*parts).generate_state(4)).permutation(n)


def torch_seed(*parts: str | int) -> int:
    """A 63-bit seed for torch.manual_seed that depends on `parts` only."""
    return int(seed_sequence(*parts).generate_state(1, np.uint64)[0]) >> 1


@contextmanager
def global_rngs_restored():
    """Restore python `random`, `numpy.random` and torch's default CPU generator when the block ends.

    Scopes nested in it (seeded ones included) leave the restoring to the outermost: a batch of views saves and
    restores the generators once, not once per view (numpy's state alone is 2.5 KB copied out and back, about
    80 us, more than seeding all three).
    """
    import torch  # here, not at the top: the shard stage derives its sample order without loading torch (~1 s)

    with GLOBAL_RNG_LOCK:  # other threads of the process share the generators (deit_pipe.rng_lock)
        depth = getattr(_scope, "depth", 0)
        saved = None if depth else (random.getstate(), np.random.get_state(), torch.default_generator.get_state())
        _scope.depth = depth + 1
        try:
            yield
        finally:
            _scope.depth = depth
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.default_generator.set_state(saved[2])


@contextmanager
def seeded_global_rngs(key: np.random.SeedSequence):
    """Seed python `random`, `numpy.random` and torch's default CPU generator from `key`; restore them after (or
    leave that to an enclosing `global_rngs_restored`).

    What runs inside neither depends on nor disturbs the process's RNG state.
    """
    import torch  # as in global_rngs_restored

    words = key.generate_state(6)  # uint32
    with global_rngs_restored():
        random.seed(int(words[0]) | int(words[1]) << 32)
        np.random.seed(words[2:4])
        torch.default_generator.manual_seed(int(words[4]) | int(words[5]) << 32)
        yield
