"""``swarmllm chat``: a conversation with the swarm on one session that keeps its KV cache.

On a terminal it is a REPL that streams each reply (``/reset``, ``/image PATH``, Ctrl-D
quits). Otherwise it reads one user turn per line of stdin and prints each reply on one line,
so it can be scripted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from swarmllm.commands.arguments import image_file
from swarmllm.commands.client_options import (
    add_client_options,
    add_sampling_options,
    connect,
    report_evidence,
    sampling_config,
    split_initial_peers,
)

REPL_HELP = (
    "/reset forgets the conversation, /image PATH attaches a picture to the next message, "
    "Ctrl-D quits"
)


def add_chat_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "chat",
        help="chat with the model through the swarm",
        description=f"{__doc__.strip().splitlines()[0]} {REPL_HELP}.",
    )
    add_client_options(parser)
    parser.add_argument("--system", help="a system message that opens the conversation")
    parser.add_argument(
        "--max-length",
        type=int,
        default=2048,
        help="tokens the whole conversation may hold (its KV cache on every peer)",
    )
    add_sampling_options(parser, max_new_tokens=256)
    parser.set_defaults(handler=chat, prompt=None)


def chat(args: argparse.Namespace) -> None:
    from transformers import TextStreamer

    split_initial_peers(args)
    interactive = sys.stdin.isatty()
    with connect(args) as model:
        conversation = model.chat_session(
            args.system, max_length=args.max_length, **sampling_config(args)
        )
        with conversation:
            if interactive:
                print(f"Chatting with {model.source.name}. {REPL_HELP}.", file=sys.stderr)
            images: list[Any] = []
            while (line := _read_turn(interactive)) is not None:
                text = line.strip()
                try:
                    if text == "/reset":
                        conversation.reset()
                        images = []
                        _note("(conversation reset)", interactive)
                    elif text.startswith("/image"):
                        images.append(_picture(text.removeprefix("/image").strip()))
                        _note(f"(picture {len(images)} goes with the next message)", interactive)
                    elif text and interactive:
                        streamer = TextStreamer(
                            model.tokenizer, skip_prompt=True, skip_special_tokens=True
                        )
                        conversation.send(text, images=images or None, streamer=streamer)
                        images = []
                    elif text:
                        reply = conversation.send(text, images=images or None)
                        print(" ".join(reply.split()), flush=True)  # one line per reply
                        images = []
                except ValueError as e:  # a mistake in this turn; the conversation goes on
                    if not interactive:
                        raise
                    print(f"error: {e}", file=sys.stderr)
            report_evidence(conversation.session)


def _read_turn(interactive: bool) -> str | None:
    """The next user line, or None at end of input (Ctrl-D)."""
    try:
        return input("> ") if interactive else sys.stdin.readline() or None
    except EOFError:
        print(file=sys.stderr)
        return None


def _picture(path_text: str):
    from swarmllm.blocks.vision import load_image

    if not path_text:
        raise ValueError("/image needs a path, e.g. /image green_star.png")
    try:
        return load_image(image_file(path_text))
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None


def _note(text: str, interactive: bool) -> None:
    if interactive:
        print(text, file=sys.stderr)
