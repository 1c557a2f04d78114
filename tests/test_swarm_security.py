"""Security on a running swarm: private peers and clients, owned DHT records, stable identities."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from dht_nodes import loopback_dht
from hivemind.utils import get_dht_time
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import ModelSource
from swarmllm.blocks.span import BlockSpan
from swarmllm.client.connection import SwarmConnection
from swarmllm.client.hop import HopFailure, HopStream, SessionSpec, remote_forward
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.routing import Hop, NoRouteError
from swarmllm.dht.records import PeerRecord, PeerState, block_key
from swarmllm.protocol import RemoteError
from swarmllm.security.identity import IdentityError, create_identity, load_identity, peer_id_of
from swarmllm.security.record_validator import PeerIdSignatureValidator
from swarmllm.swarm import HOST, LocalSwarm

pytestmark = pytest.mark.slow

REFRESH = ["--refresh-period", "2"]
PROMPT_LENGTH, NEW_TOKENS = 8, 6
ONLINE_TIMEOUT = 120.0
STREAM_REFUSALS = 30


@dataclass
class PrivateSwarm:
    swarm: LocalSwarm
    open_peer: str  # serves everyone
    private_peer: str  # serves only the listed client
    client_key: Path  # the listed client's identity
    client_id: str


@pytest.fixture(scope="module")
def private_swarm(llama: ModelSource, tmp_path_factory) -> Iterator[PrivateSwarm]:
    folder = tmp_path_factory.mktemp("private")
    client_key = folder / "client.key"
    client_id = peer_id_of(create_identity(client_key))
    allowed = folder / "allowed.txt"
    allowed.write_text(f"# who may use the private peer\n\n{client_id}  # the test client\n")
    with LocalSwarm(0, source=llama, workdir=folder / "swarm", peer_args=REFRESH) as swarm:
        blocks = (0, llama.config.num_hidden_layers)
        open_peer = swarm.start_peer("open", blocks)
        private_peer = swarm.start_peer("private", blocks, ["--allowed-peers", str(allowed)])
        swarm.wait_until_ready(timeout=ONLINE_TIMEOUT)
        yield PrivateSwarm(swarm, open_peer.peer_id, private_peer.peer_id, client_key, client_id)


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (1, PROMPT_LENGTH), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def expected(llama: ModelSource, prompt: torch.Tensor) -> list[int]:
    reference = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    return reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()


def test_a_private_peer_serves_only_listed_clients(private_swarm: PrivateSwarm, llama) -> None:
    swarm, private = private_swarm.swarm, private_swarm.private_peer
    num_blocks = llama.config.num_hidden_layers
    hop = Hop(private, 0, num_blocks)
    hidden = torch.randn(1, 5, llama.config.hidden_size)
    refusal = "is not on this peer's allowed-peers list"

    with SwarmConnection(swarm.initial_peers) as stranger:
        with pytest.raises(RemoteError, match=refusal):
            stranger.run(stranger.info(private), timeout=30)
        with pytest.raises(HopFailure, match=refusal):
            stranger.run(remote_forward(stranger, hop, llama.model_id, hidden), timeout=30)
        # a refused stream must deliver its error before it closes, every time (it once lost
        # the race: the client saw only "the peer closed the stream")
        for attempt in range(STREAM_REFUSALS):
            spec = SessionSpec(llama.model_id, f"stranger-{attempt}", max_length=8)
            stream = HopStream(stranger, hop, spec)
            with pytest.raises(HopFailure, match=refusal):
                stranger.run(stream.open(), timeout=30)
            stranger.run(stream.close(), timeout=30)
        assert stranger.run(stranger.info(private_swarm.open_peer), timeout=30).start == 0

    with SwarmConnection(swarm.initial_peers, identity=private_swarm.client_key) as listed:
        assert listed.peer_id == private_swarm.client_id
        output = listed.run(remote_forward(listed, hop, llama.model_id, hidden), timeout=30)
    local = BlockSpan.from_weights(llama.config, llama.weight_files(), 0, num_blocks)
    torch.testing.assert_close(output, local(hidden), atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["open", "private"])
def test_a_client_routes_only_through_allowed_peers(
    which: str, private_swarm: PrivateSwarm, llama, prompt, expected
) -> None:
    allowed = private_swarm.open_peer if which == "open" else private_swarm.private_peer
    with (
        DistributedModelForCausalLM.from_pretrained(
            str(llama.path),
            initial_peers=private_swarm.swarm.initial_peers,
            allowed_peers={allowed},
            identity=private_swarm.client_key,
        ) as model,
        model.inference_session(max_length=PROMPT_LENGTH + NEW_TOKENS) as session,
    ):
        assert [hop.peer_id for hop in session.route] == [allowed]
        output = model.generate(prompt, session=session, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    assert output[0].tolist() == expected


def test_an_unlisted_client_allowing_only_a_private_peer_finds_no_route(
    private_swarm: PrivateSwarm, llama
) -> None:
    with DistributedModelForCausalLM.from_pretrained(
        str(llama.path),
        initial_peers=private_swarm.swarm.initial_peers,
        allowed_peers={private_swarm.private_peer},
    ) as model:
        with pytest.raises(NoRouteError):
            model.inference_session(max_length=PROMPT_LENGTH + NEW_TOKENS)
        assert private_swarm.private_peer in model.bans.banned()


@pytest.mark.parametrize("command", ["peer", "generate"])
def test_a_bad_allowed_peers_file_is_one_clear_error(command: str, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed.txt"
    allowed.write_text("# clients\n12D3KooWnotapeerid\n")
    args = ["--allowed-peers", str(allowed)]
    if command == "generate":
        nobody = peer_id_of(create_identity(tmp_path / "nobody.key"))
        args += ["--initial-peers", f"/ip4/{HOST}/tcp/9/p2p/{nobody}", "hello"]
    result = run_cli(command, *args)
    assert result.returncode == 1
    assert f"{allowed}, line 2: '12D3KooWnotapeerid' is not an Ed25519 peer id" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_forged_record_for_a_running_peer_is_rejected(
    private_swarm: PrivateSwarm, llama: ModelSource, tmp_path: Path
) -> None:
    victim = private_swarm.open_peer
    swarm = private_swarm.swarm
    forged = PeerRecord(PeerState.ONLINE, 0, 1, 1e9, 10**9, "forged", "float32").to_bytes()
    key = block_key(llama.model_id, 0)
    # an attacker's node: a hivemind DHT with an Ed25519 key of its own, signing as itself
    identity = tmp_path / "forger.key"
    forger_key = create_identity(identity)
    forger = loopback_dht(
        initial_peers=swarm.initial_peers,
        client_mode=True,
        identity_path=str(identity),
        check_if_identity_free=False,
        record_validators=[PeerIdSignatureValidator(forger_key)],
    )
    try:
        # control: the same node can store a record it owns, so a refusal below is the
        # validators' doing
        expiration = get_dht_time() + 600
        assert forger.store(f"{key}.unowned", forged, expiration, subkey=peer_id_of(forger_key))
        assert not forger.store(key, forged, expiration, subkey=victim)
    finally:
        forger.shutdown()
    with SwarmConnection(swarm.initial_peers) as reader:
        record = reader.coverage(llama.model_id, llama.config.num_hidden_layers).blocks[0][victim]
    assert record.state == PeerState.ONLINE and record.public_name == "open"
    assert (record.start, record.end) == (0, llama.config.num_hidden_layers)
    assert record.decode_steps_per_s < 1e9


def _peer_process(swarm: LocalSwarm, llama: ModelSource, identity: Path, log: Path):
    with open(log, "ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "swarmllm.cli",
                "peer",
                "--initial-peers",
                *swarm.initial_peers,
                "--identity",
                str(identity),
                "--model",
                str(llama.path),
                "--blocks",
                f"0:{llama.config.num_hidden_layers}",
                "--host-maddrs",
                f"/ip4/{HOST}/tcp/0",
                *REFRESH,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _wait_until(condition, process: subprocess.Popen, log: Path, what: str) -> None:
    deadline = time.monotonic() + ONLINE_TIMEOUT
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the peer exited before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _loads(identity: Path) -> bool:
    try:
        load_identity(identity)
    except IdentityError:  # not there yet, or being written
        return False
    return True


def test_an_identity_is_created_private_and_reused_across_restarts(
    private_swarm: PrivateSwarm, llama: ModelSource, tmp_path: Path
) -> None:
    swarm = private_swarm.swarm
    identity = tmp_path / "keys" / "restarted.key"  # neither the file nor its folder exist
    log = tmp_path / "restarted.log"
    seen: list[tuple[str, bytes]] = []
    with SwarmConnection(swarm.initial_peers) as reader:

        def online(peer_id: str) -> bool:
            coverage = reader.coverage(llama.model_id, llama.config.num_hidden_layers)
            record = coverage.peers().get(peer_id)
            return record is not None and record.state == PeerState.ONLINE

        for run in range(2):
            process = _peer_process(swarm, llama, identity, log)
            try:
                _wait_until(lambda: _loads(identity), process, log, "the identity file")
                peer_id = peer_id_of(load_identity(identity))
                _wait_until(partial(online, peer_id), process, log, f"run {run} to come online")
                seen.append((peer_id, identity.read_bytes()))
                process.send_signal(signal.SIGTERM)
                assert process.wait(timeout=30) == 0
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(timeout=10)
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600
    assert seen[0] == seen[1]  # same peer id, and the file was not rewritten
