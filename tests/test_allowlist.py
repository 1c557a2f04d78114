"""Allowed-peers files: peer ids one per line, comments, and errors that name the line."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from swarmllm.security.allowlist import AllowlistError, load_allowlist
from swarmllm.security.identity import peer_id_of

RSA_STYLE_PEER_ID = "QmNnooDu7bfjPFoTZYxMNLWUQJyrVwtbZg5gBMjTezGAJN"


def _peer_id() -> str:
    return peer_id_of(Ed25519PrivateKey.generate())


def test_ids_comments_and_blank_lines(tmp_path: Path) -> None:
    a, b = _peer_id(), _peer_id()
    path = tmp_path / "allowed.txt"
    path.write_text(f"# our peers\n\n  {a}  # alice\n{b}\n{a}\n")
    assert load_allowlist(path) == {a, b}


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        ("not-a-peer-id", "not valid base58"),
        (RSA_STYLE_PEER_ID, "does not inline an Ed25519 public key"),
        ("12D3KooW", "is not an Ed25519 peer id"),
    ],
)
def test_a_bad_line_is_named(tmp_path: Path, line: str, complaint: str) -> None:
    path = tmp_path / "allowed.txt"
    path.write_text(f"{_peer_id()}\n{line}\n")
    with pytest.raises(AllowlistError, match=f"line 2: '{line}'.*{complaint}"):
        load_allowlist(path)


def test_an_empty_list_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "allowed.txt"
    path.write_text("# nobody yet\n\n")
    with pytest.raises(AllowlistError, match="lists no peer ids"):
        load_allowlist(path)


def test_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(AllowlistError, match="cannot be read"):
        load_allowlist(tmp_path / "missing.txt")
