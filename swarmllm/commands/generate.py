"""``swarmllm generate``: stream a model's answer, computed by the swarm, to stdout."""

from __future__ import annotations

import argparse
import sys
import time

from swarmllm.commands.arguments import image_file
from swarmllm.commands.client_options import (
    UsageError,
    add_client_options,
    add_sampling_options,
    connect,
    report_evidence,
    sampling_config,
    split_initial_peers,
)


def add_generate_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate",
        help="generate text through the swarm",
        description="Stream the answer to stdout; a tokens/s line goes to stderr.",
    )
    parser.add_argument(
        "prompt",
        nargs="?",
        help="the prompt ('-' reads it from stdin; it may also follow --initial-peers)",
    )
    add_client_options(parser)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        type=image_file,
        metavar="PATH",
        help="a PNG or JPEG picture the prompt asks about, or the name of a shipped example "
        "(green_star.png); repeatable; needs a model with a vision adapter (the embedded "
        "model, LLaVA)",
    )
    add_sampling_options(parser, max_new_tokens=64)
    parser.add_argument(
        "--show-route", action="store_true", help="print the chosen peers to stderr"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print to stderr where each step's time went (client, each hop's compute, network) "
        "and how many drafts the swarm accepted",
    )
    parser.set_defaults(handler=generate)


def generate(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    from swarmllm.blocks.prompts import prompt_ids
    from swarmllm.blocks.vision import load_image
    from swarmllm.client.routing import format_route

    split_initial_peers(args)
    if args.prompt is None:
        raise UsageError("no prompt given (pass it after the options, or '-' to read stdin)")
    if args.prompt == "-":
        args.prompt = sys.stdin.read().rstrip("\n")
    images = [load_image(path) for path in args.image]  # fail before joining the swarm
    config = sampling_config(args)
    with connect(args) as model:
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
            started = time.perf_counter()
            output = model.generate(
                input_ids, session=session, streamer=streamer, images=images or None, **config
            )
            elapsed = time.perf_counter() - started
            report_evidence(session)
        new_tokens = output.shape[1] - input_ids.shape[1]
        print(
            f"{new_tokens} tokens in {elapsed:.2f} s ({new_tokens / elapsed:.1f} tokens/s)",
            file=sys.stderr,
        )
        if model.profile is not None:
            print(f"\n{model.profile.format()}", file=sys.stderr)
            if config["speculative"] != "off":
                print(f"speculative: {session.speculation.format()}", file=sys.stderr)
