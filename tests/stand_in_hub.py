"""A stand-in Hugging Face hub on loopback that the real ``huggingface_hub`` client talks to.

It answers the routes that client was seen to use (``ARCHITECTURE.md``): the revision API
(``sha`` and ``siblings``, LFS files with ``lfs.sha256`` and ``size``), the tree API, and
``HEAD``/``GET`` of ``/{repo}/resolve/{rev}/{file}`` with the ``X-Repo-Commit``, ``ETag``,
``X-Linked-Etag`` and ``X-Linked-Size`` headers and ``Range`` requests. Every process under
test gets its own endpoint, ``/as/{label}``, so the request log tells which process fetched
which files and how many bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class Request:
    label: str  # which process asked (its endpoint's /as/{label})
    method: str
    path: str  # without the label prefix
    file: str | None  # for /resolve/ requests: the file asked for
    range: str | None
    status: int
    body_bytes: int  # bytes of file content sent


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES)

    def sibling(self, name: str) -> dict:
        content = self.files[name]
        entry = {"rfilename": name, "size": len(content), "blobId": _git_blob_id(content)}
        if self.is_lfs(name):
            entry["lfs"] = {
                "sha256": hashlib.sha256(content).hexdigest(),
                "size": len(content),
                "pointerSize": 134,
            }
        return entry

    def etag(self, name: str) -> str:
        content = self.files[name]
        return hashlib.sha256(content).hexdigest() if self.is_lfs(name) else _git_blob_id(content)


@dataclass
class StandInHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    # file -> bytes: the next full GET of that file drops the connection after so many bytes
    cut_once: dict[str, int] = field(default_factory=dict)

    def add_repo(self, repo_id: str, directory: Path) -> str:
        """Publish every file of ``directory`` as ``repo_id`` at a new commit; returns it."""
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        listing = hashlib.sha1()
        for name, content in files.items():
            listing.update(f"{name}\0{_git_blob_id(content)}\n".encode())
        self.repos[repo_id] = Repo(listing.hexdigest(), files)
        return self.repos[repo_id].commit

    def start(self) -> StandInHub:
        hub = self

        class Handler(_Handler):
            stand_in = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def endpoint(self, label: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/as/{label}"

    def fetched(self, label: str) -> dict[str, int]:
        """File -> bytes of content that process ``label`` downloaded (GETs of /resolve/)."""
        totals: dict[str, int] = {}
        for request in self.log:
            if request.label == label and request.method == "GET" and request.file:
                totals[request.file] = totals.get(request.file, 0) + request.body_bytes
        return totals


class _Handler(BaseHTTPRequestHandler):
    stand_in: StandInHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # the request log replaces stderr lines
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        match = re.fullmatch(r"/as/([^/]+)(/.*)", unquote(urlsplit(self.path).path))
        if not match:
            return self._send(400, b"no /as/{label} prefix", "x", body, None, None)
        label, path = match.groups()
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(/.*)?)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if api:
            repo = self._repo(api.group(1), api.group(3) or "main")
            if repo is None:
                return self._send(404, b"", label, body, path, None, error="RepoNotFound")
            if api.group(2) != "tree":
                info = {
                    "id": api.group(1),
                    "modelId": api.group(1),
                    "sha": repo.commit,
                    "private": False,
                    "siblings": [repo.sibling(name) for name in repo.files],
                }
            else:
                info = [_tree_entry(repo, name) for name in repo.files]
            return self._send(200, json.dumps(info).encode(), label, body, path, None, json_=True)
        if resolve:
            repo = self._repo(resolve.group(1), resolve.group(2))
            if repo is None:
                return self._send(404, b"", label, body, path, None, error="RepoNotFound")
            name = resolve.group(3)
            if name not in repo.files:
                return self._send(
                    404, b"", label, body, path, name, error="EntryNotFound", repo=repo
                )
            return self._send_file(repo, name, label, body, path)
        return self._send(404, b"", label, body, path, None)

    def _repo(self, repo_id: str, revision: str) -> Repo | None:
        repo = self.stand_in.repos.get(repo_id)
        if repo is None or revision not in ("main", repo.commit):
            return None
        return repo

    def _send_file(self, repo: Repo, name: str, label: str, body: bool, path: str) -> None:
        content = repo.files[name]
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(name)}"'}
        headers["Accept-Ranges"] = "bytes"
        if repo.is_lfs(name):
            headers["X-Linked-Etag"] = f'"{repo.etag(name)}"'
            headers["X-Linked-Size"] = str(len(content))
        status, part = 200, content
        wanted = self.headers.get("Range")
        if body and not wanted and name in self.stand_in.cut_once:
            return self._send_cut(content, self.stand_in.cut_once.pop(name), headers, label, path)
        match = _RANGE.fullmatch(wanted.strip()) if wanted else None
        if match and body:
            first, last = match.groups()
            if first:
                start, end = (
                    int(first),
                    min(int(last) if last else len(content) - 1, len(content) - 1),
                )
            else:  # a suffix: the last N bytes
                start, end = max(len(content) - int(last), 0), len(content) - 1
            if start >= len(content):
                headers["Content-Range"] = f"bytes */{len(content)}"
                return self._send(416, b"", label, body, path, name, headers=headers, range_=wanted)
            status, part = 206, content[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        self._send(status, part, label, body, path, name, headers=headers, range_=wanted)

    def _send_cut(
        self, content: bytes, cut: int, headers: dict[str, str], label: str, path: str
    ) -> None:
        """Promise the whole file, send ``cut`` bytes of it, then drop the connection."""
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content[:cut])
        self.wfile.flush()
        self.close_connection = True
        file = path.rsplit("/", 1)[-1]
        self.stand_in.log.append(Request(label, "GET", path, file, None, 200, cut))

    def _send(
        self,
        status: int,
        payload: bytes,
        label: str,
        body: bool,
        path: str | None,
        file: str | None,
        *,
        headers: dict[str, str] | None = None,
        error: str | None = None,
        repo: Repo | None = None,
        json_: bool = False,
        range_: str | None = None,
    ) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if error:
            self.send_header("X-Error-Code", error)
        if repo is not None and "X-Repo-Commit" not in (headers or {}):
            self.send_header("X-Repo-Commit", repo.commit)
        self.send_header(
            "Content-Type", "application/json" if json_ else "application/octet-stream"
        )
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        sent = 0
        if body:
            self.wfile.write(payload)
            sent = len(payload) if file else 0
        self.stand_in.log.append(
            Request(label, self.command, path or self.path, file, range_, status, sent)
        )


def _tree_entry(repo: Repo, name: str) -> dict:
    entry = {"type": "file", "path": name, "size": len(repo.files[name])}
    entry["oid"] = _git_blob_id(repo.files[name])
    if repo.is_lfs(name):
        lfs = repo.sibling(name)["lfs"]
        entry["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": 134}
    return entry


def _git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
