#!/usr/bin/env python
"""Cluster profiles (`configs/clusters/NAME.yml`): partition, GPUs and CPUs per node, time, the
interconnect environment, modules, the NCCL to preload, batch adjustments and the commands that
reach the cluster. Job scripts read theirs through this file:

    eval "$(python tools/slurm/profiles.py --shell CONFIG.yml [...] [key=value ...])"

picks the profile named by STRATA_CLUSTER, else the one whose hostname_pattern matches this host,
else the generic one, and prints the shell lines that load its modules and export its
environment, STRATA_CLUSTER, STRATA_GPUS_PER_NODE and STRATA_BATCH_OVERRIDES (the micro-batch
and accumulation that keep the config's global batch on this cluster's GPUs).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

PROFILE_DIR = Path(__file__).resolve().parents[2] / "configs" / "clusters"
GENERIC = "h100-infiniband"


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    hostname_pattern: str | None
    partition: str | None
    gpus_per_node: int
    cpus_per_task: int
    time: str
    preempt_signal_seconds: int
    env: dict
    modules: list
    ld_preload: list
    micro_batch_divisor: int
    sinfo: list
    sbatch: list


FIELD_TYPES = {f.name: f.type.replace(" | None", "") for f in fields(Profile) if f.name != "name"}
OPTIONAL = {"hostname_pattern", "partition"}
TYPES = {"str": str, "int": int, "dict": dict, "list": list}


def known_profiles(folder: Path = PROFILE_DIR) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yml"))


def load_profile(name: str, folder: Path = PROFILE_DIR) -> Profile:
    path = folder / f"{name}.yml"
    if not path.is_file():
        raise ProfileError(
            f"unknown cluster profile {name!r}: known profiles in {folder} are "
            f"{', '.join(known_profiles(folder)) or 'none'}"
        )
    values = yaml.safe_load(path.read_text()) or {}
    for key, type_name in FIELD_TYPES.items():
        if key not in values:
            raise ProfileError(f"{path}: the required field {key!r} is missing")
        value = values[key]
        if value is None and key in OPTIONAL:
            continue
        if not isinstance(value, TYPES[type_name]) or isinstance(value, bool):
            raise ProfileError(f"{path}: {key} must be a {type_name}, got {value!r}")
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise ProfileError(f"{path}: unknown fields {', '.join(unknown)}")
    if values["gpus_per_node"] < 1 or values["micro_batch_divisor"] < 1:
        raise ProfileError(f"{path}: gpus_per_node and micro_batch_divisor must be >= 1")
    return Profile(name=name, **{key: values[key] for key in FIELD_TYPES})


def choose_profile(
    environ: dict[str, str] | None = None, hostname: str | None = None, folder: Path = PROFILE_DIR
) -> tuple[Profile, str]:
    """(profile, why): STRATA_CLUSTER, else a hostname_pattern match, else the generic one."""
    environ = os.environ if environ is None else environ
    hostname = hostname or socket.gethostname()
    if environ.get("STRATA_CLUSTER"):
        return load_profile(environ["STRATA_CLUSTER"], folder), "STRATA_CLUSTER"
    for name in known_profiles(folder):
        profile = load_profile(name, folder)
        if profile.hostname_pattern and re.search(profile.hostname_pattern, hostname):
            return profile, f"host {hostname} matches {profile.hostname_pattern!r}"
    return load_profile(GENERIC, folder), "no STRATA_CLUSTER and no hostname pattern matched"


def batch_overrides(profile: Profile, values: dict) -> list[str]:
    """key=value overrides that divide the micro-batch by the profile's micro_batch_divisor and
    multiply the accumulation by it: the global batch is unchanged. None for
    train_micro_batch_size_per_gpu: auto."""
    divisor = profile.micro_batch_divisor
    if divisor == 1:
        return []
    micro = values.get("train_micro_batch_size_per_gpu")
    if micro == "auto":  # the run sizes it on the device, keeping the global batch
        return []
    if micro is None:
        raise ProfileError(
            f"cluster profile {profile.name} divides the micro-batch by {divisor}: the config "
            "must set train_micro_batch_size_per_gpu"
        )
    if micro % divisor:
        raise ProfileError(
            f"cluster profile {profile.name}: train_micro_batch_size_per_gpu {micro} is not "
            f"divisible by its micro_batch_divisor {divisor}"
        )
    overrides = [f"train_micro_batch_size_per_gpu={micro // divisor}"]
    accumulation = values.get("gradient_accumulation_steps")
    if accumulation is not None or values.get("train_batch_size") is None:
        # (With train_batch_size alone set, the accumulation it implies doubles by itself.)
        overrides.append(f"gradient_accumulation_steps={(accumulation or 1) * divisor}")
    return overrides


def config_values(arguments: list[str]) -> dict:
    """The merged top-level values of the YAML files and key=value overrides a job is given."""
    from megatron.neox_arguments.errors import Problems
    from megatron.neox_arguments.loading import apply_overrides, load_files

    problems = Problems()
    raw = load_files([a for a in arguments if "=" not in a], problems)
    apply_overrides(raw, [a for a in arguments if "=" in a], problems)
    problems.raise_if_any()
    return dict(raw.values)


def shell_lines(profile: Profile, overrides: list[str]) -> str:
    lines = [f"module load {shlex.quote(m)}" for m in profile.modules]
    lines += [f"export {key}={shlex.quote(str(value))}" for key, value in profile.env.items()]
    if profile.ld_preload:
        # Unquoted paths: a profile may name them through variables such as ${NCCL_HOME}.
        preload = ":".join(profile.ld_preload)
        lines.append(f'export LD_PRELOAD="{preload}${{LD_PRELOAD:+:$LD_PRELOAD}}"')
    lines += [
        f"export STRATA_CLUSTER={shlex.quote(profile.name)}",
        f"export STRATA_GPUS_PER_NODE={profile.gpus_per_node}",
        f"export STRATA_BATCH_OVERRIDES={shlex.quote(' '.join(overrides))}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shell", action="store_true", help="print the job's shell lines")
    parser.add_argument("config", nargs="*", help="the job's YAML files and key=value overrides")
    args = parser.parse_args(argv)
    try:
        profile, why = choose_profile()
        overrides = batch_overrides(profile, config_values(args.config)) if args.config else []
    except (ProfileError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"# cluster profile {profile.name} ({why})", file=sys.stderr)
    print(shell_lines(profile, overrides) if args.shell else profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
