#!/usr/bin/env python
"""Submit a pretraining job: tools/slurm/pretrain.sbatch rendered for a cluster profile.

    python tools/submit.py CONFIG.yml [MORE.yml ...] [key=value ...] [--cluster NAME]
        [--clusters a,b,c] [--nodes N] [--time T] [--job-name NAME] [--dry-run]

`--then CMD` (repeatable) queues conversion, evaluation or upload after the training succeeds:
one job name per experiment with `--dependency=afterok:<previous>,singleton`, so they run in
order, one at a time. With several clusters, each one's `sinfo` is asked for idle nodes in its partition and the job
goes where it can start soonest (enough idle nodes, then the most idle), with the reason printed.
Config paths become absolute (the job runs elsewhere); a node count that the model-parallel
sizes do not divide is refused here, not after the queue wait.
"""

from __future__ import annotations

import argparse
import shlex
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
RUN_SCRIPT = REPO / "tools" / "slurm" / "run_on_compute.sbatch"


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


def render(
    profile: Profile, nodes: int, time_limit: str | None, job_name: str, log_dir: Path
) -> str:
    """pretrain.sbatch with its #SBATCH header set for this profile and job."""
    header = [
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --exclusive",
        f"#SBATCH --cpus-per-task={profile.cpus_per_task}",
        f"#SBATCH --time={time_limit or profile.time}",
        f"#SBATCH --output={log_dir}/%x-%j.out",
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


def sbatch(profile: Profile, options: list[str], script: list[str], text: str | None) -> str:
    """Submit; the job id. `text` is the job script when it comes on stdin."""
    command = [*profile.sbatch, "--parsable", *options, *script]
    done = subprocess.run(command, input=text, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise ProfileError(f"sbatch failed: {done.stderr.strip()}")
    return done.stdout.strip().split(";")[0]


def after_jobs(
    commands: list[str], fields: dict[str, str], job_name: str, log_dir: Path
) -> list[tuple[list[str], list[str]]]:
    """(sbatch options, script and arguments) of each --then command: run_on_compute.sbatch jobs
    that wait for the previous job to succeed and, one job name per experiment with
    `singleton`, never run two at a time. `{job}` in the dependency is the previous job's id."""
    jobs = []
    for command in commands:
        try:
            filled = command.format(**fields)
        except KeyError as err:
            raise ProfileError(
                f"--then {command!r}: unknown field {err}; use {', '.join('{' + f + '}' for f in fields)}"
            ) from None
        options = [
            f"--job-name={job_name}-after",
            "--dependency=afterok:{job},singleton",
            f"--output={log_dir}/%x-%j.out",
        ]
        jobs.append((options, [str(RUN_SCRIPT), "bash", "-c", filled]))
    return jobs


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
    parser.add_argument("--log-dir", type=Path, default=REPO / "logs", help="job logs")
    parser.add_argument(
        "--then",
        action="append",
        default=[],
        metavar="CMD",
        help="a command for after the training succeeds (conversion, evaluation, upload), in "
        "order, one at a time; {save}, {configs}, {log_dir} are filled in",
    )
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
        job_name = args.job_name or f"strata-{Path(arguments[0]).stem}"
        log_dir = args.log_dir.resolve()
        fields = {
            "save": str(Path(values.get("save") or "").resolve()) if values.get("save") else "",
            "configs": " ".join(arguments),
            "log_dir": str(log_dir),
        }
        chained = after_jobs(args.then, fields, job_name, log_dir)
        script = render(profile, args.nodes, args.time, job_name, log_dir)
        common = [f"--export=ALL,STRATA_CLUSTER={profile.name},STRATA_REPO={REPO}"]
        if args.dry_run:
            print(script)
            print("# submit: " + shlex.join([*profile.sbatch, *common, "/dev/stdin", *arguments]))
            for options, command in chained:
                print("# then: " + shlex.join([*profile.sbatch, *common, *options, *command]))
            return 0
        log_dir.mkdir(parents=True, exist_ok=True)
        job_id = sbatch(profile, common, ["/dev/stdin", *arguments], script)
        print(
            f"submitted job {job_id} ({job_name}) to {profile.name}: log "
            f"{log_dir}/{job_name}-{job_id}.out"
        )
        previous = job_id
        for options, command in chained:
            options = [o.replace("{job}", previous) for o in options]
            previous = sbatch(profile, [*common, *options], command, None)
            print(f"submitted job {previous} after it: {command[-1]}")
    except (ProfileError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
