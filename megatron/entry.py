"""Shared start of the entry points: read the config the launcher passed, turn known input errors
into one clear message and a non-zero exit instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from megatron.checkpointing import CheckpointError
from megatron.data.indexed_dataset import DatasetError
from megatron.neox_arguments import ConfigError, NeoXArgs

USER_ERRORS = (ConfigError, CheckpointError, DatasetError, FileNotFoundError)


def run_entry_point(main: Callable, argv: list[str] | None = None) -> int:
    try:
        args = NeoXArgs.consume_neox_args(argv)
        main(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0
