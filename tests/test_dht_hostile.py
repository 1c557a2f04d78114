"""A hostile DHT node of the test's own against real nodes that run our record validator.

The honest nodes are ``swarm_dht`` nodes, as every peer and client runs them; the hostile one
is a plain hivemind node with no validator, which sends whatever it likes straight to them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial

import hivemind
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dht_nodes import loopback_dht, swarm_node
from hivemind.dht.node import DHTID, DHTNode
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarmllm.dht.announce import announce
from swarmllm.dht.coverage import get_coverage
from swarmllm.dht.node import run_bounded
from swarmllm.dht.records import PeerRecord, PeerState, block_key
from swarmllm.security.identity import peer_id_of
from swarmllm.security.record_validator import (
    MAX_RECORD_BYTES,
    MAX_RECORD_TTL,
    PeerIdSignatureValidator,
)

NUM_BLOCKS = 3


@dataclasses.dataclass
class Swarm:
    honest: list[hivemind.DHT]  # honest[0] announces; honest[1] reads
    hostile: hivemind.DHT
    hostile_key: Ed25519PrivateKey

    @property
    def announcer(self) -> hivemind.DHT:
        return self.honest[0]

    @property
    def reader(self) -> hivemind.DHT:
        return self.honest[1]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    folder = tmp_path_factory.mktemp("hostile-dht")
    nodes: list[hivemind.DHT] = []
    try:
        nodes.append(swarm_node(folder, "a", []))
        initial_peers = [str(maddr) for maddr in nodes[0].get_visible_maddrs()]
        nodes.append(swarm_node(folder, "b", initial_peers))
        nodes.append(loopback_dht(initial_peers=initial_peers))  # no validator at all
        yield Swarm(nodes[:2], nodes[2], Ed25519PrivateKey.generate())
    finally:
        for node in reversed(nodes):
            node.shutdown()


def _record() -> PeerRecord:
    return PeerRecord(PeerState.ONLINE, 0, NUM_BLOCKS, 10.0, 1024, "test", "float32")


async def _store_at(
    targets: list[str],
    key: str,
    subkey: str | None,
    value: bytes,
    expiration: float,
    _dht: hivemind.DHT,
    node: DHTNode,
) -> list[bool | None]:
    """In the hostile node's process: ask each target directly to store one raw value."""
    results: list[bool | None] = []
    for target in targets:
        stored = await node.protocol.call_store(
            PeerID.from_base58(target),
            keys=[DHTID.generate(source=key)],
            values=[value],
            expiration_time=[expiration],
            subkeys=[subkey],
        )
        results.append(None if stored is None else stored[0])
    return results


def _send(swarm: Swarm, key: str, subkey: str | None, value: bytes, expiration: float) -> list:
    targets = [node.peer_id.to_base58() for node in swarm.honest]
    store = partial(_store_at, targets, key, subkey, value, expiration)
    results = run_bounded(swarm.hostile, store, timeout=20.0)
    assert results is not None, "the hostile node's stores did not finish"
    return results


def _signed_by(key: Ed25519PrivateKey, dht_key: str, value: bytes, expiration: float) -> bytes:
    """``value`` as its own DHT value, signed by ``key`` exactly as our validator signs."""
    record = DHTRecord(
        key=DHTID.generate(source=dht_key).to_bytes(),
        subkey=MSGPackSerializer.dumps(peer_id_of(key)),
        value=MSGPackSerializer.dumps(value),
        expiration_time=expiration,
    )
    return PeerIdSignatureValidator(key).sign_value(record)


def test_an_unsigned_plain_value_does_not_erase_a_block(swarm: Swarm) -> None:
    model = "erase-model"
    announcer_id = swarm.announcer.peer_id.to_base58()
    announce(swarm.announcer, model, range(NUM_BLOCKS), _record(), get_dht_time() + 60)
    before = get_coverage(swarm.reader, model, NUM_BLOCKS)
    assert all(announcer_id in block for block in before.blocks)  # control: the record is there

    # hivemind lets a plain value that expires later replace a key's whole dictionary
    later = get_dht_time() + 120
    target = block_key(model, 1)
    plain = MSGPackSerializer.dumps(b"gone")
    assert _send(swarm, target, None, plain, later) == [False, False]
    swarm.hostile.store(target, b"gone", later)  # and through hivemind's own API (kept locally)

    for node in swarm.honest:
        after = get_coverage(node, model, NUM_BLOCKS)
        assert after.blocks == before.blocks
        assert after.fully_covered is before.fully_covered


@pytest.mark.parametrize(
    "attack",
    ["expires in ten years", "expires in an hour", "oversized value"],
)
def test_a_signed_record_that_outlives_or_outgrows_the_limits_is_refused(
    swarm: Swarm, attack: str
) -> None:
    key = block_key("ghost-model", attack)
    now = get_dht_time()
    value, expiration = _record().to_bytes(), now + 60
    if attack == "expires in ten years":
        expiration = now + 10 * 365 * 86400
    elif attack == "expires in an hour":
        expiration = now + MAX_RECORD_TTL + 3600
    else:
        # a few times the limit: the hostile process's pipe to its DHT takes no more
        value = msgpack.packb({"state": 2, "padding": "x" * (4 * MAX_RECORD_BYTES)})
    subkey = peer_id_of(swarm.hostile_key)
    hostile = _signed_by(swarm.hostile_key, key, value, expiration)
    assert _send(swarm, key, subkey, hostile, expiration) == [False, False]
    assert get_coverage(swarm.reader, "ghost-model", 0, extra_blocks=[attack]).extra[attack] == {}

    # control: the same identity, record and path within the limits are stored and read
    honest_expiration = now + 60
    fine = _signed_by(swarm.hostile_key, key, _record().to_bytes(), honest_expiration)
    assert len(fine) <= MAX_RECORD_BYTES
    assert _send(swarm, key, subkey, fine, honest_expiration) == [True, True]
    found = get_coverage(swarm.reader, "ghost-model", 0, extra_blocks=[attack]).extra[attack]
    assert found == {subkey: _record()}
