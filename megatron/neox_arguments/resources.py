"""Where the processes run: hostfile parsing, include/exclude filters, local device count.

Semantics follow DeepSpeed's runner: a hostfile line is `hostname slots=N`; include/exclude
are `NODE_SPEC[@NODE_SPEC ...]` with `NODE_SPEC = NAME[:SLOT[,SLOT ...]]`; a missing hostfile
means "local resources only".
"""

from __future__ import annotations

import os
import re

from megatron.neox_arguments.errors import ConfigError

# DeepSpeed's runner reads this hostfile when none is given (DLTS_HOSTFILE overrides it).
DEFAULT_HOSTFILE = "/job/hostfile"

_LINE = re.compile(r"^(?P<host>\S+)\s+slots\s*=\s*(?P<slots>\d+)\s*$")


def default_hostfile() -> str:
    return os.environ.get("DLTS_HOSTFILE", DEFAULT_HOSTFILE)


def read_hostfile(path: str) -> dict[str, int]:
    """Hosts in file order with their slot counts."""
    hosts: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            match = _LINE.match(line)
            if match is None:
                raise ConfigError(
                    f"hostfile {path} line {number}: expected 'hostname slots=N', got {line!r}"
                )
            host = match["host"]
            if host in hosts:
                raise ConfigError(f"hostfile {path} line {number}: host {host!r} listed twice")
            hosts[host] = int(match["slots"])
    if not hosts:
        raise ConfigError(f"hostfile {path} lists no hosts")
    return hosts


def _parse_spec(spec: str, hosts: dict[str, int], key: str) -> dict[str, list[int] | None]:
    """{host: slots or None for all} from an include/exclude string."""
    parsed: dict[str, list[int] | None] = {}
    for node in spec.split("@"):
        name, _, slots = node.partition(":")
        if name not in hosts:
            raise ConfigError(f"{key}: host {name!r} is not in the hostfile ({', '.join(hosts)})")
        if not slots:
            parsed[name] = None
            continue
        try:
            chosen = [int(s) for s in slots.split(",")]
        except ValueError:
            raise ConfigError(f"{key}: slots of {name!r} must be integers, got {slots!r}") from None
        bad = [s for s in chosen if not 0 <= s < hosts[name]]
        if bad:
            raise ConfigError(f"{key}: {name!r} has slots 0..{hosts[name] - 1}, not {bad}")
        parsed[name] = chosen
    return parsed


def select_slots(hosts: dict[str, int], include: str, exclude: str) -> dict[str, list[int]]:
    """Slots per host after applying include or exclude (they are mutually exclusive)."""
    if include and exclude:
        raise ConfigError("include and exclude cannot both be set (DeepSpeed's rule)")
    pool = {host: list(range(slots)) for host, slots in hosts.items()}
    if include:
        wanted = _parse_spec(include, hosts, "include")
        return {h: pool[h] if s is None else sorted(set(s)) for h, s in wanted.items()}
    if exclude:
        for host, slots in _parse_spec(exclude, hosts, "exclude").items():
            pool[host] = [] if slots is None else [s for s in pool[host] if s not in slots]
    return {host: slots for host, slots in pool.items() if slots}


def local_device_count() -> int:
    """CUDA devices on this machine, or 1 on a machine without a GPU (one CPU process)."""
    import torch

    return torch.cuda.device_count() or 1


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_hosts(
    hostfile: str | None, include: str | None, exclude: str | None, num_nodes: int
) -> tuple[dict[str, list[int]] | None, list[str]]:
    """Slots per host for a multi-host launch (None: local only), and warnings to print."""
    warnings: list[str] = []
    path = hostfile
    if path is None and os.path.isfile(default_hostfile()):
        path = default_hostfile()
    if path is not None and not os.path.isfile(path):
        warnings.append(
            f"hostfile {path} not found: using local resources only (as DeepSpeed's runner does)"
        )
        path = None
    if path is None:
        if not (include or exclude):
            return None, warnings
        hosts = {"localhost": local_device_count()}
    else:
        hosts = read_hostfile(path)
    slots = select_slots(hosts, include or "", exclude or "")
    if num_nodes > 0:
        if num_nodes > len(slots):
            raise ConfigError(
                f"num_nodes ({num_nodes}) is more than the {len(slots)} usable hosts "
                f"({', '.join(slots)})"
            )
        slots = dict(list(slots.items())[:num_nodes])
    return slots, warnings
