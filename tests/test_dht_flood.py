"""A flood of signed records for minted identities cannot make coverage reads expensive.

A hostile node of the test's own (a plain hivemind node) signs records for 2,000 freshly minted
Ed25519 identities (no process behind any of them) under every block of a model, each living as
long as the validators allow, and asks the honest nodes to store them all. One honest peer
announced before the flood, one after it. The cost of a read is counted, not timed: the
signatures the reader's DHT process verified, and the records that reached the client.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from functools import partial

import hivemind
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
from swarmllm.dht.storage import MAX_RECORDS_PER_KEY
from swarmllm.security.identity import peer_id_of
from swarmllm.security.record_validator import MAX_RECORD_TTL, PeerIdSignatureValidator

MODEL, NUM_BLOCKS = "flooded-model", 3
MINTED = 2_000
BATCH = 250  # records per store request


@dataclasses.dataclass
class Flooded:
    honest: list[hivemind.DHT]  # honest[0] announced before the flood, honest[1] after it
    reader: hivemind.DHT  # a client's node
    stored: list[list[int]]  # per honest node, per block: the records it keeps


def _record() -> PeerRecord:
    return PeerRecord(PeerState.ONLINE, 0, NUM_BLOCKS, 1e9, 10**6, "liar", "float32")


def _signed(key: Ed25519PrivateKey, peer_id: str, dht_key: str, value: bytes, expiration: float):
    record = DHTRecord(
        key=DHTID.generate(source=dht_key).to_bytes(),
        subkey=MSGPackSerializer.dumps(peer_id),
        value=MSGPackSerializer.dumps(value),
        expiration_time=expiration,
    )
    return PeerIdSignatureValidator(key).sign_value(record)


async def _flood(
    targets: list[str], keys: list[str], value: bytes, expiration: float, _dht, node: DHTNode
) -> int:
    """In the hostile node's process: mint ``MINTED`` identities, sign ``value`` under every key
    for each, and ask every target to store them all, in batches. (Minted here: hivemind's
    pipe into a DHT process fails now and then on a message of megabytes.)"""
    entries = []
    for _ in range(MINTED):
        key = Ed25519PrivateKey.generate()
        peer_id = peer_id_of(key)
        for dht_key in keys:
            entries.append((dht_key, peer_id, _signed(key, peer_id, dht_key, value, expiration)))
    stored = 0
    for target in targets:
        for begin in range(0, len(entries), BATCH):
            batch = entries[begin : begin + BATCH]
            result = await node.protocol.call_store(
                PeerID.from_base58(target),
                keys=[DHTID.generate(source=key) for key, _, _ in batch],
                values=[signed for _, _, signed in batch],
                expiration_time=[expiration] * len(batch),
                subkeys=[peer_id for _, peer_id, _ in batch],
            )
            stored += sum(bool(ok) for ok in result or ())
    return stored


async def _kept(keys: list[str], _dht, node: DHTNode) -> list[int]:
    """In an honest node's process: how many records it keeps under each key."""
    counts = []
    for key in keys:
        found = node.protocol.storage.get(DHTID.generate(source=key))
        counts.append(len(found.value) if found is not None else 0)
    return counts


async def _signatures_checked(_dht, _node: DHTNode) -> int:
    return PeerIdSignatureValidator.signatures_checked


@pytest.fixture(scope="module")
def flooded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flooded]:
    folder = tmp_path_factory.mktemp("flood")
    nodes: list[hivemind.DHT] = []
    keys = [block_key(MODEL, block) for block in range(NUM_BLOCKS)]
    try:
        nodes.append(swarm_node(folder, "a", []))
        initial_peers = [str(maddr) for maddr in nodes[0].get_visible_maddrs()]
        nodes.append(swarm_node(folder, "b", initial_peers))
        hostile = loopback_dht(initial_peers=initial_peers)  # no validator at all
        nodes.append(hostile)
        honest = nodes[:2]
        announce(honest[0], MODEL, range(NUM_BLOCKS), _record(), get_dht_time() + 60)

        expiration = get_dht_time() + MAX_RECORD_TTL  # as long as any validator allows
        targets = [node.peer_id.to_base58() for node in honest]
        flood = partial(_flood, targets, keys, _record().to_bytes(), expiration)
        stored = run_bounded(hostile, flood, timeout=120)
        assert stored, "the honest nodes stored no minted record at all"

        announce(honest[1], MODEL, range(NUM_BLOCKS), _record(), get_dht_time() + 60)
        nodes.append(swarm_node(folder, "reader", initial_peers, client_mode=True))
        kept = [run_bounded(node, partial(_kept, keys), timeout=10) for node in honest]
        yield Flooded(honest, nodes[-1], kept)
    finally:
        for node in reversed(nodes):
            node.shutdown()


def test_a_coverage_read_costs_a_bounded_number_of_records(flooded: Flooded) -> None:
    before = run_bounded(flooded.reader, _signatures_checked, timeout=10)
    started = time.perf_counter()
    coverage = get_coverage(flooded.reader, MODEL, NUM_BLOCKS)
    seconds = time.perf_counter() - started
    checked = run_bounded(flooded.reader, _signatures_checked, timeout=10) - before
    read = [len(block) for block in coverage.blocks]
    print(
        f"\n{MINTED} minted identities x {NUM_BLOCKS} blocks: the honest nodes keep "
        f"{flooded.stored} records; one coverage read verified {checked} signatures, "
        f"took {read} records per block, in {seconds:.2f} s"
    )
    assert all(count <= MAX_RECORDS_PER_KEY for counts in flooded.stored for count in counts)
    assert all(count <= MAX_RECORDS_PER_KEY for count in read)
    # every honest node (and the reader's own cache) sends at most the cap per key
    assert checked <= (len(flooded.honest) + 1) * NUM_BLOCKS * MAX_RECORDS_PER_KEY
    assert seconds < 5.0  # far above what it takes; the flood took it past 5 s before


def test_the_peers_that_answer_keep_their_place(flooded: Flooded) -> None:
    coverage = get_coverage(flooded.reader, MODEL, NUM_BLOCKS)
    for node in flooded.honest:  # announced before the flood, and after it
        peer_id = node.peer_id.to_base58()
        assert all(peer_id in block for block in coverage.blocks), peer_id
