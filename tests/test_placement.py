"""Devices, dtypes, quantized spans, precision records and routing, memory sizing (no swarm)."""

from __future__ import annotations

import dataclasses
import importlib.util

import msgpack
import pytest
import torch
from torch import nn

from swarmllm.blocks.families import family_of
from swarmllm.blocks.placement import Placement, PlacementError, resolve_placement
from swarmllm.blocks.quantization import Int8WeightOnlyLinear, bytes_per_block
from swarmllm.blocks.span import BlockSpan
from swarmllm.client.routing import NoRouteError, find_route
from swarmllm.client.verification import TOLERANCES, relative_error, tolerance_for, wire_rounding
from swarmllm.dht.records import CoverageMap, PeerRecord, PeerState
from swarmllm.peer.server import PeerSettings, check_budget
from swarmllm.peer.sizing import block_budget, parse_memory

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="needs bitsandbytes (scripts/device_check.sh installs it)",
)


def test_auto_placement_on_this_machine_is_a_float_span():
    placement = resolve_placement("auto", "auto", "none")
    if torch.cuda.is_available():
        assert placement.device == torch.device("cuda", 0)
        assert placement.dtype in (torch.bfloat16, torch.float16)
    else:
        assert placement.device.type in ("cpu", "mps")
    assert resolve_placement("cpu", "float16").dtype == torch.float16
    assert resolve_placement("cpu", "auto", "int8").precision == "int8"


@pytest.mark.parametrize(("setting", "dtype"), [("0", torch.float32), ("1", torch.bfloat16)])
def test_the_cpu_bf16_setting_decides_what_auto_computes_in_on_a_cpu(
    monkeypatch, setting: str, dtype: torch.dtype
) -> None:
    monkeypatch.setenv("SWARMLLM_CPU_BF16", setting)
    assert resolve_placement("cpu", "auto").dtype == dtype


def test_a_bad_cpu_bf16_setting_is_named(monkeypatch) -> None:
    monkeypatch.setenv("SWARMLLM_CPU_BF16", "yes")
    with pytest.raises(PlacementError, match="SWARMLLM_CPU_BF16='yes': expected 0 or 1"):
        resolve_placement("cpu", "auto")


@pytest.mark.parametrize(
    ("device", "dtype", "quant", "message"),
    [
        ("cpu", "auto", "nf4", "--quant nf4 runs only on CUDA"),
        ("tpu", "auto", "none", "--device tpu: expected one of auto|cpu|cuda[:N]|mps"),
        ("cpu", "float64", "none", "--dtype float64"),
        ("cpu", "auto", "int4", "--quant int4"),
    ],
)
def test_impossible_choices_are_refused_naming_them(device, dtype, quant, message):
    with pytest.raises(PlacementError, match="^" + message.replace("[", r"\[").replace("|", r"\|")):
        resolve_placement(device, dtype, quant)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused():
    with pytest.raises(PlacementError, match=r"^--device cuda: CUDA is not available here"):
        resolve_placement("cuda", "auto", "none")
    with pytest.raises(PlacementError, match=r"^--device cuda:1: CUDA is not available here"):
        resolve_placement("cuda:1", "auto", "int8")


def test_int8_linear_is_close_to_the_float_one():
    torch.manual_seed(0)
    linear = nn.Linear(96, 48)
    quantized = Int8WeightOnlyLinear(linear, torch.float32)
    x = torch.randn(3, 5, 96)
    assert quantized.weight.dtype == torch.int8
    with torch.no_grad():
        assert relative_error(quantized(x), linear(x)) < 1e-2


def _span(llama, placement: Placement | None = None, start: int = 0, end: int = 3) -> BlockSpan:
    return BlockSpan.from_weights(
        llama.config, llama.weight_files(), start, end, placement=placement
    )


def test_an_int8_span_holds_the_bytes_the_sizing_counts_and_stays_close(llama):
    placement = resolve_placement("cpu", "auto", "int8")
    span = _span(llama, placement)
    linears = [m for m in span.modules() if isinstance(m, nn.Linear)]
    assert not linears, "every linear layer of the span is quantized"
    held = sum(t.numel() * t.element_size() for t in [*span.buffers(), *span.parameters()])
    held -= sum(b.numel() * b.element_size() for b in span.rotary.buffers())
    with torch.device("meta"):
        layer = family_of(llama.config).decoder_layer(llama.config, layer_idx=0)
    assert held == 3 * bytes_per_block(layer, placement)
    float_bytes = 3 * bytes_per_block(layer, Placement(CPU, torch.float32))
    assert held < 0.3 * float_bytes
    hidden = torch.randn(2, 7, llama.config.hidden_size)
    assert relative_error(span(hidden), _span(llama)(hidden)) < TOLERANCES["int8"]


def test_a_quantized_span_decodes_in_batches_like_alone(llama):
    span = _span(llama, resolve_placement("cpu", "auto", "int8"))
    prompts = [torch.randn(1, n, llama.config.hidden_size) for n in (3, 5)]
    caches = [span.new_cache() for _ in prompts]
    for prompt, cache in zip(prompts, caches, strict=True):
        span(prompt, cache)
    steps = [torch.randn(1, 1, llama.config.hidden_size) for _ in prompts]
    batched = span.decode_batch(steps, caches, [None, None])
    for prompt, step, out in zip(prompts, steps, batched, strict=True):
        alone = span.new_cache()
        span(prompt, alone)
        assert torch.allclose(span(step, alone), out, atol=1e-5)


def _record(dtype="float32", quant="none", start=0, end=6, **kw) -> PeerRecord:
    fields = dict(state=PeerState.ONLINE, start=start, end=end, decode_steps_per_s=10.0)
    fields.update(cache_tokens_left=1000, version="0.1.0", dtype=dtype, quant=quant, **kw)
    return PeerRecord(**fields)


def test_records_carry_device_dtype_and_quant_and_old_records_still_parse():
    record = _record("bfloat16", "nf4", device="cuda")
    assert PeerRecord.from_bytes(record.to_bytes()) == record
    assert record.precision == "nf4"
    old = msgpack.unpackb(_record().to_bytes())
    del old["device"], old["quant"]  # a record from a peer before this change
    parsed = PeerRecord.from_bytes(msgpack.packb(old))
    assert (parsed.device, parsed.quant, parsed.precision) == ("cpu", "none", "float32")
    with pytest.raises(ValueError, match="'quant' must be a string of at most 32"):
        PeerRecord.from_bytes(msgpack.packb({**old, "quant": "x" * 33}))


def _coverage(records: dict[str, PeerRecord]) -> CoverageMap:
    coverage = CoverageMap("m", 6, [{} for _ in range(6)])
    for peer_id, record in records.items():
        for block in range(record.start, record.end):
            coverage.blocks[block][peer_id] = record
    return coverage


def test_routes_keep_to_the_minimum_precision():
    coverage = _coverage(
        {
            "fast-bf16": dataclasses.replace(_record("bfloat16"), decode_steps_per_s=1000.0),
            "fast-int8": dataclasses.replace(_record(quant="int8"), decode_steps_per_s=500.0),
            "slow-fp32": _record(),
        }
    )
    assert [h.peer_id for h in find_route(coverage)] == ["fast-bf16"]
    assert [h.peer_id for h in find_route(coverage, min_precision="float32")] == ["slow-fp32"]
    assert [h.peer_id for h in find_route(coverage, min_precision="int8")] == ["fast-bf16"]
    with pytest.raises(NoRouteError, match=r"1 peer computing in bfloat16 \(below float16\)"):
        find_route(coverage, min_precision="float16", banned={"slow-fp32"})
    with pytest.raises(ValueError, match="min_precision must be one of"):
        find_route(coverage, min_precision="float64")


def test_spot_check_tolerance_follows_the_coarsest_precision():
    records = {"a": _record(), "b": _record(quant="int8"), "c": _record("bfloat16", "nf4")}
    answers = dict.fromkeys(records, torch.zeros(1))

    def over_a_float32_wire(precision: str) -> float:
        return TOLERANCES[precision] + wire_rounding(torch.float32, TOLERANCES[precision])

    assert tolerance_for(torch.float32, {"a": answers["a"]}, records) == over_a_float32_wire(
        "float32"
    )
    assert tolerance_for(torch.float32, {"a": 0, "b": 0}, records) == over_a_float32_wire("int8")
    assert tolerance_for(torch.float32, answers, records) == over_a_float32_wire("nf4")
    assert TOLERANCES["float32"] < TOLERANCES["int8"] < TOLERANCES["nf4"] < 1


def test_memory_sizes_parse_and_bad_ones_name_the_problem():
    assert parse_memory("4GiB") == 4 << 30
    assert parse_memory("512MB") == 512_000_000
    assert parse_memory("1.5g") == 3 << 29
    assert parse_memory("1000") == 1000
    for bad in ("", "-1G", "12XB", "inf", "GiB"):
        with pytest.raises(ValueError, match="expected a memory size"):
            parse_memory(bad)


def test_the_budget_counts_weights_at_their_precision_plus_the_kv_cache(llama):
    config = llama.config
    fp32 = block_budget(config, Placement(CPU, torch.float32), 100, 10**9)
    int8 = block_budget(config, resolve_placement("cpu", "auto", "int8"), 100, 10**9)
    head_dim = config.hidden_size // config.num_attention_heads
    assert fp32.cache_bytes == 2 * 100 * config.num_key_value_heads * head_dim * 4
    assert int8.cache_bytes == fp32.cache_bytes  # the cache stays in the compute dtype
    assert int8.weight_bytes < 0.3 * fp32.weight_bytes
    k = 4
    exact = block_budget(
        config, Placement(CPU, torch.float32), 100, k * (fp32.weight_bytes + fp32.cache_bytes)
    )
    assert exact.fits == k
    line = exact.describe(k, config.num_hidden_layers)
    assert "(--max-memory)" in line and f"= {k} blocks; taking {k} of 6" in line
    with pytest.raises(ValueError, match="not enough for 5 block"):
        check_budget(PeerSettings(blocks=(0, 5), max_memory=1), exact, 6)
    check_budget(PeerSettings(blocks=(0, 4)), exact, 6)


@needs_cuda
@pytest.mark.parametrize(
    "quant", ["none", pytest.param("int8", marks=needs_bnb), pytest.param("nf4", marks=needs_bnb)]
)
def test_cuda_spans_match_the_cpu_float32_span(llama, quant):
    placement = resolve_placement("cuda", "auto", quant)
    span = _span(llama, placement)
    reference = _span(llama)
    hidden = torch.randn(2, 9, llama.config.hidden_size)
    cache = span.new_cache()
    out = span(hidden.to(placement.dtype), cache)
    assert out.device == CPU, "outputs come back to the device the input came from"
    assert all(k.device.type == "cuda" for k in cache._keys if k is not None)
    tolerance = TOLERANCES[placement.precision]
    assert relative_error(out, reference(hidden)) < tolerance
    steps = [torch.randn(1, 1, llama.config.hidden_size, dtype=placement.dtype) for _ in "ab"]
    caches = [span.new_cache() for _ in "ab"]
    for c in caches:
        span(hidden[:1].to(placement.dtype), c)
    batched = span.decode_batch(steps, caches, [None, None])
    assert all(out.device == CPU and out.isfinite().all() for out in batched)
