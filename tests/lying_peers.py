"""Lying peers, for tests and benchmarks only: ``python tests/lying_peers.py ARGS`` (see --help).

Each liar is an identity of its own with its own hivemind DHT node (NAT port mapping off) that
announces every block of a model at an absurd throughput with a valid signed record, answers
pings, and then serves nobody: MODE ``refuse`` answers every session with a "busy" error (the
refusal that costs a liar no ban), MODE ``silent`` accepts the stream and never answers it.
One process hosts all of them (``--count``), so that many liars cost one Python interpreter.
It prints ``LIARS READY <peer id> ...`` once every record is stored, and runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import (  # noqa: UP035 - hivemind only detects streaming RPCs typed with typing.AsyncIterator
    AsyncIterator,
)

from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from swarmllm.dht.announce import Announcer, announce
from swarmllm.dht.node import swarm_dht
from swarmllm.dht.records import PeerRecord, PeerState
from swarmllm.protocol import (
    SERVICER_NAMESPACE,
    Error,
    ErrorCode,
    InfoReply,
    SwarmRPC,
)
from swarmllm.security.identity import load_or_create_identity, peer_id_of

LIE = 1e9  # decode steps per second, for every block
MODES = ("refuse", "silent")
SILENCE = 600.0  # seconds a silent liar holds a stream before it lets go
READY = "LIARS READY"


class LyingServicer(SwarmRPC):
    def __init__(self, mode: str, model_id: str, num_blocks: int, name: str):
        self.mode = mode
        self.info = InfoReply(
            model_id=model_id,
            start=0,
            end=num_blocks,
            version="0.1.0",
            torch="2.13.0",
            dtype="float32",
            device="cuda",
            quant="none",
            decode_steps_per_s=LIE,
            state="ONLINE",
            public_name=name,
            adapters=(),
            cache_tokens_left=10**9,
            sessions=0,
            max_tokens=4096,
            max_bytes=2**24,
        )

    async def rpc_info(
        self, request: runtime_pb2.ExpertRequest, context: P2PContext
    ) -> runtime_pb2.ExpertResponse:
        return self.info.encode()

    async def rpc_forward(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._serve_nobody(requests):
            yield response

    async def rpc_inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async for response in self._serve_nobody(requests):
            yield response

    async def _serve_nobody(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest]
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        await anext(requests, None)
        if self.mode == "refuse":
            yield Error("busy: no room for the session", ErrorCode.BUSY).encode()
            return
        with contextlib.suppress(asyncio.TimeoutError):  # silent: read on, answer nothing
            async with asyncio.timeout(SILENCE):
                async for _ in requests:
                    pass


async def _serve(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    blocks = list(range(args.num_blocks))
    record = PeerRecord(
        PeerState.ONLINE, 0, args.num_blocks, LIE, 10**9, "0.1.0", "float32", device="cuda"
    )
    nodes, announcers, peer_ids = [], [], []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        for index in range(args.count):
            path = workdir / f"liar{index}.key"
            key = load_or_create_identity(path)
            dht = swarm_dht(
                path,
                key,
                initial_peers=args.initial_peers,
                host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                start=True,
            )
            nodes.append(dht)
            p2p = await dht.replicate_p2p()
            servicer = LyingServicer(args.mode, args.model_id, args.num_blocks, f"liar{index}")
            await servicer.add_p2p_handlers(p2p, namespace=SERVICER_NAMESPACE)
            # stored before READY, so that a client reading the map from then on sees them
            announce(dht, args.model_id, blocks, record, get_dht_time() + 60)
            announcer = Announcer(dht, args.model_id, blocks, record, refresh_period=20, ttl=60)
            announcer.start()
            announcers.append(announcer)
            peer_ids.append(peer_id_of(key))
        print(READY, *peer_ids, flush=True)
        await stop.wait()
    finally:  # all at once: each stop waits for one DHT store
        with ThreadPoolExecutor(max(1, len(announcers))) as stopping:
            list(stopping.map(Announcer.stop, announcers))
        for dht in nodes:
            dht.shutdown()


class Liars:
    """``count`` liars in one child process of ours, started and stopped by PID."""

    def __init__(
        self,
        initial_peers: Sequence[str],
        model_id: str,
        num_blocks: int,
        count: int,
        mode: str,
        workdir: Path,
    ):
        self.command = [
            sys.executable,
            __file__,
            *("--initial-peers", *initial_peers, "--model-id", model_id),
            *("--num-blocks", str(num_blocks), "--count", str(count)),
            *("--mode", mode, "--workdir", str(workdir)),
        ]
        self.log_path = workdir / f"liars-{mode}-{count}.log"
        self.process: subprocess.Popen | None = None
        self.peer_ids: list[str] = []

    def start(self, timeout: float = 120.0) -> Liars:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith(READY):
                    self.peer_ids = line.split()[2:]
                    return self
            if self.process.poll() is not None:
                break
            time.sleep(0.3)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"the liars did not start in {timeout:.0f} s:\n{tail}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def __enter__(self) -> Liars:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--num-blocks", type=int, required=True)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--mode", choices=MODES, default="refuse")
    parser.add_argument("--workdir", required=True, help="where the liars' keys are kept")
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
