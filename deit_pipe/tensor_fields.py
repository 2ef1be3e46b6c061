"""Dataclasses whose every field is a tensor of one row per sample (a batch of views, a batch of store rows):
moved, pinned or joined field by field, with the fields listed once, in the dataclass."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TypeVar

import torch

T = TypeVar("T", bound="TensorFields")


class TensorFields:
    def _map(self: T, fn: Callable[[torch.Tensor], torch.Tensor]) -> T:
        return type(self)(*(fn(getattr(self, f.name)) for f in fields(self)))

    def to(self: T, device, non_blocking: bool = False) -> T:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self: T) -> T:
        """What DataLoader(pin_memory=True) calls on a batch it does not know the shape of."""
        return self._map(lambda t: t.pin_memory())

    @classmethod
    def cat(cls: type[T], parts: Sequence[T], **joined: torch.Tensor) -> T:
        """The rows of `parts` in order (a single part as it is, not copied); a field in `joined` is taken as it is
        (the parts' rows were written into it in place)."""
        names = [f.name for f in fields(cls)]
        if set(joined) - set(names):
            raise TypeError(f"{cls.__name__} has no field {sorted(set(joined) - set(names))[0]!r}")
        if len(parts) == 1:
            return parts[0]
        return cls(*(joined[n] if n in joined else torch.cat([getattr(p, n) for p in parts]) for n in names))
