"""Credentials kept out of printed and saved configs.

A key "looks like a credential" when one of the words of its name (split at `_`, `-`, `.`,
spaces and camelCase) is token, key(s), secret(s), password(s) (or passwd, apikey,
credential(s)), and its value is a string: `wandb_api_key: abc` and `hf_token: abc` are
redacted, `num_kv_heads: 8`, `key_size: 64` and `tokenizer_type: HFTokenizer` are not.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"
CREDENTIAL_WORDS = frozenset(
    {
        *("token", "key", "keys", "secret", "secrets", "password", "passwords"),
        *("passwd", "apikey", "credential", "credentials"),
    }
)
_WORD_SPLIT = re.compile(r"[^A-Za-z0-9]+|(?<=[a-z0-9])(?=[A-Z])")


def is_credential_name(name: str) -> bool:
    """True for a key name with a credential word in it (see the module docstring)."""
    words = {w.lower() for w in _WORD_SPLIT.split(str(name)) if w}
    return bool(words & CREDENTIAL_WORDS)


def redact_values(value: Any, name: str = "") -> Any:
    """A copy of `value` (dicts and lists walked) with credential strings replaced."""
    if isinstance(value, dict):
        return {k: redact_values(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_values(v, name) for v in value)
    if isinstance(value, str) and value and is_credential_name(name):
        return REDACTED
    return value


def credential_strings(value: Any, name: str = "") -> set[str]:
    """Every non-empty string held under a credential-looking key in `value`."""
    if isinstance(value, dict):
        return set().union(*(credential_strings(v, str(k)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return set().union(*(credential_strings(v, name) for v in value))
    if isinstance(value, str) and value and is_credential_name(name):
        return {value}
    return set()


def redact_text(text: str) -> str:
    """A YAML or JSON config file's text with the string values of credential keys replaced
    wherever they appear (comments and layout stay as the user wrote them). Text that does
    not parse is returned unchanged (a config that does not parse never builds)."""
    import json

    import yaml

    try:
        secrets = credential_strings(yaml.safe_load(text))
    except yaml.YAMLError:
        return text
    # Longest first, so a secret containing another is replaced whole; the JSON-escaped form
    # covers values written with escapes in double quotes.
    forms = {form for s in secrets for form in (s, json.dumps(s)[1:-1])}
    for form in sorted(forms, key=len, reverse=True):
        pattern = rf"(?<![A-Za-z0-9_]){re.escape(form)}(?![A-Za-z0-9_])"
        text = re.sub(pattern, REDACTED, text)
    return text


def redacted_config_files(args: Any) -> dict[str, str]:
    """`args.config_files` with credential values redacted (what a checkpoint may store)."""
    return {name: redact_text(text) for name, text in (args.config_files or {}).items()}
