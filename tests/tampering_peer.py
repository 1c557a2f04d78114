"""A real peer that misbehaves, for tests only: ``python tests/tampering_peer.py MODE peer ARGS``.

MODE ``noise``: the span adds Gaussian noise to every output, which the peer then signs
correctly (a valid signature over wrong values; only spot-checking can catch it).
MODE ``noise-once``: the same noise, on the third decode step only (the one lie a peer hopes
a spot-check of a later step will not see).
MODE ``scale``: every output scaled by ``SCALE`` (2% off: inside the bfloat16 compute
tolerance, outside a bfloat16 wire's rounding between float32 peers).
MODE ``skip-block``: a cheaper model: the span skips its last block, and says nothing.
MODE ``wrong-key``: outputs are right, but every reply is signed with a key other than the
peer's own (the client's signature check catches it on the first reply).
MODE ``nan``: every output is NaN, correctly signed (the client's own check of each reply must
blame this peer, not the next hop that would refuse the NaN).
MODE ``bomb``: every step is answered with a msgpack bomb of ``BOMB_BYTES`` as its metadata
(an array of empty arrays: ~70 times its size once decoded), in a frame hivemind sends as it is.

The misbehaviour is patched into this process only; the production peer has no such switch.
"""

from __future__ import annotations

import sys

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import swarmllm.peer.servicer
from swarmllm.blocks.span import BlockSpan
from swarmllm.cli import main
from swarmllm.security.signing import ActivationDigest

NOISE_STD = 0.05  # far above the float32 tolerance, small enough to look like activations


def add_noise() -> None:
    forward, decode_batch = BlockSpan.forward, BlockSpan.decode_batch

    def noisy_forward(self: BlockSpan, *args, **kwargs) -> torch.Tensor:
        output = forward(self, *args, **kwargs)
        return output + NOISE_STD * torch.randn_like(output)

    def noisy_decode_batch(self: BlockSpan, *args, **kwargs) -> list[torch.Tensor]:
        return [
            out + NOISE_STD * torch.randn_like(out) for out in decode_batch(self, *args, **kwargs)
        ]

    BlockSpan.forward, BlockSpan.decode_batch = noisy_forward, noisy_decode_batch


def add_noise_once(lied_at: int = 3) -> None:
    forward = BlockSpan.forward
    steps = 0

    def noisy_once(self: BlockSpan, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        nonlocal steps
        output = forward(self, hidden, *args, **kwargs)
        steps += hidden.shape[1] == 1  # a single session's decode step runs alone
        if steps != lied_at or hidden.shape[1] != 1:
            return output
        return output + NOISE_STD * torch.randn_like(output)

    BlockSpan.forward = noisy_once


SCALE = 1.02


def scale_outputs() -> None:
    forward, decode_batch = BlockSpan.forward, BlockSpan.decode_batch

    def scaled_forward(self: BlockSpan, *args, **kwargs) -> torch.Tensor:
        return SCALE * forward(self, *args, **kwargs)

    def scaled_decode_batch(self: BlockSpan, *args, **kwargs) -> list[torch.Tensor]:
        return [SCALE * out for out in decode_batch(self, *args, **kwargs)]

    BlockSpan.forward, BlockSpan.decode_batch = scaled_forward, scaled_decode_batch


def skip_last_block() -> None:
    run_layers = BlockSpan._run_layers

    def cheaper(self: BlockSpan, *args, **kwargs) -> torch.Tensor:
        layers, windows = self.layers, self.windows
        self.layers, self.windows = layers[:-1], windows[:-1]
        try:
            return run_layers(self, *args, **kwargs)
        finally:
            self.layers, self.windows = layers, windows

    BlockSpan._run_layers = cheaper


def output_nan() -> None:
    forward, decode_batch = BlockSpan.forward, BlockSpan.decode_batch

    def nan_forward(self: BlockSpan, *args, **kwargs) -> torch.Tensor:
        return torch.full_like(forward(self, *args, **kwargs), torch.nan)

    def nan_decode_batch(self: BlockSpan, *args, **kwargs) -> list[torch.Tensor]:
        return [torch.full_like(out, torch.nan) for out in decode_batch(self, *args, **kwargs)]

    BlockSpan.forward, BlockSpan.decode_batch = nan_forward, nan_decode_batch


BOMB_BYTES = 256 * 1024**2


def reply_with_a_bomb() -> None:
    from hivemind.proto import runtime_pb2

    count = BOMB_BYTES - 5
    bomb = runtime_pb2.ExpertResponse(metadata=b"\xdd" + count.to_bytes(4, "big") + b"\x90" * count)

    async def bomb_step(self, session, request) -> runtime_pb2.ExpertResponse:
        return bomb

    swarmllm.peer.servicer.PeerServicer._step = bomb_step


def sign_with_another_key() -> None:
    impostor = Ed25519PrivateKey.generate()

    def sign_activation(key: Ed25519PrivateKey, digest: ActivationDigest) -> bytes:
        return impostor.sign(digest.to_bytes())

    swarmllm.peer.servicer.sign_activation = sign_activation


MODES = {
    "noise": add_noise,
    "noise-once": add_noise_once,
    "scale": scale_outputs,
    "skip-block": skip_last_block,
    "wrong-key": sign_with_another_key,
    "nan": output_nan,
    "bomb": reply_with_a_bomb,
}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in MODES or sys.argv[2] != "peer":
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(MODES)}}} peer [peer arguments]")
    MODES[sys.argv[1]]()
    sys.exit(main(sys.argv[2:]))
