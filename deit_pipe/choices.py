"""The closed sets of values some options take. As typer options, an Enum lists its values in `--help` and
refuses any other; `check` gives callers that pass plain strings (the Python API, the demo) the same one-line
refusal. Light on purpose: the CLI imports it before any heavy library."""

from __future__ import annotations

from enum import Enum

from deit_pipe.errors import InputError


class Precision(str, Enum):
    """A model's compute precision: bf16 (DeepSpeed's bf16 for a student, autocast for a teacher) or fp32."""

    bf16 = "bf16"
    fp32 = "fp32"


class Distillation(str, Enum):
    """DeiT's --distillation-type: none, soft (KL at temperature tau) or hard (the teacher's top-1)."""

    none = "none"
    soft = "soft"
    hard = "hard"


class SoftReduction(str, Enum):
    """How the soft KL sum becomes a loss: DeiT's sum / numel, or per sample (batchmean)."""

    sum_numel = "sum_numel"
    batchmean = "batchmean"


def check(kind: type[Enum], value, flag: str) -> str:
    """`value` (a member or its string) as a plain string; refused in one line naming `flag` otherwise."""
    values = [member.value for member in kind]
    value = value.value if isinstance(value, kind) else value
    if value not in values:
        raise InputError(f"{flag} must be one of {', '.join(values)}, not {value!r}")
    return value
