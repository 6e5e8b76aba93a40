"""deepy.py and the launch commands it builds for every launcher."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _config_fixtures import REPO, small_config, write_config, write_dataset

from megatron.neox_arguments import ConfigError, NeoXArgs
from megatron.neox_arguments.launch import LaunchPlan, _first_of_nodelist, build_launch

pytestmark = pytest.mark.timeout(120)

# The user script writes started-RANK if it is ever started, then what it saw into that file
# (one file per rank: the processes' stdout lines may interleave).
SCRIPT = """\
import os
from megatron.neox_arguments import NeoXArgs

started = os.path.join(os.path.dirname(__file__), "started-" + os.environ.get("RANK", "x"))
open(started, "w").close()
args = NeoXArgs.consume_neox_args()
with open(started, "w") as f:
    f.write(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} iters {args.train_iters} "
            f"world {args.global_num_gpus}")
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    write_dataset(tmp_path / "data" / "tiny_text_document", [[1, 2, 3], [4, 5]])
    (tmp_path / "train.py").write_text(SCRIPT)
    (tmp_path / "hostfile").write_text("worker-0 slots=4\nworker-1 slots=4\n")
    return tmp_path


def config_file(workdir: Path, **overrides: object) -> str:
    values = small_config(str(workdir / "data" / "tiny_text_document"), **overrides)
    return write_config(workdir / "config.yml", values)


def args_for(workdir: Path, **overrides: object) -> NeoXArgs:
    return NeoXArgs.from_ymls([config_file(workdir, **overrides)])


def deepy(
    workdir: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, str(REPO / "deepy.py"), *argv],
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=110,
    )


def decoded_config(argv: list[str]) -> dict:
    encoded = argv[argv.index("--megatron_config") + 1]
    return json.loads(base64.urlsafe_b64decode(encoded))


# --------------------------------------------------------------------------- command building


def test_local_cpu_run_starts_num_gpus_gloo_processes(workdir: Path) -> None:
    plan = build_launch(args_for(workdir, num_gpus=2), "train.py", cuda=False)
    argv = plan.argv
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert argv[argv.index("--nproc_per_node") + 1] == "2"
    assert argv[argv.index("--rdzv_backend") + 1] == "c10d"
    host, port = argv[argv.index("--rdzv_endpoint") + 1].split(":")
    assert host == "127.0.0.1" and 0 < int(port) < 65536
    assert plan.env == {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    assert argv[argv.index("--megatron_config") - 1] == "train.py"
    assert decoded_config(argv)["num_gpus"] == 2


def test_local_cpu_run_uses_master_port_when_set(workdir: Path) -> None:
    plan = build_launch(args_for(workdir, master_port=31234), "train.py", cuda=False)
    assert "127.0.0.1:31234" in plan.argv


def test_local_gpu_run_uses_the_deepspeed_runner(workdir: Path) -> None:
    plan = build_launch(args_for(workdir, num_gpus=2), "train.py", cuda=True)
    assert Path(plan.argv[0]).name == "deepspeed"
    assert plan.argv[1:7] == ["--num_gpus", "2", "--master_port", "29500", "train.py",
                              "--megatron_config"]  # fmt: skip
    assert plan.env == {}


def test_pdsh_with_hostfile(workdir: Path) -> None:
    hostfile = str(workdir / "hostfile")
    args = args_for(workdir, num_gpus=None, hostfile=hostfile, master_addr="10.0.0.1")
    assert args.global_num_gpus == 8 and args.train_batch_size == 32
    argv = build_launch(args, "train.py").argv
    expected = ["--hostfile", hostfile, "--num_gpus", "4", "--master_port", "29500",
                "--master_addr", "10.0.0.1", "--launcher", "pdsh", "train.py"]  # fmt: skip
    assert argv[1 : len(expected) + 1] == expected
    assert decoded_config(argv)["global_num_gpus"] == 8


def test_include_replaces_num_gpus_and_nodes(workdir: Path) -> None:
    args = args_for(workdir, hostfile=str(workdir / "hostfile"), include="worker-0:0,1", num_gpus=2)
    plan = build_launch(args, "train.py")
    assert "--include" in plan.argv and "--num_gpus" not in plan.argv
    assert any("include/exclude" in note for note in plan.notes)


def test_openmpi(workdir: Path) -> None:
    args = args_for(workdir, hostfile=str(workdir / "hostfile"), launcher="openmpi", num_nodes=2)
    argv = build_launch(args, "train.py").argv
    assert argv[argv.index("--launcher") + 1] == "openmpi"
    assert "--force_multi" in argv and argv[argv.index("--num_nodes") + 1] == "2"
    assert decoded_config(argv)["deepspeed_mpi"] is True


def test_slurm_through_deepspeed(workdir: Path) -> None:
    args = args_for(workdir, launcher="slurm", num_nodes=2, num_gpus=4, comment="neox")
    argv = build_launch(args, "train.py").argv
    assert argv[argv.index("--launcher") + 1] == "slurm" and "--force_multi" in argv
    assert argv[argv.index("--launcher_args") + 1] == "--comment=neox"
    assert decoded_config(argv)["deepspeed_slurm"] is True
    assert decoded_config(argv)["global_num_gpus"] == 8


def test_torchrun(workdir: Path) -> None:
    args = args_for(workdir, launcher="torchrun", num_nodes=2, num_gpus=4, master_addr="node0",
                    master_port=29400)  # fmt: skip
    plan = build_launch(args, "train.py", cuda=True)
    assert Path(plan.argv[0]).name == "torchrun"
    assert plan.argv[1:11] == ["--nnodes", "2", "--nproc_per_node", "4", "--rdzv_backend", "c10d",
                               "--rdzv_endpoint", "node0:29400", "train.py",
                               "--megatron_config"]  # fmt: skip


def test_multi_node_torchrun_needs_a_master(workdir: Path) -> None:
    args = args_for(workdir, launcher="torchrun", num_nodes=2, num_gpus=1)
    with pytest.raises(ConfigError, match="needs master_addr"):
        build_launch(args, "train.py", cuda=True, environ={})


def test_srun_uses_the_first_host_of_the_allocation(workdir: Path) -> None:
    args = args_for(workdir, launcher="srun", num_nodes=2, num_gpus=4, account="proj")
    plan = build_launch(args, "train.py", cuda=True, environ={"SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert plan.argv[:7] == ["srun", "--nodes", "2", "--ntasks-per-node", "4", "--account", "proj"]
    assert plan.argv[7:10] == [sys.executable, "-u", "train.py"]
    assert plan.env == {"MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}
    assert decoded_config(plan.argv)["deepspeed_slurm"] is True


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node01", "node01"),
        ("node[03-05,9],gpu1", "node03"),
        ("a1,b[2-3]", "a1"),
        ("rack[2-3]-n[10-12]", "rack2-n10"),
    ],  # fmt: skip
)
def test_first_host_of_a_slurm_nodelist(nodelist: str, first: str) -> None:
    assert _first_of_nodelist(nodelist) == first


def test_command_line_quotes_and_lists_env() -> None:
    plan = LaunchPlan(["python", "a b.py"], {"B": "2", "A": "x y"})
    assert plan.command_line() == "A='x y' B=2 python 'a b.py'"


# --------------------------------------------------------------------------- deepy.py


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "-m torch.distributed.run --nnodes 1 --nproc_per_node 1 --rdzv_backend c10d"),
        (["hostfile=hostfile", "num_gpus=null"], "--hostfile hostfile --num_gpus 4"),
        (["launcher=torchrun", "master_port=29401"], "--rdzv_endpoint 127.0.0.1:29401 train.py"),
    ],
)
def test_dry_run_prints_the_command_and_starts_nothing(
    workdir: Path, overrides: list[str], expected: str
) -> None:
    result = deepy(workdir, "train.py", config_file(workdir), *overrides, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "Launch command:" in result.stdout and expected in result.stdout
    assert "train_batch_size" in result.stdout and '"zero_allow_untested_optimizer": true' in (
        result.stdout
    )
    assert not list(workdir.glob("started-*"))


@pytest.mark.parametrize("size,verdict", [("80GB", "fits: need"), ("1MB", "does not fit: need")])
def test_dry_run_estimates_memory_against_a_device(workdir: Path, size: str, verdict: str) -> None:
    result = deepy(workdir, "train.py", config_file(workdir), "--dry-run", "--device-memory", size)
    assert result.returncode == 0, result.stderr
    memory = result.stdout.split("Memory per GPU (estimate):")[1]
    for term in ("weights", "gradients", "optimizer state", "activations", "logits"):
        assert term in memory
    assert verdict in memory


def test_config_error_exits_2_and_starts_nothing(workdir: Path) -> None:
    result = deepy(workdir, "train.py", config_file(workdir), "hiden_size=64", "--dry-run")
    assert result.returncode == 2
    assert "unknown key 'hiden_size'" in result.stderr and "did you mean 'hidden_size'" in (
        result.stderr
    )
    assert result.stdout == "" and not list(workdir.glob("started-*"))


def test_missing_user_script_and_bad_usage_exit_2(workdir: Path) -> None:
    result = deepy(workdir, "nope.py", config_file(workdir))
    assert result.returncode == 2 and "user script not found: nope.py" in result.stderr
    assert deepy(workdir, "train.py").returncode == 2


def test_runs_the_processes_with_the_resolved_config(workdir: Path) -> None:
    result = deepy(workdir, "train.py", config_file(workdir, num_gpus=2), "train_iters=7")
    assert result.returncode == 0, result.stderr
    for rank in ("0", "1"):
        seen = (workdir / f"started-{rank}").read_text()
        assert seen == f"rank {rank} of 2 iters 7 world 2"


def test_run_returns_the_child_exit_code() -> None:
    sys.path.insert(0, str(REPO))
    try:
        import deepy
    finally:
        sys.path.remove(str(REPO))
    assert deepy.run(LaunchPlan([sys.executable, "-c", "raise SystemExit(3)"])) == 3
