"""Datasets read through the `datasets` library: by Hub id (config, split, revision) or from a
local folder (`save_to_disk` output, parquet or jsonl files); what they hold (plain text under a
key, or conversations) and their export to the jsonl the preprocessing tools read."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from tools.datasets.readers import PreprocessError

CHAT_KEYS = ("messages", "conversations")
# ShareGPT-style turns ({"from": "human", "value": ...}) in the chat format's roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
LOCAL_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}


def load_hub(repo_id: str, config: str | None, split: str, revision: str | None) -> Any:
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    from megatron.hub.client import check_repo_id

    check_repo_id(repo_id, "--hf-dataset")
    try:
        return datasets.load_dataset(repo_id, config, split=split, revision=revision)
    except DatasetNotFoundError as err:
        raise PreprocessError(f"--hf-dataset {repo_id}: {err}") from None
    except ValueError as err:  # an unknown split or config
        raise PreprocessError(f"--hf-dataset {repo_id}: {err}") from None


def load_local(path: Path, split: str) -> Any:
    import datasets

    if not path.exists():
        raise PreprocessError(f"--local {path}: no such file or folder")
    if path.is_dir() and any((path / n).is_file() for n in ("state.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise PreprocessError(
                    f"--local {path}: no split {split!r} (splits: {', '.join(loaded)}); pass --split"
                )
            return loaded[split]
        return loaded
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS)
        if path.is_dir()
        else [path]
    )
    builders = {LOCAL_BUILDERS.get(p.suffix) for p in files}
    if not files or None in builders or len(builders) != 1:
        raise PreprocessError(
            f"--local {path}: expected a save_to_disk folder, or parquet or jsonl files of one kind"
        )
    return datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train")


def detect(columns: list[str], text_key: str) -> tuple[str, str]:
    """("chat", column) for conversations, else ("text", text_key), checked to exist."""
    for key in CHAT_KEYS:
        if key in columns:
            return "chat", key
    if text_key not in columns:
        raise PreprocessError(
            f"the dataset has no column {text_key!r} (columns: {', '.join(columns)}); name the "
            "text column with --text-key"
        )
    return "text", text_key


def as_messages(turns: list[dict]) -> list[dict]:
    """Turns in the chat format ({"role", "content"}), ShareGPT's {"from", "value"} mapped."""
    if all("role" in t for t in turns):
        return [{"role": t["role"], "content": t["content"]} for t in turns]
    return [
        {"role": SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t["value"]} for t in turns
    ]


def export_jsonl(dataset: Any, kind: str, key: str, path: Path) -> int:
    """Write the documents as jsonl ({"text": ...} or {"messages": [...]}) under a temporary
    name, renamed when complete; the number of records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    count = 0
    try:
        with os.fdopen(fd, "w") as handle:
            for row in dataset:
                value = row[key]
                record = {"text": value} if kind == "text" else {"messages": as_messages(value)}
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
