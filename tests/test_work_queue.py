"""storage.work_queue: commit markers and plan binding, on a local folder and on S3 (moto)."""

from __future__ import annotations

import json
import re

import pytest

from deit_pipe.errors import InputError
from deit_pipe.storage import location, work_queue
from deit_pipe.storage.location import join
from deit_pipe.storage.work_queue import CommitMarkers, bind_plan, to_json


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("s3_bucket")


def test_committed_lists_finished_markers_from_a_missing_folder_on(root):
    markers = CommitMarkers(join(root, "work", "done"))
    assert markers.committed() == set()
    assert not markers.is_committed("a")
    markers.commit("a")
    markers.commit("b.json", b'{"n":1}')
    assert markers.committed() == {"a", "b.json"}
    assert markers.is_committed("a") and not markers.is_committed("c")
    assert markers.read(["b.json", "a"]) == [b'{"n":1}', b""]
    assert markers.read([]) == []


def test_a_killed_writes_temporary_file_is_not_a_marker_and_the_next_commit_clears_it(tmp_path):
    markers = CommitMarkers(str(tmp_path / "done"))
    (tmp_path / "done").mkdir()
    leftover = tmp_path / "done" / "a.tmp-0123abcd"  # what put_atomic leaves when killed before its rename
    leftover.write_bytes(b"half")
    assert markers.committed() == set() and not markers.is_committed("a")
    markers.commit("a", b"whole")
    assert not leftover.exists()
    assert markers.committed() == {"a"} and markers.read(["a"]) == [b"whole"]


def test_the_first_plan_binds_and_a_later_one_gets_it_back(root):
    url = join(root, "work", "plan.json")
    assert bind_plan(url, {"seed": 1, "files": ["a", "b"]}, is_main=True) == {"seed": 1, "files": ["a", "b"]}
    assert location.read_bytes(url) == b'{"files":["a","b"],"seed":1}'
    # A rerun with other arguments, as rank 0 or any other rank: the stored plan comes back unchanged.
    assert bind_plan(url, {"seed": 2}, is_main=True) == {"seed": 1, "files": ["a", "b"]}
    assert bind_plan(url, {"seed": 3}, is_main=False) == {"seed": 1, "files": ["a", "b"]}


def test_other_ranks_wait_for_rank_0s_plan_and_markers(tmp_path, monkeypatch):
    monkeypatch.setattr(work_queue, "WAIT_TIMEOUT", 0.0)
    plan = str(tmp_path / "plan.json")
    with pytest.raises(InputError, match=re.escape(f"timed out waiting for rank 0's plan: 1 missing, first {plan}")):
        bind_plan(plan, {"seed": 1}, is_main=False)
    markers = CommitMarkers(str(tmp_path / "done"))
    markers.commit("a")
    markers.wait(["a"], "the units")
    missing = f"{tmp_path}/done/b"
    with pytest.raises(InputError, match=re.escape(f"timed out waiting for the units: 1 missing, first {missing}")):
        markers.wait(["a", "b"], "the units")


def test_to_json_is_canonical():
    assert to_json({"b": [1, 2], "a": {"d": 1, "c": "x"}}) == b'{"a":{"c":"x","d":1},"b":[1,2]}'
    assert json.loads(to_json({"k": 1.5})) == {"k": 1.5}
