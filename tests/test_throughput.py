"""`deit-pipe throughput`: the table names the machine and the paper's numbers, the JSON holds a real measurement,
bad input is one line, and the GPU batch search keeps the largest power of two that fits."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch
from cli_run import run

from deit_pipe.errors import EnvironmentFault
from deit_pipe.stages import throughput


def cpu_model_from_proc() -> str:
    with open("/proc/cpuinfo") as f:
        return re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()


def test_the_table_names_the_machine_and_the_papers_numbers(capsys, tmp_path):
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads_before + 1)  # differs from --threads below, to see it given back
    try:
        start = time.perf_counter()
        code, out, _ = run(capsys, "throughput", "--models", "deit_tiny_patch16_224", "--img-size", "32", "--batch",
                           "4", "--warmup", "1", "--iters", "2", "--threads", "1", "--json", str(tmp_path / "r.json"))
        wall = time.perf_counter() - start
        assert torch.get_num_threads() == threads_before + 1
    finally:
        torch.set_num_threads(threads_before)
    assert code == 0, out
    header = out.splitlines()[0]
    assert cpu_model_from_proc() in header and f"{len(os.sched_getaffinity(0))} cores" in header
    assert f"torch {torch.__version__}" in header and "fp32" in header and "1 torch threads" in header
    row = next(line for line in out.splitlines() if line.startswith("| deit_tiny_patch16_224 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["32", "4"] and cells[4:] == ["2,536", "18,550"]  # DeiT's V100 and timm's RTX 4090
    assert "V100" in out and "benchmark-infer-amp-nchw-pt291-cu128-4090.csv" in out

    report = json.loads((tmp_path / "r.json").read_text())
    (measured,) = report["models"]
    assert (measured["model"], measured["img_size"], measured["batch"]) == ("deit_tiny_patch16_224", 32, 4)
    # The timed batches are part of the command's wall time, so the rate is at least 2 batches over all of it.
    assert measured["images_per_s"] >= 2 * 4 / wall
    assert f"{measured['images_per_s']:,.1f}" == cells[3]


def test_each_model_runs_at_its_own_resolution(capsys, tmp_path):
    code, out, _ = run(capsys, "throughput", "--models", "vit_tiny_patch16_384", "--models", "regnetx_002",
                       "--batch", "1", "--warmup", "0", "--iters", "1", "--threads", "1",
                       "--json", str(tmp_path / "r.json"))
    assert code == 0, out
    rows = json.loads((tmp_path / "r.json").read_text())["models"]
    assert [(r["model"], r["img_size"]) for r in rows] == [("vit_tiny_patch16_384", 384), ("regnetx_002", 224)]
    assert all(r["images_per_s"] > 0 and r["paper_v100"] is None for r in rows)
    assert "| regnetx_002 | 224 | 1 |" in out and out.rstrip().endswith("| - | - |")  # no published numbers


@pytest.mark.parametrize("argv,message", [
    (["--models", "deit_tiny_patch16_224", "--models", "deit_nope"], "unknown timm model 'deit_nope'"),
    (["--dtype", "fp8"], "--dtype must be one of bf16, fp16, fp32, not 'fp8'"),
])
def test_bad_input_is_one_line_before_any_timing(capsys, monkeypatch, argv, message):
    timed = []
    monkeypatch.setattr(throughput, "images_per_s", lambda *args, **kwargs: timed.append(args) or 1.0)
    code, out, err = run(capsys, "throughput", *argv)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"deit-pipe: error: {message}"
    assert timed == []


def test_images_per_s_times_only_the_timed_batches_in_eval_and_inference_mode(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])

    class HalfSecondModel(torch.nn.Module):
        """Each forward takes half a second of the fake clock and records how it was called."""

        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, x):
            self.calls.append((tuple(x.shape), self.training, torch.is_inference_mode_enabled()))
            clock[0] += 0.5
            return x

    model = HalfSecondModel().train()
    speed = throughput.images_per_s(model, 4, 32, torch.device("cpu"), None, warmup=2, iters=3)
    assert speed == pytest.approx(3 * 4 / 1.5)  # 12 images in the 3 timed half-seconds; warm-up not counted
    assert model.calls == [((4, 3, 32, 32), False, True)] * 5


@pytest.mark.parametrize("fits_up_to,cap,expected", [
    (1, 1024, 1), (5, 1024, 4), (64, 1024, 64), (1000, 1024, 512), (10**6, 1024, 1024), (10**6, 100, 64),
])
def test_the_batch_search_keeps_the_largest_power_of_two_that_fits(fits_up_to, cap, expected):
    tried = []

    def runs(batch: int) -> None:
        tried.append(batch)
        if batch > fits_up_to:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at batch {batch}")

    assert throughput.largest_batch(runs, cap) == expected
    # Doubling from 1, and no attempt after the first that did not fit.
    assert tried == [2**i for i in range(len(tried))] and all(b <= fits_up_to for b in tried[:-1])


def test_a_model_that_does_not_fit_at_batch_one_is_the_machines_fault():
    def runs(batch: int) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(EnvironmentFault, match="does not fit"):
        throughput.largest_batch(runs, 1024)
