"""The exit status of the tools and entry points: one place that turns expected failures into
one clear line."""

from __future__ import annotations

import sys
from collections.abc import Callable


def exit_status(
    work: Callable[[], int | None],
    errors: tuple[type[BaseException], ...],
    describe: Callable[[BaseException], str] = str,
) -> int:
    """Run a tool's ``work``: its return value (0 for None); 1 with one "error: ..." line on
    stderr when it raises one of the expected ``errors`` (bad input, not a bug: no traceback);
    130 on Ctrl-C (outputs are written to temporary names first: nothing half-written stays)."""
    try:
        status = work()
    except errors as err:
        print(f"error: {describe(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return status or 0
