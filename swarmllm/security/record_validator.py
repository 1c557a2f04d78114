"""Owned DHT records: only the peer named in a record's subkey can write that record.

Peers announce ``{model_id}.{block}`` with subkey = their base58 peer id. Give every DHT
``record_validators=[PeerIdSignatureValidator(key)]`` and the rules below hold on every node,
for records it is asked to store and for records it reads from others:

* a record's subkey must be a ``str`` Ed25519 peer id, and its value must end with that
  peer's Ed25519 signature over (key, subkey, value, expiration time), so nobody can forge,
  alter, or extend the life of another peer's record;
* a record under any other subkey (another type, an RSA peer id, garbage) is rejected, and so
  is a plain record without a subkey: hivemind lets a plain value that expires later replace
  the key's whole dictionary, so one unsigned store would erase every peer's record of a block;
* a record may expire at most ``MAX_RECORD_TTL`` seconds (plus clock slack) from now, so a peer
  cannot leave a record behind that outlives it by more than that;
* a record's value (signature included) is at most ``MAX_RECORD_BYTES`` long, which also
  bounds what it decodes to.

What this cannot bound: hivemind deserializes a whole dictionary that a node is asked to store
before any validator sees its entries (``DHTProtocol.rpc_store``), so that work is bounded only
by the size of one P2P message.

hivemind hands validators serialized bytes: ``key`` is the 20-byte DHTID (hash of the key
string), ``subkey`` is the msgpack-serialized subkey (msgpack ``None`` for a plain record) and
``value`` is the msgpack-serialized value; the signature covers exactly those bytes.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from swarmllm.security.identity import IdentityError, peer_id_of, public_key_from_peer_id
from swarmllm.security.signing import SIGNATURE_BYTES

logger = logging.getLogger(__name__)

_RECORD_DOMAIN = b"swarmllm-dht-record-v1"
_NO_SUBKEY = DHTProtocol.IS_REGULAR_VALUE

MAX_RECORD_TTL = 900.0  # seconds a record may live from the moment a node checks it
CLOCK_SLACK = 30.0  # seconds: DHT nodes' clocks may disagree this much
MAX_RECORD_BYTES = 1024  # a serialized value, signature included (a peer record is ~200)
_MAX_SUBKEY_BYTES = 64  # a serialized Ed25519 peer id is 54


class PeerIdSignatureValidator(RecordValidatorBase):
    """Signs our own records and rejects records under a peer id subkey not signed by that peer.

    Without a private key (a client that only reads) it validates and strips but never signs.
    ``signatures_checked`` counts the signatures this process verified (each DHT node runs in a
    process of its own): what reading and storing records costs.
    """

    signatures_checked: ClassVar[int] = 0

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
            logger.debug("rejecting DHT record: it has no subkey, so no owner")
            return False
        if len(record.value) > MAX_RECORD_BYTES:
            logger.debug("rejecting DHT record: %d bytes is over the limit", len(record.value))
            return False
        if not record.expiration_time <= get_dht_time() + MAX_RECORD_TTL + CLOCK_SLACK:
            logger.debug(
                "rejecting DHT record: it expires %.0f s from now, more than %.0f s",
                record.expiration_time - get_dht_time(),
                MAX_RECORD_TTL,
            )
            return False
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
        PeerIdSignatureValidator.signatures_checked += 1
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
        # Only called on records that passed validate(): the subkey is a signed peer id.
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
    if len(subkey_bytes) > _MAX_SUBKEY_BYTES:
        return None
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
