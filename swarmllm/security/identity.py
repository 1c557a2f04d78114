"""Peer identity: an Ed25519 key in a libp2p ``PrivateKey`` protobuf file.

The same file is given to hivemind (``identity_path=``), so the key that signs activations and
DHT records is the one libp2p authenticates connections with. An Ed25519 peer id is an identity
multihash that contains the public key, so anyone can check a signature from the peer id alone.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from google.protobuf.message import DecodeError
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

_SEED_BYTES = 32
_PUBLIC_KEY_BYTES = 32
# multihash "identity" code 0x00, then the length of the PublicKey protobuf (36 bytes for Ed25519)
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, 0x24])


class IdentityError(ValueError):
    """An identity file or peer id that cannot be used as an Ed25519 identity."""


def create_identity(path: str | Path) -> Ed25519PrivateKey:
    """Generate a new key and write it to ``path`` (mode 0600); refuse to overwrite a file."""
    path = Path(path)
    try:
        return _write_new_identity(path)
    except FileExistsError as e:
        raise IdentityError(f"identity file {path} already exists; refusing to overwrite it") from e


def load_identity(path: str | Path) -> Ed25519PrivateKey:
    """Read an existing identity file; raise IdentityError naming the file and the problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as e:
        raise IdentityError(f"identity file {path} does not exist") from e
    except OSError as e:
        raise IdentityError(f"identity file {path} cannot be read: {e.strerror or e}") from e
    return _parse_private_key(raw, path)


def load_or_create_identity(path: str | Path) -> Ed25519PrivateKey:
    """Load the identity at ``path``, creating it on first use."""
    path = Path(path)
    if not path.exists():
        try:
            return _write_new_identity(path)
        except FileExistsError:
            pass  # another process created it since we looked: use theirs
    return load_identity(path)


def peer_id_of(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The base58 libp2p peer id (``12D3KooW…``) of a key, as p2pd reports it."""
    public_key = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    proto = crypto_pb2.PublicKey(key_type=crypto_pb2.Ed25519, data=raw).SerializeToString()
    return PeerID(_IDENTITY_MULTIHASH_PREFIX + proto).to_base58()


def public_key_from_peer_id(peer_id: str | PeerID) -> Ed25519PublicKey:
    """The Ed25519 public key inlined in a peer id; IdentityError for any other kind of id."""
    if isinstance(peer_id, PeerID):
        peer_id = peer_id.to_base58()
    return _public_key_from_base58(peer_id)


@lru_cache(maxsize=4096)
def _public_key_from_base58(peer_id: str) -> Ed25519PublicKey:
    # Called for every signed message, hence the cache (failures are not cached).
    try:
        raw = PeerID.from_base58(peer_id).to_bytes()
    except ValueError as e:
        raise IdentityError(f"peer id {peer_id!r} is not valid base58") from e
    if not raw.startswith(_IDENTITY_MULTIHASH_PREFIX):
        raise IdentityError(
            f"peer id {peer_id} does not inline an Ed25519 public key "
            "(it is not a 36-byte identity multihash; RSA peer ids are hashes of the key)"
        )
    proto = crypto_pb2.PublicKey()
    try:
        proto.ParseFromString(raw[len(_IDENTITY_MULTIHASH_PREFIX) :])
    except DecodeError as e:
        raise IdentityError(f"peer id {peer_id} holds a malformed public key: {e}") from e
    if not proto.IsInitialized() or proto.key_type != crypto_pb2.Ed25519:
        raise IdentityError(f"peer id {peer_id} does not hold an Ed25519 public key")
    if len(proto.data) != _PUBLIC_KEY_BYTES:
        raise IdentityError(
            f"peer id {peer_id} holds an Ed25519 key of {len(proto.data)} bytes, "
            f"expected {_PUBLIC_KEY_BYTES}"
        )
    return Ed25519PublicKey.from_public_bytes(proto.data)


def _write_new_identity(path: Path) -> Ed25519PrivateKey:
    """Create ``path`` atomically with mode 0600; FileExistsError if it is already there."""
    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes_raw()
    public = key.public_key().public_bytes_raw()
    proto = crypto_pb2.PrivateKey(key_type=crypto_pb2.Ed25519, data=seed + public)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return key


def _parse_private_key(raw: bytes, path: Path) -> Ed25519PrivateKey:
    proto = crypto_pb2.PrivateKey()
    try:
        proto.ParseFromString(raw)
    except DecodeError as e:
        raise IdentityError(f"identity file {path} is not a libp2p private key: {e}") from e
    if not proto.IsInitialized():
        raise IdentityError(f"identity file {path} is not a libp2p private key (fields missing)")
    if proto.key_type != crypto_pb2.Ed25519:
        type_name = crypto_pb2.KeyType.Name(proto.key_type)
        raise IdentityError(
            f"identity file {path} holds a {type_name} key; swarmllm needs an Ed25519 key "
            "(create one with `swarmllm keygen FILE`)"
        )
    expected = _SEED_BYTES + _PUBLIC_KEY_BYTES
    if len(proto.data) != expected:
        raise IdentityError(
            f"identity file {path} holds {len(proto.data)} bytes of Ed25519 key data, "
            f"expected {expected} (seed + public key)"
        )
    try:
        key = Ed25519PrivateKey.from_private_bytes(proto.data[:_SEED_BYTES])
    except (ValueError, UnsupportedAlgorithm) as e:
        raise IdentityError(f"identity file {path} holds an invalid Ed25519 key: {e}") from e
    if key.public_key().public_bytes_raw() != proto.data[_SEED_BYTES:]:
        raise IdentityError(
            f"identity file {path} is corrupt: its public key does not match its private key"
        )
    return key
