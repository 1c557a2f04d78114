"""``swarmllm generate``: stream a model's answer, computed by the swarm, to stdout."""

from __future__ import annotations

import argparse
import logging
import sys

from swarmllm.cli import multiaddr, positive_int


def add_generate_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="generate text through the swarm")
    parser.add_argument("prompt", nargs="?", help="the prompt (may also follow --initial-peers)")
    parser.add_argument("--model", help="hub id or local directory (default: embedded SmolLM2)")
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
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
        "--show-route", action="store_true", help="print the chosen peers to stderr"
    )
    # stderr carries only the answer's errors; -v shows failovers and bans
    parser.set_defaults(handler=generate, log_level=logging.ERROR)


def generate(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    from swarmllm.client.model import DistributedModelForCausalLM
    from swarmllm.client.routing import format_route

    _take_trailing_prompt(args)
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
    ) as model:
        model.check_coverage()
        tokenizer = model.tokenizer
        if args.chat:
            input_ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": args.prompt}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
        else:
            input_ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
        max_length = input_ids.shape[1] + args.max_new_tokens
        with model.inference_session(max_length=max_length) as session:
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
                **sampling,
            )


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
