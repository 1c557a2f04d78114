"""Ed25519 identity files, peer ids, and agreement with what hivemind/p2pd report."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from dht_nodes import loopback_dht
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2

from swarmllm.security.identity import (
    IdentityError,
    create_identity,
    load_identity,
    load_or_create_identity,
    peer_id_of,
    public_key_from_peer_id,
)


def test_created_file_is_a_private_libp2p_ed25519_key(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "peer.key"  # the parent folder is created too
    key = create_identity(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    proto = crypto_pb2.PrivateKey.FromString(path.read_bytes())
    assert proto.key_type == crypto_pb2.Ed25519
    assert proto.data == key.private_bytes_raw() + key.public_key().public_bytes_raw()
    assert load_identity(path).private_bytes_raw() == key.private_bytes_raw()


def test_load_or_create_creates_once_then_reuses(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    first = load_or_create_identity(path)
    content = path.read_bytes()
    second = load_or_create_identity(str(path))
    assert peer_id_of(first) == peer_id_of(second)
    assert path.read_bytes() == content


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    key = create_identity(path)
    with pytest.raises(IdentityError, match="already exists"):
        create_identity(path)
    assert peer_id_of(load_identity(path)) == peer_id_of(key)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(IdentityError, match=f"{path}.*does not exist"):
        load_identity(path)


def _corrupt_files(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    good = tmp_path / "good.key"
    key = create_identity(good)
    seed, public = key.private_bytes_raw(), key.public_key().public_bytes_raw()
    other_public = create_identity(tmp_path / "other.key").public_key().public_bytes_raw()

    def proto(key_type: int, data: bytes) -> bytes:
        return crypto_pb2.PrivateKey(key_type=key_type, data=data).SerializeToString()

    return {
        "garbage": (b"\xff\xfe not a protobuf", "not a libp2p private key"),
        "empty": (b"", "fields missing"),
        "truncated": (proto(crypto_pb2.Ed25519, seed + public[:5]), "37 bytes"),
        "secp256k1": (proto(crypto_pb2.Secp256k1, seed), "Secp256k1 key"),
        "mismatched": (proto(crypto_pb2.Ed25519, seed + other_public), "does not match"),
    }


@pytest.mark.parametrize("case", ["garbage", "empty", "truncated", "secp256k1", "mismatched"])
def test_bad_files_name_the_file_and_the_problem(tmp_path: Path, case: str) -> None:
    content, problem = _corrupt_files(tmp_path)[case]
    path = tmp_path / f"{case}.key"
    path.write_bytes(content)
    with pytest.raises(IdentityError, match=problem) as info:
        load_or_create_identity(path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == content  # never replaced


def test_hivemind_rsa_identity_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rsa.key"
    P2P.generate_identity(str(path))
    with pytest.raises(IdentityError, match="RSA key"):
        load_identity(path)
    rsa_peer_id = PeerID.from_identity(path.read_bytes())
    with pytest.raises(IdentityError, match="does not inline an Ed25519"):
        public_key_from_peer_id(rsa_peer_id)


def test_peer_id_round_trip(tmp_path: Path) -> None:
    key = create_identity(tmp_path / "peer.key")
    peer_id = peer_id_of(key)
    assert peer_id.startswith("12D3KooW")
    assert peer_id_of(key.public_key()) == peer_id
    for form in (peer_id, PeerID.from_base58(peer_id)):
        assert (
            public_key_from_peer_id(form).public_bytes_raw() == key.public_key().public_bytes_raw()
        )


@pytest.mark.parametrize(
    ("peer_id", "problem"), [("0OIl", "not valid base58"), ("", "does not inline")]
)
def test_malformed_peer_ids(peer_id: str, problem: str) -> None:
    with pytest.raises(IdentityError, match=problem):
        public_key_from_peer_id(peer_id)


def test_peer_id_matches_hivemind(tmp_path: Path) -> None:
    path = tmp_path / "peer.key"
    key = load_or_create_identity(path)
    dht = loopback_dht(identity_path=str(path))
    try:
        assert dht.peer_id.to_base58() == peer_id_of(key)
    finally:
        dht.shutdown()
