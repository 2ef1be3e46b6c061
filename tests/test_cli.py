"""The CLI's closed choices: typer lists them in --help and refuses others before any work; the Python API
refuses the same values in one line naming the option (deit_pipe.choices)."""

from __future__ import annotations

import os

import pytest
from cli_run import run

from deit_pipe.choices import Distillation, Precision, SoftReduction, check
from deit_pipe.distributed.deepspeed_engine import EngineSpec
from deit_pipe.errors import InputError
from deit_pipe.loss.deit import DISTILLATION_MODES, SOFT_REDUCTIONS
from deit_pipe.stages.teacher_logits import TeacherSpec
from deit_pipe.stages.train import TrainConfig


def test_help_lists_every_choice(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps help at the terminal width
    code, text, _ = run(capsys, "train", "--help")
    assert code == 0
    for flag, choices in (("--distillation", "none|soft|hard"), ("--soft-reduction", "sum_numel|batchmean"),
                          ("--precision", "bf16|fp32"), ("--teacher-precision", "bf16|fp32")):
        line = next(line for line in text.splitlines() if line.strip("│ ").startswith(f"{flag} "))
        assert f"<{choices}>" in line or f"[{choices}]" in line, line
    _, text, _ = run(capsys, "teacher-logits", "--help")
    assert "bf16|fp32" in text


@pytest.mark.parametrize("argv,refused", [
    (["--distillation", "medium"], "'medium' is not one of 'none', 'soft', 'hard'"),
    (["--precision", "fp16"], "'fp16' is not one of 'bf16', 'fp32'"),
    (["--zero", "4"], "--zero"),
])
def test_a_value_outside_the_choices_is_a_usage_error(capsys, tmp_path, argv, refused):
    code, out, err = run(capsys, "train", str(tmp_path / "no-shards"), "-o", str(tmp_path / "out"), *argv)
    assert code == 2 and refused in out + err and "Traceback" not in out + err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_the_api_refuses_the_same_values_naming_the_option():
    assert check(Precision, Precision.bf16, "--precision") == "bf16" and check(Precision, "fp32", "-") == "fp32"
    with pytest.raises(InputError, match="^--precision must be one of bf16, fp32, not 'fp16'$"):
        EngineSpec(precision="fp16")
    with pytest.raises(InputError, match="^--precision must be one of bf16, fp32, not 'fp16'$"):
        TeacherSpec("regnetx_002", None, "fp16")
    # Members are kept as their plain values: they reach messages and JSON, where a member prints its name.
    assert TeacherSpec("regnetx_002", None, Precision.bf16).precision == "bf16"
    assert type(EngineSpec(precision=Precision.fp32).precision) is str
    cfg = TrainConfig("s", "o", distillation=Distillation.soft, soft_reduction=SoftReduction.batchmean,
                      teacher_precision=Precision.bf16)
    assert [type(v) for v in (cfg.distillation, cfg.soft_reduction, cfg.teacher_precision)] == [str, str, str]
    with pytest.raises(InputError, match="^--teacher-precision must be one of bf16, fp32, not 'fp8'$"):
        TrainConfig("s", "o", teacher_precision="fp8")


def test_the_loss_registries_are_the_choices():
    assert list(DISTILLATION_MODES) == ["none", "soft", "hard"]
    assert list(SOFT_REDUCTIONS) == ["sum_numel", "batchmean"]


def test_bf16_gradients_are_reduced_in_fp32():
    """DeepSpeed's bf16 default sums gradients in bf16 across ranks; 8-16 ranks lose bits there."""
    for precision in ("bf16", "fp32"):
        assert EngineSpec(precision=precision).config()["communication_data_type"] == "fp32"


def test_retry_defaults_yield_to_the_environment_and_the_aws_config(tmp_path, monkeypatch):
    from deit_pipe.pipeline.cli import retry_defaults

    for variable in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    retry_defaults()
    assert (os.environ["AWS_RETRY_MODE"], os.environ["AWS_MAX_ATTEMPTS"]) == ("adaptive", "10")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    monkeypatch.delenv("AWS_RETRY_MODE")
    (tmp_path / "config").write_text("[default]\nretry_mode = standard\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    retry_defaults()
    assert "AWS_RETRY_MODE" not in os.environ and os.environ["AWS_MAX_ATTEMPTS"] == "3"
