"""Owned DHT records: the validator on its own, then on real DHT nodes over loopback."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial

import hivemind
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dht_nodes import loopback_dht
from hivemind.dht.node import DHTID, DHTNode
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarmllm.dht.records import PeerRecord, PeerState, block_key
from swarmllm.security.identity import load_or_create_identity, peer_id_of
from swarmllm.security.record_validator import (
    MAX_RECORD_BYTES,
    MAX_RECORD_TTL,
    PeerIdSignatureValidator,
)
from swarmllm.security.signing import SIGNATURE_BYTES

RSA_STYLE_PEER_ID = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"


def _record(key: str, subkey: object, value: object, expiration_time: float) -> DHTRecord:
    """A record exactly as hivemind hands it to validators: all fields serialized."""
    return DHTRecord(
        key=DHTID.generate(source=key).to_bytes(),
        subkey=MSGPackSerializer.dumps(subkey),
        value=MSGPackSerializer.dumps(value),
        expiration_time=expiration_time,
    )


def _signed(validator: PeerIdSignatureValidator, record: DHTRecord) -> DHTRecord:
    return dataclasses.replace(record, value=validator.sign_value(record))


@pytest.fixture(scope="module")
def key_a() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def validator_a(key_a: Ed25519PrivateKey) -> PeerIdSignatureValidator:
    return PeerIdSignatureValidator(key_a)


def test_own_record_round_trip(validator_a: PeerIdSignatureValidator) -> None:
    record = _record("m.0", validator_a.peer_id, b"announcement", get_dht_time() + 60)
    signed = _signed(validator_a, record)
    assert signed.value != record.value
    assert validator_a.validate(signed)
    assert validator_a.strip_value(signed) == record.value
    reader = PeerIdSignatureValidator()  # a client without a key still checks records
    assert reader.validate(signed)
    assert reader.sign_value(record) == record.value


def test_changed_records_are_rejected(validator_a: PeerIdSignatureValidator) -> None:
    signed = _signed(
        validator_a, _record("m.0", validator_a.peer_id, b"announcement", get_dht_time() + 60)
    )
    tampered_value = signed.value[:-65] + b"X" + signed.value[-64:]
    flipped_signature = signed.value[:-1] + bytes([signed.value[-1] ^ 1])
    changes = {
        "value": dataclasses.replace(signed, value=tampered_value),
        "expiration": dataclasses.replace(signed, expiration_time=signed.expiration_time + 1),
        "key": dataclasses.replace(signed, key=DHTID.generate(source="m.1").to_bytes()),
        "signature": dataclasses.replace(signed, value=flipped_signature),
        "no signature": dataclasses.replace(signed, value=MSGPackSerializer.dumps(b"x")),
    }
    for name, record in changes.items():
        assert not validator_a.validate(record), name


def test_records_under_another_peer_id_are_neither_signed_nor_accepted(
    validator_a: PeerIdSignatureValidator,
) -> None:
    other = PeerIdSignatureValidator(Ed25519PrivateKey.generate())
    expiration = get_dht_time() + 60
    claim = _record("m.0", validator_a.peer_id, b"forged", expiration)
    assert other.sign_value(claim) == claim.value  # we never sign for someone else
    assert not validator_a.validate(claim)
    own = _signed(other, _record("m.0", other.peer_id, b"forged", expiration))
    assert validator_a.validate(own)
    # The forger's own valid record, refiled under A's peer id.
    assert not validator_a.validate(dataclasses.replace(own, subkey=claim.subkey))


@pytest.mark.parametrize("subkey", [7, b"raw-bytes", "not-a-peer-id", RSA_STYLE_PEER_ID])
def test_subkeys_that_are_not_ed25519_peer_ids_are_rejected(
    validator_a: PeerIdSignatureValidator, subkey: object
) -> None:
    assert not validator_a.validate(_record("m.0", subkey, b"x" * 100, get_dht_time() + 60))


def test_plain_records_are_rejected(validator_a: PeerIdSignatureValidator) -> None:
    # a plain value that expires later replaces the key's whole dictionary of signed records
    plain = _record("anything", None, {"a": 1}, get_dht_time() + 60)
    assert validator_a.sign_value(plain) == plain.value  # nothing of ours to sign
    assert not validator_a.validate(plain)
    assert not PeerIdSignatureValidator().validate(plain)


def test_expiration_is_capped(validator_a: PeerIdSignatureValidator) -> None:
    now = get_dht_time()
    for ahead, accepted in [
        (60.0, True),
        (MAX_RECORD_TTL, True),
        (MAX_RECORD_TTL + 600, False),
        (1e12, False),
        (float("inf"), False),
        (float("nan"), False),
    ]:
        record = _signed(validator_a, _record("m.0", validator_a.peer_id, b"v", now + ahead))
        assert validator_a.validate(record) is accepted, ahead


def test_record_size_is_capped(validator_a: PeerIdSignatureValidator) -> None:
    unsigned = MAX_RECORD_BYTES - SIGNATURE_BYTES
    for size, accepted in [(unsigned, True), (unsigned + 1, False)]:
        record = dataclasses.replace(
            _record("m.0", validator_a.peer_id, None, get_dht_time() + 60), value=b"x" * size
        )
        signed = _signed(validator_a, record)
        assert validator_a.validate(signed) is accepted, len(signed.value)
    huge_subkey = _record("m.0", "12D3KooW" + "x" * 10_000, b"v", get_dht_time() + 60)
    assert not validator_a.validate(huge_subkey)


def test_merging(validator_a: PeerIdSignatureValidator, key_a: Ed25519PrivateKey) -> None:
    reader = PeerIdSignatureValidator()
    composite = CompositeValidator([reader, PeerIdSignatureValidator(key_a)])
    record = _record("m.0", validator_a.peer_id, b"v", get_dht_time() + 60)
    assert validator_a.validate(dataclasses.replace(record, value=composite.sign_value(record)))
    with pytest.raises(ValueError, match="two peers"):
        CompositeValidator([validator_a, PeerIdSignatureValidator(Ed25519PrivateKey.generate())])


# --- real DHT nodes on loopback -------------------------------------------------------------


@dataclasses.dataclass
class Swarm:
    a: hivemind.DHT
    b: hivemind.DHT
    key_a: Ed25519PrivateKey
    peer_id_a: str


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    folder = tmp_path_factory.mktemp("identities")
    key_a = load_or_create_identity(folder / "a.key")
    key_b = load_or_create_identity(folder / "b.key")
    a = loopback_dht(
        identity_path=str(folder / "a.key"),
        record_validators=[PeerIdSignatureValidator(key_a)],
    )
    try:
        b = loopback_dht(
            identity_path=str(folder / "b.key"),
            initial_peers=[str(maddr) for maddr in a.get_visible_maddrs()],
            # hivemind's identity check reads the file as RSA and fails on Ed25519 keys
            check_if_identity_free=False,
            record_validators=[PeerIdSignatureValidator(key_b)],
        )
    except BaseException:
        a.shutdown()
        raise
    try:
        assert a.peer_id.to_base58() == peer_id_of(key_a)
        assert b.peer_id.to_base58() == peer_id_of(key_b)
        yield Swarm(a, b, key_a, peer_id_of(key_a))
    finally:
        b.shutdown()
        a.shutdown()


def _announcement(throughput: float) -> bytes:
    return PeerRecord(PeerState.ONLINE, 0, 4, throughput, 1024, "test", "float32").to_bytes()


def _value_under(dht: hivemind.DHT, key: str, subkey: str) -> bytes | None:
    found = dht.get(key, latest=True)
    if found is None or subkey not in found.value:
        return None
    return found.value[subkey].value


def test_owner_record_is_visible_everywhere(swarm: Swarm) -> None:
    key = block_key("owned-model", 0)
    value = _announcement(10.0)
    assert swarm.a.store(key, value, get_dht_time() + 60, subkey=swarm.peer_id_a)
    assert _value_under(swarm.b, key, swarm.peer_id_a) == value  # signature stripped on read
    assert _value_under(swarm.a, key, swarm.peer_id_a) == value


def test_forged_store_through_the_dht_api_fails(swarm: Swarm) -> None:
    key = block_key("owned-model", 1)
    real = _announcement(10.0)
    assert swarm.a.store(key, real, get_dht_time() + 60, subkey=swarm.peer_id_a)
    forged = _announcement(1e9)
    assert not swarm.b.store(key, forged, get_dht_time() + 120, subkey=swarm.peer_id_a)
    for node in (swarm.a, swarm.b):
        assert _value_under(node, key, swarm.peer_id_a) == real


async def _store_raw_at(
    target_peer_id: str,
    key: str,
    subkey: str,
    value_bytes: bytes,
    expiration_time: float,
    _dht: hivemind.DHT,
    node: DHTNode,
) -> list[bool] | None:
    """Runs inside node B's DHT process: bypasses B's own validator and asks A directly."""
    store_ok = await node.protocol.call_store(
        PeerID.from_base58(target_peer_id),
        keys=[DHTID.generate(source=key)],
        values=[value_bytes],
        expiration_time=[expiration_time],
        subkeys=[subkey],
    )
    return None if store_ok is None else list(store_ok)


def test_forged_and_tampered_records_sent_directly_are_refused(swarm: Swarm) -> None:
    key = block_key("owned-model", 2)
    real = _announcement(10.0)
    expiration = get_dht_time() + 60
    assert swarm.a.store(key, real, expiration, subkey=swarm.peer_id_a)

    # Every attempt expires later than A's record, so storage would take it if validation did.
    later = expiration + 60
    signer = PeerIdSignatureValidator(swarm.key_a)
    genuine_later = _signed(signer, _record(key, swarm.peer_id_a, real, later))
    genuine_now = _signed(signer, _record(key, swarm.peer_id_a, real, expiration))
    forged = MSGPackSerializer.dumps(_announcement(1e9))
    impostor = Ed25519PrivateKey.generate()
    attempts = {
        "signed by another key": forged + impostor.sign(forged),
        "tampered value": forged + genuine_later.value[-64:],
        "extended expiration": genuine_now.value,
    }
    a_id = swarm.a.peer_id.to_base58()
    for name, value_bytes in attempts.items():
        store = partial(_store_raw_at, a_id, key, swarm.peer_id_a, value_bytes, later)
        assert swarm.b.run_coroutine(store) == [False], name
    for node in (swarm.a, swarm.b):
        assert _value_under(node, key, swarm.peer_id_a) == real

    # Control: the same raw path delivers A's genuine newer record, so the refusals above are
    # the validator's doing and not a broken request.
    store = partial(_store_raw_at, a_id, key, swarm.peer_id_a, genuine_later.value, later)
    assert swarm.b.run_coroutine(store) == [True]
    assert swarm.a.get(key, latest=True).value[swarm.peer_id_a].expiration_time == later
