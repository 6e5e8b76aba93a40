"""What every Hub tool shares: repo id checks, the token (read, never stored), and an HfApi
whose retries are ours (megatron/hub/retry.py)."""

from __future__ import annotations

import re

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
TOKEN_HELP = (
    "set the HF_TOKEN environment variable or run `hf auth login` (Strata reads the token from "
    "there and never writes it anywhere)"
)


class HubError(ValueError):
    """Bad input for a Hub tool, or a Hub answer it cannot use."""


def check_repo_id(repo_id: str, option: str = "--repo") -> str:
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise HubError(
            f"{option} {repo_id!r}: expected a repo id namespace/name (e.g. EleutherAI/pythia-70m)"
        )
    return repo_id


def require_token() -> None:
    """Fail before any work when there is no token to write with."""
    from huggingface_hub import get_token

    if not get_token():
        raise HubError(f"no Hugging Face token: {TOKEN_HELP}")


def hub_api():
    """An HfApi on HF_ENDPOINT with the token from HF_TOKEN or the login cache. The library's
    own retry loop (5 tries, at most 8 s apart, logged through its logger) is switched off so
    that the caller's policy, with its flags and one printed line per wait, is the only one."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import _http, disable_progress_bars, logging

    defaults = _http.http_backoff.__kwdefaults__
    if defaults and "max_retries" in defaults:
        defaults["max_retries"] = 0
    logging.set_verbosity_error()  # its retry warnings would repeat our lines
    disable_progress_bars()  # one bar per revision instead of one per file
    return HfApi()
