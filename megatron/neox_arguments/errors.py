"""The one exception type for configuration problems."""

from __future__ import annotations


class ConfigError(ValueError):
    """One or more configuration problems; each message names the key, its source and the rule."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"{len(self.problems)} configuration errors:\n{lines}"
        super().__init__(text)


class Problems:
    """Collects messages so that all errors of one stage are reported together."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def raise_if_any(self) -> None:
        if self.messages:
            raise ConfigError(self.messages)
