"""The tensors of a model, each located and verified only when a process loads it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from swarmllm.blocks.digests import FileHashes, file_digest
from swarmllm.blocks.errors import ModelSourceError
from swarmllm.blocks.manifest import Manifest


class WeightFiles(Mapping[str, Path]):
    """Tensor name -> the local path of the safetensors file holding it.

    Listing names costs nothing; looking one up locates its file (finds it in a directory or
    fetches it from the hub) and checks the file's size and sha256 against the manifest that
    the model id was built from, once per file. A file that does not match is refused with an
    error naming it, so a process never serves weights other than the ones its id promises.
    """

    def __init__(
        self,
        manifest: Manifest,
        model_id: str,
        locate: Callable[[str], Path],
        hashes: FileHashes | None = None,
    ):
        self.manifest, self.model_id = manifest, model_id
        self._locate, self._hashes = locate, hashes
        self._verified: dict[str, Path] = {}
        self._lock = threading.Lock()

    def __getitem__(self, tensor: str) -> Path:
        return self.path_of(self.manifest.weight_map[tensor])

    def __contains__(self, tensor: object) -> bool:
        return tensor in self.manifest.weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self.manifest.weight_map)

    def __len__(self) -> int:
        return len(self.manifest.weight_map)

    def loaded_files(self) -> set[str]:
        """The files this process has located and verified so far."""
        with self._lock:
            return set(self._verified)

    def path_of(self, file: str) -> Path:
        """The verified local path of weight file ``file``."""
        with self._lock:
            if file not in self._verified:
                self._verified[file] = self._verify(file, self._locate(file))
            return self._verified[file]

    def _verify(self, file: str, path: Path) -> Path:
        expected = self.manifest.files[file]
        size = path.stat().st_size
        if size != expected.size:
            raise ModelSourceError(
                f"weight file {file} ({path}) has {size} bytes, but model {self.model_id} was "
                f"built from a file of {expected.size} bytes; refusing to load it. Delete it to "
                "fetch it again, or replace it with the right copy"
            )
        digest = self._hashes.digest(path) if self._hashes else file_digest(path)
        if digest != expected.sha256:
            raise ModelSourceError(
                f"weight file {file} ({path}) has sha256 {digest}, but model {self.model_id} "
                f"was built from {expected.sha256}; refusing to load it. Delete it to fetch it "
                "again, or replace it with the right copy"
            )
        return path
