"""A local swarm behind emulated links: every connection crosses a link, none bypasses it."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm.blocks.sources import ModelSource
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.links import LinkProfile
from swarmllm.swarm import LocalSwarm

pytestmark = pytest.mark.slow

DELAY_MS = 5


@pytest.fixture(scope="module")
def swarm(llama: ModelSource, tmp_path_factory) -> Iterator[LocalSwarm]:
    with LocalSwarm(
        2, source=llama, workdir=tmp_path_factory.mktemp("swarm"), link=LinkProfile(DELAY_MS)
    ) as running:
        running.wait_until_ready(timeout=120)
        yield running


def _daemons() -> list[psutil.Process]:
    below = psutil.Process(os.getpid()).children(recursive=True)
    return [proc for proc in below if proc.name() == "p2pd"]


def test_greedy_output_through_links_equals_transformers(swarm, llama):
    reference = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    input_ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with DistributedModelForCausalLM.from_pretrained(
        str(llama.path), initial_peers=swarm.initial_peers
    ) as model:
        ours = model.generate(input_ids, max_new_tokens=8, eos_token_id=[])
    expected = reference.generate(input_ids, max_new_tokens=8, do_sample=False)
    assert ours.tolist() == expected.tolist()


def test_no_connection_bypasses_the_links(swarm):
    nodes = [swarm.bootstrap, *swarm.peers]
    links = {node.name: node.link for node in nodes}
    assert all(links.values())
    real_ports = {link.target_port for link in links.values()}
    daemons = _daemons()
    assert len(daemons) >= len(nodes)
    for daemon in daemons:
        for conn in daemon.net_connections(kind="tcp"):
            if conn.raddr and conn.status == psutil.CONN_ESTABLISHED:
                assert conn.raddr.port not in real_ports, (daemon.pid, conn)
    # every node was reached through its link, in both directions
    for name, link in links.items():
        assert link.counters.inbound > 0 and link.counters.outbound > 0, name


def test_peers_announce_only_their_link_addresses(swarm):
    for peer in swarm.peers:
        log = peer.log_path.read_text(errors="replace")
        announced = [line for line in log.splitlines() if "swarmllm peer address:" in line]
        assert announced, peer.log_tail()
        for line in announced:
            assert f"/tcp/{peer.link.port}/" in line, line
            assert f"/tcp/{peer.link.target_port}/" not in line, line
