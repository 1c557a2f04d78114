"""The peer process: join the swarm, load a span, serve it, announce it, leave cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import hivemind

import swarmllm
from swarmllm.blocks.placement import Placement, resolve_placement
from swarmllm.blocks.sources import ModelSource
from swarmllm.blocks.vision import ADAPTER_BLOCK
from swarmllm.dht.announce import Announcer
from swarmllm.dht.node import swarm_dht
from swarmllm.dht.ping import live_coverage
from swarmllm.dht.records import PeerRecord, PeerState
from swarmllm.peer.batching import BatchingWorker
from swarmllm.peer.loading import SpanLoader
from swarmllm.peer.rebalancing import BalanceSettings, Rebalancer
from swarmllm.peer.selection import choose_span
from swarmllm.peer.servicer import PeerIdentity, PeerServicer
from swarmllm.peer.sessions import SessionRegistry
from swarmllm.peer.sizing import BlockBudget, block_budget
from swarmllm.protocol import SERVICER_NAMESPACE
from swarmllm.security.identity import load_or_create_identity, peer_id_of
from swarmllm.security.validation import RequestLimits

logger = logging.getLogger("swarmllm.peer")

MAINTENANCE_PERIOD = 2.0
SETTLE_ROUNDS = 2  # checks in a row that must keep a new peer's choice of blocks
MAX_SETTLE_CHECKS = 8


@dataclass
class PeerSettings:
    initial_peers: list[str] = field(default_factory=list)
    blocks: tuple[int, int] | None = None
    num_blocks: int | None = None
    identity: Path | None = None
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    announce_maddrs: list[str] = field(default_factory=list)
    nat_port_map: bool = False  # UPnP/NAT-PMP on the LAN: only when the volunteer asks for it
    cache_tokens: int = 16384
    max_sessions: int = 32
    public_name: str = ""
    dtype: str = "auto"  # auto: bfloat16 where the device computes it fast, else float32
    device: str = "auto"  # auto: the first CUDA device, else MPS, else the CPU
    quant: str = "none"  # the span's linear layers: none | int8 | nf4
    max_memory: int | None = None  # bytes for blocks + KV caches (None: a share of free memory)
    session_timeout: float = 300.0  # idle seconds before a session's stream is closed
    refresh_period: float = 10.0
    num_threads: int | None = None  # torch threads for passes over several tokens
    decode_threads: int = 1  # torch threads for single-token (decode) passes
    batch_window: float | None = None  # max seconds a decode batch waits (None: auto)
    limits: RequestLimits = field(default_factory=RequestLimits)
    allowed_peers: frozenset[str] | None = None  # serve only these clients (a private swarm)
    adapter: bool = True  # with block 0, also serve the model's vision adapter if it has one
    # peers that chose their own blocks: mean seconds between checks for a better span (0: never)
    balance_period: float = 120.0
    balance_quality: float = 0.75  # move when the swarm's bottleneck would grow by 1/quality
    drain_timeout: float = 60.0  # seconds sessions from before a move may go on


def check_blocks(blocks: tuple[int, int] | None, source: ModelSource) -> None:
    """Raise ValueError when ``--blocks`` does not fit the model."""
    num_layers = source.config.num_hidden_layers
    if blocks is not None and not 0 <= blocks[0] < blocks[1] <= num_layers:
        raise ValueError(
            f"--blocks {blocks[0]}:{blocks[1]} is outside the model's {num_layers} blocks "
            f"(valid spans lie within 0:{num_layers})"
        )


def run_peer(settings: PeerSettings, source: ModelSource) -> None:
    """Serve ``source`` until SIGINT/SIGTERM (blocking)."""
    check_blocks(settings.blocks, source)
    placement = resolve_placement(settings.device, settings.dtype, settings.quant)
    budget = block_budget(source.config, placement, settings.cache_tokens, settings.max_memory)
    check_budget(settings, budget, source.config.num_hidden_layers)
    asyncio.run(_serve(settings, source, placement, budget))


def check_budget(settings: PeerSettings, budget: BlockBudget, num_layers: int) -> None:
    """Raise ValueError when not even one block fits, or when the blocks asked for exceed an
    explicit ``--max-memory`` (beyond the default share, asking for more is the volunteer's
    call)."""
    if settings.blocks is not None:
        wanted = settings.blocks[1] - settings.blocks[0]
    else:
        wanted = min(settings.num_blocks or 1, num_layers)
    if budget.default_memory and (settings.blocks or settings.num_blocks):
        wanted = 1
    if budget.fits < wanted:
        raise ValueError(f"{budget.describe(0, num_layers)}: not enough for {wanted} block(s)")


async def _serve(
    settings: PeerSettings, source: ModelSource, placement: Placement, budget: BlockBudget
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    with tempfile.TemporaryDirectory(prefix="swarmllm-peer-") as scratch:
        identity_path = settings.identity or Path(scratch) / "identity.key"
        private_key = load_or_create_identity(identity_path)
        dht = swarm_dht(
            identity_path,
            private_key,
            initial_peers=settings.initial_peers,
            host_maddrs=settings.host_maddrs,
            announce_maddrs=settings.announce_maddrs or None,
            nat_port_map=settings.nat_port_map,
            start=True,
        )
        announcer: Announcer | None = None
        worker = BatchingWorker(
            settings.num_threads,
            decode_threads=settings.decode_threads,
            window=settings.batch_window,
        )
        try:
            peer_id = peer_id_of(private_key)
            logger.info("peer id %s", peer_id)
            for maddr in dht.get_visible_maddrs():
                print(f"swarmllm peer address: {maddr}", flush=True)
            start, end = await _choose_blocks(settings, dht, source, budget.fits)
            # JOINING goes out before anything slow, so that peers starting now see this one
            record = PeerRecord(
                state=PeerState.JOINING,
                start=start,
                end=end,
                decode_steps_per_s=0.0,
                cache_tokens_left=settings.cache_tokens,
                version=swarmllm.__version__,
                dtype=placement.dtype_name,
                public_name=settings.public_name,
                device=placement.device.type,
                quant=placement.quant,
            )
            announcer = Announcer(
                dht,
                source.model_id,
                range(start, end),
                record,
                refresh_period=settings.refresh_period,
                ttl=3 * settings.refresh_period,
            )
            announcer.start()
            if settings.blocks is None:
                start, end = await _settle(dht, source, announcer, start, end)
            print(budget.describe(end - start, source.config.num_hidden_layers), flush=True)
            loader = SpanLoader(
                source, placement, worker, settings.decode_threads, settings.adapter
            )
            adapter = await loader.adapter_for(start)
            if adapter is not None:
                announcer.move([*range(start, end), ADAPTER_BLOCK], adapters=(adapter.name,))
            loaded = await loader.load(start, end, adapter)
            limits = dataclasses.replace(
                settings.limits, session_idle_timeout=settings.session_timeout
            )
            registry = SessionRegistry(
                settings.cache_tokens,
                settings.max_sessions,
                limits.max_sessions_per_peer,
                limits.max_cache_tokens_per_peer,
            )
            servicer = PeerServicer(
                loaded.span,
                PeerIdentity(source.model_id, swarmllm.__version__, private_key),
                registry,
                worker,
                limits,
                loader.info(loaded, settings.public_name),
                allowed_peers=settings.allowed_peers,
                adapter=loaded.adapter,
            )
            p2p = await dht.replicate_p2p()
            await servicer.add_p2p_handlers(p2p, namespace=SERVICER_NAMESPACE)
            announcer.update(state=PeerState.ONLINE, decode_steps_per_s=loaded.decode_rate)
            print(
                f"swarmllm peer ONLINE: blocks [{start}, {end}) of {source.model_id} "
                f"as {peer_id} ({loaded.decode_rate:.1f} decode steps/s, "
                f"{placement.describe()})"
                + (f", with the {adapter.name} adapter" if adapter is not None else ""),
                flush=True,
            )
            rebalancer = None
            if settings.blocks is None and settings.balance_period > 0:
                rebalancer = Rebalancer(
                    dht,
                    announcer,
                    servicer,
                    loader,
                    BalanceSettings(
                        settings.balance_period,
                        settings.balance_quality,
                        settings.drain_timeout,
                        budget.fits,
                    ),
                )
            await _maintain(stop, registry, announcer, rebalancer)
            await servicer.remove_p2p_handlers(p2p, namespace=SERVICER_NAMESPACE)
        finally:
            if announcer is not None:
                announcer.stop(final_state=PeerState.OFFLINE)
            worker.shutdown()
            dht.shutdown()
    print("swarmllm peer stopped", flush=True)


async def _choose_blocks(
    settings: PeerSettings, dht: hivemind.DHT, source: ModelSource, fits: int
) -> tuple[int, int]:
    """``--blocks``; else ``--num-blocks``, else as many as fit in memory, where the swarm
    needs them most."""
    num_layers = source.config.num_hidden_layers
    if settings.blocks is not None:
        return settings.blocks
    wanted = min(settings.num_blocks or fits, num_layers)
    # a random pause lets peers started together see each other's JOINING records
    await asyncio.sleep(random.uniform(0, 1.0))
    coverage = await live_coverage(dht, source.model_id, source.config.num_hidden_layers)
    return choose_span(coverage, wanted, exclude_peer=dht.peer_id.to_base58())


async def _settle(
    dht: hivemind.DHT, source: ModelSource, announcer: Announcer, start: int, end: int
) -> tuple[int, int]:
    """Re-check the choice after announcing JOINING, until it holds for SETTLE_ROUNDS checks
    in a row (at most MAX_SETTLE_CHECKS), so that peers that chose at the same moment spread.

    Each check comes after a random pause and chooses again, counting every peer except the
    JOINING ones with a larger peer id: of two peers joining on the same blocks, the smaller
    id stays and the other moves, so they cannot both move and collide again.
    """
    me = dht.peer_id.to_base58()
    held = 0
    for _ in range(MAX_SETTLE_CHECKS):
        await asyncio.sleep(random.uniform(0.5, 1.5))
        coverage = await live_coverage(dht, source.model_id, source.config.num_hidden_layers)
        yielding = {
            peer_id
            for peer_id, record in coverage.peers().items()
            if record.state == PeerState.JOINING and peer_id > me
        }
        choice = choose_span(coverage.without(yielding), end - start, exclude_peer=me)
        if choice == (start, end):
            held += 1
            if held == SETTLE_ROUNDS:
                break
            continue
        logger.info("blocks [%d, %d) taken meanwhile: moving to [%d, %d)", start, end, *choice)
        held = 0
        start, end = choice
        announcer.move(range(start, end), start=start, end=end)
    return start, end


async def _maintain(
    stop: asyncio.Event,
    registry: SessionRegistry,
    announcer: Announcer,
    rebalancer: Rebalancer | None,
) -> None:
    """Until asked to stop: keep the announced cache room current (each session's stream ends
    it when it idles or outlives its lifetime), and rebalance when the peer chose its blocks."""
    balancing = asyncio.create_task(rebalancer.run()) if rebalancer is not None else None
    announced_room = registry.tokens_left
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=MAINTENANCE_PERIOD)
            if registry.tokens_left != announced_room:
                announced_room = registry.tokens_left
                announcer.update(cache_tokens_left=announced_room)
    finally:
        if balancing is not None:
            balancing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await balancing
