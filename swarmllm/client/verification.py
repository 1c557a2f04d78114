"""Spot-check verification: re-run a hop's input on another peer and compare the outputs.

A signature proves which peer produced an output, not that the output is right: a peer can
sign wrong values. With ``verify_fraction`` F, each hop of each step is checked with
probability F: the client sends everything that hop has received so far (a stateless
``forward``: the other peer holds no cache of the session) to another peer serving the same
blocks, and compares the outputs for every token so far, not only the step's new ones: each
token's output must lie within a relative distance (L2, ``tolerance_for``) of the other peer's.
A check therefore covers every earlier step of the hop as well, so a peer that tampers with
any step is caught by any later check, and the closing check a generation ends with
(``always``, see ``InferenceSession.audit``) leaves no step unchecked.

On a mismatch a third peer breaks the tie. Every peer whose answer agrees with no other answer
is banned: the odd one out of three, or, when only two peers answered (no third one serves
those blocks, or it failed), both of them, since the client cannot tell which one lies. When
the checked hop's peer is among them the check raises ``OutvotedHop``, and the session fails
over as for any other fault (and rewinds, when the peer's outputs already went on: see
``client/session.py``). The signed replies are kept as ``VerificationEvidence``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from swarmllm.client.hop import HopFailure, HopStream, SessionSpec, SignedReply, signed_forward
from swarmllm.client.routing import Hop, meets_precision
from swarmllm.dht.records import PeerRecord, PeerState
from swarmllm.security.signing import SignatureError

if TYPE_CHECKING:
    from swarmllm.client.router import Router

logger = logging.getLogger("swarmllm.client")

# Largest per-token relative L2 distance between two honest answers, by the coarsest precision
# the answering peers compute in (their quantization, else their compute dtype). A stateless
# forward over the whole sequence and cached steps round differently: on SmolLM2, 10 blocks,
# measured up to 4e-6 in float32 and up to 4.4e-2 in bfloat16; an int8 span (weight-only, CPU)
# against a float32 one up to 4.2e-2. NF4 was not measured here (no GPU): its weights carry
# about 4x int8's error. Below float16 compute a check only catches gross tampering.
TOLERANCES: dict[str, float] = {
    "float32": 1e-3,
    "float16": 3e-2,
    "bfloat16": 1e-1,
    "int8": 1e-1,
    "nf4": 3e-1,
}
# The wire adds its rounding on top: both answers reach the client rounded to the wire dtype
# (the inputs are the same values for both). Two values that differ by a relative d round to
# the same wire value unless a rounding boundary falls between them, which it does for about a
# share d / ulp of the elements, each then one ulp apart; so the rounded answers of a token
# differ by about sqrt(d * ulp) in relative L2 (at most one ulp), d being the peers' compute
# tolerance. For a bfloat16 wire between float32 peers that is 2.8e-3 (x1.5 margin: a total of
# 5.2e-3), where two honest answers measured 2.9e-5 at most on SmolLM2 (15 blocks): noise of
# 1% of a token's norm and a 2% scaling are caught. A bound of two unit roundoffs, in the
# worst case for every element at once, would allow 1.3e-2 and let that noise through.
WIRE_ROUNDING_MARGIN = 1.5


def wire_rounding(wire_dtype: torch.dtype, compute_tolerance: float) -> float:
    """How far rounding to ``wire_dtype`` may move two answers that agree within
    ``compute_tolerance`` apart."""
    ulp = torch.finfo(wire_dtype).eps  # relative spacing of the wire's values
    return WIRE_ROUNDING_MARGIN * min(math.sqrt(compute_tolerance * ulp), ulp)


# at most one new read of the coverage map per this many seconds, when no verifier is known
FRESH_READ_PERIOD = 5.0


@dataclass(frozen=True)
class VerificationEvidence:
    """A spot-check that found disagreeing outputs, with every signed reply it compared."""

    session_id: str
    step: int  # the checked hop's step number
    position: int
    start: int
    end: int
    # the checked hop's replies first (the step's tokens, one per message it took), then the
    # verifiers' (whole sequence)
    replies: tuple[SignedReply, ...]
    banned: tuple[str, ...]

    def describe(self) -> str:
        lines = [
            f"spot-check of blocks {self.start}-{self.end - 1}, session {self.session_id}, "
            f"step {self.step} (position {self.position}): banned {', '.join(self.banned)}"
        ]
        for reply in self.replies:
            signature = reply.signature.hex() if reply.signature else "none"
            lines.append(
                f"  {reply.peer_id}: input {reply.digest.input_digest.hex()} "
                f"output {reply.digest.output_digest.hex()} signature {signature}"
            )
        return "\n".join(lines)


def token_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a_t - b_t| / max(|a_t|, |b_t|)`` for every token ``t`` (L2 over the hidden
    dimension; symmetric): a tensor of the leading dimensions."""
    a, b = a.float(), b.float()
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp(min=torch.finfo(torch.float32).tiny)
    return (a - b).norm(dim=-1) / scale


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest of ``token_errors(a, b)``."""
    return float(token_errors(a, b).max())


def outliers(outputs: Mapping[str, torch.Tensor], tolerance: float) -> set[str]:
    """The peers whose output agrees with no other peer's output."""
    return {
        peer
        for peer, output in outputs.items()
        if not any(
            relative_error(output, other) <= tolerance for p, other in outputs.items() if p != peer
        )
    }


class OutvotedHop(HopFailure):
    """A spot-check outvoted the hop: its outputs agree with no other peer's."""


class SpotChecker:
    """Checks hops of one inference session; ``check`` runs after each hop's step."""

    def __init__(self, router: Router, fraction: float):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"verify_fraction must be within [0, 1], got {fraction}")
        self.router, self.fraction = router, fraction
        # unpredictable: a peer must not know which of its replies get checked, nor by whom
        self.rng = random.SystemRandom()
        self.evidence: list[VerificationEvidence] = []
        self._fresh_read_at = -math.inf

    async def check(
        self,
        stream: HopStream,
        history: Sequence[torch.Tensor],
        past_outputs: Sequence[torch.Tensor],
        hidden: torch.Tensor,
        output: torch.Tensor,
        position: int,
        always: bool = False,
    ) -> None:
        """Maybe (``always``: surely) re-run the hop's inputs so far (``history`` then
        ``hidden``) elsewhere; raise OutvotedHop when the hop's outputs so far
        (``past_outputs`` then ``output``) are outvoted."""
        if self.fraction == 0.0 or (not always and self.rng.random() >= self.fraction):
            return
        hop = stream.hop
        records = await self._records(hop.start, fresh=False)
        candidates = self._candidates(hop, records)
        if not candidates and time.monotonic() - self._fresh_read_at >= FRESH_READ_PERIOD:
            # a replica may have joined since the map was read (it is reused for 30 s)
            self._fresh_read_at = time.monotonic()
            records = await self._records(hop.start, fresh=True)
            candidates = self._candidates(hop, records)
        if not candidates:
            logger.info(
                "no other peer serves blocks %d-%d: not spot-checked", hop.start, hop.end - 1
            )
            return
        inputs = torch.cat([*history, hidden], dim=1)
        answers = {hop.peer_id: torch.cat([*past_outputs, output], dim=1)}
        replies: list[SignedReply] = []
        for peer_id in candidates:
            reply = await self._ask(Hop(peer_id, hop.start, hop.end), inputs, stream.spec)
            if reply is None:
                continue
            replies.append(reply)
            answers[peer_id] = reply.output
            if not outliers(answers, tolerance_for(output.dtype, answers, records)):
                return  # the verifier agrees (or a third peer settled a borderline case)
            if len(answers) == 3:
                break
        if len(answers) == 1:
            logger.info("no verifier answered for blocks %d-%d", hop.start, hop.end - 1)
            return
        banned = outliers(answers, tolerance_for(output.dtype, answers, records))
        evidence = VerificationEvidence(
            session_id=stream.spec.session_id,
            step=stream.steps_sent,
            position=position,
            start=hop.start,
            end=hop.end,
            replies=(*stream.last_replies, *replies),
            banned=tuple(sorted(banned)),
        )
        self.evidence.append(evidence)
        logger.warning("%s", evidence.describe())
        others = [peer for peer in answers if peer != hop.peer_id]
        for peer_id in banned - {hop.peer_id}:
            self.router.bans.ban(peer_id, f"spot-check: its output disagrees with {hop.peer_id}")
        if hop.peer_id in banned:
            tolerance = tolerance_for(output.dtype, answers, records)
            errors = token_errors(answers[hop.peer_id], answers[others[0]]).amax(dim=0)
            first = int((errors > tolerance).nonzero()[0, 0])  # it agrees with no other answer
            raise OutvotedHop(
                hop,
                f"spot-check at step {evidence.step}: its output for position {first} disagrees "
                f"with {', '.join(others)}",
            )

    async def _ask(self, hop: Hop, inputs: torch.Tensor, spec: SessionSpec) -> SignedReply | None:
        """The verifier's signed answer, or None when it cannot give one (a verifier that
        signs badly is banned; one that fails otherwise, e.g. refuses the length, is skipped)."""
        try:
            return await signed_forward(
                self.router.connection,
                hop,
                spec.model_id,
                inputs,
                pad_lengths=spec.pad_lengths,
                timeout=spec.timeout_for(inputs.shape[1]),
            )
        except HopFailure as failure:
            if isinstance(failure.__cause__, SignatureError):
                self.router.bans.ban(hop.peer_id, failure.reason)
            else:
                logger.info("verifier %s gave no answer: %s", hop.peer_id, failure.reason)
            return None

    def _candidates(self, hop: Hop, records: Mapping[str, PeerRecord]) -> list[str]:
        """Other usable peers serving all of ``[hop.start, hop.end)`` at the session's minimum
        precision, in a random order with those computing in the checked peer's precision
        first (the tolerance stays tight)."""
        banned = self.router.bans.banned()
        allowed = self.router.allowed
        usable = [
            peer_id
            for peer_id, record in records.items()
            if peer_id != hop.peer_id
            and record.state == PeerState.ONLINE
            and record.start <= hop.start
            and hop.end <= record.end
            and peer_id not in banned
            and (allowed is None or peer_id in allowed)
            and meets_precision(record, self.router.min_precision)
        ]
        self.rng.shuffle(usable)
        checked = records.get(hop.peer_id)
        if checked is not None:
            usable.sort(key=lambda peer_id: records[peer_id].precision != checked.precision)
        return usable

    async def _records(self, block: int, fresh: bool) -> Mapping[str, PeerRecord]:
        """Who announces ``block``, from the coverage map the router routes with (``fresh``:
        read again now)."""
        try:
            coverage, _ = await self.router.read_coverage(fresh=fresh)
        except TimeoutError as e:
            logger.warning("cannot read the coverage map to find verifiers: %s", e)
            return {}
        return coverage.blocks[block]


def tolerance_for(
    wire_dtype: torch.dtype, answers: Mapping[str, torch.Tensor], records: Mapping[str, PeerRecord]
) -> float:
    """The tolerance of the coarsest precision the answering peers compute in (one this
    version does not know counts as the coarsest; float32 when no record is known), plus the
    wire's rounding."""
    precisions = {records[peer].precision for peer in answers if peer in records} or {"float32"}
    coarsest = max(TOLERANCES.get(precision, max(TOLERANCES.values())) for precision in precisions)
    return coarsest + wire_rounding(wire_dtype, coarsest)
