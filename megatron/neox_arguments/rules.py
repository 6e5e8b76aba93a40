"""What the config is checked against that only the layers above it know.

The config package imports nothing from the model, optimizers, schedules, losses or data code;
those modules register here, when they are imported, the names a config key may take
(`register_names`), the checks that need their code (`register_rule`) and the questions about
files that only they can answer (`register_reader`: how many samples `train_epochs` gives).
`megatron.config` imports every one of them and then calls `all_registered()`; a config read
from files or a dict before that is refused, so no rule is ever skipped silently. A launched
process may read the launcher's config without them (a NeoX user script imports only
`megatron.neox_arguments`): the launcher checked it in full, so what is not registered there is
not checked again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from megatron.neox_arguments.errors import Problems
from megatron.registry import Registry

Rule = Callable[[Any, Problems], None]

NAMES: Registry[Registry[Any]] = Registry("config name list")
RULES: Registry[Rule] = Registry("config rule")
READERS: Registry[Callable[..., Any]] = Registry("config reader")
_complete = False


def register_names(kind: str, registry: Registry[Any]) -> None:
    """The names keys typed ``Registered(kind)`` accept: whatever ``registry`` holds when a
    config is built (so a user's ``register_*`` call is all a new name needs)."""
    NAMES.register(kind, registry)


def register_rule(name: str) -> Callable[[Rule], Rule]:
    """``@register_rule("name")`` adds ``check(args, problems)``, run on every config after the
    keys are derived; it adds a message to ``problems`` for each thing wrong."""
    return RULES.register(name)


def register_reader(name: str, reader: Callable[..., Any]) -> None:
    """A function the config calls to read a derived value from files (its callers document
    the signature)."""
    READERS.register(name, reader)


def all_registered() -> None:
    """Called by `megatron.config` once every rule-providing module is imported."""
    global _complete
    _complete = True


def require_all() -> None:
    """Refuse to check a config's files or dict when the rules are not all registered."""
    if not _complete:
        raise RuntimeError(
            "the config rules are not registered: import megatron.config (the entry points "
            "do) before building a NeoXArgs"
        )


def names(kind: str) -> Registry[Any] | None:
    """The registry of ``kind``; None in a launched process that did not import it."""
    return NAMES.get(kind) if kind in NAMES else None


def reader(name: str) -> Callable[..., Any]:
    return READERS.get(name)


def check_rules(args: Any, problems: Problems) -> None:
    for _, rule in RULES.items():
        rule(args, problems)
