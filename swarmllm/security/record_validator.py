"""Owned DHT records: only the peer named in a record's subkey can write that record.

Peers announce ``{model_id}.{block}`` with subkey = their base58 peer id. Give every DHT
``record_validators=[PeerIdSignatureValidator(key)]`` and the rules below hold on every node,
for records it is asked to store and for records it reads from others:

* a record with a subkey must have a subkey that is a ``str`` Ed25519 peer id, and its value
  must end with that peer's Ed25519 signature over (key, subkey, value, expiration time), so
  nobody can forge, alter, or extend the life of another peer's record;
* a record under any other subkey (another type, an RSA peer id, garbage) is rejected;
* a plain record without a subkey is accepted unchanged, so other uses of the DHT still work.

hivemind hands validators serialized bytes: ``key`` is the 20-byte DHTID (hash of the key
string), ``subkey`` is the msgpack-serialized subkey (msgpack ``None`` for a plain record) and
``value`` is the msgpack-serialized value; the signature covers exactly those bytes.
"""

from __future__ import annotations

import logging

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from swarmllm.security.identity import IdentityError, peer_id_of, public_key_from_peer_id
from swarmllm.security.signing import SIGNATURE_BYTES

logger = logging.getLogger(__name__)

_RECORD_DOMAIN = b"swarmllm-dht-record-v1"
_NO_SUBKEY = DHTProtocol.IS_REGULAR_VALUE


class PeerIdSignatureValidator(RecordValidatorBase):
    """Signs our own records and rejects records under a peer id subkey not signed by that peer.

    Without a private key (a client that only reads) it validates and strips but never signs.
    """

    def __init__(self, private_key: Ed25519PrivateKey | None = None):
        self._private_key = private_key
        self.peer_id = peer_id_of(private_key) if private_key is not None else None
        self._own_subkey = (
            DHTProtocol.serializer.dumps(self.peer_id) if self.peer_id is not None else None
        )

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._private_key is None or record.subkey != self._own_subkey:
            return record.value
        return record.value + self._private_key.sign(_signed_payload(record))

    def validate(self, record: DHTRecord) -> bool:
        if record.subkey == _NO_SUBKEY:
            return True
        public_key = _owner_key(record.subkey)
        if public_key is None:
            logger.debug("rejecting DHT record: subkey %r is not an Ed25519 peer id", record.subkey)
            return False
        if len(record.value) < SIGNATURE_BYTES:
            logger.debug(
                "rejecting DHT record under %r: value too short to be signed", record.subkey
            )
            return False
        signature = record.value[-SIGNATURE_BYTES:]
        unsigned = DHTRecord(
            record.key, record.subkey, record.value[:-SIGNATURE_BYTES], record.expiration_time
        )
        try:
            public_key.verify(signature, _signed_payload(unsigned))
        except InvalidSignature:
            logger.debug("rejecting DHT record under %r: bad signature", record.subkey)
            return False
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        # Only called on records that passed validate(): any subkey here is a signed peer id.
        if record.subkey == _NO_SUBKEY:
            return record.value
        return record.value[:-SIGNATURE_BYTES]

    @property
    def priority(self) -> int:
        # Validate and strip before validators that deserialize the value; sign after them.
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, PeerIdSignatureValidator):
            return False
        if other.peer_id is None or other.peer_id == self.peer_id:
            return True
        if self.peer_id is None:
            self._private_key, self.peer_id = other._private_key, other.peer_id
            self._own_subkey = other._own_subkey
            return True
        raise ValueError(
            f"one DHT cannot sign records as two peers ({self.peer_id} and {other.peer_id})"
        )


def _signed_payload(record: DHTRecord) -> bytes:
    return msgpack.packb(
        [_RECORD_DOMAIN, record.key, record.subkey, record.value, float(record.expiration_time)],
        use_bin_type=True,
    )


def _owner_key(subkey_bytes: bytes) -> Ed25519PublicKey | None:
    """The public key of the peer a serialized subkey names, or None if it names no such peer."""
    try:  # plain msgpack: a peer id is a str, and ext types must not be decoded here at all
        subkey = msgpack.unpackb(subkey_bytes, raw=False)
    except (ValueError, msgpack.UnpackException):
        return None
    if not isinstance(subkey, str):
        return None
    try:
        return public_key_from_peer_id(subkey)
    except IdentityError:
        return None
