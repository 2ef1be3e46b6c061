"""reporting.run_records: the step log reads losses from the device in batches, and says what a run was."""

from __future__ import annotations

import json

import torch

from deit_pipe.distributed.context import RankContext
from deit_pipe.reporting import run_records
from deit_pipe.reporting.run_records import RunRecords


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_losses_are_read_every_flush_every_steps_and_at_a_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(run_records, "FLUSH_EVERY", 3)
    records = RunRecords(str(tmp_path), RankContext(0, 2), {"epochs": 1})
    assert json.loads((tmp_path / "run.json").read_text()) == {"epochs": 1}
    read = [records.step(0, s, s + 1, torch.tensor(float(s) / 4), 0.1) for s in range(5)]
    assert read == [None, None, 0.5, None, None]  # the third step read the three pending losses
    assert [row["loss"] for row in lines(tmp_path / "steps.jsonl")] == [0.0, 0.25, 0.5]
    assert records.flush() == 1.0  # a checkpoint's flush: the steps up to it are on disk
    records.step(0, 5, 6, 7.5, 0.1)
    records.close()
    assert lines(tmp_path / "steps.jsonl") == [
        {"epoch": 0, "step": s, "total_steps": s + 1, "loss": loss, "lr": 0.1}
        for s, loss in enumerate([0.0, 0.25, 0.5, 0.75, 1.0, 7.5])]


def test_other_ranks_log_no_steps(tmp_path):
    records = RunRecords(str(tmp_path), RankContext(1, 2), {})
    assert records.step(0, 0, 1, torch.tensor(1.0), 0.1) is None and records.flush() is None
    records.close()
    assert not (tmp_path / "steps.jsonl").exists() and not (tmp_path / "run.json").exists()


def test_a_line_a_killed_run_left_half_written_is_cut_when_the_records_open(tmp_path):
    """A kill during an append leaves a last line without its newline: the resumed run's first row must not join
    it (one unreadable line in the middle of the log), so rank 0 cuts it when it opens the records."""
    row = json.dumps({"epoch": 0, "train_loss": 1.5})
    (tmp_path / "metrics.jsonl").write_text(row + "\n" + '{"epoch": 1, "tra')
    (tmp_path / "steps.jsonl").write_text('{"epoch": 0, "st')
    records = RunRecords(str(tmp_path), RankContext(0, 1), {})
    assert records.has_epoch(0, torch.device("cpu")) and not records.has_epoch(1, torch.device("cpu"))
    records.epoch({"epoch": 1, "train_loss": 1.0})
    records.step(1, 0, 1, 2.0, 0.1)
    records.close()
    assert lines(tmp_path / "metrics.jsonl") == [{"epoch": 0, "train_loss": 1.5}, {"epoch": 1, "train_loss": 1.0}]
    assert lines(tmp_path / "steps.jsonl") == [{"epoch": 1, "step": 0, "total_steps": 1, "loss": 2.0, "lr": 0.1}]
