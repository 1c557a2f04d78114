"""``swarmllm generate``: stream a model's answer, computed by the swarm, to stdout."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from swarmllm.commands.arguments import multiaddr, positive_int, readable_file
from swarmllm.dht.records import PRECISIONS


def add_generate_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="generate text through the swarm")
    parser.add_argument("prompt", nargs="?", help="the prompt (may also follow --initial-peers)")
    parser.add_argument("--model", help="hub id or local directory (default: embedded SmolLM2)")
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help="a PNG or JPEG picture the prompt asks about (repeatable); needs a model with a "
        "vision adapter (the embedded model, LLaVA)",
    )
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    parser.add_argument("--top-k", type=positive_int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--wire-dtype", choices=["float32", "bfloat16", "float16"], default="float32"
    )
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per step before failover"
    )
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
    parser.add_argument(
        "--show-route", action="store_true", help="print the chosen peers to stderr"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print to stderr where each step's time went (client, each hop's compute, network)",
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
    # stderr carries only the answer's errors; -v shows failovers and bans
    parser.set_defaults(handler=generate, log_level=logging.ERROR)


def generate(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    from swarmllm.blocks.prompts import prompt_ids
    from swarmllm.blocks.vision import load_image
    from swarmllm.client.model import DistributedModelForCausalLM
    from swarmllm.client.routing import format_route
    from swarmllm.security.allowlist import load_allowlist

    _take_trailing_prompt(args)
    images = [load_image(path) for path in args.image]  # fail before joining the swarm
    allowed = load_allowlist(args.allowed_peers) if args.allowed_peers else None
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    sampling = (
        {"do_sample": False}
        if args.temperature == 0
        else {"do_sample": True, "temperature": args.temperature}
    )
    with DistributedModelForCausalLM.from_pretrained(
        args.model,
        initial_peers=args.initial_peers,
        wire_dtype=args.wire_dtype,
        step_timeout=args.timeout,
        verify_fraction=args.verify_fraction,
        allowed_peers=allowed,
        identity=args.identity,
        profile=args.profile,
        device=args.device,
        min_precision=args.min_precision,
    ) as model:
        model.check_coverage()
        tokenizer = model.tokenizer
        if images:
            input_ids = model.image_prompt(args.prompt, len(images), chat=args.chat)
        else:
            input_ids = prompt_ids(tokenizer, args.prompt, chat=args.chat)
        max_length = input_ids.shape[1] + args.max_new_tokens
        with model.inference_session(max_length=max_length, images=bool(images)) as session:
            if args.show_route:
                print(format_route(session.route), file=sys.stderr)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            model.generate(
                input_ids,
                session=session,
                streamer=streamer,
                max_new_tokens=args.max_new_tokens,
                top_k=args.top_k,
                top_p=args.top_p,
                repetition_penalty=args.repetition_penalty,
                seed=args.seed,
                images=images or None,
                **sampling,
            )
            for evidence in session.evidence:
                banned = ", ".join(evidence.banned)
                print(
                    f"warning: spot-check of blocks {evidence.start}-{evidence.end - 1} at step "
                    f"{evidence.step} caught disagreeing outputs; banned {banned} "
                    "(-v logs the signed evidence)",
                    file=sys.stderr,
                )
        if model.profile is not None:
            print(f"\n{model.profile.format()}", file=sys.stderr)


def fraction(text: str) -> float:
    """argparse type: a number within [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number within [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number within [0, 1], got {value}")
    return value


def _take_trailing_prompt(args: argparse.Namespace) -> None:
    """``--initial-peers A B "prompt"``: argparse gives the prompt to --initial-peers."""
    peers = args.initial_peers
    if args.prompt is None and peers and not peers[-1].startswith("/"):
        args.prompt = peers.pop()
    if args.prompt is None:
        raise ValueError("no prompt given")
    for peer in peers:
        try:
            multiaddr(peer)
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None
