"""A local stand-in for the Hugging Face Hub: the part of its HTTP API `huggingface_hub` uses to
create repos, upload files (preupload, LFS batch + PUT, NDJSON commits), manage branches, list
trees and refs, and download (HEAD/GET resolve). Repos live in memory. Faults can be injected:
HTTP errors (429 with or without Retry-After, 5xx) and connections dropped mid-request.

    with HubServer() as hub:         # hub.endpoint -> HF_ENDPOINT
        hub.inject("POST", "/commit/", status=429, retry_after=0, times=2)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".parquet", ".arrow")
LFS_MIN_SIZE = 10 * 2**20
_API = re.compile(
    r"^/api/(models|datasets)/([^/]+/[^/]+?)(?:/(preupload|commit|branch|refs|tree|revision)(?:/(.*))?)?$"
)
_BATCH = re.compile(r"^/(?:(datasets)/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_RESOLVE = re.compile(r"^/(?:(datasets)/)?([^/]+/[^/]+?)/resolve/([^/]+)/(.+)$")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class Entry:
    size: int
    data: bytes | None = None  # a regular file's content
    lfs: str | None = None  # an LFS file's sha256

    @property
    def blob_id(self) -> str:
        return git_sha1(self.data if self.lfs is None else lfs_pointer(self.lfs, self.size))


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, Entry]] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


@dataclass
class Fault:
    method: str
    pattern: str  # a regular expression searched in the path
    status: int | None  # None: drop the connection after reading half the body
    retry_after: float | None
    times: int


class HubServer:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int | None]] = []  # (method, path, status)
        self.authorizations: set[str] = set()
        self.lock = threading.Lock()
        self._counter = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.hub = self
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(
        self,
        method: str,
        pattern: str,
        status: int | None = None,
        retry_after: float | None = None,
        times: int = 1,
    ) -> None:
        with self.lock:
            self.faults.append(Fault(method, pattern, status, retry_after, times))

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and re.search(fault.pattern, path):
                    fault.times -= 1
                    return fault
        return None

    def files(self, repo_id: str, revision: str, kind: str = "models") -> dict[str, bytes]:
        """Every file of a revision with its content (for the tests' checks)."""
        repo = self.repos[(kind, repo_id)]
        tree = repo.commits[repo.resolve(revision)]
        return {p: e.data if e.lfs is None else repo.lfs[e.lfs] for p, e in tree.items()}

    def new_commit(self, repo: Repo, tree: dict[str, Entry]) -> str:
        self._counter += 1
        commit = hashlib.sha1(f"{self._counter}:{sorted(tree)}".encode()).hexdigest()
        repo.commits[commit] = tree
        return commit


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra) -> None:
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the tests read hub.requests instead
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ------------------------------------------------------------------ plumbing

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        if self.headers.get("Authorization"):
            self.hub.authorizations.add(self.headers["Authorization"])
        fault = self.hub.take_fault(method, path)
        if fault is not None and fault.status is None:
            self._read_body(half=True)
            self.hub.requests.append((method, path, None))
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        body = self._read_body()
        if fault is not None:
            headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
            self._send_json(fault.status, {"error": "injected"}, headers, method, path)
            return
        try:
            status, payload, headers = self._route(method, path, query, body)
        except _HTTPError as err:
            headers = {"X-Error-Code": err.code} if err.code else {}
            self._send_json(err.status, {"error": str(err), **err.extra}, headers, method, path)
            return
        if isinstance(payload, bytes):
            self._send(status, payload, headers, method, path)
        else:
            self._send_json(status, payload, headers, method, path)

    def _read_body(self, half: bool = False) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if half:
                    break
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length // 2 if half else length)

    def _send_json(self, status: int, payload, headers: dict, method: str, path: str) -> None:
        data = json.dumps(payload).encode()
        self._send(status, data, {"Content-Type": "application/json", **headers}, method, path)

    def _send(self, status: int, data: bytes, headers: dict, method: str, path: str) -> None:
        self.hub.requests.append((method, path, status))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    # ------------------------------------------------------------------ the API

    def _route(self, method: str, path: str, query: dict, body: bytes):
        hub = self.hub
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if method == "PUT" and path.startswith("/_lfs/"):
            kind, repo_id, oid = path.removeprefix("/_lfs/").split(":")
            if hashlib.sha256(body).hexdigest() != oid:
                raise _HTTPError(400, f"content does not match oid {oid}")
            with hub.lock:
                self._repo(kind, repo_id).lfs[oid] = body
            return 200, {}, {}
        if match := _BATCH.match(path):
            kind = "datasets" if match.group(1) else "models"
            return self._lfs_batch(kind, match.group(2), json.loads(body))
        if match := _RESOLVE.match(path):
            kind = "datasets" if match.group(1) else "models"
            return self._resolve(kind, *match.group(2, 3, 4))
        match = _API.match(path)
        if not match:
            raise _HTTPError(404, f"no route for {method} {path}")
        kind, repo_id, action, rest = match.groups()
        with hub.lock:
            repo = self._repo(kind, repo_id)
            if action in (None, "revision") and method == "GET":
                return self._info(repo_id, repo, rest or "main")
            if action == "refs":
                branches = [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                    for n, c in repo.branches.items()
                ]
                return 200, {"branches": branches, "tags": [], "converts": []}, {}
            if action == "tree":
                revision, _, prefix = (rest or "main").partition("/")
                recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
                return 200, self._tree(repo, revision, prefix, recursive), {}
            if action == "branch" and method == "POST":
                if rest in repo.branches:
                    raise _HTTPError(409, f"branch {rest} already exists")
                start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
                repo.branches[rest] = self._commit_of(repo, start)
                return 200, {}, {}
            if action == "branch" and method == "DELETE":
                repo.branches.pop(rest, None)
                return 200, {}, {}
            if action == "preupload":
                return 200, self._preupload(repo, rest, json.loads(body)), {}
            if action == "commit":
                return 200, self._commit(kind, repo_id, repo, rest, body), {}
        raise _HTTPError(405, f"{method} not supported on {path}")

    def _repo(self, kind: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((kind, repo_id))
        if repo is None:
            raise _HTTPError(404, f"repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit_of(self, repo: Repo, revision: str) -> str:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HTTPError(404, f"invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _create_repo(self, payload: dict):
        kind = f"{payload.get('type') or 'model'}s"
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.hub.endpoint}/{'datasets/' if kind == 'datasets' else ''}{repo_id}"
        with self.hub.lock:
            if (kind, repo_id) in self.hub.repos:
                raise _HTTPError(409, "You already created this repo", url=url)
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            repo = Repo(private=private)
            attributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            tree = {".gitattributes": Entry(len(attributes), data=attributes)}
            repo.branches["main"] = self.hub.new_commit(repo, tree)
            self.hub.repos[(kind, repo_id)] = repo
        return 200, {"url": url}, {}

    def _info(self, repo_id: str, repo: Repo, revision: str):
        commit = self._commit_of(repo, revision)
        siblings = [{"rfilename": path} for path in sorted(repo.commits[commit])]
        return (
            200,
            {"id": repo_id, "sha": commit, "private": repo.private, "siblings": siblings},
            {},
        )

    def _tree(self, repo: Repo, revision: str, prefix: str, recursive: bool) -> list[dict]:
        tree = repo.commits[self._commit_of(repo, revision)]
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        folders, entries = set(), []
        for path, entry in sorted(tree.items()):
            if not path.startswith(base):
                continue
            parts = path.split("/")
            depth = len(base.split("/")) - 1 if base else 0
            folders.update("/".join(parts[: i + 1]) for i in range(depth, len(parts) - 1))
            if not recursive and len(parts) > depth + 1:
                continue
            item = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
            if entry.lfs:
                pointer = lfs_pointer(entry.lfs, entry.size)
                item["lfs"] = {"oid": entry.lfs, "size": entry.size, "pointerSize": len(pointer)}
            entries.append(item)
        if not recursive:
            folders = {f for f in folders if f.count("/") == base.count("/")}
        directories = [
            {"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in sorted(folders)
        ]
        return directories + entries

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> dict:
        tree = repo.commits[self._commit_of(repo, revision)]
        files = []
        for item in payload["files"]:
            path, size = item["path"], item["size"]
            lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE
            existing = tree.get(path)
            oid = None
            if existing is not None:
                oid = existing.lfs or git_sha1(existing.data)
            files.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return {"files": files}

    def _lfs_batch(self, kind: str, repo_id: str, payload: dict):
        objects = []
        with self.hub.lock:
            repo = self._repo(kind, repo_id)
            for obj in payload["objects"]:
                answer = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in repo.lfs:
                    href = f"{self.hub.endpoint}/_lfs/{kind}:{repo_id}:{obj['oid']}"
                    answer["actions"] = {"upload": {"href": href}}
                objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _commit(self, kind: str, repo_id: str, repo: Repo, revision: str, body: bytes) -> dict:
        if revision not in repo.branches:
            raise _HTTPError(404, f"invalid rev id: {revision}", "RevisionNotFound")
        tree = dict(repo.commits[repo.branches[revision]])
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                tree[value["path"]] = Entry(len(data), data=data)
            elif key == "lfsFile":
                if value["oid"] not in repo.lfs:
                    raise _HTTPError(422, f"LFS object {value['oid']} was never uploaded")
                tree[value["path"]] = Entry(len(repo.lfs[value["oid"]]), lfs=value["oid"])
            elif key == "deletedFile":
                tree.pop(value["path"], None)
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                tree = {p: e for p, e in tree.items() if not p.startswith(folder)}
        commit = self.hub.new_commit(repo, tree)
        repo.branches[revision] = commit
        prefix = "datasets/" if kind == "datasets" else ""
        url = f"{self.hub.endpoint}/{prefix}{repo_id}/commit/{commit}"
        return {"commitUrl": url, "commitOid": commit, "success": True}

    def _resolve(self, kind: str, repo_id: str, revision: str, path: str):
        with self.hub.lock:
            repo = self._repo(kind, repo_id)
            commit = self._commit_of(repo, revision)
            entry = repo.commits[commit].get(path)
            if entry is None:
                raise _HTTPError(404, f"{path} not found at {revision}", "EntryNotFound")
            data = entry.data if entry.lfs is None else repo.lfs[entry.lfs]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{entry.lfs or entry.blob_id}"'}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.lfs}"', "X-Linked-Size": str(entry.size)})
        headers["Content-Length"] = str(len(data))
        return 200, data, headers
