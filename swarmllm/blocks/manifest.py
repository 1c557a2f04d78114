"""The manifest of a model's weights, and the model id computed from it.

A manifest lists, for every safetensors file of a checkpoint, its sha256 and size, and which
file holds each tensor. With the config it is all a process needs to compute the model id,
so a peer that holds (or fetches) only the shards of its span computes the same id as one
that holds every file: the hub publishes each LFS file's sha256, a local directory hashes
its files, and a directory holding only some shards carries the manifest written where
every file was (``swarmllm manifest``). Every file a process loads is then checked against
the manifest's digest (``WeightFiles``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from swarmllm.blocks.errors import ModelSourceError

MANIFEST_FILE = "swarmllm-manifest.json"
MANIFEST_FORMAT = 1
ID_HASH_CHARS = 20  # 80 bits: forging another set of weights with the same id is out of reach


class ManifestError(ModelSourceError):
    """A manifest that cannot be read or does not fit the files it describes."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """Which file holds each tensor, and each file's sha256 and size."""

    weight_map: dict[str, str]  # tensor name -> file name
    files: dict[str, FileEntry]  # file name -> its digest and size

    def __post_init__(self) -> None:
        unlisted = sorted(set(self.weight_map.values()) - set(self.files))
        if unlisted:
            raise ManifestError(f"the weight map names {unlisted[0]}, which has no sha256")

    def model_id(self, model_type: str, config_sha256: str) -> str:
        """``{model_type}-{hash}``: binds the config, the tensor layout and every file's
        content, and nothing about where the files are."""
        combined = hashlib.sha256(f"swarmllm-model-id/{MANIFEST_FORMAT}\n".encode())
        combined.update(f"config.json\0{config_sha256}\n".encode())
        for name in sorted(self.files):
            entry = self.files[name]
            combined.update(f"file\0{name}\0{entry.sha256}\0{entry.size}\n".encode())
        for tensor in sorted(self.weight_map):
            combined.update(f"tensor\0{tensor}\0{self.weight_map[tensor]}\n".encode())
        return f"{model_type}-{combined.hexdigest()[:ID_HASH_CHARS]}"

    def shard_bytes(self, files: set[str] | None = None) -> int:
        return sum(e.size for name, e in self.files.items() if files is None or name in files)

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "files": {name: vars(entry) for name, entry in sorted(self.files.items())},
            "weight_map": dict(sorted(self.weight_map.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping, origin: str) -> Manifest:
        try:
            if data.get("format") != MANIFEST_FORMAT:
                raise ManifestError(f"format {data.get('format')!r}, expected {MANIFEST_FORMAT}")
            files = {
                str(name): FileEntry(str(entry["sha256"]).lower(), int(entry["size"]))
                for name, entry in data["files"].items()
            }
            weight_map = {str(tensor): str(file) for tensor, file in data["weight_map"].items()}
            return cls(weight_map, files)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{origin} is not a valid swarmllm manifest: {exc}") from exc


def read_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path} is not a valid swarmllm manifest: not a JSON object")
    return Manifest.from_json(data, str(path))


def write_manifest(manifest: Manifest, path: Path) -> None:
    path.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
