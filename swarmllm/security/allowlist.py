"""Private swarms: a file of the peer ids a peer serves, or a client routes through.

One Ed25519 peer id per line; ``#`` starts a comment; blank lines are ignored. Every id is
checked when the file is read, so a typo fails at start with the file and line named, instead
of silently locking a peer out.
"""

from __future__ import annotations

from pathlib import Path

from swarmllm.security.identity import IdentityError, public_key_from_peer_id


class AllowlistError(ValueError):
    """An allowed-peers file that cannot be read or holds something other than peer ids."""


def load_allowlist(path: str | Path) -> frozenset[str]:
    """The peer ids listed in ``path``; AllowlistError naming the file (and line) otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise AllowlistError(f"allowed-peers file {path} cannot be read: {e}") from e
    peers: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        peer_id = line.split("#", 1)[0].strip()
        if not peer_id:
            continue
        try:
            public_key_from_peer_id(peer_id)
        except IdentityError as e:
            raise AllowlistError(
                f"allowed-peers file {path}, line {number}: {peer_id!r} is not an Ed25519 peer "
                f"id ({e})"
            ) from e
        peers.add(peer_id)
    if not peers:
        raise AllowlistError(f"allowed-peers file {path} lists no peer ids")
    return frozenset(peers)
