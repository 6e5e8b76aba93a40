"""Launch commands for a validated config: DeepSpeed's runner, torchrun, srun, local CPU.

Pure command building (no processes are started here) so every launcher can be tested.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from megatron.neox_arguments.errors import ConfigError
from megatron.neox_arguments.resources import cuda_available

DEEPSPEED_DEFAULT_PORT = 29500
CPU_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


@dataclass
class LaunchPlan:
    """The command to run, variables to add to its environment, and warnings to print."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def command_line(self) -> str:
        assignments = [f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items())]
        return " ".join([*assignments, shlex.join(self.argv)])


def free_port() -> int:
    """A TCP port that is free right now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    """An executable from PATH or next to this Python (an un-activated virtualenv)."""
    found = shutil.which(name)
    if found:
        return found
    sibling = os.path.join(os.path.dirname(sys.executable), name)
    return sibling if os.path.isfile(sibling) else name


def first_slurm_host(environ: Mapping[str, str]) -> str | None:
    """The first host of the Slurm allocation (SLURM_JOB_NODELIST), if inside one."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
        if out:
            return out[0]
    return _first_of_nodelist(nodelist)


def _first_of_nodelist(nodelist: str) -> str:
    """'node[03-05,9],gpu1' -> 'node03' (Slurm's compressed host list)."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    host = nodelist[:end]
    while (match := re.search(r"\[([^\]]*)\]", host)) is not None:
        first = match.group(1).split(",")[0].split("-")[0]
        host = host[: match.start()] + first + host[match.end() :]
    return host


def _layout(args: Any) -> tuple[int, int]:
    """(nodes, processes per node)."""
    if args.hosts:
        first = next(iter(args.hosts.values()))
        per_node = args.num_gpus if args.num_gpus and args.num_gpus > 0 else len(first)
        return len(args.hosts), per_node
    nodes = args.num_nodes if args.num_nodes > 0 else 1
    return nodes, args.global_num_gpus // nodes


def _rendezvous(args: Any, nodes: int, environ: Mapping[str, str]) -> tuple[str, int]:
    """(master address, port) for torchrun and srun."""
    master = args.master_addr or first_slurm_host(environ)
    if master is None:
        if nodes > 1:
            raise ConfigError(
                f"launcher {args.launcher!r} on {nodes} nodes needs master_addr (or must run "
                "inside a Slurm allocation, where the first host is used)"
            )
        master = "127.0.0.1"
    port = args.master_port or (free_port() if nodes == 1 else DEEPSPEED_DEFAULT_PORT)
    return master, port


def build_launch(
    args: Any,
    user_script: str,
    *,
    cuda: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """The launch command for `user_script` under `args.launcher`.

    `cuda` says whether this machine has a GPU (detected when None); without one, a local run
    starts `num_gpus` CPU processes over gloo.
    """
    environ = os.environ if environ is None else environ
    script = [user_script, "--megatron_config", args.encoded()]
    nodes, per_node = _layout(args)
    multi_node = args.hosts is not None or args.launcher != "pdsh" or args.force_multi or nodes > 1
    if multi_node and args.launcher not in ("torchrun", "srun"):
        return _deepspeed_runner(args, script, per_node, multi_node=True)
    cuda = cuda_available() if cuda is None else cuda
    cpu_env = {} if cuda else dict(CPU_ENV)
    if args.launcher == "torchrun":
        master, port = _rendezvous(args, nodes, environ)
        argv = [
            _tool("torchrun"),
            "--nnodes", str(nodes),
            "--nproc_per_node", str(per_node),
            "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{master}:{port}",
            *script,
        ]  # fmt: skip
        return LaunchPlan(argv, cpu_env)
    if args.launcher == "srun":
        master, port = _rendezvous(args, nodes, environ)
        argv = ["srun", "--nodes", str(nodes), "--ntasks-per-node", str(per_node)]
        if args.comment:
            argv += ["--comment", args.comment]
        if args.account:
            argv += ["--account", args.account]
        argv += [sys.executable, "-u", *script]
        env = {"MASTER_ADDR": master, "MASTER_PORT": str(port), **cpu_env}
        return LaunchPlan(argv, env)
    if cuda:
        return _deepspeed_runner(args, script, per_node, multi_node=False)
    # A single machine without a GPU: num_gpus CPU processes, gloo, a free port.
    port = args.master_port or free_port()
    argv = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1",
        "--nproc_per_node", str(per_node),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"127.0.0.1:{port}",
        *script,
    ]  # fmt: skip
    return LaunchPlan(argv, cpu_env)


def _deepspeed_runner(
    args: Any, script: list[str], per_node: int, *, multi_node: bool
) -> LaunchPlan:
    notes: list[str] = []
    argv = [_tool("deepspeed")]
    if args.hosts is not None and args.hostfile and os.path.isfile(args.hostfile):
        argv += ["--hostfile", args.hostfile]
    if args.include:
        argv += ["--include", args.include]
    if args.exclude:
        argv += ["--exclude", args.exclude]
    if args.include or args.exclude:
        if args.num_gpus or args.num_nodes > 0:
            notes.append(
                "include/exclude choose the hosts and slots: num_gpus and num_nodes are not "
                "passed to DeepSpeed (it refuses both together)"
            )
    else:
        if args.num_nodes > 0:
            argv += ["--num_nodes", str(args.num_nodes)]
        argv += ["--num_gpus", str(per_node)]
    argv += ["--master_port", str(args.master_port or DEEPSPEED_DEFAULT_PORT)]
    if args.master_addr:
        argv += ["--master_addr", args.master_addr]
    if multi_node:
        argv += ["--launcher", args.launcher]
        if args.force_multi or args.deepspeed_slurm or args.deepspeed_mpi:
            argv.append("--force_multi")
    if args.no_ssh_check:
        argv.append("--no_ssh_check")
    slurm_args = [f"--{k}={getattr(args, k)}" for k in ("comment", "account") if getattr(args, k)]
    if slurm_args:
        if args.launcher == "slurm":
            argv += ["--launcher_args", " ".join(slurm_args)]
        else:
            notes.append(
                f"comment/account apply to Slurm launches only; ignored for {args.launcher}"
            )
    return LaunchPlan([*argv, *script], {}, notes)
