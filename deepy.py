#!/usr/bin/env python
"""Launch a Strata script with a NeoX config.

    python deepy.py train.py configs/125M.yml configs/local_setup.yml [key=value ...] [--dry-run]

Merges and validates the config files (a ConfigError prints the problems and exits with 2
before anything starts), prints the derived values, builds the launch command for the
configured launcher and runs it, streaming its output and returning its exit code. With
--dry-run it prints the command, the resolved config and the per-GPU memory estimate instead;
`--device-memory 80GB` (the key device_memory) adds whether the run fits on such a device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from megatron.config import ConfigError, NeoXArgs
from megatron.neox_arguments.launch import LaunchPlan, build_launch
from megatron.neox_arguments.memory import memory_report, parse_bytes
from megatron.neox_arguments.redact import redact_values
from megatron.neox_arguments.schema import FIELDS
from megatron.neox_arguments.validation import is_default

USAGE = (
    "usage: python deepy.py USER_SCRIPT CONFIG.yml [CONFIG.yml ...] [key=value ...] "
    "[--dry-run] [--device-memory SIZE] [-d CONF_DIR]"
)
EXIT_CONFIG_ERROR = 2


class UsageError(Exception):
    pass


def parse_command_line(argv: list[str]) -> tuple[str, list[str], list[str], bool]:
    """(user script, config files, overrides, dry run); --device-memory becomes an override."""
    dry_run, conf_dir, positional = False, None, []
    items = iter(argv)
    for item in items:
        if item in ("-h", "--help"):
            raise UsageError(__doc__ or USAGE)
        if item in ("--dry-run", "--dry_run"):
            dry_run = True
        elif item in ("--device-memory", "--device_memory"):
            size = next(items, None)
            if size is None:
                raise UsageError(f"{item} needs a size, e.g. 80GB")
            positional.append(f"device_memory={size}")
        elif item in ("-d", "--conf_dir", "--conf-dir"):
            conf_dir = next(items, None)
            if conf_dir is None:
                raise UsageError(f"{item} needs a directory")
        elif item.startswith("-"):
            raise UsageError(f"unknown option {item!r}\n{USAGE}")
        else:
            positional.append(item)
    if len(positional) < 2:
        raise UsageError(USAGE)
    script, rest = positional[0], positional[1:]
    overrides = [a for a in rest if "=" in a]
    configs = [_config_path(a, conf_dir) for a in rest if "=" not in a]
    if not configs:
        raise UsageError(f"no config files given\n{USAGE}")
    return script, configs, overrides, dry_run


def _config_path(name: str, conf_dir: str | None) -> str:
    path = os.path.join(conf_dir, name) if conf_dir else name
    # As in NeoX, `125M` means `125M.yml`.
    if not os.path.exists(path) and not path.endswith((".yml", ".yaml", ".json")):
        path += ".yml"
    return path


def resolved_config(args: NeoXArgs) -> dict[str, object]:
    """Keys that differ from NeoX's defaults (config_files left out: they are the input),
    credential-looking values redacted."""
    return redact_values(
        {
            key: value
            for key, value in args.values().items()
            if key != "config_files" and not is_default(value, FIELDS[key].default)
        }
    )


def print_dry_run(args: NeoXArgs, plan: LaunchPlan) -> None:
    print("\nLaunch command:")
    print(plan.command_line())
    print("\nDeepSpeed config:")
    print(json.dumps(args.deepspeed_config, indent=2, sort_keys=True))
    print("\nResolved config (values that differ from NeoX defaults):")
    print(json.dumps(resolved_config(args), indent=2, sort_keys=True))
    if args.padded_vocab_size is not None:
        memory = parse_bytes(args.device_memory) if args.device_memory else None
        print("\nMemory per GPU (estimate):")
        print(memory_report(args, memory))


def run(plan: LaunchPlan) -> int:
    """Run the command with inherited stdout/stderr; its exit code (128 + n for signal n)."""
    process = subprocess.Popen(plan.argv, env={**os.environ, **plan.env})
    try:
        code = process.wait()
    except KeyboardInterrupt:
        # The child got the same SIGINT from the terminal; give it time to shut down.
        code = process.wait()
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    try:
        script, configs, overrides, dry_run = parse_command_line(
            sys.argv[1:] if argv is None else argv
        )
        if not os.path.isfile(script):
            raise ConfigError(f"user script not found: {script}")
        args = NeoXArgs.from_ymls(configs, overrides, user_script=script)
        plan = build_launch(args, script)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except ConfigError as exc:
        print(f"deepy.py: configuration error\n{exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    for warning in [*args.warnings, *plan.notes]:
        print(f"deepy.py: warning: {warning}", file=sys.stderr)
    print(args.derived_table())
    if dry_run:
        print_dry_run(args, plan)
        return 0
    shown = plan.command_line().replace(args.encoded(), "<base64 config>")
    print(f"\nLaunching: {shown}\n", flush=True)
    return run(plan)


if __name__ == "__main__":
    sys.exit(main())
