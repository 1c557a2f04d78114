"""Options that ``generate`` and ``chat`` share: joining the swarm and sampling."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from swarmllm.client.drafting import SPECULATIVE_MODES, check_speculative
from swarmllm.commands.arguments import (
    fraction,
    non_negative_float,
    peer_multiaddr,
    positive_int,
    readable_file,
)
from swarmllm.commands.parsing import UsageError
from swarmllm.precisions import PRECISIONS

DEFAULT_SPECULATIVE = "lookup"  # see the README's "Speculative decoding"

SAMPLING_HELP = (
    "sampling: greedy unless --temperature, --top-k or --top-p is given (as in the Python "
    "API); --temperature 0 is greedy; --seed makes sampling reproducible"
)


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local directory (default: embedded SmolLM2)")
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        required=True,
        metavar="MADDR",
        help="a multiaddr ending in /p2p/<peer id>, as `swarmllm swarm` or a peer printed it",
    )
    parser.add_argument(
        "--wire-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the activations sent between hops",
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per step before failover"
    )
    parser.add_argument(
        "--failover-timeout",
        type=non_negative_float,
        metavar="SECONDS",
        help="seconds a failover may search for peers to take a hop's blocks over, waiting "
        "for blocks whose peers all left to be served again (default 60)",
    )
    parser.add_argument(
        "--verify-fraction",
        type=fraction,
        default=0.0,
        metavar="F",
        help="re-run each hop's step on another peer with probability F and compare (cost: "
        "one stateless forward of the whole sequence so far per check; default 0)",
    )
    parser.add_argument(
        "--allowed-peers",
        type=readable_file,
        metavar="FILE",
        help="route only through the peers listed (one peer id per line, '#' comments)",
    )
    parser.add_argument(
        "--identity", type=Path, help="this client's key file (for peers that allow-list it)"
    )
    add_draft_model_option(parser)
    parser.add_argument(
        "--device",
        default="auto",
        metavar="auto|cpu|cuda[:N]|mps",
        help="where the embeddings and LM head compute (default auto: CUDA, else MPS, else CPU)",
    )
    parser.add_argument(
        "--min-precision",
        choices=list(PRECISIONS),
        help="route only through peers computing at this precision or finer "
        "(nf4 < int8 < bfloat16 < float16 < float32; default: any)",
    )
    # stderr carries only the answer's errors; -v shows failovers and bans
    parser.set_defaults(log_level=logging.ERROR)


def add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("generation", SAMPLING_HELP)
    group.add_argument(
        "--max-new-tokens", type=positive_int, default=max_new_tokens, help="tokens per answer"
    )
    group.add_argument("--temperature", type=float, help="sample at this temperature")
    group.add_argument("--top-k", type=positive_int, help="sample among the K likeliest tokens")
    group.add_argument(
        "--top-p", type=float, help="sample among the likeliest tokens holding P of the mass"
    )
    group.add_argument("--repetition-penalty", type=float, help="e.g. 1.1; 1 means none")
    group.add_argument("--seed", type=int, help="seed of the sampler (needs sampling)")
    group.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STRING",
        help="end the answer where STRING appears (repeatable)",
    )
    add_speculative_option(group, DEFAULT_SPECULATIVE)


def add_speculative_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: str
) -> None:
    parser.add_argument(
        "--speculative",
        choices=SPECULATIVE_MODES,
        help="speculative decoding: 'lookup' drafts tokens from the context (no extra model), "
        "'draft' from the --draft-model, and the swarm verifies several per step; the same "
        f"greedy tokens, the same sampling distribution (default: 'draft' with a --draft-model, "
        f"else {default!r})",
    )
    parser.set_defaults(default_speculative=default)


def add_draft_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--draft-model",
        metavar="REF",
        help="a small model with the same tokenizer (hub id or local directory), held whole "
        "here, that drafts tokens for --speculative draft",
    )


def speculative_mode(args: argparse.Namespace) -> str:
    """The ``--speculative`` mode (default: 'draft' when a draft model is named), refused
    before joining the swarm if this client lacks it."""
    has_draft_model = args.draft_model is not None
    mode = args.speculative or ("draft" if has_draft_model else args.default_speculative)
    try:
        return check_speculative(mode, has_draft_model)
    except ValueError as e:
        raise UsageError(f"--speculative: {e}") from None


def sampling_config(args: argparse.Namespace) -> dict[str, Any]:
    """``generate`` keywords from the options; the API decides greedy or sampling, the same
    way for both."""
    config: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    if args.stop:
        config["stop_strings"] = list(args.stop)
    config["speculative"] = speculative_mode(args)
    return config


def split_initial_peers(args: argparse.Namespace) -> None:
    """``--initial-peers A B "prompt"``: argparse gives the prompt to --initial-peers. A trailing
    word that is no multiaddr is the prompt only after at least one address; then every
    address is checked."""
    peers = args.initial_peers
    if args.prompt is None and len(peers) > 1 and not peers[-1].startswith("/"):
        args.prompt = peers.pop()
    for peer in peers:
        try:
            peer_multiaddr(peer)
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"--initial-peers: {e}") from None


def connect(args: argparse.Namespace):
    """The distributed model for the options, with the swarm's coverage checked."""
    from swarmllm.client.model import DistributedModelForCausalLM
    from swarmllm.security.allowlist import load_allowlist

    allowed = load_allowlist(args.allowed_peers) if args.allowed_peers else None
    model = DistributedModelForCausalLM.from_pretrained(
        args.model,
        initial_peers=args.initial_peers,
        wire_dtype=args.wire_dtype,
        step_timeout=args.timeout,
        **({} if args.failover_timeout is None else {"failover_timeout": args.failover_timeout}),
        verify_fraction=args.verify_fraction,
        allowed_peers=allowed,
        identity=args.identity,
        profile=getattr(args, "profile", False),
        device=args.device,
        min_precision=args.min_precision,
        draft_model=args.draft_model,
    )
    try:
        model.check_coverage()
    except BaseException:
        model.shutdown()
        raise
    return model


def report_evidence(session) -> None:
    for evidence in session.evidence:
        banned = ", ".join(evidence.banned)
        print(
            f"warning: spot-check of blocks {evidence.start}-{evidence.end - 1} at step "
            f"{evidence.step} caught disagreeing outputs; banned {banned} "
            "(-v logs the signed evidence)",
            file=sys.stderr,
        )
