"""An inference session across a chain of peers, with failover that replays history.

The client keeps, for every hop, the inputs it has sent (positions 0..n), committed only when a
step has run through the whole chain. When a hop fails through its own fault the client bans the
peer (a peer that is busy, or refuses the client's own bad request, is only avoided for the
session), routes only that hop's blocks again (possibly across several peers), replays the
stored inputs to rebuild their caches (in chunks within each peer's limits), and retries the
step where it failed. Replay restarts from position 0, so the replacement's cache matches the
failed peer's exactly.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from swarmllm.blocks.vision import ImageInputs
from swarmllm.client.hop import HopFailure, HopStream, SessionSpec
from swarmllm.client.profile import Profile, phase_of
from swarmllm.client.router import Router
from swarmllm.client.routing import Hop
from swarmllm.client.verification import SpotChecker, VerificationEvidence
from swarmllm.protocol import ErrorCode

logger = logging.getLogger("swarmllm.client")


class SessionFailedError(RuntimeError):
    """A step could not complete within the failover budget."""


class InferenceSession:
    def __init__(
        self,
        router: Router,
        spec: SessionSpec,
        *,
        max_failovers: int = 8,
        profile: Profile | None = None,
        verifier: SpotChecker | None = None,
        adapter: str | None = None,
    ):
        self.router, self.spec, self.max_failovers = router, spec, max_failovers
        self.profile = profile
        self.verifier = verifier  # spot-checks hops; a hop it outvotes fails over like any fault
        self.hops: list[HopStream] = []
        self.history: list[list[torch.Tensor]] = []  # per hop: the inputs sent, in order
        # per hop: the outputs it returned for them (a spot-check compares all of them)
        self.outputs: list[list[torch.Tensor]] = []
        # image prompts: the adapter the first hop must serve, and the images it was sent
        self.adapter = adapter
        self.images: ImageInputs | None = None
        self.position = 0
        self._busy: set[str] = set()

    @property
    def route(self) -> list[Hop]:
        return [stream.hop for stream in self.hops]

    @property
    def evidence(self) -> list[VerificationEvidence]:
        """Every spot-check of this session that found disagreeing signed outputs."""
        return self.verifier.evidence if self.verifier is not None else []

    async def open(self) -> None:
        self.hops, self.history, self.outputs = await self._connect(
            0, self.router.num_blocks, history=None
        )

    async def step(
        self,
        hidden: torch.Tensor,
        position: int | None = None,
        images: ImageInputs | None = None,
        phase: str | None = None,
    ) -> torch.Tensor:
        """Run ``hidden`` [batch, tokens, hidden] through every hop, starting at ``position``
        (default: right after the previous step; an earlier position rewinds). ``images``
        (absolute positions, in the wire dtype) go to the first hop's adapter. ``phase``
        names the step in the profile (default: by its number of tokens)."""
        position = self.position if position is None else position
        if images is not None and self.adapter is None:
            raise ValueError("images need a session opened with the adapter of the image encoder")
        if position > self.position:
            raise ValueError(f"position {position} skips past the session's {self.position} tokens")
        if position + hidden.shape[1] > self.spec.max_length:
            raise ValueError(
                f"{position + hidden.shape[1]} tokens exceed the session's max length "
                f"{self.spec.max_length}"
            )
        if position < self.position:
            self.rewind(position)
        # the inputs each hop accepted in this step: committed to the history only once the
        # whole chain has run it, so a step that fails half-way leaves no hop's history (and
        # no later replay) holding its tokens; the peers' caches are rewound by the next step
        accepted: list[torch.Tensor] = []
        produced: list[torch.Tensor] = []
        index = 0
        while index < len(self.hops):
            first_hop_images = images if index == 0 else None
            # a stateless re-run can't carry the images: the first hop of an image prompt is
            # not spot-checked
            holds_images = index == 0 and (images is not None or self.images is not None)
            try:
                output = await self.hops[index].step(hidden, position, first_hop_images)
                if self.verifier is not None and not holds_images:
                    stream = self.hops[index]
                    await self.verifier.check(
                        stream, self.history[index], self.outputs[index], hidden, output, position
                    )
            except HopFailure as failure:
                self._penalise(failure)
                await self._fail_over(index)
                continue  # retry this step on the replacement
            if self.profile is not None and self.hops[index].last_timing is not None:
                self.profile.add_hop(
                    self.hops[index].hop,
                    phase or phase_of(hidden.shape[1]),
                    self.hops[index].last_timing,
                )
            accepted.append(hidden)
            produced.append(output)
            hidden = output
            index += 1
        for chunks, sent in zip(self.history, accepted, strict=True):
            chunks.append(sent)
        for chunks, returned in zip(self.outputs, produced, strict=True):
            chunks.append(returned)
        if images is not None:
            self.images = _merged(self.images, images)
        self.position = position + hidden.shape[1]
        return hidden

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self.hops))
        self.hops, self.history, self.outputs = [], [], []

    def _penalise(self, failure: HopFailure) -> None:
        logger.warning("hop failed: %s", failure)
        if failure.fault:
            self.router.bans.ban(failure.hop.peer_id, failure.reason)
        elif failure.code != ErrorCode.EXPIRED:  # an expired session is simply opened again
            self._busy.add(failure.hop.peer_id)

    async def _fail_over(self, index: int) -> None:
        """Replace hop ``index`` by a fresh route over its blocks (maybe several peers) whose
        caches are rebuilt from the failed hop's history."""
        failed = self.hops[index]
        await failed.close()
        history = torch.cat(self.history[index], dim=1) if self.history[index] else None
        images = self.images if index == 0 else None
        streams, histories, outputs = await self._connect(
            failed.hop.start, failed.hop.end, history, images
        )
        self.hops[index : index + 1] = streams
        self.history[index : index + 1] = histories
        self.outputs[index : index + 1] = outputs

    async def _connect(
        self,
        start: int,
        end: int,
        history: torch.Tensor | None,
        images: ImageInputs | None = None,
    ) -> tuple[list[HopStream], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """Open streams over a route for ``[start, end)`` and replay ``history`` (with the
        first hop's ``images``) through them, retrying on failures within the failover budget.
        Returns the streams, the inputs each has seen and the outputs it returned for them."""
        for attempt in range(self.max_failovers):
            route = await self.router.route(
                start,
                end,
                min_cache_tokens=self.spec.max_length * self.spec.batch,
                avoid=self._busy,
                first_hop_adapter=self.adapter if start == 0 else None,
                fresh=attempt > 0,
            )
            streams = [HopStream(self.router.connection, hop, self.spec) for hop in route]
            histories: list[list[torch.Tensor]] = [[] for _ in streams]
            outputs: list[list[torch.Tensor]] = [[] for _ in streams]
            try:
                await _open_all(streams)
                if history is not None:
                    logger.info("replaying %d tokens on %s", history.shape[1], route)
                    replay = history
                    for stream, seen, returned in zip(streams, histories, outputs, strict=True):
                        seen.append(replay)
                        replay = await stream.step(replay, 0, images)
                        returned.append(replay)
                        images = None  # only the first of them holds block 0
                return streams, histories, outputs
            except HopFailure as failure:
                self._penalise(failure)
                await asyncio.gather(*(s.close() for s in streams))
        raise SessionFailedError(
            f"blocks {start}-{end - 1}: no working peer after {self.max_failovers} attempts"
        )

    def rewind(self, position: int) -> None:
        """Forget every token from ``position`` on (rejected drafts): the history a failover
        replays loses them now, the peers' caches at the next step (sent at ``position``)."""
        if not 0 <= position <= self.position:
            raise ValueError(f"cannot rewind a session of {self.position} tokens to {position}")
        if self.images is not None:  # raises, before any change, inside an image
            self.images = self.images.before(position)
        self.history = [_before(chunks, position) for chunks in self.history]
        self.outputs = [_before(chunks, position) for chunks in self.outputs]
        self.position = position


async def _open_all(streams: list[HopStream]) -> None:
    """Open every stream concurrently; raise the first failure."""
    results = await asyncio.gather(*(s.open() for s in streams), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _before(chunks: list[torch.Tensor], position: int) -> list[torch.Tensor]:
    """The tokens of ``chunks`` (one per step, along dim 1) before ``position``."""
    kept = torch.cat(chunks, dim=1)[:, :position] if chunks else None
    return [kept] if kept is not None and kept.shape[1] else []


def _merged(earlier: ImageInputs | None, later: ImageInputs) -> ImageInputs:
    if earlier is None:
        return later
    return ImageInputs(
        torch.cat([earlier.features, later.features]),
        torch.cat([earlier.positions, later.positions]),
    )
