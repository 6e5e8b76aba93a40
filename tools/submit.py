#!/usr/bin/env python
"""Submit a pretraining job: tools/slurm/pretrain.sbatch rendered for a cluster profile.

    python tools/submit.py CONFIG.yml [MORE.yml ...] [key=value ...] [--cluster NAME]
        [--clusters a,b,c] [--nodes N] [--time T] [--job-name NAME] [--dry-run]

With several clusters, each one's `sinfo` is asked for idle nodes in its partition and the job
goes where it can start soonest (enough idle nodes, then the most idle), with the reason printed.
Config paths become absolute (the job runs elsewhere); a node count that the model-parallel
sizes do not divide is refused here, not after the queue wait.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tools.slurm.profiles import (
    Profile,
    ProfileError,
    batch_overrides,
    choose_profile,
    config_values,
    load_profile,
)

REPO = Path(__file__).resolve().parent.parent
JOB_SCRIPT = REPO / "tools" / "slurm" / "pretrain.sbatch"


def absolute_arguments(arguments: list[str]) -> list[str]:
    """Config files as absolute paths (checked to exist); key=value overrides unchanged."""
    result = []
    for item in arguments:
        if "=" in item:
            result.append(item)
            continue
        path = Path(item).resolve()
        if not path.is_file():
            raise ProfileError(f"config file {item} does not exist")
        result.append(str(path))
    return result


def check_layout(values: dict, nodes: int, profile: Profile) -> None:
    world = nodes * profile.gpus_per_node
    tp = max(int(values.get("model_parallel_size") or 1), 1)
    pp = max(int(values.get("pipe_parallel_size") or 1), 1)
    if world % (tp * pp):
        raise ProfileError(
            f"--nodes {nodes} x {profile.gpus_per_node} GPUs per node ({profile.name}) = {world} "
            f"processes, which model_parallel_size {tp} x pipe_parallel_size {pp} = {tp * pp} "
            "does not divide"
        )


def idle_nodes(profile: Profile) -> int | None:
    """Idle nodes in the profile's partition, from its sinfo command (None: no answer)."""
    command = [*profile.sinfo, "-h", "-t", "idle", "-o", "%D"]
    if profile.partition:
        command += ["-p", profile.partition]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return sum(int(word) for word in done.stdout.split() if word.isdigit())


def pick_cluster(profiles: list[Profile], nodes: int) -> tuple[Profile, list[str]]:
    """The profile whose cluster can start `nodes` soonest, and one line per cluster on why."""
    answers = [(profile, idle_nodes(profile)) for profile in profiles]
    reasons = [
        f"{p.name}: {'no answer from sinfo' if idle is None else f'{idle} idle node(s)'}"
        for p, idle in answers
    ]
    reachable = [(p, idle) for p, idle in answers if idle is not None]
    if not reachable:
        raise ProfileError("no cluster answered sinfo: " + "; ".join(reasons))
    # Enough idle nodes starts now; otherwise the most idle is the closest to starting.
    best, idle = max(reachable, key=lambda pair: (pair[1] >= nodes, pair[1]))
    why = "can start now" if idle >= nodes else "closest to starting (fewest nodes short)"
    reasons.append(f"chose {best.name}: {idle} idle of {nodes} needed, {why}")
    return best, reasons


def render(profile: Profile, nodes: int, time_limit: str | None, job_name: str) -> str:
    """pretrain.sbatch with its #SBATCH header set for this profile and job."""
    header = [
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --exclusive",
        f"#SBATCH --cpus-per-task={profile.cpus_per_task}",
        f"#SBATCH --time={time_limit or profile.time}",
        f"#SBATCH --output={REPO}/logs/%x-%j.out",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal=B:USR1@{profile.preempt_signal_seconds}",
        "#SBATCH --requeue",
    ]
    if profile.partition:
        header.append(f"#SBATCH --partition={profile.partition}")
    lines = JOB_SCRIPT.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    body = [line for line in lines[first:] if not line.startswith("#SBATCH")]
    return "\n".join([*lines[:first], *header, *body]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="+", help="YAML files and key=value overrides")
    parser.add_argument("--cluster", help="profile name (default: STRATA_CLUSTER / hostname)")
    parser.add_argument(
        "--clusters", help="comma-separated profiles: submit where it starts soonest"
    )
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--time", help="time limit (default: the profile's)")
    parser.add_argument("--job-name", help="job name (default: strata-<first config's stem>)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the job script, submit nothing"
    )
    args = parser.parse_intermixed_args(argv)
    try:
        arguments = absolute_arguments(args.config)
        if args.clusters:
            names = [n for n in args.clusters.split(",") if n]
            profile, reasons = pick_cluster([load_profile(n) for n in names], args.nodes)
            print("\n".join(reasons))
        else:
            profile = load_profile(args.cluster) if args.cluster else choose_profile()[0]
        values = config_values(arguments)
        check_layout(values, args.nodes, profile)
        batch_overrides(profile, values)  # refused here, not in the job, when it cannot apply
    except (ProfileError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    job_name = args.job_name or f"strata-{Path(arguments[0]).stem}"
    script = render(profile, args.nodes, args.time, job_name)
    command = [
        *profile.sbatch,
        "--parsable",
        f"--export=ALL,STRATA_CLUSTER={profile.name},STRATA_REPO={REPO}",
    ]
    command += ["/dev/stdin", *arguments]
    if args.dry_run:
        print(script)
        print("# submit: " + " ".join(command))
        return 0
    (REPO / "logs").mkdir(exist_ok=True)
    done = subprocess.run(command, input=script, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        print(f"error: sbatch failed: {done.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = done.stdout.strip().split(";")[0]
    print(
        f"submitted job {job_id} ({job_name}) to {profile.name}: log {REPO}/logs/{job_name}-{job_id}.out"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
