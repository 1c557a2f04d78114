"""The digest a peer signs for every activation it returns, and its verification.

Peers and clients both import this module, so both sides always encode the same bytes. The
client builds the digest from what it expects (its own stream, nonce, step, span, batch layout
and the tensors it sent and received) and checks the peer's signature with the key inside the
peer's id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import PeerID

from swarmllm.protocol import PROTOCOL_MAJOR
from swarmllm.security.identity import IdentityError, public_key_from_peer_id

PROTOCOL_VERSION = PROTOCOL_MAJOR  # signatures of one major version never verify in another

DIGEST_BYTES = 32
SIGNATURE_BYTES = 64
_ACTIVATION_DOMAIN = b"swarmllm-activation-v2"
_TENSOR_DIGEST_PERSON = b"swarmllm-tensors"  # blake2b personalization, at most 16 bytes


class SignatureError(ValueError):
    """A signature that does not prove the peer produced this output."""

    def __init__(self, message: str, peer_id: str, step: int):
        super().__init__(message)
        self.peer_id, self.step = peer_id, step


def tensor_digest(*tensors: torch.Tensor) -> bytes:
    """blake2b-256 over each tensor's dtype, shape and raw bytes; no tensors gives a fixed value."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_TENSOR_DIGEST_PERSON)
    for tensor in tensors:
        tensor = tensor.detach()
        # msgpack is self-delimiting and dtype+shape fix the data length, so frames can't blur.
        h.update(msgpack.packb([str(tensor.dtype).removeprefix("torch."), list(tensor.shape)]))
        # Views, not copies, unless the tensor is on another device or not contiguous.
        flat = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
        h.update(flat.numpy())
    return h.digest()


class MessageKind:
    """Which RPC a signed output answers: a reply of one never verifies as the other's."""

    INFERENCE = "inference"
    FORWARD = "forward"


@dataclass(frozen=True)
class ActivationDigest:
    """What one signature covers: which exchange (RPC kind, stream and its client-chosen
    nonce, step), which span and batch layout produced which output from which input."""

    protocol_version: int
    kind: str  # MessageKind
    model_id: str
    stream_id: str  # "" for a stateless forward
    nonce: bytes  # chosen by the client at open (per stream) or per forward call
    position: int  # token position the message starts at
    step: int  # per-stream message counter
    start: int  # the exact span [start, end) that was run
    end: int
    batch: int  # rows of the input
    pad_lengths: tuple[int, ...]  # left padding of each row; () when there is none
    input_digest: bytes
    output_digest: bytes

    @classmethod
    def of(
        cls,
        kind: str,
        model_id: str,
        stream_id: str,
        nonce: bytes,
        position: int,
        step: int,
        start: int,
        end: int,
        pad_lengths: Sequence[int] | None,
        inputs: Sequence[torch.Tensor],
        output: torch.Tensor,
    ) -> ActivationDigest:
        """The digest, in this protocol version, of ``output`` computed from ``inputs`` (every
        tensor of the request, as sent; the first is the hidden states, whose rows are the
        batch)."""
        return cls(
            PROTOCOL_VERSION,
            kind,
            model_id,
            stream_id,
            nonce,
            position,
            step,
            start,
            end,
            int(inputs[0].shape[0]),
            tuple(pad_lengths) if pad_lengths and any(pad_lengths) else (),
            tensor_digest(*inputs),
            tensor_digest(output),
        )

    def to_bytes(self) -> bytes:
        """Canonical encoding: a domain-separated msgpack list in a fixed field order.

        Fields are coerced to their plain types so that e.g. a numpy int encodes like an int.
        """
        return msgpack.packb(
            [
                _ACTIVATION_DOMAIN,
                int(self.protocol_version),
                str(self.kind),
                str(self.model_id),
                str(self.stream_id),
                bytes(self.nonce),
                int(self.position),
                int(self.step),
                int(self.start),
                int(self.end),
                int(self.batch),
                [int(p) for p in self.pad_lengths],
                bytes(self.input_digest),
                bytes(self.output_digest),
            ],
            use_bin_type=True,
        )


def sign_activation(key: Ed25519PrivateKey, digest: ActivationDigest) -> bytes:
    return key.sign(digest.to_bytes())


def verify_activation(peer_id: str | PeerID, digest: ActivationDigest, signature: bytes) -> None:
    """Check that ``peer_id`` signed ``digest``; raise SignatureError saying what failed."""
    peer_id = str(peer_id)
    where = f"peer {peer_id}, step {digest.step}"
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
        got = (
            f"{len(signature)} bytes" if isinstance(signature, bytes) else type(signature).__name__
        )
        raise SignatureError(
            f"{where}: signature must be {SIGNATURE_BYTES} bytes, got {got}", peer_id, digest.step
        )
    try:
        public_key = public_key_from_peer_id(peer_id)
    except IdentityError as e:
        raise SignatureError(f"{where}: cannot check signature: {e}", peer_id, digest.step) from e
    try:
        public_key.verify(signature, digest.to_bytes())
    except InvalidSignature as e:
        raise SignatureError(
            f"{where}: signature does not match the expected digest "
            f"(span [{digest.start}, {digest.end}), position {digest.position})",
            peer_id,
            digest.step,
        ) from e
