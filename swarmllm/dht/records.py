"""The typed value a peer announces for each block it serves, and the coverage map built from them.

A record is stored under DHT key ``{model_id}.{block}`` with subkey = the announcing peer's id.
Values are msgpack maps; readers ignore unknown fields so that the schema can grow. A record
is at most ``MAX_PEER_RECORD_BYTES`` long, so that it fits the DHT validators' limit once
serialized and signed, and is decoded with msgpack limits, so a hostile one cannot expand.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from swarmllm.precisions import PRECISIONS
from swarmllm.security.record_validator import MAX_RECORD_BYTES
from swarmllm.security.signing import SIGNATURE_BYTES

RECORD_VERSION = 2  # 2: ``throughput`` became ``decode_steps_per_s``
# room left for hivemind's msgpack framing of the value (a bin header of at most 5 bytes)
MAX_PEER_RECORD_BYTES = MAX_RECORD_BYTES - SIGNATURE_BYTES - 5
# decode limits: a record's longest string is its public name; its one list, the adapters
_UNPACK_LIMITS = {
    "max_str_len": MAX_PEER_RECORD_BYTES,
    "max_bin_len": 0,
    "max_array_len": 16,
    "max_map_len": 32,
    "max_ext_len": 0,
}

MAX_FIELD_CHARS = 32  # device kinds, dtypes and quantization names are short


class PeerState(enum.IntEnum):
    OFFLINE = 0
    JOINING = 1
    ONLINE = 2


@dataclass(frozen=True)
class PeerRecord:
    """What one peer says about itself; identical for every block of its span."""

    state: PeerState
    start: int
    end: int
    # single-token decode steps of one sequence per second through the whole span
    # (measured as swarmllm.peer.throughput says)
    decode_steps_per_s: float
    cache_tokens_left: int
    version: str
    dtype: str
    public_name: str = ""
    adapters: tuple[str, ...] = ()
    device: str = "cpu"  # the kind of device the span computes on: cpu, cuda, mps
    quant: str = "none"  # quantization of the span's linear layers: none, int8, nf4

    @property
    def precision(self) -> str:
        """The coarsest number format this peer computes with (one of PRECISIONS, or an
        unknown name from a newer peer, which ``precision_rank`` ranks below all known)."""
        return self.quant if self.quant != "none" else self.dtype

    def __post_init__(self) -> None:
        self.to_bytes()  # a record the DHT would refuse fails here, where it is made

    def to_bytes(self) -> bytes:
        """The record as announced; ValueError if it is longer than ``MAX_PEER_RECORD_BYTES``."""
        encoded = msgpack.packb(
            {
                "v": RECORD_VERSION,
                "state": int(self.state),
                "start": self.start,
                "end": self.end,
                "decode_steps_per_s": float(self.decode_steps_per_s),
                "cache_tokens_left": int(self.cache_tokens_left),
                "version": self.version,
                "dtype": self.dtype,
                "public_name": self.public_name,
                "adapters": list(self.adapters),
                "device": self.device,
                "quant": self.quant,
            }
        )
        if len(encoded) > MAX_PEER_RECORD_BYTES:
            raise ValueError(
                f"a peer record of {len(encoded)} bytes is over the DHT limit of "
                f"{MAX_PEER_RECORD_BYTES}: shorten the public name ({len(self.public_name)} "
                "characters)"
            )
        return encoded

    @classmethod
    def from_bytes(cls, raw: bytes) -> PeerRecord:
        """Parse a record, ignoring unknown fields; raise ValueError on anything malformed."""
        if len(raw) > MAX_PEER_RECORD_BYTES:
            raise ValueError(f"malformed peer record: {len(raw)} bytes is over the limit")
        try:
            data: dict[str, Any] = msgpack.unpackb(raw, raw=False, **_UNPACK_LIMITS)
            record = cls(
                state=PeerState(int(data["state"])),
                start=int(data["start"]),
                end=int(data["end"]),
                decode_steps_per_s=float(data["decode_steps_per_s"]),
                cache_tokens_left=int(data["cache_tokens_left"]),
                version=str(data["version"]),
                dtype=str(data["dtype"]),
                public_name=str(data.get("public_name", "")),
                adapters=tuple(str(a) for a in data.get("adapters", ())),
                # records of peers from before devices and quantization: float on the CPU
                device=_short(data.get("device", "cpu"), "device"),
                quant=_short(data.get("quant", "none"), "quant"),
            )
            _short(record.dtype, "dtype")
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as e:
            raise ValueError(f"malformed peer record: {e}") from e
        if not 0 <= record.start < record.end:
            raise ValueError(f"malformed peer record: bad span [{record.start}, {record.end})")
        return record


def precision_rank(precision: str) -> int:
    """Position in PRECISIONS (higher is finer); -1 for a name this version does not know."""
    return PRECISIONS.index(precision) if precision in PRECISIONS else -1


def _short(value: Any, name: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
        raise ValueError(f"field {name!r} must be a string of at most {MAX_FIELD_CHARS} chars")
    return value


def block_key(model_id: str, block: int | str) -> str:
    """DHT key for one block of a model (``block`` may be a name such as ``vision``)."""
    return f"{model_id}.{block}"


@dataclass
class CoverageMap:
    """For each block of a model, the peers that announced it: ``blocks[i][peer_id] = record``."""

    model_id: str
    num_blocks: int
    blocks: list[dict[str, PeerRecord]] = field(default_factory=list)
    # named blocks outside the numbered stack (e.g. ``vision``): ``extra[name][peer_id] = record``
    extra: dict[str, dict[str, PeerRecord]] = field(default_factory=dict)

    def peers(self) -> dict[str, PeerRecord]:
        """Every peer seen, with its record (a peer announces the same record for all blocks)."""
        merged: dict[str, PeerRecord] = {}
        for per_block in self.blocks:
            merged.update(per_block)
        return merged

    def without(self, peer_ids: set[str]) -> CoverageMap:
        """The same map with ``peer_ids``' records left out."""
        return CoverageMap(
            self.model_id,
            self.num_blocks,
            [{p: r for p, r in block.items() if p not in peer_ids} for block in self.blocks],
            {
                name: {p: r for p, r in block.items() if p not in peer_ids}
                for name, block in self.extra.items()
            },
        )

    def online(self, block: int) -> dict[str, PeerRecord]:
        return {
            peer_id: record
            for peer_id, record in self.blocks[block].items()
            if record.state == PeerState.ONLINE
        }

    def uncovered_ranges(self) -> list[tuple[int, int]]:
        """Maximal ranges ``[a, b)`` of blocks that no ONLINE peer serves."""
        ranges: list[tuple[int, int]] = []
        for block in range(self.num_blocks):
            if self.online(block):
                continue
            if ranges and ranges[-1][1] == block:
                ranges[-1] = (ranges[-1][0], block + 1)
            else:
                ranges.append((block, block + 1))
        return ranges

    @property
    def fully_covered(self) -> bool:
        return not self.uncovered_ranges()
