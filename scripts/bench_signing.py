"""The per-token cost of signing and verifying activations, end to end and in isolation.

End to end: the same greedy generation through a local 3-peer swarm of the embedded model,
with the client checking every hop's signature and without (``verify_signatures=False``),
interleaved runs, medians. Peers always sign, so their share is measured in isolation: the
digests and the Ed25519 signature of one hop's reply, times the hops per token. Writes
bench_results/bench_signing.json.

    python scripts/bench_signing.py [--runs 5] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_common import TokenClock, write_report
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from swarmllm.blocks.prompts import prompt_ids
from swarmllm.blocks.sources import resolve_model
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.security.identity import peer_id_of
from swarmllm.security.signing import (
    ActivationDigest,
    MessageKind,
    sign_activation,
    verify_activation,
)
from swarmllm.swarm import LocalSwarm

PROMPT = "Write a short story about a lighthouse keeper and a seagull."
PEERS = 3
TARGET_OVERHEAD = 0.03


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each (at least 3)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--micro-repeats", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_signing.json"))
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be at least 3")
    return args


def per_call_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median over 5 batches of the mean time of one call."""
    fn()
    batches = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        batches.append((time.perf_counter() - started) / repeats)
    return statistics.median(batches)


def micro_costs(hidden_size: int, repeats: int) -> dict[str, float]:
    """Seconds per hop per decode step: what a peer adds to sign, what a client adds to check."""
    key = Ed25519PrivateKey.generate()
    peer_id = peer_id_of(key)
    hidden, output = torch.randn(1, 1, hidden_size), torch.randn(1, 1, hidden_size)
    nonce = bytes(16)

    def digest() -> ActivationDigest:
        return ActivationDigest.of(
            MessageKind.INFERENCE, "model", "stream", nonce, 100, 100, 0, 10, None, [hidden], output
        )

    signature = sign_activation(key, digest())
    return {
        "peer_sign_s": per_call_seconds(lambda: sign_activation(key, digest()), repeats),
        "client_verify_s": per_call_seconds(
            lambda: verify_activation(peer_id, digest(), signature), repeats
        ),
    }


def main() -> None:
    args = parse_args()
    console = Console()
    source = resolve_model()
    tokenizer = source.load_tokenizer()
    prompt = prompt_ids(tokenizer, PROMPT)

    with LocalSwarm(PEERS, source=source) as swarm:
        swarm.wait_until_ready(timeout=300)
        with DistributedModelForCausalLM.from_pretrained(
            None, initial_peers=swarm.initial_peers
        ) as model:

            def run(verify: bool) -> TokenClock:
                model.verify_signatures = verify  # read by each new session
                clock = TokenClock()
                model.generate(
                    prompt, max_new_tokens=args.new_tokens, eos_token_id=[], streamer=clock
                )
                return clock

            run(True), run(False)  # warm-up
            clocks: dict[bool, list[TokenClock]] = {True: [], False: []}
            for index in range(args.runs):
                for verify in (True, False) if index % 2 == 0 else (False, True):
                    clocks[verify].append(run(verify))

    def ms_per_token(verify: bool) -> float:
        return 1000 / statistics.median(c.decode_tokens_per_second for c in clocks[verify])

    with_ms, without_ms = ms_per_token(True), ms_per_token(False)
    micro = micro_costs(source.config.hidden_size, args.micro_repeats)
    peer_ms = PEERS * micro["peer_sign_s"] * 1000
    client_ms = PEERS * micro["client_verify_s"] * 1000
    measured_overhead = with_ms / without_ms - 1
    # everything signing and checking add to a token, relative to a token without any of it
    micro_overhead = (peer_ms + client_ms) / (with_ms - peer_ms - client_ms)
    report = {
        "model_id": source.model_id,
        "peers": PEERS,
        "prompt_tokens": prompt.shape[1],
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "decode_ms_per_token": {"verified": with_ms, "unverified": without_ms},
        "client_verification_overhead_measured": measured_overhead,
        "per_hop_ms": {
            "peer_digests_and_sign": micro["peer_sign_s"] * 1000,
            "client_digests_and_verify": micro["client_verify_s"] * 1000,
        },
        "per_token_ms": {"peer_signing": peer_ms, "client_verification": client_ms},
        "signing_and_verification_overhead_micro": micro_overhead,
        "target_overhead": TARGET_OVERHEAD,
    }
    write_report(args.out, report)

    table = Table(title=f"{PEERS}-peer swarm, {args.new_tokens} new tokens, fp32, medians")
    table.add_column("per decoded token")
    table.add_column("ms", justify="right")
    table.add_row("client verifies signatures", f"{with_ms:.2f}")
    table.add_row("client skips verification", f"{without_ms:.2f}")
    table.add_row(f"peers sign ({PEERS} hops, isolated)", f"{peer_ms:.3f}")
    table.add_row(f"client verifies ({PEERS} hops, isolated)", f"{client_ms:.3f}")
    console.print(table)
    console.print(
        f"verification, end to end: {measured_overhead:+.1%} per token; "
        f"signing + verification, isolated: {micro_overhead:+.1%} (target ≤ {TARGET_OVERHEAD:.0%})"
    )
    console.print(f"written to {args.out}")


if __name__ == "__main__":
    main()
