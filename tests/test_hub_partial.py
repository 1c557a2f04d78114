"""Holding only what you serve: peers and a client fetch from a stand-in hub only the shards
they run, agree on one model id, verify every file they load, and reproduce transformers.

Every process (the test process acting as client, each peer) has its own ``HF_HOME``,
swarmllm cache and hub endpoint (``/as/{label}``), so the hub's request log tells who
fetched what.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
import torch
from cli_runner import run_cli
from safetensors.torch import load_file
from sharded_model import EMBEDDINGS, HEAD, SHARDS, save_sharded_llama, span_shards, write_shards
from stand_in_hub import StandInHub
from transformers import AutoModelForCausalLM

from swarmllm.blocks.head import ModelHead
from swarmllm.blocks.manifest import MANIFEST_FILE
from swarmllm.blocks.sources import ModelSourceError, resolve_model
from swarmllm.blocks.span import BlockSpan
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm, SwarmStartError, free_port

REPO = "swarmllm-tests/tiny-sharded"
OTHER_REPO = "swarmllm-tests/tiny-sharded-changed"
SPANS = {"peer-a": (0, 4), "peer-b": (4, 8)}  # block 3 lies in two shards: peer-a needs both
METADATA = {"config.json", "generation_config.json", "model.safetensors.index.json"}
PROMPT = torch.tensor([[5, 17, 42, 8, 99, 3, 64, 21]])
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_sharded_llama(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def hub(checkpoint: Path, tmp_path_factory) -> Iterator[StandInHub]:
    changed = tmp_path_factory.mktemp("changed")
    shutil.copytree(checkpoint, changed, dirs_exist_ok=True)
    state = {}
    for shard in sorted(changed.glob("model-*.safetensors")):
        state.update(load_file(shard))
    state["model.layers.5.mlp.up_proj.weight"][0, 0] += 1.0  # one changed tensor
    write_shards(state, changed)
    stand_in = StandInHub().start()
    stand_in.add_repo(REPO, checkpoint)
    stand_in.add_repo(OTHER_REPO, changed)
    yield stand_in
    stand_in.stop()


def process_env(hub: StandInHub, label: str, root: Path) -> dict[str, str]:
    """The environment of one process: its own hub endpoint, hub cache and swarmllm cache."""
    return {
        "HF_ENDPOINT": hub.endpoint(label),
        "HF_HOME": str(root / label / "hf"),
        "SWARMLLM_CACHE": str(root / label / "swarmllm"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }


@pytest.fixture
def as_process(hub: StandInHub, tmp_path: Path, monkeypatch):
    """``as_process(label)``: this test process acts as process ``label`` from now on."""

    def act(label: str) -> None:
        for key, value in process_env(hub, label, tmp_path).items():
            monkeypatch.setenv(key, value)

    return act


def weight_bytes(hub: StandInHub, label: str) -> dict[str, int]:
    return {f: n for f, n in hub.fetched(label).items() if f.endswith(".safetensors")}


def shard_sizes(checkpoint: Path, shards: set[str]) -> dict[str, int]:
    return {shard: (checkpoint / shard).stat().st_size for shard in shards}


@pytest.mark.slow
def test_peers_and_client_fetch_only_the_shards_they_run(hub, checkpoint, tmp_path, monkeypatch):
    for key, value in process_env(hub, "client", tmp_path).items():
        monkeypatch.setenv(key, value)
    source = resolve_model(REPO)  # metadata only: the swarm's peers get REPO@commit
    assert weight_bytes(hub, "client") == {}
    with LocalSwarm(0, source=source, workdir=tmp_path / "swarm") as swarm:
        for label, blocks in SPANS.items():
            env = [f"{key}={value}" for key, value in process_env(hub, label, tmp_path).items()]
            launcher = ["env", *env, sys.executable, "-m", "swarmllm.cli"]
            swarm.start_peer(label, blocks=blocks, launcher=launcher)
        swarm.wait_until_ready(timeout=180)  # both announced under the client's model id
        with DistributedModelForCausalLM.from_pretrained(
            REPO, initial_peers=swarm.initial_peers
        ) as model:
            assert model.model_id == source.model_id
            tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    expected = reference.generate(
        PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
    )
    assert tokens[0].tolist() == expected[0].tolist()

    figures = {}
    for label, (start, end) in SPANS.items():
        needed = shard_sizes(checkpoint, span_shards(start, end))
        assert weight_bytes(hub, label) == needed, label  # every byte of those, nothing else
        assert set(hub.fetched(label)) - set(needed) == METADATA, label
        figures[label] = (sum(hub.fetched(label).values()), sum(needed.values()))
    head = shard_sizes(checkpoint, {EMBEDDINGS, HEAD})
    assert weight_bytes(hub, "client") == head
    figures["client"] = (sum(hub.fetched("client").values()), sum(head.values()))
    total = sum(shard_sizes(checkpoint, _weights(checkpoint)).values())
    for label, (fetched, needed) in figures.items():
        print(
            f"{label}: fetched {fetched} bytes for {needed} bytes of its shards "
            f"({fetched / needed:.3f}x; the repo's weights: {total} bytes)"
        )
        assert fetched <= 1.05 * needed, label


def _weights(checkpoint: Path) -> set[str]:
    return {p.name for p in checkpoint.glob("*.safetensors")}


def test_same_weights_from_hub_and_local_copy_have_one_id(hub, checkpoint, as_process, tmp_path):
    as_process("resolver")
    from_hub = resolve_model(REPO)
    assert from_hub.ref == f"{REPO}@{hub.repos[REPO].commit}"
    copy = shutil.copytree(checkpoint, tmp_path / "some-other-name")
    assert resolve_model(copy).model_id == from_hub.model_id
    assert resolve_model(checkpoint).model_id == from_hub.model_id
    changed = resolve_model(OTHER_REPO)
    assert changed.model_id != from_hub.model_id
    # and nothing but metadata was fetched to learn all that
    assert weight_bytes(hub, "resolver") == {}


def test_corrupted_cached_shard_is_refused_with_its_name(hub, as_process):
    as_process("corrupted")
    source = resolve_model(REPO)
    ModelHead.from_weights(source.config, source.weight_files())  # fetches and verifies
    cached = source.weight_files()["model.embed_tokens.weight"]
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF  # same size, parseable: only the digest notices
    cached.unlink()  # a cache file is a link to a blob; replace the content it points to
    cached.write_bytes(bytes(data))
    again = resolve_model(REPO)
    with pytest.raises(ModelSourceError, match=rf"{EMBEDDINGS} .* has sha256 .* refusing"):
        ModelHead.from_weights(again.config, again.weight_files())


@pytest.mark.slow
def test_peer_with_a_corrupted_shard_does_not_serve(hub, as_process, tmp_path):
    as_process("bad-peer")
    source = resolve_model(REPO)
    first = next(iter(span_shards(4, 8)))
    path = source.weight_files().path_of(first)
    path.unlink()
    path.write_bytes(b"\0" * (hub.repos[REPO].files[first].__len__()))
    env = [f"{key}={value}" for key, value in process_env(hub, "bad-peer", tmp_path).items()]
    launcher = ["env", *env, sys.executable, "-m", "swarmllm.cli"]
    with LocalSwarm(0, source=source, workdir=tmp_path / "swarm") as swarm:
        swarm.start_peer("bad-peer", blocks=(4, 8), launcher=launcher)
        with pytest.raises(SwarmStartError, match=rf"exited with code 1[\s\S]*{first}"):
            swarm.wait_until_ready(timeout=120)


def test_offline_from_the_cache_names_what_is_missing(hub, as_process, monkeypatch):
    as_process("offline")
    online = resolve_model(REPO)
    BlockSpan.from_weights(online.config, online.weight_files(), 0, 2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.log.clear()
    offline = resolve_model(REPO)
    assert offline.model_id == online.model_id
    BlockSpan.from_weights(offline.config, offline.weight_files(), 0, 2)  # cached
    missing = next(iter(span_shards(6, 8)))
    with pytest.raises(ModelSourceError, match=rf"{missing} of {REPO}.* not in the hub cache"):
        BlockSpan.from_weights(offline.config, offline.weight_files(), 6, 8)
    assert not [r for r in hub.log if r.label == "offline"]


def test_partial_local_directory_with_a_manifest(hub, checkpoint, as_process, tmp_path):
    as_process("partial")
    full_id = resolve_model(checkpoint).model_id
    partial = tmp_path / "span-0-4"
    partial.mkdir()
    for name in ["config.json", *span_shards(0, 4)]:
        shutil.copy(checkpoint / name, partial / name)
    without = pytest.raises(ModelSourceError, match=rf"{EMBEDDINGS} is missing .*{MANIFEST_FILE}")
    shutil.copy(checkpoint / "model.safetensors.index.json", partial)
    with without:
        resolve_model(partial)

    result = run_cli("manifest", REPO, "--output", str(partial))  # from hub metadata alone
    assert result.returncode == 0, result.stderr
    assert full_id in result.stdout
    source = resolve_model(partial)
    assert source.model_id == full_id
    span = BlockSpan.from_weights(source.config, source.weight_files(), 0, 4)
    assert span.end == 4
    second = next(iter(span_shards(4, 8) - span_shards(0, 4)))
    with pytest.raises(ModelSourceError, match=rf"weight file {second} is missing from"):
        BlockSpan.from_weights(source.config, source.weight_files(), 4, 8)


def test_manifest_command_on_a_complete_directory(checkpoint, tmp_path):
    copy = shutil.copytree(checkpoint, tmp_path / "full")
    result = run_cli("manifest", str(copy))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == _weights(checkpoint)
    assert set(SHARDS.values()) <= set(manifest["files"])


def test_interrupted_download_resumes_where_it_stopped(hub, as_process, monkeypatch):
    as_process("resumed")
    # huggingface_hub writes what it received in chunks of this size (10 MB by default)
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    source = resolve_model(REPO)
    size = source.weight_files().manifest.files[HEAD].size
    cut = size // 3
    hub.cut_once[HEAD] = cut  # the connection drops a third of the way through
    ModelHead.from_weights(source.config, source.weight_files())  # verified after resuming
    first, second = [
        r for r in hub.log if r.label == "resumed" and r.file == HEAD and r.method == "GET"
    ]
    assert (first.range, first.body_bytes) == (None, cut)
    resumed_at = int(second.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= cut and second.body_bytes == size - resumed_at


def test_unreachable_hub_falls_back_to_the_cache(hub, as_process, monkeypatch, caplog):
    as_process("unreachable")
    online = resolve_model(REPO)
    BlockSpan.from_weights(online.config, online.weight_files(), 0, 2)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nobody listens
    again = resolve_model(REPO)
    assert again.model_id == online.model_id
    assert "the hub cannot be reached" in caplog.text
    BlockSpan.from_weights(again.config, again.weight_files(), 0, 2)


def test_single_file_checkpoint_is_mapped_from_its_header(hub, tiny_model_dir, as_process):
    as_process("single")
    directory = tiny_model_dir("llama")  # one model.safetensors, no index
    hub.add_repo("swarmllm-tests/tiny-single", directory)
    source = resolve_model("swarmllm-tests/tiny-single")
    assert source.model_id == resolve_model(directory).model_id
    size = (directory / "model.safetensors").stat().st_size
    reads = [
        r
        for r in hub.log
        if r.label == "single" and r.file == "model.safetensors" and r.method == "GET"
    ]
    assert reads and all(r.range for r in reads)  # range reads of the header, no download
    assert sum(r.body_bytes for r in reads) < size / 4
