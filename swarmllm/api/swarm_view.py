"""What the dashboard shows of the swarm: its peers and the block-by-block coverage."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import TYPE_CHECKING, Any

from swarmllm.client.routing import NoRouteError
from swarmllm.protocol import InfoReply

if TYPE_CHECKING:
    from swarmllm.client.model import DistributedModelForCausalLM

INFO_TIMEOUT = 2.0


async def swarm_status(model: DistributedModelForCausalLM) -> dict[str, Any]:
    """Runs on the model's connection loop: a fresh coverage read and every peer's ``info``."""
    coverage, _ = await model.router.read_coverage(fresh=True)
    records = coverage.peers()
    ids = sorted(records, key=lambda p: (records[p].start, records[p].end, p))
    replies = await asyncio.gather(
        *(model.connection.info(p, INFO_TIMEOUT) for p in ids), return_exceptions=True
    )
    banned = model.bans.banned()
    peers = []
    for peer_id, reply in zip(ids, replies, strict=True):
        record = records[peer_id]
        info = dataclasses.asdict(reply) if isinstance(reply, InfoReply) else {}
        rtt = model.connection.rtt.get(peer_id) if info else None
        peers.append(
            {
                "peer_id": peer_id,
                "name": record.public_name,
                "start": record.start,
                "end": record.end,
                "state": record.state.name,
                "reachable": bool(info),
                "banned": peer_id in banned,
                "decode_steps_per_s": round(record.decode_steps_per_s, 2),
                "cache_tokens_left": info.get("cache_tokens_left", record.cache_tokens_left),
                "sessions": info.get("sessions"),
                "device": info.get("device"),
                "dtype": info.get("dtype"),
                "quant": info.get("quant"),
                "version": info.get("version"),
                "adapters": list(record.adapters),
                "ping_ms": round(rtt * 1000, 2) if rtt is not None else None,
                "error": None if info else str(reply),
            }
        )
    num_blocks = model.config.num_hidden_layers
    return {
        "model": model.source.name,
        "model_id": model.model_id,
        "num_blocks": num_blocks,
        "blocks": [len(coverage.online(block)) for block in range(num_blocks)],
        "uncovered": [list(r) for r in coverage.uncovered_ranges()],
        "peers": peers,
    }


async def coverage_problem(model: DistributedModelForCausalLM) -> str | None:
    """Why no request could be served now (naming the blocks nobody serves), or None."""
    try:
        await model.router.route(0, model.config.num_hidden_layers, min_cache_tokens=0)
    except NoRouteError as e:
        return str(e)
    return None
