"""Retries of Hub calls on rate limits (429), server errors (5xx) and dropped connections:
exponential backoff with jitter, or exactly the wait a `Retry-After` header asks for."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
T = TypeVar("T")


class GaveUp(RuntimeError):
    """A call still failing after the allowed retries."""


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 8
    min_wait: float = 1.0
    max_wait: float = 120.0

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Seconds before retry number `retry` (1-based): min_wait doubled each time, capped at
        max_wait, then drawn from its upper half so many clients hitting one limit spread out."""
        ceiling = min(self.max_wait, self.min_wait * 2 ** (retry - 1))
        return rng.uniform(ceiling / 2, ceiling)


def retry_reason(err: BaseException | None) -> tuple[str, float | None] | None:
    """(what went wrong, the server's Retry-After in seconds or None) when `err`, or the error
    it wraps (huggingface_hub wraps a failed LFS upload in a RuntimeError), is worth a retry;
    None otherwise (a 4xx other than 429 is the caller's mistake, retrying won't help)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    while err is not None:
        if isinstance(err, HfHubHTTPError) and err.response is not None:
            status = err.response.status_code
            if status not in RETRIED_STATUSES:
                return None
            return f"HTTP {status}", _retry_after(err.response.headers.get("Retry-After"))
        if isinstance(err, httpx2.TransportError):
            return f"connection error ({type(err).__name__})", None
        err = err.__cause__
    return None


def _retry_after(value: str | None) -> float | None:
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:  # an HTTP date: rare on the Hub; fall back to our own backoff
        return None


def with_retries(
    call: Callable[[], T],
    policy: RetryPolicy,
    what: str,
    log: Callable[[str], object] = print,
    sleep: Callable[[float], object] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """`call()`, retried per `policy`; one line through `log` per wait."""
    rng = rng or random.Random()
    retry = 0
    while True:
        try:
            return call()
        except Exception as err:
            reason = retry_reason(err)
            if reason is None:
                raise
            retry += 1
            why, asked = reason
            if retry > policy.max_retries:
                raise GaveUp(
                    f"{what}: still failing after {policy.max_retries} retries ({why}: {err})"
                ) from err
            wait = asked if asked is not None else policy.backoff(retry, rng)
            source = "Retry-After" if asked is not None else "backoff"
            log(
                f"{what}: {why}; waiting {wait:.1f} s ({source}), retry {retry}/{policy.max_retries}"
            )
            sleep(wait)
