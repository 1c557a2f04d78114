"""A Hugging Face hub model, fetched piece by piece: metadata first, weights only when loaded.

Resolving a repo asks the hub once for the revision's commit and its file list (with each LFS
file's sha256 and size), fetches the small files (config, tokenizer, generation config,
safetensors index) into the hub cache (``HF_HOME``), and records the weights' manifest under
swarmllm's cache, so that the model id is known before any shard is fetched and stays known
offline. ``HubSnapshot.fetch`` then downloads one shard when a process loads a tensor from it,
through ``huggingface_hub`` (progress bar in bytes, resumed after an interruption, reused from
the cache).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import httpx2  # huggingface_hub's HTTP client: its connection errors reach us unwrapped
import huggingface_hub
from huggingface_hub.errors import EntryNotFoundError

from swarmllm.blocks.digests import write_json_atomic
from swarmllm.blocks.errors import ModelSourceError
from swarmllm.blocks.manifest import FileEntry, Manifest

logger = logging.getLogger(__name__)

# The small files a process needs besides weights: config, generation config, safetensors
# index, tokenizer (tokenizer.json, tokenizer_config.json, *.model, vocab/merges), chat
# template, image processor config.
METADATA_PATTERNS = ("*.json", "tokenizer*", "*.model", "*.txt", "*.jinja")
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# HTTP errors, refused or dropped connections, cache misses
_HUB_ERRORS = (OSError, ValueError, EntryNotFoundError, httpx2.HTTPError)


@dataclass(frozen=True)
class HubSnapshot:
    """One commit of a hub repo: its metadata files are in ``path``, its weights on demand."""

    repo_id: str
    commit: str
    path: Path  # the snapshot folder in the hub cache
    manifest: Manifest
    offline: bool

    def fetch(self, file: str) -> Path:
        """The local copy of ``file`` of this commit, downloaded unless the cache has it."""
        try:
            return _hub_download(self.repo_id, self.commit, file, self.offline)
        except _HUB_ERRORS as exc:
            raise ModelSourceError(
                f"weight file {file} of {self.repo_id}@{self.commit[:12]} is not in the hub "
                f"cache ({cache_dir()}) and cannot be downloaded: {_first_line(exc)}"
            ) from exc


def open_snapshot(repo_id: str, revision: str | None, manifests: Path) -> HubSnapshot:
    """Resolve ``repo_id`` at ``revision`` (default: main) to a commit and fetch its metadata.

    ``manifests`` is where the weights' manifest of every resolved commit is kept, so that an
    offline process can still compute the model id from the cache.
    """
    if is_offline():
        return _cached_snapshot(repo_id, revision, manifests)
    try:
        info = _api().model_info(repo_id, revision=revision, files_metadata=True)
    except _HUB_ERRORS as exc:
        if _is_not_found(exc):
            raise ModelSourceError(
                f"the Hugging Face hub has no model {repo_id!r}"
                + (f" at revision {revision!r}" if revision else "")
                + f": {_first_line(exc)}"
            ) from exc
        logger.warning("the hub cannot be reached (%s); using the cache", _first_line(exc))
        return _cached_snapshot(repo_id, revision, manifests, reason=_first_line(exc))
    commit = str(info.sha)
    siblings = {s.rfilename: s for s in info.siblings or []}
    metadata_files = sorted(name for name in siblings if _is_metadata(name))
    if "config.json" not in metadata_files:
        raise ModelSourceError(f"{repo_id}@{commit[:12]} on the hub has no config.json")
    path = None
    for name in metadata_files:
        path = _download(repo_id, commit, name, offline=False).parent
    assert path is not None
    manifest = _manifest_from_hub(repo_id, commit, path, siblings)
    _save_record(manifests, repo_id, commit, manifest, metadata_files)
    _ref_path(manifests, repo_id, revision).write_text(commit)  # for offline use
    return HubSnapshot(repo_id, commit, path, manifest, offline=False)


# huggingface_hub reads HF_HUB_OFFLINE, HF_ENDPOINT and HF_HOME once, at import; these honour
# them when set later too (a process that configures itself after importing transformers).
def is_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return huggingface_hub.constants.HF_HUB_OFFLINE or flag


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or huggingface_hub.constants.ENDPOINT


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(huggingface_hub.constants.HF_HUB_CACHE)


def _api() -> huggingface_hub.HfApi:
    return huggingface_hub.HfApi(endpoint=endpoint())


def _manifest_from_hub(repo_id: str, commit: str, path: Path, siblings: dict) -> Manifest:
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = read_json_object(path / SAFETENSORS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelSourceError(f"{SAFETENSORS_INDEX} of {repo_id} has no 'weight_map'")
    elif SAFETENSORS_FILE in siblings:
        # one range request for the file's header: which tensors it holds, without its data
        try:
            weight_map = _api().get_safetensors_metadata(repo_id, revision=commit).weight_map
        except _HUB_ERRORS as exc:
            raise ModelSourceError(
                f"cannot read the safetensors header of {repo_id}: {_first_line(exc)}"
            ) from exc
    else:
        found = sorted(n for n in siblings if n.endswith((".safetensors", ".bin")))
        raise ModelSourceError(
            f"{repo_id}@{commit[:12]} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} (found: "
            f"{', '.join(found) or 'no weights'}); swarmllm loads safetensors weights only"
        )
    files = {}
    for name in sorted(set(map(str, weight_map.values()))):
        lfs = getattr(siblings.get(name), "lfs", None)
        if lfs is None:
            raise ModelSourceError(
                f"the hub lists no sha256 for {name} of {repo_id}@{commit[:12]} "
                "(missing, or not stored with LFS), so it cannot be verified"
            )
        files[name] = FileEntry(str(lfs.sha256).lower(), int(lfs.size))
    return Manifest({str(t): str(f) for t, f in weight_map.items()}, files)


def _cached_snapshot(
    repo_id: str, revision: str | None, manifests: Path, reason: str = "offline mode"
) -> HubSnapshot:
    """The commit of ``revision`` already in the hub cache, with the manifest recorded for it."""
    try:
        commit = _ref_path(manifests, repo_id, revision).read_text().strip()
    except OSError:
        commit = revision or "main"  # a commit hash, or a ref the hub cache may know
    config = huggingface_hub.try_to_load_from_cache(
        repo_id, "config.json", cache_dir=cache_dir(), revision=commit
    )
    if not isinstance(config, str):
        raise ModelSourceError(
            f"cannot download {repo_id!r} from the Hugging Face hub ({reason}) and the hub "
            f"cache ({cache_dir()}) does not hold it. Fetch it once "
            "with a connection, or download it elsewhere and pass the local directory with "
            "--model /path/to/dir"
        )
    path = Path(config).parent
    commit = path.name
    record_path = _record_path(manifests, repo_id, commit)
    try:
        record = read_json_object(record_path)
        manifest = Manifest.from_json(record["manifest"], str(record_path))
        metadata_files = [str(name) for name in record["metadata_files"]]
    except (ModelSourceError, KeyError, TypeError) as exc:
        raise ModelSourceError(
            f"{repo_id}@{commit[:12]} is in the hub cache but its weights' manifest "
            f"{record_path} is not ({exc}); resolve the model once with a connection"
        ) from exc
    for name in metadata_files:
        if not (path / name).is_file():
            raise ModelSourceError(
                f"{name} of {repo_id}@{commit[:12]} is not in the hub cache ({path}) and the "
                f"hub cannot be reached ({reason})"
            )
    return HubSnapshot(repo_id, commit, path, manifest, offline=True)


def _hub_download(repo_id: str, commit: str, name: str, offline: bool) -> Path:
    """``hf_hub_download``: reuses the cache, resumes partial files, shows a bytes bar."""
    return Path(
        huggingface_hub.hf_hub_download(
            repo_id,
            name,
            revision=commit,
            cache_dir=cache_dir(),
            endpoint=endpoint(),
            local_files_only=offline,
        )
    )


def _download(repo_id: str, commit: str, name: str, offline: bool) -> Path:
    try:
        return _hub_download(repo_id, commit, name, offline)
    except _HUB_ERRORS as exc:
        raise ModelSourceError(
            f"cannot fetch {name} of {repo_id}@{commit[:12]}: {_first_line(exc)}"
        ) from exc


def _save_record(
    manifests: Path, repo_id: str, commit: str, manifest: Manifest, metadata_files: list[str]
) -> None:
    record = {"manifest": manifest.to_json(), "metadata_files": metadata_files}
    write_json_atomic(_record_path(manifests, repo_id, commit), record)
    _ref_path(manifests, repo_id, None).parent.mkdir(parents=True, exist_ok=True)


def _record_path(manifests: Path, repo_id: str, commit: str) -> Path:
    return manifests / repo_id.replace("/", "--") / f"{commit}.json"


def _ref_path(manifests: Path, repo_id: str, revision: str | None) -> Path:
    """Where the commit that ``revision`` last resolved to is kept."""
    name = (revision or "main").replace("/", "--")
    return manifests / repo_id.replace("/", "--") / "refs" / name


def _is_metadata(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, p) for p in METADATA_PATTERNS)


def _is_not_found(exc: BaseException) -> bool:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status in (401, 404)


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object; ModelSourceError names the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path} does not hold a JSON object")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
