"""Sessions on real peers over time: rewinds on the client, idle expiry on the peers."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch

from swarmllm.blocks.sources import ModelSource
from swarmllm.blocks.span import BlockSpan
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

SESSION_TIMEOUT = 2.0
CACHE_TOKENS = 512


@pytest.fixture(scope="module")
def swarm(llama: ModelSource, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    peer_args = ["--session-timeout", str(SESSION_TIMEOUT), "--refresh-period", "2"]
    peer_args += ["--cache-tokens", str(CACHE_TOKENS)]
    with LocalSwarm(
        2, source=llama, workdir=tmp_path_factory.mktemp("lifecycle"), peer_args=peer_args
    ) as running:
        running.wait_until_ready(timeout=240)
        yield running


@pytest.fixture(scope="module")
def model(swarm: LocalSwarm, llama: ModelSource) -> Iterator[DistributedModelForCausalLM]:
    with DistributedModelForCausalLM.from_pretrained(
        str(llama.path), initial_peers=swarm.initial_peers
    ) as distributed:
        yield distributed


@pytest.fixture(scope="module")
def local(llama: ModelSource) -> BlockSpan:
    return BlockSpan.from_weights(
        llama.config, llama.weight_files(), 0, llama.config.num_hidden_layers
    )


def hidden(tokens: int, seed: int, size: int) -> torch.Tensor:
    return torch.randn(1, tokens, size, generator=torch.Generator().manual_seed(seed))


def test_a_rewind_replaces_the_tokens_after_it_on_every_hop(
    model: DistributedModelForCausalLM, local: BlockSpan
) -> None:
    size = local.config.hidden_size
    first, second = hidden(11, 1, size), hidden(4, 2, size)
    with model.inference_session(max_length=64) as session:
        assert len(session.route) == 2  # the rewind must reach both hops' caches
        session.step(first[:, :8])
        for t in range(8, 11):
            session.step(first[:, t : t + 1])
        rewound = session.step(second[:, :2], position=5)  # drop tokens 5..10
        assert session.position == 7
        after = session.step(second[:, 2:3])  # and carry on after the rewind
        again = session.step(second[:, 3:4], position=7)  # rewind by one and branch
        restart = session.step(second[:, :1], position=0)  # back to the very start
    branch = torch.cat([first[:, :5], second[:, :3]], dim=1)
    expected = local(branch)
    torch.testing.assert_close(rewound, expected[:, 5:7], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, expected[:, 7:8], atol=1e-4, rtol=1e-4)
    other = local(torch.cat([first[:, :5], second[:, :2], second[:, 3:4]], dim=1))
    torch.testing.assert_close(again, other[:, 7:8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(restart, local(second[:, :1]), atol=1e-4, rtol=1e-4)


def _announced_room(model: DistributedModelForCausalLM, swarm: LocalSwarm) -> dict[str, int]:
    coverage = model.connection.coverage(model.model_id, model.config.num_hidden_layers)
    peers = coverage.peers()
    return {peer.peer_id: peers[peer.peer_id].cache_tokens_left for peer in swarm.peers}


def _wait_for_room(
    model: DistributedModelForCausalLM, swarm: LocalSwarm, done, timeout: float = 60.0
) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        room = _announced_room(model, swarm)
        if done(room) or time.monotonic() > deadline:
            return room
        time.sleep(0.5)


def test_an_idle_session_expires_and_gives_its_cache_back_while_a_busy_one_lives(
    model: DistributedModelForCausalLM, local: BlockSpan, swarm: LocalSwarm
) -> None:
    size = local.config.hidden_size
    full = {peer.peer_id: CACHE_TOKENS for peer in swarm.peers}
    assert _wait_for_room(model, swarm, lambda room: room == full) == full
    idle = model.inference_session(max_length=100)
    busy = model.inference_session(max_length=100)
    try:
        idle.step(hidden(4, 3, size))
        inputs = hidden(40, 4, size)
        outputs = [busy.step(inputs[:, :4])]
        both = {peer: CACHE_TOKENS - 200 for peer in full}
        assert _wait_for_room(model, swarm, lambda room: room == both) == both
        # ``busy`` steps more often than the timeout, for several timeouts; ``idle`` does not
        deadline = time.monotonic() + 4 * SESSION_TIMEOUT
        position = 4
        while time.monotonic() < deadline and position < inputs.shape[1]:
            outputs.append(busy.step(inputs[:, position : position + 1]))
            position += 1
            time.sleep(SESSION_TIMEOUT / 4)
        # only ``idle``'s reservation came back
        one = {peer: CACHE_TOKENS - 100 for peer in full}
        assert _wait_for_room(model, swarm, lambda room: room == one) == one
        torch.testing.assert_close(
            torch.cat(outputs, dim=1), local(inputs[:, :position]), atol=1e-4, rtol=1e-4
        )
    finally:
        busy.close()
        idle.close()
    assert _wait_for_room(model, swarm, lambda room: room == full) == full
