"""Publishing one revision: the files already on the branch with the same size and hash are
left alone, the rest go up in one commit (files the branch has and the revision lacks are
deleted, so the branch holds exactly the revision). Each attempt starts by comparing with the
branch, so an interrupted upload continues where it stopped: LFS objects the Hub already stores
are not sent again."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from megatron.hub.retry import RetryPolicy, with_retries
from megatron.hub.revisions import LocalFile, human_size

KEPT = frozenset({".gitattributes"})  # the Hub's own file on every branch


class _CountingReader(io.BufferedReader):
    """A file whose reads advance a progress bar once `bar` is set (hashing it first, as
    huggingface_hub does when the operation is built, is not progress)."""

    bar: tqdm | None = None

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.bar is not None:
            self.bar.update(len(data))
        return data


@dataclass
class Plan:
    add: list[LocalFile]
    delete: list[str]
    branch_exists: bool

    @property
    def empty(self) -> bool:
        return not self.add and not self.delete


class RevisionUploader:
    def __init__(
        self,
        api,
        repo_id: str,
        policy: RetryPolicy,
        log: Callable[[str], object] = print,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self.api, self.repo_id, self.policy, self.log, self.sleep = api, repo_id, policy, log, sleep
        self.sent = 0  # bytes read to be sent, over every attempt (failed ones too)

    def create_repo(self, private: bool) -> None:
        with_retries(
            lambda: self.api.create_repo(self.repo_id, private=private, exist_ok=True),
            self.policy,
            f"create {self.repo_id}",
            self.log,
            self.sleep,
        )

    def upload(self, branch: str, files: list[LocalFile], message: str) -> bool:
        """Make `branch` hold exactly `files`; whether that took a commit."""
        return with_retries(
            lambda: self._attempt(branch, files, message),
            self.policy,
            f"{self.repo_id}@{branch}",
            self.log,
            self.sleep,
        )

    def plan(self, branch: str, files: list[LocalFile]) -> Plan:
        from huggingface_hub.errors import RevisionNotFoundError
        from huggingface_hub.hf_api import RepoFile

        try:
            tree = self.api.list_repo_tree(self.repo_id, revision=branch, recursive=True)
            remote = {entry.path: entry for entry in tree if isinstance(entry, RepoFile)}
        except RevisionNotFoundError:
            return Plan(list(files), [], branch_exists=False)
        wanted = {f.repo_path for f in files}
        add = [f for f in files if f.repo_path not in remote or _differs(f, remote[f.repo_path])]
        delete = sorted(path for path in remote if path not in wanted and path not in KEPT)
        return Plan(add, delete, branch_exists=True)

    def _attempt(self, branch: str, files: list[LocalFile], message: str) -> bool:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        plan = self.plan(branch, files)
        if plan.empty:
            self.log(f"{branch}: complete on the Hub ({len(files)} files), skipped")
            return False
        if not plan.branch_exists:
            self.api.create_branch(self.repo_id, branch=branch, exist_ok=True)
        readers = [_open(f) for f in plan.add]
        try:
            operations = [CommitOperationAdd(f.repo_path, r) for f, r in zip(plan.add, readers)]
            operations += [CommitOperationDelete(path) for path in plan.delete]
            size = sum(f.size for f in plan.add)
            self.log(
                f"{branch}: {len(plan.add)} of {len(files)} files to commit ({human_size(size)})"
                + (f", {len(plan.delete)} to delete" if plan.delete else "")
            )
            with tqdm(total=size, unit="B", unit_scale=True, desc=branch, leave=False) as bar:
                for reader in readers:
                    if isinstance(reader, _CountingReader):
                        reader.bar = bar
                    else:
                        bar.update(len(reader))
                try:
                    self.api.create_commit(
                        self.repo_id, operations, commit_message=message, revision=branch
                    )
                finally:  # LFS objects the Hub already had were not read, so not counted
                    self.sent += bar.n
            self.log(f"{branch}: committed, {human_size(bar.n)} sent")
        finally:
            for reader in readers:
                if isinstance(reader, _CountingReader):
                    reader.close()
        return True


def _differs(local: LocalFile, remote) -> bool:
    if remote.size != local.size:
        return True
    if remote.lfs is not None:
        return remote.lfs.sha256 != local.sha256
    return remote.blob_id != local.git_sha1()


def _open(local: LocalFile) -> _CountingReader | bytes:
    if isinstance(local.source, bytes):
        return local.source
    return _CountingReader(io.FileIO(local.source, "rb"))
