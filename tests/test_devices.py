"""Which device a rank takes, and srun's variables mapped to torch.distributed's (distributed.context)."""

from __future__ import annotations

import pytest
import torch

from deit_pipe.distributed import context
from deit_pipe.distributed.context import RankContext, rank_device, torch_env_from_slurm
from deit_pipe.errors import InputError
from deit_pipe.pipeline.launch import relaunch_under_torchrun

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES")


@pytest.fixture
def env(monkeypatch):
    """A process no launcher started (whatever ran the tests)."""
    import os

    for name in [*LAUNCH_VARS, *(n for n in os.environ if n.startswith("SLURM_"))]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_a_device_with_an_index_or_cpu_is_taken_literally(env):
    assert rank_device("cpu", RankContext(3, 4, 3, 4)) == torch.device("cpu")
    assert rank_device("cuda:1", RankContext(3, 4, 3, 4)) == torch.device("cuda", 1)


def test_each_local_rank_takes_its_own_gpu(env):
    gpus(env, 4)
    assert [rank_device("cuda", RankContext(4 + r, 8, r, 4)) for r in range(4)] == [
        torch.device("cuda", r) for r in range(4)]
    assert rank_device(None, RankContext(5, 8, 1, 2)) == torch.device("cuda", 1)


def test_more_local_ranks_than_gpus_are_refused(env):
    gpus(env, 4)
    with pytest.raises(InputError, match=r"^8 ranks on this node but 4 GPU\(s\) visible to each: start at most 4"):
        rank_device("cuda", RankContext(0, 8, 0, 8))
    gpus(env, 1)
    env.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun --nproc-per-node 2 on a node showing one GPU to both
    with pytest.raises(InputError, match=r"^2 ranks on this node but 1 GPU\(s\)"):
        rank_device("cuda", RankContext(1, 2, 1, 2))


def test_srun_with_a_gpu_per_task_puts_every_rank_on_the_one_it_sees(env):
    gpus(env, 1)
    env.setenv("SLURM_LOCALID", "3")
    with pytest.raises(InputError, match=r"^4 ranks on this node but 1 GPU\(s\)"):  # no per-task GPUs: one GPU
        rank_device("cuda", RankContext(3, 4, 3, 4))
    env.setenv("SLURM_GPUS_PER_TASK", "1")
    env.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert rank_device("cuda", RankContext(3, 4, 3, 4)) == torch.device("cuda", 0)


def test_other_device_names_are_taken_literally(env):
    assert rank_device("mps", RankContext()) == torch.device("mps")


def test_no_silent_cpu_on_a_gpu_node_whose_cuda_does_not_load(env):
    gpus(env, 0)
    env.setattr(context, "_gpu_node", lambda: False)
    assert rank_device(None, RankContext()) == torch.device("cpu")
    with pytest.raises(InputError, match="^CUDA is not available to torch here"):
        rank_device("cuda", RankContext())
    env.setattr(context, "_gpu_node", lambda: True)
    with pytest.raises(InputError, match=r"or run on CPU with CUDA_VISIBLE_DEVICES='' \(teacher-logits and"):
        rank_device(None, RankContext())
    assert rank_device("cpu", RankContext()) == torch.device("cpu")


def test_a_node_is_a_gpu_node_unless_the_process_was_hidden_from_its_gpus(env, monkeypatch):
    monkeypatch.setattr(context.os.path, "exists", lambda path: path == "/dev/nvidia0")
    assert context._gpu_node()
    for hidden in ("", "-1"):
        env.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert not context._gpu_node()
    monkeypatch.setattr(context.os.path, "exists", lambda path: False)
    env.delenv("CUDA_VISIBLE_DEVICES")
    assert not context._gpu_node()


def test_srun_variables_become_torchs(env):
    slurm = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "4",
             "SLURM_JOB_ID": "123456", "MASTER_ADDR": "node017"}
    variables = dict(slurm)
    torch_env_from_slurm(variables)
    assert variables == {**slurm, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                         "MASTER_PORT": str(20000 + 123456 % 40000)}
    for name, value in slurm.items():
        env.setenv(name, value)
    env.setenv("SLURM_STEP_TASKS_PER_NODE", "2(x4)")
    assert RankContext.from_env() == RankContext(5, 8, 1, 2)


def test_srun_on_one_node_meets_on_localhost_and_on_several_needs_master_addr(env):
    variables = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "1",
                 "SLURM_JOB_ID": "7"}
    torch_env_from_slurm(variables)
    assert (variables["MASTER_ADDR"], variables["MASTER_PORT"]) == ("127.0.0.1", "20007")
    with pytest.raises(InputError, match=r"^srun on 2 nodes: export MASTER_ADDR"):
        torch_env_from_slurm({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2"})
    started_by_torchrun = {"RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}
    torch_env_from_slurm(started_by_torchrun)
    assert started_by_torchrun == {"RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}


def test_a_batch_script_outside_srun_is_one_rank(env):
    """sbatch sets SLURM_PROCID=0 and the allocation's SLURM_NTASKS in the script itself: a plain deit-pipe
    there is one process, not rank 0 of 16 waiting for the others."""
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_NNODES": "2", "SLURM_JOB_ID": "9"}
    variables = dict(batch)
    torch_env_from_slurm(variables)
    assert variables == batch
    for name, value in batch.items():
        env.setenv(name, value)
    assert RankContext.from_env() == RankContext()


def test_deepspeeds_launcher_says_how_many_ranks_share_the_node(env):
    for name, value in {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8"}.items():
        env.setenv(name, value)
    assert RankContext.from_env() == RankContext(9, 16, 1, 8)


def test_nproc_per_node_refuses_several_nodes_and_a_launched_rank(env):
    env.setenv("SLURM_NNODES", "2")
    with pytest.raises(InputError, match=r"^--nproc-per-node starts the ranks of one node"):
        relaunch_under_torchrun(2)
    env.delenv("SLURM_NNODES")
    env.setenv("SLURM_STEP_NUM_TASKS", "2")  # srun -n 2 on one node: two torchruns on one --output
    with pytest.raises(InputError, match=r"^--nproc-per-node starts the ranks of one node"):
        relaunch_under_torchrun(2)
    env.delenv("SLURM_STEP_NUM_TASKS")
    env.setenv("RANK", "0")
    with pytest.raises(InputError, match=r"^--nproc-per-node starts the ranks of one node"):
        relaunch_under_torchrun(2)


def test_loader_workers_share_the_nodes_cores_among_its_ranks(monkeypatch):
    from deit_pipe.distributed.context import loader_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    assert loader_workers(RankContext(0, 16, 0, 8)) == 7  # 8 cores per GPU rank: 7 workers and the rank
    assert loader_workers(RankContext()) == 63
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert loader_workers(RankContext(1, 2, 1, 2)) == 1  # never none: the rank would build views between steps


def test_a_launch_is_known_by_its_shared_variables_and_whether_one_names_it_alone(env):
    """The deepspeed launcher on its default port gives no launch id (its ranks then know their rank 0 by their
    launcher process); torchrun's rendezvous id and an srun step do."""
    env.setenv("MASTER_ADDR", "node-1")
    env.setenv("MASTER_PORT", "29500")
    plain = RankContext().launch
    assert "MASTER_ADDR=node-1;MASTER_PORT=29500;" in plain.variables and plain.has_no_id
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_STEP_ID"):
        env.setenv(name, "7")
        launch = RankContext().launch
        assert not launch.has_no_id and f"{name}=7" in launch.variables and launch != plain
        env.delenv(name)
