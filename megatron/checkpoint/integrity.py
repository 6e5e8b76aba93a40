"""The sha256 of every checkpoint file, recorded in metadata.json when the checkpoint is
published and checked before it is loaded (each file by one rank)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 16 * 2**20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_problems(folder: Path, metadata: dict, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with the files this rank checks (file i of the sorted list when
    i % world == rank): missing, or not the bytes that were written. Checkpoints written before
    digests were recorded have nothing to check."""
    recorded = metadata.get("sha256") or {}
    problems = []
    for index, name in enumerate(sorted(recorded)):
        if index % world != rank:
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif file_sha256(path) != recorded[name]:
            problems.append(
                f"{path} does not have the sha256 metadata.json records (changed or damaged "
                "since it was written)"
            )
    return problems
