"""A run's checkpoints as Hub revisions: which steps, and the files each revision holds.

In the repo, format "hf" puts the `transformers` folder convert_neox_to_hf.py writes at the
root (so `from_pretrained(repo, revision=...)` works); format "strata" puts the checkpoint under
`strata/global_stepN/` with `strata/latest` beside it, so a downloaded snapshot's `strata/`
folder is a `load` directory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from megatron.checkpoint.format import METADATA_FILE, read_metadata, tag_for
from megatron.checkpoint.integrity import CHUNK, file_sha256
from megatron.hub.client import HubError

FORMATS = ("hf", "strata", "both")
STRATA_PREFIX = "strata"
_STEP = re.compile(r"global_step(\d+)")


@dataclass
class LocalFile:
    """A file of a revision: on disk (`source` a path) or made here (`source` bytes)."""

    repo_path: str
    source: Path | bytes
    size: int
    sha256: str

    @classmethod
    def from_path(cls, repo_path: str, path: Path, sha256: str | None = None) -> LocalFile:
        return cls(repo_path, path, path.stat().st_size, sha256 or file_sha256(path))

    @classmethod
    def from_bytes(cls, repo_path: str, data: bytes) -> LocalFile:
        return cls(repo_path, data, len(data), hashlib.sha256(data).hexdigest())

    def git_sha1(self) -> str:
        """The git blob id: what the Hub reports for a file not stored with LFS."""
        digest = hashlib.sha1(f"blob {self.size}\0".encode())
        if isinstance(self.source, bytes):
            digest.update(self.source)
        else:
            with open(self.source, "rb") as handle:
                while chunk := handle.read(CHUNK):
                    digest.update(chunk)
        return digest.hexdigest()


def find_checkpoints(run: Path) -> dict[int, Path]:
    """The complete checkpoints (global_stepN with metadata.json) of a save directory."""
    if not run.is_dir():
        raise HubError(f"--run {run}: not a directory")
    found = {
        int(m.group(1)): path
        for path in run.iterdir()
        if (m := _STEP.fullmatch(path.name)) and (path / METADATA_FILE).is_file()
    }
    if not found:
        raise HubError(
            f"--run {run}: no checkpoints (expected global_stepN folders with {METADATA_FILE}, "
            "as a run's `save` directory holds)"
        )
    return dict(sorted(found.items()))


def select_steps(available: dict[int, Path], spec: str) -> list[int]:
    """`all`, `latest` or a comma-separated list of steps, each one that exists."""
    if spec == "all":
        return list(available)
    if spec == "latest":
        return [max(available)]
    try:
        wanted = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise HubError(
            f"--steps {spec!r}: expected all, latest or steps such as 1000,2000"
        ) from None
    missing = [step for step in wanted if step not in available]
    if missing or not wanted:
        raise HubError(
            f"--steps {spec!r}: no checkpoint for step(s) {', '.join(map(str, missing)) or spec} "
            f"(the run has {', '.join(map(str, available))})"
        )
    return wanted


def strata_files(folder: Path) -> list[LocalFile]:
    """The checkpoint folder under strata/global_stepN/, with strata/latest naming it. The
    digests recorded at save time are reused for the comparison with the Hub (hashing a large
    checkpoint again costs minutes)."""
    recorded = read_metadata(folder).get("sha256", {})
    prefix = f"{STRATA_PREFIX}/{folder.name}"
    files = [
        LocalFile.from_path(
            f"{prefix}/{path.relative_to(folder).as_posix()}",
            path,
            recorded.get(path.relative_to(folder).as_posix()),
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    return [*files, LocalFile.from_bytes(f"{STRATA_PREFIX}/latest", folder.name.encode())]


# (run, config files, output folder, step) -> the folder written (tools/ckpts/convert_neox_to_hf)
Converter = Callable[[Path, list[Path], Path, int], Path]


def hf_files(run: Path, step: int, staging: Path, convert: Converter) -> list[LocalFile]:
    """The `transformers` folder of checkpoint `step`, converted into `staging` with the config
    files the run saved in the checkpoint."""
    configs = sorted((run / tag_for(step) / "configs").glob("*"))
    if not configs:
        raise HubError(
            f"{run / tag_for(step)}: no configs/ folder, so the model cannot be converted for "
            "--format hf (use --format strata)"
        )
    out = convert(run, configs, staging / tag_for(step), step)
    return [
        LocalFile.from_path(path.relative_to(out).as_posix(), path)
        for path in sorted(out.rglob("*"))
        if path.is_file()
    ]


def revision_files(
    run: Path, step: int, fmt: str, staging: Path, convert: Converter
) -> list[LocalFile]:
    files = []
    if fmt in ("hf", "both"):
        files += hf_files(run, step, staging, convert)
    if fmt in ("strata", "both"):
        files += strata_files(run / tag_for(step))
    return files


def total_size(files: list[LocalFile]) -> int:
    return sum(f.size for f in files)


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
