"""The signed activation digest: what it covers, and that any change breaks the signature."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import PeerID

from swarmllm.security.identity import peer_id_of
from swarmllm.security.signing import (
    PROTOCOL_VERSION,
    ActivationDigest,
    MessageKind,
    SignatureError,
    sign_activation,
    tensor_digest,
    verify_activation,
)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def digest() -> ActivationDigest:
    hidden = torch.randn(1, 3, 8)
    return ActivationDigest(
        protocol_version=PROTOCOL_VERSION,
        kind=MessageKind.INFERENCE,
        model_id="tiny-llama",
        stream_id="stream-1",
        nonce=b"n" * 16,
        position=5,
        step=2,
        start=3,
        end=7,
        batch=1,
        pad_lengths=(),
        input_digest=tensor_digest(hidden),
        output_digest=tensor_digest(hidden * 2),
    )


def test_tensor_digest_is_deterministic_and_sees_every_value() -> None:
    x = torch.randn(2, 3, 4)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert len(tensor_digest(x)) == 32
    changed = x.clone()
    changed[1, 2, 3] += 1e-3
    assert tensor_digest(changed) != tensor_digest(x)


def test_tensor_digest_covers_dtype_shape_and_framing() -> None:
    zeros = torch.zeros(4, dtype=torch.float32)  # 16 zero bytes in each of the first three
    digests = {
        tensor_digest(zeros),
        tensor_digest(zeros.view(2, 2)),
        tensor_digest(torch.zeros(2, dtype=torch.float64)),
        tensor_digest(zeros[:2], zeros[2:]),
        tensor_digest(torch.zeros(0)),
        tensor_digest(),
    }
    assert len(digests) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_digest_reads_the_raw_bytes_of_each_wire_dtype(dtype: torch.dtype) -> None:
    x = torch.randn(3, 5).to(dtype)
    transposed = x.t()  # not contiguous: digested as its logical contents
    assert tensor_digest(transposed) == tensor_digest(transposed.contiguous())
    assert tensor_digest(x) != tensor_digest(transposed.contiguous())
    assert tensor_digest(torch.tensor(1.0, dtype=dtype)) != tensor_digest(
        torch.tensor(2.0, dtype=dtype)
    )


def test_sign_and_verify(key: Ed25519PrivateKey, digest: ActivationDigest) -> None:
    signature = sign_activation(key, digest)
    verify_activation(peer_id_of(key), digest, signature)
    verify_activation(PeerID.from_base58(peer_id_of(key)), digest, signature)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("protocol_version", PROTOCOL_VERSION + 1),
        ("model_id", "other-model"),
        ("kind", MessageKind.FORWARD),  # a stream's reply replayed as a forward's, or back
        ("stream_id", "stream-2"),
        ("nonce", b"m" * 16),  # another stream that reuses the id
        ("position", 6),
        ("step", 3),
        ("start", 4),
        ("end", 8),
        ("batch", 2),  # the same bytes read as another batch layout
        ("pad_lengths", (1,)),
        ("input_digest", tensor_digest(torch.ones(1))),
        ("output_digest", tensor_digest(torch.ones(1))),
    ],
)
def test_any_field_change_fails(
    key: Ed25519PrivateKey, digest: ActivationDigest, field: str, value: object
) -> None:
    signature = sign_activation(key, digest)
    changed = dataclasses.replace(digest, **{field: value})
    with pytest.raises(SignatureError, match="does not match") as info:
        verify_activation(peer_id_of(key), changed, signature)
    assert info.value.peer_id == peer_id_of(key)
    assert info.value.step == changed.step
    assert peer_id_of(key) in str(info.value) and f"step {changed.step}" in str(info.value)


def test_signature_by_another_peer_fails(key: Ed25519PrivateKey, digest: ActivationDigest) -> None:
    impostor = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match="does not match"):
        verify_activation(peer_id_of(key), digest, sign_activation(impostor, digest))


def test_malformed_signature_and_peer_id(key: Ed25519PrivateKey, digest: ActivationDigest) -> None:
    signature = sign_activation(key, digest)
    with pytest.raises(SignatureError, match="must be 64 bytes, got 63 bytes"):
        verify_activation(peer_id_of(key), digest, signature[:-1])
    rsa_style_peer_id = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"
    with pytest.raises(SignatureError, match="cannot check signature"):
        verify_activation(rsa_style_peer_id, digest, signature)


def test_encoding_is_canonical_across_int_types(digest: ActivationDigest) -> None:
    numpy_fields = dataclasses.replace(digest, position=np.int64(5), step=np.int32(2))
    assert numpy_fields.to_bytes() == digest.to_bytes()
    assert b"swarmllm-activation-v2" in digest.to_bytes()


def test_of_reads_the_layout_from_the_inputs_and_ignores_zero_padding() -> None:
    hidden, output = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    args = (MessageKind.INFERENCE, "m", "s", b"n" * 16, 0, 1, 0, 4)
    padded = ActivationDigest.of(*args, (0, 2), [hidden], output)
    assert padded.batch == 2 and padded.pad_lengths == (0, 2)
    unpadded = ActivationDigest.of(*args, (0, 0), [hidden], output)
    assert (
        unpadded.pad_lengths == () == ActivationDigest.of(*args, None, [hidden], output).pad_lengths
    )


def test_sign_and_verify_cost_stays_small(key: Ed25519PrivateKey, digest: ActivationDigest) -> None:
    # Per-token path. Ed25519 takes ~0.1 ms for both; RSA-2048 (hivemind's default) takes ~1 ms.
    peer_id, rounds = peer_id_of(key), 200
    started = time.perf_counter()
    for _ in range(rounds):
        verify_activation(peer_id, digest, sign_activation(key, digest))
    assert (time.perf_counter() - started) / rounds < 2e-3
