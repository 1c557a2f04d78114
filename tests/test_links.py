"""The emulated link: a TCP forwarder on loopback that delays each direction, in order."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from swarmllm.links import HOST, LinkEmulator, LinkProfile


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A plain TCP echo server on loopback (one thread per connection)."""
    server = socket.create_server((HOST, 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    server.close()


def _exchange(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` through ``port`` and read it back; returns it and the seconds taken."""
    with socket.create_connection((HOST, port), timeout=10) as conn:
        started = time.perf_counter()
        conn.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = conn.recv(65536)
            assert chunk, "the link closed early"
            received += chunk
        return received, time.perf_counter() - started


def test_a_round_trip_through_the_link_takes_at_least_twice_the_one_way_delay(echo_port):
    with LinkEmulator() as links:
        link = links.add(echo_port, LinkProfile(delay_ms=25))
        _exchange(link.port, b"warm-up")
        rtts = [_exchange(link.port, b"ping")[1] for _ in range(5)]
    assert min(rtts) >= 0.050
    assert min(rtts) < 0.050 + 0.5  # loose: the machine may be busy, but not a stalled link


def test_jitter_never_reorders_bytes_and_counters_see_both_directions(echo_port):
    payload = b"".join(i.to_bytes(4, "big") for i in range(50_000))
    with LinkEmulator(seed=3) as links:
        link = links.add(echo_port, LinkProfile(delay_ms=2, jitter_ms=2))
        received, _ = _exchange(link.port, payload)
    assert received == payload
    assert link.counters.connections == 1
    assert link.counters.inbound == link.counters.outbound == len(payload)


def test_a_bandwidth_cap_spreads_a_transfer_over_time(echo_port):
    payload = bytes(250_000)  # 2 Mbit each way at 20 Mbit/s: >= 0.1 s per direction
    with LinkEmulator() as links:
        link = links.add(echo_port, LinkProfile(mbps=20))
        received, seconds = _exchange(link.port, payload)
    assert received == payload
    assert seconds >= 0.1


def test_a_node_that_goes_away_closes_the_connection_through_the_link():
    server = socket.create_server((HOST, 0))
    with LinkEmulator() as links:
        link = links.add(server.getsockname()[1], LinkProfile(delay_ms=1))
        with socket.create_connection((HOST, link.port), timeout=10) as conn:
            accepted, _ = server.accept()
            accepted.close()
            server.close()
            conn.settimeout(5)
            assert conn.recv(10) == b""


def test_profiles_refuse_negative_delays_and_zero_bandwidth():
    with pytest.raises(ValueError, match="delay"):
        LinkProfile(delay_ms=-1)
    with pytest.raises(ValueError, match="bandwidth"):
        LinkProfile(mbps=0)
