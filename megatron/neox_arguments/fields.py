"""How schema fields are declared: default, one-line doc and Strata's support level."""

from __future__ import annotations

import enum
from dataclasses import Field, field
from typing import Any


class Support(enum.Enum):
    """What Strata does with a NeoX key."""

    YES = "implemented"
    # A NeoX feature Strata does not implement yet: only NeoX's default value is accepted.
    DEFAULT_ONLY = "not supported yet"
    # A pure performance hint (kernel fusion and the like): any value is accepted and the
    # results do not depend on it.
    HINT = "performance hint"
    # Computed by Strata from other keys; a config file may not set it (the launcher's JSON may).
    DERIVED = "derived"
    # A setting of a feature Strata refuses (its `gate`): inert, as in NeoX with the feature off.
    GATED = "only with a feature not supported yet"


def arg(default: Any, doc: str, support: Support = Support.YES, gate: str | None = None) -> Any:
    """A schema field with NeoX's `default`, a one-line `doc` and its `support` level.

    `gate` names the refused feature the key belongs to, as "key" (a DEFAULT_ONLY switch) or
    "key: value" (a value validation refuses); such a key is accepted with any value and unread.
    """
    metadata = {"doc": doc, "support": Support.GATED if gate else support, "gate": gate}
    return field(default=default, metadata=metadata)


def field_doc(f: Field[Any]) -> str:
    return str(f.metadata.get("doc", ""))


def field_support(f: Field[Any]) -> Support:
    return f.metadata.get("support", Support.YES)
