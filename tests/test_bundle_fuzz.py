"""Fuzzing the bundle loader: any input loads or raises BundleError, within bounded memory."""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cogbert_edge import ActionSpace, Bundle, BundleError, ModelConfig, init_params, load_bundle
from cogbert_edge.inference.quant import plan, quantize_params

from .helpers import mutate_bundle

SMALL = ModelConfig(obs_dim=32, action=ActionSpace.of_discrete(4), encoder=(32,), hidden=32)
_params = init_params(SMALL, 0)
_layers = plan(SMALL, 4, 32)
SEEDS = {
    "fp32": Bundle.create(SMALL, _params, model_id="fuzz-fp32").to_bytes(),
    "int4": Bundle.create(SMALL, quantize_params(_params, _layers), quant=_layers, model_id="fuzz-int4").to_bytes(),
}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load_within_memory_bound(data: bytes) -> None:
    """Load ``data``; it must load or raise BundleError, and never allocate more than a small
    multiple of its own size (plus a constant for the parser's fixed overhead)."""
    tracemalloc.start()
    try:
        try:
            load_bundle(data)
        except BundleError:
            pass
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 8 * len(data) + 256 * 1024, f"peak {peak} B for a {len(data)} B input"


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash_the_loader(data):
    load_within_memory_bound(data)


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_mutated_bundles_load_or_raise_bundle_error(which, data):
    kinds = ["flip-header", "flip-any", "truncate", "insert", "length"]
    load_within_memory_bound(mutate_bundle(SEEDS[which], data, kinds, 8))


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
                     max_leaves=20)
_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "U32", "F16", "I64", "x"]) | _json,
    "shape": st.lists(st.integers(-2, 2**40), max_size=5) | _json,
    "data_offsets": st.lists(st.integers(-2, 2**40), min_size=0, max_size=3) | _json,
})
# The header keys of a real bundle (its tensor names and __metadata__).
_SEED_KEYS = sorted(json.loads(SEEDS["fp32"][8:8 + struct.unpack_from("<Q", SEEDS["fp32"])[0]]))


@FUZZ
@given(st.dictionaries(st.sampled_from(_SEED_KEYS) | st.text(max_size=10),
                       _entry | _json, max_size=12),
       st.binary(max_size=2048))
def test_structured_hostile_headers_load_or_raise_bundle_error(header, body):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    load_within_memory_bound(struct.pack("<Q", len(raw)) + raw + body)


def test_valid_bundle_loads_within_the_memory_bound():
    for data in SEEDS.values():
        load_within_memory_bound(data)


@pytest.mark.parametrize("body", [b"[" * 2 + b"[],"  * 200_000 + b"[]]]", b'"a",' * 200_000])
def test_container_and_string_floods_are_refused_before_parsing(body):
    text = b'{"x":' + body + b"}"
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text
    with pytest.raises(BundleError, match="far more JSON values"):
        load_bundle(data)
    load_within_memory_bound(data)
