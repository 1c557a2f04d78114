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
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep identities (reused by the next run in the same folder, so peer ids stay) and "
        "each process's log here (default: a new temporary folder, kept after the swarm stops)",
    )
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to come online")
    parser.add_argument(
        "--ask", metavar="PROMPT", help="ask the swarm one chat question, print the answer, stop"
    )
    links = parser.add_argument_group(
        "emulated links", "put every node behind a delaying forwarder, as if peers were far apart"
    )
    links.add_argument("--link-delay-ms", type=float, default=0.0, help="one-way delay")
    links.add_argument("--link-jitter-ms", type=float, default=0.0, help="± uniform jitter")
    links.add_argument("--link-mbps", type=float, help="bandwidth cap per link and direction")
    add_server_arguments(parser, port_flag="--api-port")
    parser.set_defaults(handler=run_swarm)


def run_swarm(args: argparse.Namespace) -> None:
    from swarmllm.links import LinkProfile
    from swarmllm.swarm import LocalSwarm

    link = LinkProfile(args.link_delay_ms, args.link_jitter_ms, args.link_mbps)
    started = time.monotonic()
    swarm = LocalSwarm(
        args.peers,
        args.model,
        replicas=args.replicas,
        workdir=args.workdir,
        keep_logs=True,
        link=link if link.emulates_anything else None,
    )
    print(f"logs: {swarm.workdir}", flush=True)
    with swarm:
        with PeerProgress(swarm) as progress:
            coverage = swarm.wait_until_ready(args.timeout, on_progress=progress.update)
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
            from swarmllm.commands.client_options import speculative_mode

            print("\nCtrl-C stops the server and the swarm.", flush=True)
            keys = api_keys(args.api_key)
            serve_swarm(
                args.model,
                swarm.initial_peers,
                args.host,
                args.api_port,
                keys,
                max_active=args.max_concurrent,
                speculative=speculative_mode(args),
                draft_model=args.draft_model,
            )
        else:
            _serve_until_stopped(swarm)
    print(f"swarm stopped; logs kept in {swarm.workdir}")


class PeerProgress:
    """A live line per peer while the swarm comes up: a spinner, the peer's latest log line
    (what it is loading), and the time since start; on a terminal only."""

    def __init__(self, swarm):
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.swarm = swarm
        self.display = Progress(
            SpinnerColumn(),
            TextColumn("{task.fields[name]:<12}"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self.tasks = {
            peer.peer_id: self.display.add_task("starting", name=peer.name, total=1)
            for peer in swarm.peers
        }

    def update(self, online: set[str]) -> None:
        for peer in self.swarm.peers:
            task = self.tasks[peer.peer_id]
            if peer.peer_id in online:
                self.display.update(task, description="online", completed=1)
            else:
                self.display.update(task, description=_latest(peer.log_tail(5)))

    def __enter__(self) -> PeerProgress:
        self.display.start()
        return self

    def __exit__(self, *exc) -> None:
        self.display.stop()


def _latest(log_tail: str, width: int = 60) -> str:
    """The last line of a log without its timestamp and logger name, cut to ``width``."""
    lines = [line for line in log_tail.splitlines() if line.strip()]
    if not lines:
        return "starting"
    text = lines[-1].split(": ", 1)[-1] if " INFO " in lines[-1] else lines[-1]
    return text if len(text) <= width else text[: width - 1] + "…"


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
