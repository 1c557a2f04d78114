"""Content digests: sha256 of files (the digest the hub publishes for every LFS file), the
canonical digest of a config, and a memo so unchanged files are hashed once."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout


class LockTimeoutError(RuntimeError):
    """Another process held a lock for longer than the wait allows."""


def file_digest(path: Path) -> str:
    """The sha256 of a file's content, hex: what the hub lists as an LFS file's ``sha256``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def config_digest(config: dict) -> str:
    """sha256 of a config.json's content in canonical form.

    ``transformers_version`` is left out so that peers running different transformers
    releases still agree on the id of the same weights.
    """
    config = {key: value for key, value in config.items() if key != "transformers_version"}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


class FileHashes:
    """A JSON memo of file digests keyed by (path, size, mtime_ns), shared by processes."""

    def __init__(self, memo_path: Path):
        self.memo_path = memo_path

    def digest(self, path: Path) -> str:
        path = path.resolve()
        stat = path.stat()
        key = [stat.st_size, stat.st_mtime_ns]
        entry = self._load().get(str(path))
        if isinstance(entry, list) and len(entry) == 3 and entry[:2] == key:
            return str(entry[2])
        value = file_digest(path)
        self.remember(path, value)
        return value

    def remember(self, path: Path, value: str) -> None:
        """Record ``value`` as the digest of ``path`` as it is now."""
        path = path.resolve()
        stat = path.stat()
        with locked(self.memo_path.with_name(self.memo_path.name + ".lock"), timeout=60):
            memo = {p: entry for p, entry in self._load().items() if _unchanged(p, entry)}
            memo[str(path)] = [stat.st_size, stat.st_mtime_ns, value]
            write_json_atomic(self.memo_path, {"files": memo})

    def _load(self) -> dict[str, list]:
        try:
            files = json.loads(self.memo_path.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            return {}  # a missing or damaged memo only costs re-hashing
        return files if isinstance(files, dict) else {}


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temporary, path)


@contextmanager
def locked(lock_path: Path, timeout: float) -> Iterator[None]:
    """An flock on ``lock_path``: released by the OS even if its holder dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout as exc:
        raise LockTimeoutError(
            f"waited {timeout:.0f} s for {lock_path}, held by another swarmllm process; "
            "stop that process or retry"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _unchanged(path: str, entry: object) -> bool:
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return isinstance(entry, list) and entry[:2] == [stat.st_size, stat.st_mtime_ns]
