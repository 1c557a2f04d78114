"""``swarmllm swarm``: a bootstrap node and N local peers splitting a model, until Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

from swarmllm.commands.api import add_server_arguments
from swarmllm.commands.arguments import positive_int


def add_swarm_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("swarm", help="run a local swarm for demos and tests")
    parser.add_argument("--peers", type=positive_int, default=3, help="peer processes in all")
    parser.add_argument("--model", help="hub id or local directory (default: embedded SmolLM2)")
    parser.add_argument("--replicas", type=positive_int, default=1, help="peers per span")
    parser.add_argument("--workdir", type=Path, help="keep identities and logs here")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to come online")
    parser.add_argument(
        "--ask", metavar="PROMPT", help="ask the swarm one chat question, print the answer, stop"
    )
    add_server_arguments(parser, port_flag="--api-port")
    parser.set_defaults(handler=run_swarm)


def run_swarm(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from swarmllm.swarm import LocalSwarm

    started = time.monotonic()
    with LocalSwarm(args.peers, args.model, replicas=args.replicas, workdir=args.workdir) as swarm:
        print(f"logs: {swarm.workdir}")
        with tqdm(total=len(swarm.peers), desc="peers online", unit="peer") as bar:

            def progress(ready: int, total: int) -> None:
                bar.n = ready
                bar.refresh()

            coverage = swarm.wait_until_ready(args.timeout, on_progress=progress)
        print(f"swarm ready in {time.monotonic() - started:.1f} s: {swarm.source.model_id}")
        for peer in swarm.peers:
            record = coverage.peers()[peer.peer_id]
            print(f"  {peer.name}: blocks {record.start}-{record.end - 1} (pid {peer.pid})")
        peers = " ".join(swarm.initial_peers)
        model = f" --model {args.model}" if args.model else ""
        print("\nIn another terminal:")
        question = '"What is the capital of France?"'
        print(f"  swarmllm generate{model} --initial-peers {peers} --chat {question}")
        if args.ask:
            ask(args.model, swarm.initial_peers, args.ask)
        elif args.api_port is not None:
            from swarmllm.commands.api import api_keys, serve_swarm

            print("\nCtrl-C stops the server and the swarm.", flush=True)
            keys = api_keys(args.api_key)
            serve_swarm(
                args.model,
                swarm.initial_peers,
                args.host,
                args.api_port,
                keys,
                max_active=args.max_concurrent,
            )
        else:
            _serve_until_stopped(swarm)
    print("swarm stopped")


def _serve_until_stopped(swarm) -> None:
    """Block until SIGINT/SIGTERM, reporting peers that exit on their own."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print("\nCtrl-C stops the swarm.", flush=True)
    while not stop.wait(1.0):
        for peer in list(swarm.peers):
            if peer.process.poll() is not None:
                print(f"warning: {peer.name} exited with code {peer.process.returncode}")
                swarm.peers.remove(peer)


def ask(model_ref: str | None, initial_peers: list[str], question: str) -> None:
    """Stream a greedy chat answer from the swarm to stdout."""
    from transformers import TextStreamer

    from swarmllm.blocks.prompts import prompt_ids
    from swarmllm.client.model import DistributedModelForCausalLM

    with DistributedModelForCausalLM.from_pretrained(
        model_ref, initial_peers=initial_peers
    ) as model:
        input_ids = prompt_ids(model.tokenizer, question)
        print(f"\n> {question}")
        streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        started = time.perf_counter()
        output = model.generate(input_ids, max_new_tokens=64, streamer=streamer)
        new_tokens = output.shape[1] - input_ids.shape[1]
        elapsed = time.perf_counter() - started
        print(f"({new_tokens} tokens in {elapsed:.1f} s through the swarm)")
