"""`Registry`: the one way Strata maps names to the pieces users ablate.

A registry refuses a name twice (a second registration would silently replace the first), and a
failed lookup lists the registered names with the closest one. Names may be compared
case-insensitively (NeoX does so for tokenizer and optimizer types); they are listed as written.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

T = TypeVar("T")


class NotRegistered(KeyError, ValueError):
    """A lookup of a name nobody registered: a KeyError for dict-style callers, a ValueError
    for a bad config value."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


class Registry(Generic[T]):
    """Names (and aliases) of one kind of entry, e.g. ``Registry[NormFactory]("norm")``.

    ``kind`` names the registry in messages; ``register_with`` is the public function users add
    entries with, named in the lookup error.
    """

    def __init__(self, kind: str, *, ignore_case: bool = False, register_with: str = "") -> None:
        self.kind = kind
        self.ignore_case = ignore_case
        self.register_with = register_with
        self._entries: dict[str, tuple[str, T]] = {}  # key -> (name as written, entry)

    def _key(self, name: str) -> str:
        return name.lower() if self.ignore_case else name

    @overload
    def register(self, name: str, *aliases: str) -> Callable[[T], T]: ...
    @overload
    def register(self, name: str, entry: T, /) -> T: ...
    def register(self, name: str, *rest: str | T) -> T | Callable[[T], T]:
        """``@register("name", "alias", ...)`` decorates an entry; ``register("name", entry)``
        adds a value. A name already taken is a ValueError and nothing is added."""
        if len(rest) == 1 and not isinstance(rest[0], str):
            self._add((name,), rest[0])
            return rest[0]

        def decorate(entry: T) -> T:
            self._add((name, *rest), entry)  # type: ignore[arg-type]  # all str here
            return entry

        return decorate

    def _add(self, names: tuple[str, ...], entry: T) -> None:
        keys = [self._key(name) for name in names]
        for name, key in zip(names, keys):
            if key in self._entries or keys.count(key) > 1:
                owner = getattr(self._entries.get(key, (name, None))[1], "__qualname__", None)
                by = f" (by {owner})" if owner else ""
                raise ValueError(f"{self.kind} {name!r} is already registered{by}")
        for name, key in zip(names, keys):
            self._entries[key] = (name, entry)

    def get(self, name: str, *, key: str = "") -> T:
        """The entry called ``name``; ``key`` (the config key that named it) prefixes the error."""
        found = self._entries.get(self._key(name))
        if found is None:
            raise NotRegistered(self.unknown(name, key=key))
        return found[1]

    def unknown(self, name: str, *, key: str = "") -> str:
        """The error for an unregistered ``name``: the registered names and the closest one."""
        prefix = f"{key}: " if key else ""
        expected = f"expected one of {self.choices()}{self.hint(name)}"
        return f"{prefix}unknown {self.kind} {name!r}; {expected}"

    def choices(self) -> str:
        return ", ".join(repr(n) for n in self.names())

    def hint(self, name: str) -> str:
        """' (did you mean 'x'?)' for the closest name, then how to add one."""
        close = self.closest(name)
        text = f" (did you mean {close!r}?)" if close else ""
        return text + (f"; add one with {self.register_with}" if self.register_with else "")

    def closest(self, name: str) -> str | None:
        by_key = {self._key(n): n for n in self}
        match = difflib.get_close_matches(self._key(name), list(by_key), n=1)
        return by_key[match[0]] if match else None

    def names(self) -> list[str]:
        """Registered names as written, sorted."""
        return sorted(self)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.values())

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __delitem__(self, name: str) -> None:
        del self._entries[self._key(name)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._key(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        """Names as written, in registration order."""
        return (name for name, _ in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
