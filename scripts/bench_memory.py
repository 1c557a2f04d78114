"""A peer's memory against its span size, on the embedded model: fixed cost plus a slope.

Starts one peer serving the last 5, 10 and 30 blocks (no vision adapter, no session; it has
run one throughput pass over its blocks), waits until it is ONLINE, and reads the resident
memory (RSS, and PSS, which splits the pages the forked DHT process shares with its parent)
of the peer process, its DHT process and p2pd. Also measures what importing the runtime
costs before any weight is loaded. Prints a table and writes bench_results/bench_memory.json.

    python scripts/bench_memory.py [--spans 5 10 30]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from bench_common import write_report
from rich.console import Console
from rich.table import Table
from safetensors import safe_open

from swarmllm.blocks.families import weight_names
from swarmllm.blocks.sources import ModelSource, resolve_model
from swarmllm.swarm import LocalSwarm

MIB = 2**20
# resident bytes after each import, in a fresh interpreter (cumulative)
IMPORTS = """
import psutil
rss = lambda: print(psutil.Process().memory_info().rss, flush=True)
rss()
import torch
rss()
from transformers.models.llama import modeling_llama
rss()
import hivemind
rss()
import swarmllm.cli, swarmllm.peer.server
rss()
"""
IMPORT_STAGES = [
    "python + psutil",
    "+ torch",
    "+ transformers (llama)",
    "+ hivemind",
    "+ swarmllm peer",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, nargs="+", default=[5, 10, 30])
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_memory.json"))
    return parser.parse_args()


def import_costs() -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", IMPORTS], capture_output=True, text=True, timeout=600, check=True
    )
    return dict(zip(IMPORT_STAGES, map(int, result.stdout.split()), strict=True))


def block_bytes(source: ModelSource, start: int, end: int) -> int:
    """Bytes of the weights of blocks ``[start, end)`` as stored (float32 for the embedded)."""
    files = source.weight_files()
    prefixes = tuple(weight_names(files).layer_prefix.format(i) for i in range(start, end))
    total = 0
    for name in files:
        if name.startswith(prefixes):
            with safe_open(files[name], framework="pt") as handle:
                tensor = handle.get_tensor(name)
                total += tensor.numel() * tensor.element_size()
    return total


def peer_memory(source: ModelSource, num_blocks: int) -> dict[str, dict[str, int]]:
    """RSS and PSS of each process of a peer serving the last ``num_blocks`` blocks."""
    last = source.config.num_hidden_layers
    with LocalSwarm(0, source=source) as swarm, tempfile.TemporaryDirectory() as cache:
        # Weights are read through safetensors' memory map: pages become resident when a pass
        # touches them. A fresh cache makes the peer measure its throughput, one pass over
        # every block, as a peer that has served a request.
        launcher = ["env", f"SWARMLLM_CACHE={cache}", sys.executable, "-m", "swarmllm.cli"]
        blocks = (last - num_blocks, last)
        peer = swarm.start_peer(
            "peer", blocks=blocks, extra_args=["--no-adapter"], launcher=launcher
        )
        _wait_online(swarm)
        time.sleep(2.0)  # let start-up garbage settle
        root = psutil.Process(peer.pid)
        memory = {}
        for process in [root, *root.children(recursive=True)]:
            info = process.memory_full_info()
            name = "peer" if process.pid == root.pid else _role(process)
            memory[name] = {"rss": info.rss, "pss": info.pss, **_rss_kinds(process.pid)}
        return memory


def _wait_online(swarm: LocalSwarm, timeout: float = 300.0) -> None:
    """``wait_until_ready``, tolerating DHT reads that time out on a busy machine."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            swarm.wait_until_ready(timeout=timeout, full_coverage=False)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


def _rss_kinds(pid: int) -> dict[str, int]:
    """Resident anonymous memory (heap: weights, caches) and file-backed pages (libraries)."""
    fields = {"RssAnon:": "anon", "RssFile:": "file"}
    kinds = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, *rest = line.split()
        if key in fields:
            kinds[fields[key]] = int(rest[0]) * 1024
    return kinds


def _role(process: psutil.Process) -> str:
    return "p2pd" if "p2pd" in process.name() else "dht process"


def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares intercept and slope of bytes against blocks."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def main() -> None:
    args = parse_args()
    source = resolve_model(progress=False)
    imports = import_costs()
    last = source.config.num_hidden_layers
    spans = {n: peer_memory(source, n) for n in args.spans}
    weights = {n: block_bytes(source, last - n, last) for n in args.spans}
    intercept, slope = fit([(n, spans[n]["peer"]["rss"]) for n in args.spans])
    total_pss = {n: sum(p["pss"] for p in spans[n].values()) for n in args.spans}
    pss_intercept, pss_slope = fit([(n, total_pss[n]) for n in args.spans])

    console = Console()
    table = Table(title="what a peer costs before its weights (fresh interpreter)")
    table.add_column("imported")
    table.add_column("RSS", justify="right")
    for stage, rss in imports.items():
        table.add_row(stage, f"{rss / MIB:.0f} MiB")
    console.print(table)
    table = Table(title=f"peer serving the last N blocks of {source.name} (idle, float32)")
    columns = ["blocks", "weights", "peer RSS", "(anon)", "(files)", "DHT proc RSS", "p2pd RSS"]
    for column in [*columns, "all PSS"]:
        table.add_column(column, justify="right")
    for n in args.spans:
        procs = spans[n]
        table.add_row(
            str(n),
            f"{weights[n] / MIB:.0f} MiB",
            f"{procs['peer']['rss'] / MIB:.0f} MiB",
            f"{procs['peer'].get('anon', 0) / MIB:.0f} MiB",
            f"{procs['peer'].get('file', 0) / MIB:.0f} MiB",
            f"{procs.get('dht process', {}).get('rss', 0) / MIB:.0f} MiB",
            f"{procs.get('p2pd', {}).get('rss', 0) / MIB:.0f} MiB",
            f"{total_pss[n] / MIB:.0f} MiB",
        )
    console.print(table)
    per_block = weights[args.spans[-1]] / args.spans[-1]
    console.print(
        f"peer RSS ≈ {intercept / MIB:.0f} MiB + {slope / MIB:.1f} MiB/block "
        f"(weights: {per_block / MIB:.1f} MiB/block); all processes' PSS ≈ "
        f"{pss_intercept / MIB:.0f} MiB + {pss_slope / MIB:.1f} MiB/block"
    )
    write_report(
        args.out,
        {
            "model": source.name,
            "import_rss_bytes": imports,
            "spans": {str(n): {"weights_bytes": weights[n], "processes": spans[n]} for n in spans},
            "peer_rss_fixed_bytes": intercept,
            "peer_rss_bytes_per_block": slope,
            "total_pss_fixed_bytes": pss_intercept,
            "total_pss_bytes_per_block": pss_slope,
            "weight_bytes_per_block": per_block,
        },
    )


if __name__ == "__main__":
    main()
