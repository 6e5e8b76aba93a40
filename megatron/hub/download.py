"""Models from the Hub through huggingface_hub's cache: a snapshot folder and the commit it is.
With HF_HUB_OFFLINE=1 (or no network) a revision already in the cache is used as is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from megatron.hub.client import HubError, check_repo_id

# What a conversion reads: configs, tokenizer files and the weights (safetensors first; PyTorch
# .bin only for repos without them). A Strata upload's own checkpoint (strata/) is not needed.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
BIN_PATTERNS = ["*.bin", "*.bin.index.json"]
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "*.jinja", "vocab*", "merges.txt"]
SKIPPED = ["strata/*"]


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    revision: str
    commit: str
    folder: Path

    def as_metadata(self) -> dict[str, str]:
        return {"hf_model": self.repo_id, "revision": self.revision, "commit": self.commit}


def download_model(
    repo_id: str, revision: str | None = None, option: str = "--hf-model"
) -> Snapshot:
    """The files of `repo_id` at `revision` (default main) a conversion needs."""
    folder = _snapshot(repo_id, revision, MODEL_PATTERNS, option)
    if not any(folder.glob("*.safetensors")):
        folder = _snapshot(repo_id, revision, BIN_PATTERNS, option)
    return Snapshot(repo_id, revision or "main", folder.name, folder)


def download_tokenizer(
    repo_id: str, revision: str | None = None, option: str = "--tokenizer-path"
) -> Path:
    """A tokenizer's files (tokenizer.json, its config and chat template) of a Hub repo."""
    return _snapshot(repo_id, revision, TOKENIZER_PATTERNS, option)


def _snapshot(repo_id: str, revision: str | None, patterns: list[str], option: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    check_repo_id(repo_id, option)
    where = f"{option} {repo_id}" + (f" --revision {revision}" if revision else "")
    try:
        path = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=SKIPPED
        )
    except RevisionNotFoundError:
        raise HubError(f"{where}: the repo has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{where}: no such repo on the Hub (or it is private and no token was given)"
        ) from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{where}: not in the huggingface_hub cache and the Hub cannot be reached (run once "
            "online, or point HF_ENDPOINT at a reachable Hub)"
        ) from None
    except HfHubHTTPError as err:
        raise HubError(f"{where}: {err}") from None
    return Path(path)
