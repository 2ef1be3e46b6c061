"""One launch at a time on an output (issue 15 item 5): the lease a launch takes before it writes, on a local disk
and on S3 (moto's server, whose conditional PUT is what makes the take exclusive there)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import fsspec
import pytest

from deit_pipe.errors import InputError
from deit_pipe.storage import lease as lease_module
from deit_pipe.storage.lease import LEASE_SECONDS, LaunchLease

WHAT = "the shards X"


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_bucket") + "/out"


def lease_objects(output: str) -> dict[str, dict]:
    """Every object under <output>/_lease, read straight from the filesystem: name -> JSON."""
    fs, path = fsspec.core.url_to_fs(f"{output}/_lease")
    fs.invalidate_cache()
    if not fs.exists(path):
        return {}
    return {os.path.basename(p): json.loads(fs.cat_file(p)) for p in fs.find(path)}


def own_start() -> int:
    """This process's start time in clock ticks since boot: field 22 of /proc/self/stat (proc(5))."""
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def write_lease(output: str, generation: int, **holder) -> None:
    """A lease as another process would have left it (its holder's fields written out here): by default this
    live process's."""
    fields = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": own_start(), "ppid": os.getppid(),
              "launch": "", "started": time.time(), "renewed_at": time.time(), **holder}
    with fsspec.open(f"{output}/_lease/{generation:08d}.json", "wb") as f:
        f.write(json.dumps(fields).encode())


def python(code: str, **env: str) -> subprocess.Popen:
    """A separate process (its own pid) running `code` with the lease module imported."""
    prelude = "import sys, time\nfrom deit_pipe.storage.lease import LaunchLease\n"
    return subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def test_a_second_launch_is_refused_in_one_line_naming_the_holder_and_a_released_output_is_free(output):
    with LaunchLease.take(output, WHAT) as held:
        assert list(lease_objects(output)) == ["00000001.json"]
        with pytest.raises(InputError) as refusal:
            LaunchLease.take(output, WHAT)
    message = str(refusal.value)
    assert "\n" not in message
    assert message.startswith(f"another launch is writing {WHAT} (pid {os.getpid()} on {socket.gethostname()}, "
                              "started ")
    ended = lease_objects(output)["00000001.json"]
    assert held.generation == 1 and ended["ended"] and ended["pid"] == os.getpid()  # a record of who wrote it last
    with LaunchLease.take(output, WHAT) as again:
        assert again.generation == 2 and list(lease_objects(output)) == ["00000002.json"]


def test_the_lease_of_a_process_that_died_is_taken_over(output):
    holder = python(f"LaunchLease.take({output!r}, 'x'); import os; os._exit(0)  # killed: never released")
    assert holder.wait(timeout=60) == 0, holder.stderr.read()
    assert lease_objects(output)["00000001.json"]["pid"] == holder.pid
    with LaunchLease.take(output, WHAT) as taken:
        assert taken.generation == 2
        assert list(lease_objects(output)) == ["00000002.json"]  # the dead holder's lease is gone


def test_a_lease_whose_pid_now_belongs_to_another_process_is_taken_over(output):
    """A restarted container hands out the same small pids: the process start tells the holder from its heir."""
    write_lease(output, 1, process_start=own_start() - 100)
    with LaunchLease.take(output, WHAT) as taken:
        assert taken.generation == 2


def test_a_lease_on_another_host_expires_when_its_holder_stops_renewing_it(output):
    write_lease(output, 3, host="node-17", pid=4242, renewed_at=time.time() - 5)
    with pytest.raises(InputError, match=r"another launch is writing .*\(pid 4242 on node-17, .*renewed 5 s ago\)"):
        LaunchLease.take(output, WHAT)
    write_lease(output, 3, host="node-17", pid=4242, renewed_at=time.time() - LEASE_SECONDS - 5)
    with LaunchLease.take(output, WHAT) as taken:
        assert taken.generation == 4


def test_of_launches_racing_for_one_output_exactly_one_takes_it(output):
    start = time.time() + 6  # every process is up and waiting by then
    racers = [python(f"""
        while time.time() < {start}: time.sleep(0.001)
        try:
            lease = LaunchLease.take({output!r}, 'x')
        except Exception as exc:
            print('refused', type(exc).__name__); sys.exit(0)
        print('took'); time.sleep(3); lease.release()
        """) for _ in range(4)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in racers)
    assert outcomes == ["refused InputError"] * 3 + ["took"], outcomes


def test_a_holder_whose_lease_was_taken_over_stops_at_its_next_renewal(output):
    holder = python(f"""
        LaunchLease.take({output!r}, 'x')
        print('holding', flush=True); time.sleep(60)
        """, DEIT_PIPE_LEASE_SECONDS="1")
    assert holder.stdout.readline().strip() == "holding"
    write_lease(output, 2, host="node-3", pid=7)  # a launch that found it stale and took generation 2
    assert holder.wait(timeout=30) == 3
    err = holder.stderr.read().strip()
    assert "\n" not in err
    assert err.startswith(f"deit-pipe: error: lost the lease on {output}/_lease to pid 7 on node-3, ")
    assert err.endswith("this launch stops; committed work is kept")


def test_other_ranks_start_once_their_own_rank_0_holds_the_lease(output, monkeypatch):
    monkeypatch.setattr(lease_module, "FOLLOW_TIMEOUT", 1.0)
    refused = f"timed out waiting for rank 0 to take the lease on {WHAT}"
    with LaunchLease.take(output, WHAT, launch="MASTER_PORT=1"):
        with LaunchLease.follow(output, WHAT, "MASTER_PORT=1"):  # returns: its rank 0 holds it
            pass
        with pytest.raises(InputError, match=refused):
            LaunchLease.follow(output, WHAT, "MASTER_PORT=2")  # another launch's rank never starts
    with LaunchLease.follow(output, WHAT, "MASTER_PORT=1"):  # its rank 0 already done: the ended lease says so
        pass
    # A launch with the same launcher variables but another launcher process on this host (a second deepspeed
    # launcher on its default port, which gives no launch id): its ranks wait for their own rank 0, refused.
    holder = python(f"""
        with LaunchLease.take({output!r}, 'x', launch='MASTER_PORT=1'):
            print('holding', flush=True); time.sleep(30)
        """)
    assert holder.stdout.readline().strip() == "holding"
    try:
        with pytest.raises(InputError, match=refused):
            LaunchLease.follow(output, WHAT, "MASTER_PORT=1", by_parent=True)
    finally:
        holder.kill()


def test_every_rank_stops_when_the_lease_goes_to_another_launch(output):
    """Not rank 0 alone: its other ranks watch the lease too (a newer generation, here written by hand)."""
    short = {"DEIT_PIPE_LEASE_SECONDS": "1"}
    holder = python(f"""
        with LaunchLease.take({output!r}, 'x', launch='L'):
            print('holding', flush=True); time.sleep(60)
        """, **short)
    assert holder.stdout.readline().strip() == "holding"
    follower = python(f"""
        with LaunchLease.follow({output!r}, 'x', 'L'):
            print('following', flush=True); time.sleep(60)
        """, **short)
    assert follower.stdout.readline().strip() == "following"
    write_lease(output, 2, host="node-3", pid=7)
    assert (holder.wait(timeout=30), follower.wait(timeout=30)) == (3, 3)
    assert "lost the lease on" in follower.stderr.read()


def test_a_store_that_ignored_the_conditional_put_is_caught_at_the_next_renewal(output):
    """Two launches both "created" generation 1 on a store without If-None-Match: the one whose record is no
    longer there stops."""
    holder = python(f"""
        LaunchLease.take({output!r}, 'x')
        print('holding', flush=True); time.sleep(60)
        """, DEIT_PIPE_LEASE_SECONDS="1")
    assert holder.stdout.readline().strip() == "holding"
    write_lease(output, 1)  # this process's record over the holder's
    assert holder.wait(timeout=30) == 3


def test_a_lease_file_deit_pipe_did_not_write_is_one_line(output):
    with fsspec.open(f"{output}/_lease/00000001.json", "wb") as f:
        f.write(b"{not json")
    with pytest.raises(InputError, match=r"_lease/00000001.json is not a lease deit-pipe wrote: remove it"):
        LaunchLease.take(output, WHAT)
