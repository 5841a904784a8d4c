"""The native runtime (native/, backend "native"): parity with the numpy reference, the same
decisions and errors through the Policy API, the C reader accepting exactly what the Python
reader accepts, and the C-level suites (C tests, sanitizers, fuzzing, the C example) run from
here so that CI runs them.

Parity bounds, on |diff| / max(1, |reference|) (measured values in native/README.md):
- fp32: within 1e-5 of numpy over 1,000-step recurrent rollouts, every kernel.
- int8/int4, kernels with int16 activations (scalar, avx2, neon): within 1e-3 of numpy on the
  same bundle (numpy computes the exact dequantized math); greedy actions differ only where
  numpy's two best logits are within 1e-3.
- int8/int4, VNNI and VNNI512 kernels (int8 activations): within 6e-2 over rollouts and 3e-2 for
  one step; greedy actions differ only where numpy's two best logits are within 6e-2.
- The 512-bit kernels (avx512, vnni512) give the results of their 256-bit counterparts (avx2,
  vnni) bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cogbert_edge import (
    ActionSpace,
    BackendUnavailableError,
    Bundle,
    BundleError,
    ConfigError,
    Decision,
    ModelConfig,
    ObservationError,
    Policy,
    State,
    init_params,
    load_bundle,
)
from cogbert_edge.inference.backends import AUTO_ORDER, create_backend
from cogbert_edge.inference.backends import native_backend as nb
from cogbert_edge.inference.quant import plan, quantize_params

from .helpers import MACHINE_LIMIT, mutate_bundle, skip_on_this_machine, structured_obs
from .test_bundle import _cases, edit_meta, join, split

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"


def _build() -> None:
    """Build the native runtime if this checkout has not (CI's ./run does); fail loudly if it can't."""
    if not nb.native_available():
        p = subprocess.run(["make", "-s", "-C", str(NATIVE), f"PYTHON={sys.executable}"],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"make -C native failed:\n{p.stdout}\n{p.stderr}"
        nb._cache.clear()
    assert nb.native_available(), f"the native runtime does not load: {nb.native_error()}"


_build()
_mod = nb.native_module()
assert _mod is not None  # _build() checked it loads
MOD: Any = _mod
BEST = {v: k for k, v in nb.KERNELS.items()}[MOD.best_kernel()]
# Kernels this CPU runs (AUTO picks the best; every x86 kernel below it runs too, since each
# needs a subset of its features); int16-activation ones are held to the tight bound.
_BELOW = {"vnni512": ("avx2", "vnni", "avx512"), "avx512": ("avx2",), "vnni": ("avx2",), "avx2": (), "neon": (),
          "scalar": ()}
RUNS = ["scalar", *_BELOW[BEST], BEST] if BEST != "scalar" else ["scalar"]
PRECISE = [k for k in RUNS if k not in nb.INT8_ACTIVATION_KERNELS]
INT8_ACT = [k for k in RUNS if k in nb.INT8_ACTIVATION_KERNELS]
HAS_VNNI = bool(INT8_ACT)
# What the CPU is, not a missing install step: COGBERT_STRICT_SKIPS lets it pass (conftest.py).
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason=MACHINE_LIMIT + "run AVX512-VNNI kernels: this CPU has none "
                                "(x86 Ice Lake+ / Zen 4+)")


def ref_bundles(config, params) -> dict[str, Bundle]:
    out = {"fp32": Bundle.create(config, params)}
    for bits in (8, 4):
        layers = plan(config, bits, 64)
        out[f"int{bits}"] = Bundle.create(config, quantize_params(params, layers), quant=layers)
    return out


def rollout(a, b, obs: np.ndarray, batch: int = 1):
    """Step backends a and b side by side; return the worst |diff| / max(1, |a|) per output
    (absolute for the bounded h, relative for logits and the cell state when they exceed 1) and
    numpy's top-2 logit margin at every step where the greedy action differs."""
    hidden = a.config.hidden
    h1 = c1 = h2 = c2 = np.zeros((batch, hidden), np.float32)
    worst = dict(head=0.0, value=0.0, h=0.0, c=0.0)
    flips = []
    for t in range(obs.shape[0]):
        x = obs[t].reshape(batch, -1)
        a1, v1, h1, c1 = a.step(x, h1, c1)
        a2, v2, h2, c2 = b.step(x, h2, c2)
        for k, (p, q) in dict(head=(a1, a2), value=(v1, v2), h=(h1, h2), c=(c1, c2)).items():
            worst[k] = max(worst[k], float((np.abs(p - q) / np.maximum(1.0, np.abs(p))).max()))
        for r in np.nonzero(a1.argmax(-1) != a2.argmax(-1))[0]:
            top = np.sort(a1[r])
            flips.append(float(top[-1] - top[-2]))
    return worst, flips


def observations(kind: str, steps: int, dim: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (2 * rng.standard_normal((steps, dim))).astype(np.float32)
    return structured_obs(rng, steps, dim)


# -- parity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("kernel", RUNS)
def test_fp32_matches_numpy_within_1e5_over_1000_steps(bundles, kind, kernel):
    ref = create_backend(bundles["fp32"], "numpy")
    nat = nb.NativeBackend(bundles["fp32"], kernel=kernel)
    worst, flips = rollout(ref, nat, observations(kind, 1000, 64))
    assert max(worst.values()) <= 1e-5, worst
    assert not flips


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("kernel", PRECISE)
def test_quantized_with_int16_activations_matches_numpy(bundles, quant, kind, kernel):
    ref = create_backend(bundles[quant], "numpy")
    nat = nb.NativeBackend(bundles[quant], kernel=kernel)
    worst, flips = rollout(ref, nat, observations(kind, 1000, 64))
    assert max(worst.values()) <= 1e-3, worst
    assert all(m <= 1e-3 for m in flips), flips


@needs_vnni
@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("kernel", INT8_ACT or ["vnni"])
def test_vnni_int8_activations_stay_within_the_stated_bound(bundles, quant, kind, kernel):
    ref = create_backend(bundles[quant], "numpy")
    nat = nb.NativeBackend(bundles[quant], kernel=kernel)
    obs = observations(kind, 1000, 64)
    worst, flips = rollout(ref, nat, obs)
    assert max(worst.values()) <= 6e-2, worst
    assert all(m <= 6e-2 for m in flips), flips
    assert len(flips) <= 30, f"{len(flips)} greedy flips in 1000 steps"
    # One step from the same state (no recurrence to amplify it): a tighter bound.
    h = c = np.zeros((1, 256), np.float32)
    for t in range(200):
        a1, v1, h1, c1 = ref.step(obs[t:t + 1], h, c)
        a2, v2, h2, c2 = nat.step(obs[t:t + 1], h, c)
        assert max(np.abs(a1 - a2).max(), np.abs(h1 - h2).max(), np.abs(v1 - v2).max()) <= 3e-2
        h, c = h1, c1


@pytest.mark.parametrize("config", [
    ModelConfig(obs_dim=13, action=ActionSpace.of_discrete(3), encoder=(), hidden=20, obs_clip=0.0),
    ModelConfig(obs_dim=64, action=ActionSpace.of_discrete(5), encoder=(96, 128), hidden=36, obs_clip=3.0),
    ModelConfig(obs_dim=32, action=ActionSpace.of_continuous(2), encoder=(64,), hidden=64),
], ids=["no-encoder", "two-encoders", "continuous"])
@pytest.mark.parametrize("bits", [0, 8, 4])
def test_other_shapes_match_numpy(config, bits):
    params = init_params(config, 3, policy_gain=1.0)
    layers = plan(config, bits, 32) if bits else {}
    bundle = Bundle.create(config, quantize_params(params, layers), quant=layers)
    ref = create_backend(bundle, "numpy")
    for kernel in RUNS:
        nat = nb.NativeBackend(bundle, kernel=kernel)
        worst, _ = rollout(ref, nat, observations("random", 200, config.obs_dim))
        bound = 1e-5 if not bits else 6e-2 if kernel in nb.INT8_ACTIVATION_KERNELS else 1e-3
        assert max(worst.values()) <= bound, (kernel, worst)


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("kernel", RUNS)
def test_a_batch_row_equals_the_same_row_stepped_alone_bit_for_bit(bundles, quant, kernel):
    nat = nb.NativeBackend(bundles[quant], kernel=kernel)
    rng = np.random.default_rng(5)
    for batch in (7, 64):
        obs = (2 * rng.standard_normal((batch, 64))).astype(np.float32)
        h = (0.5 * rng.standard_normal((batch, 256))).astype(np.float32)
        c = (0.5 * rng.standard_normal((batch, 256))).astype(np.float32)
        head, value, h2, c2 = nat.step(obs, h, c)
        for i in range(batch):
            one = nat.step(obs[i:i + 1], h[i:i + 1], c[i:i + 1])
            for whole, single in zip((head, value, h2, c2), one, strict=True):
                assert np.array_equal(whole[i:i + 1], single), (batch, i)


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("wide,narrow", [("avx512", "avx2"), ("vnni512", "vnni")])
def test_the_512_bit_kernels_give_the_256_bit_results_bit_for_bit(bundles, quant, wide, narrow):
    """Other weight layout (panels of 16 rows), other tiling over the batch, same arithmetic per
    element: every output of a 100-step rollout at batch 1, 5 and 64 must be identical."""
    if wide not in RUNS:
        skip_on_this_machine(f"run the {wide} kernels on this CPU (best here: {BEST})")
    a = nb.NativeBackend(bundles[quant], kernel=wide)
    b = nb.NativeBackend(bundles[quant], kernel=narrow)
    assert (a.kernel, b.kernel) == (wide, narrow)
    rng = np.random.default_rng(11)
    for batch in (1, 5, 64):
        ha = ca = hb = cb = np.zeros((batch, 256), np.float32)
        for _ in range(100):
            obs = (2 * rng.standard_normal((batch, 64))).astype(np.float32)
            ya, va, ha, ca = a.step(obs, ha, ca)
            yb, vb, hb, cb = b.step(obs, hb, cb)
            for p, q in ((ya, yb), (va, vb), (ha, hb), (ca, cb)):
                assert np.array_equal(p, q), (quant, batch)


def test_auto_prefers_native_where_it_has_simd_kernels(monkeypatch):
    from cogbert_edge.inference.backends import resolve_backend
    monkeypatch.setenv("COGBERT_BACKEND", "numpy")     # "auto" is explicit: the variable must not matter
    if BEST not in ("scalar",):
        assert AUTO_ORDER[0] == "native"
        assert resolve_backend("auto") == "native"
    else:
        assert AUTO_ORDER[-1] == "native"
        assert resolve_backend("auto") == "numpy"


# -- the Policy API on the native backend ------------------------------------------------------


@pytest.mark.parametrize("quant", ["fp32", "int8", "int4"])
def test_the_fast_path_decides_exactly_as_the_general_path(bundles, quant):
    """Policy.act takes a discrete decision in one native call; the result must be what the
    general path (backend.step, then the SDK's sampling) gives on the same backend, to the bit,
    and the caller's random generator must advance the same way."""
    fast = Policy(bundles[quant], backend="native", seed=0)
    parts = Policy(bundles[quant], backend="native", seed=0)
    parts._fast_decision = None          # the fast path that returns parts (decide)
    slow = Policy(bundles[quant], backend="native", seed=0)
    slow._fast_decision = slow._fast_act = None
    assert fast._fast_decision is not None and parts._fast_act is not None
    obs = observations("structured", 1500, 64, seed=9)
    sf, sp, ss = fast.initial_state(), parts.initial_state(), slow.initial_state()
    rf, rp, rs = np.random.default_rng(42), np.random.default_rng(42), np.random.default_rng(42)
    for t in range(1500):
        det = t % 5 == 0
        a = fast.act(obs[t], sf, deterministic=det, rng=rf)
        p = parts.act(obs[t], sp, deterministic=det, rng=rp)
        b = slow.act(obs[t], ss, deterministic=det, rng=rs)
        for d in (a, p):
            assert (d.action, d.log_prob, d.value) == (b.action, b.log_prob, b.value), t
            assert type(d.action) is int and type(d.log_prob) is float and type(d.value) is float
            assert type(d) is Decision and type(d.state) is State
            assert np.array_equal(d.state.h, b.state.h) and np.array_equal(d.state.c, b.state.c)
            assert d.state.h.dtype == np.float32 and d.state.h.shape == (256,)
        assert a == Decision(a.action, a.log_prob, a.value, a.state), "a plain, equal dataclass"
        with pytest.raises(dataclasses.FrozenInstanceError):
            a.action = 0  # type: ignore[misc]  # the point: a frozen dataclass refuses it
        sf, sp, ss = a.state, p.state, b.state
    assert rf.random() == rp.random() == rs.random()


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_act_batch_in_one_call_equals_act_row_by_row_and_the_general_path_when_greedy(bundles, quant):
    """The native act_batch steps and samples the whole batch in C, drawing rng.random(B) (one u
    a row, as the general path draws). A row must equal act() on that row alone with the same u;
    greedy decisions must equal the general path's exactly; odd inputs take the general path."""
    fast = Policy(bundles[quant], backend="native", seed=0)
    slow = Policy(bundles[quant], backend="native", seed=0)
    slow._fast_batch = None
    assert fast._fast_batch is not None
    rng = np.random.default_rng(3)
    batch = 13
    sf = ss = fast.initial_state(batch)
    singles = [fast.initial_state() for _ in range(batch)]
    for t in range(30):
        obs = (2 * rng.standard_normal((batch, 64))).astype(np.float32)
        g = fast.act_batch(obs, sf, deterministic=True)
        s = slow.act_batch(obs, ss, deterministic=True)
        for x, y in ((g.action, s.action), (g.log_prob, s.log_prob), (g.value, s.value),
                     (g.state.h, s.state.h), (g.state.c, s.state.c)):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), t
        r1, r2 = np.random.default_rng(t), np.random.default_rng(t)
        d = fast.act_batch(obs, sf, rng=r1)
        us = r2.random(batch)
        for i in range(batch):
            one = fast.act(obs[i], singles[i], rng=_FixedU(us[i]))  # type: ignore[arg-type]
            assert (int(d.action[i]), float(d.log_prob[i]), float(d.value[i])) == (one.action, one.log_prob, one.value)
            assert np.array_equal(d.state.h[i], one.state.h) and np.array_equal(d.state.c[i], one.state.c)
            singles[i] = one.state
        assert r1.random() == r2.random(), "one draw a row, as on the general path"
        sf, ss = d.state, s.state
    # Unusual inputs: float64 observations, a NaN, a 1-D state of the right size.
    with pytest.raises(ObservationError, match="NaN"):
        fast.act_batch(np.full((2, 64), np.nan, np.float32), fast.initial_state(2))
    d64 = fast.act_batch(np.zeros((2, 64)), fast.initial_state(2), deterministic=True)
    assert d64.action.dtype == np.int64 and d64.state.h.shape == (2, 256)
    flat = State(np.zeros(512, np.float32), np.zeros(512, np.float32))
    with pytest.raises(ObservationError, match="state shape"):
        fast.act_batch(np.zeros((2, 64), np.float32), flat)


class _FixedU:
    """An rng whose random() returns a given u: act() on one row with act_batch's draw for it."""

    def __init__(self, u: float) -> None:
        self.u = float(u)

    def random(self) -> float:
        return self.u


def test_the_null_step_leaves_only_the_binding(bundles):
    be = nb.NativeBackend(bundles["int8"])
    obs = np.ones((3, 64), np.float32)
    h = np.full((3, 256), 0.5, np.float32)
    be.set_null_step(True)
    try:
        head, value, h2, c2 = be.step(obs, h, h)
        assert not head.any() and not value.any() and np.array_equal(h2, h) and np.array_equal(c2, h)
    finally:
        be.set_null_step(False)
    head, _, h2, _ = be.step(obs, h, h)
    assert head.any() and not np.array_equal(h2, h)


def test_act_never_modifies_the_callers_state_and_returns_new_arrays(bundles):
    policy = Policy(bundles["int8"], backend="native", seed=0)
    s0 = policy.initial_state()
    s0.h[:] = 0.25
    before = s0.h.copy(), s0.c.copy()
    d = policy.act(np.ones(64, np.float32), s0)
    assert np.array_equal(s0.h, before[0]) and np.array_equal(s0.c, before[1])
    assert d.state.h is not s0.h and not np.shares_memory(d.state.h, s0.h)
    assert d.state.h.flags.c_contiguous and d.state.h.dtype == np.float32


def test_unusual_inputs_take_the_general_path_with_the_same_results(bundles):
    policy = Policy(bundles["int8"], backend="native", seed=0)
    s = policy.initial_state()
    x = np.linspace(-1, 1, 128, dtype=np.float32)[::2]       # a strided view
    a = policy.act(x, s, deterministic=True)
    b = policy.act(np.ascontiguousarray(x), s, deterministic=True)
    c = policy.act(x.astype(np.float64), s, deterministic=True)
    assert a.value == b.value == c.value and a.action == b.action == c.action


@pytest.mark.parametrize("bad,words", [
    (np.zeros(63, np.float32), "shape"),
    (np.zeros((1, 64), np.float32), "shape"),
    (np.full(64, np.nan, np.float32), "NaN or Inf"),
    (np.r_[np.zeros(63), -np.inf].astype(np.float32), "NaN or Inf"),
])
def test_bad_observations_raise_the_same_errors_as_numpy(bundles, bad, words):
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    for backend, rng in (("native", rng_a), ("numpy", rng_b)):
        policy = Policy(bundles["int8"], backend=backend)
        with pytest.raises(ObservationError, match=words):
            policy.act(bad, policy.initial_state(), rng=rng)
    assert rng_a.random() == rng_b.random(), "a refused decision must not draw random numbers"


def test_sanitize_counts_and_cleans_on_the_native_backend(bundles):
    native = Policy(bundles["fp32"], backend="native", invalid_obs="sanitize")
    numpy_ = Policy(bundles["fp32"], backend="numpy", invalid_obs="sanitize")
    dirty = np.zeros(64, np.float32)
    dirty[3], dirty[5] = np.nan, np.inf
    a = native.act(dirty, native.initial_state(), deterministic=True)
    b = numpy_.act(dirty, numpy_.initial_state(), deterministic=True)
    assert native.sanitized == 1 and a.action == b.action and a.value == pytest.approx(b.value, abs=1e-5)


def test_distinct_sessions_on_many_threads_match_sequential_runs(bundles):
    policy = Policy(bundles["int8"], backend="native", seed=0)
    obs = observations("random", 200, 64).reshape(4, 50, 64)

    def run(k, out):
        s, rng, got = policy.initial_state(), np.random.default_rng(k), []
        for x in obs[k]:
            d = policy.act(x, s, rng=rng)
            s = d.state
            got.append((d.action, d.log_prob, d.value))
        b = policy.act_batch(obs[k, :8], policy.initial_state(8), deterministic=True)
        got.append(tuple(b.value.tolist()))
        out[k] = got

    expected: dict[int, list] = {}
    results: dict[int, list] = {}
    for k in range(4):
        run(k, expected)
    threads = [threading.Thread(target=run, args=(k, results)) for k in range(4) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


# -- typed errors for every status the C library can return to Python --------------------------


def test_each_native_status_reaches_python_as_a_typed_error(bundles):
    with pytest.raises(BundleError, match="native runtime"):
        nb.open_bytes(b"\x08" + b"\0" * 7 + b"{}      ")                       # FORMAT
    with pytest.raises(BundleError, match="version '2'"):
        nb.open_bytes(edit_meta(bundles["fp32"].to_bytes(), format_version="2"))  # VERSION
    with pytest.raises(BundleError, match="model_id"):
        nb.open_bytes(edit_meta(bundles["fp32"].to_bytes(), model_id="../x"))    # BUNDLE
    other = "avx2" if BEST == "neon" else "neon"
    with pytest.raises(BackendUnavailableError, match="cannot"):                  # UNSUPPORTED
        nb.NativeBackend(bundles["fp32"], kernel=other)
    with pytest.raises(ConfigError, match="COGBERT_NATIVE_KERNEL"):
        nb.NativeBackend(bundles["fp32"], kernel="gpu")
    be = nb.NativeBackend(bundles["fp32"])
    with pytest.raises(ObservationError, match="NaN or Inf"):                      # NONFINITE
        be.step(np.full((2, 64), np.inf, np.float32), *(np.zeros((2, 256), np.float32),) * 2)
    with pytest.raises(ObservationError, match="do not match"):
        be.step(np.zeros((2, 64), np.float32), *(np.zeros((3, 256), np.float32),) * 2)
    # ARGUMENT: step checks shapes before C does, so provoke it on the raw call and map it.
    with pytest.raises(MOD.NativeError) as raw:
        be._forward(*(np.zeros(k, np.float32) for k in (64, 256, 256, 8, 1, 255, 256)))
    assert raw.value.args[0] == MOD.ERR_ARGUMENT
    with pytest.raises(ObservationError, match="array sizes"):
        nb._raise(raw.value, "step")
    # NO_MEMORY and IO cannot be provoked from Python (bundles arrive as bytes); C tests cover IO.


def test_the_runtime_reports_its_kernel_and_memory(bundles):
    be = nb.NativeBackend(bundles["int8"])
    info = be.info
    assert info["macs_per_step"] == 542_976 and info["weight_bits"] == 8
    assert be.kernel == BEST
    # int8 weights as bytes (the 0.55 MB the L2 holds), scales/offsets per group, fp32 heads.
    assert 550_000 < info["policy_bytes"] < 700_000


# -- the C reader accepts exactly what the Python reader accepts -------------------------------


def _python_accepts(data: bytes) -> bool:
    try:
        load_bundle(data)
        return True
    except BundleError:
        return False
    except OverflowError:
        # bundle.py lets this escape for a clip written as an integer beyond a double's range
        # (math.isfinite raises); it is still a refusal, so C must refuse too.
        return False


def _c_accepts(data: bytes) -> bool:
    try:
        MOD.NativePolicy(data, nb.KERNELS["scalar"])
        return True
    except MOD.NativeError:
        return False


def _agree(data: bytes) -> None:
    py, c = _python_accepts(data), _c_accepts(data)
    assert py == c, f"Python {'accepts' if py else 'rejects'}, C {'accepts' if c else 'rejects'}: {data[:300]!r}"


def _with_header(data: bytes, text: str) -> bytes:
    """Replace the header JSON text verbatim (re-padded), keeping the body."""
    n = struct.unpack_from("<Q", data)[0]
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _header_text(data: bytes) -> str:
    n = struct.unpack_from("<Q", data)[0]
    return data[8:8 + n].decode().rstrip(" ")


def test_every_broken_bundle_of_the_python_suite_is_rejected_by_both(bundles):
    cases = _cases(bundles["fp32"].to_bytes(), bundles["int8"].to_bytes())
    for what, (data, _) in cases.items():
        assert not _c_accepts(data), what
        assert not _python_accepts(data), what
    for b in bundles.values():
        assert _c_accepts(b.to_bytes()) and _python_accepts(b.to_bytes())


SMALL = ModelConfig(obs_dim=32, action=ActionSpace.of_discrete(4), encoder=(32,), hidden=32)
_small = init_params(SMALL, 0)
_small_layers = plan(SMALL, 4, 32)
SEEDS = {
    "fp32": Bundle.create(SMALL, _small, model_id="fuzz-fp32").to_bytes(),
    "int4": Bundle.create(SMALL, quantize_params(_small, _small_layers), quant=_small_layers,
                          model_id="fuzz-int4").to_bytes(),
}


def _quirk_cases() -> dict[str, bytes]:
    """Edge cases where a hand-written reader could easily differ from Python's json and re."""
    base = SEEDS["int4"]
    text = _header_text(base)
    header, body = split(base)
    meta = header["__metadata__"]
    q = json.loads(meta["quantization"])
    cases = {
        "trailing tab and newline padding": _with_header(base, text + "\t\n\r"),
        "NUL padding": _with_header(base, text + "\0"),
        "model_id with one trailing newline": edit_meta(base, model_id="abc\n"),
        "model_id with two trailing newlines": edit_meta(base, model_id="abc\n\n"),
        "created_at with Arabic-Indic digits": edit_meta(base, created_at="٢٠٢٦-11-01T12:00:00Z"),
        "created_at with a fraction of 7 digits": edit_meta(base, created_at="2026-11-01T12:00:00.1234567Z"),
        "created_at with a trailing newline": edit_meta(base, created_at="2026-11-01T12:00:00.5Z\n"),
        "parent empty": edit_meta(base, parent=""),
        "parent is a newline": edit_meta(base, parent="\n"),
        "bits 4.0 and group 32.0": edit_meta(base, quantization=json.dumps(
            {"kind": "affine", "layers": {k: {"bits": 4.0, "group_size": 32.0} for k in q["layers"]}})),
        "bits 4.000000000000001": edit_meta(base, quantization=json.dumps(
            {"kind": "affine", "layers": {k: {"bits": 4.000000000000001, "group_size": 32} for k in q["layers"]}})),
        "bits written 4e0 and 0.4e1": edit_meta(base, quantization=json.dumps(
            {"kind": "affine", "layers": {k: {"bits": 4, "group_size": 32} for k in q["layers"]}})
            .replace('"bits": 4', '"bits": 4e0', 1).replace('"bits": 4', '"bits": 0.4e1')),
        "bits true": edit_meta(base, quantization=json.dumps(
            {"kind": "affine", "layers": {k: {"bits": True, "group_size": 32} for k in q["layers"]}})),
        "clip 1e-400 underflows to 0": edit_meta(base, normalization='{"kind":"standardize","clip":1e-400}'),
        "clip 1e400 overflows": edit_meta(base, normalization='{"kind":"standardize","clip":1e400}'),
        "clip -0.0": edit_meta(base, normalization='{"kind":"standardize","clip":-0.0}'),
        "clip as a large integer": edit_meta(base, normalization='{"kind":"standardize","clip":' + "9" * 300 + "}"),
        "clip as an integer beyond a double": edit_meta(
            base, normalization='{"kind":"standardize","clip":' + "9" * 400 + "}"),
        "clip as a string": edit_meta(base, normalization='{"kind":"standardize","clip":"10"}'),
        "normalization with whitespace around it": edit_meta(
            base, normalization=' \n{"kind":"standardize","clip":1}\t'),
        "config with an escaped key": edit_meta(base, config=meta["config"].replace('"obs_dim"', '"obs\\u005fdim"')),
        "config obs_dim 32.0": edit_meta(base, config=meta["config"].replace('"obs_dim":32', '"obs_dim":32.0')),
        "config obs_dim -0": edit_meta(base, config=meta["config"].replace('"obs_dim":32', '"obs_dim":-0')),
        "config duplicate key via escape": edit_meta(base, config=meta["config"][:-1] + ',"hidd\\u0065n":32}'),
        "config NaN": edit_meta(base, config=meta["config"].replace('"hidden":32', '"hidden":NaN')),
        "header duplicate key via escape": _with_header(base, text.replace('"__metadata__"', '"__metadat\\u0061__"', 1)
                                                        [:-1] + ',"__metadata__":{}}'),
        "escaped metadata key": _with_header(base, text.replace('"format_version"', '"format\\u005fversion"')),
        "surrogate pair in an x- value": edit_meta(base, **{"x-note": "\U0001F600 ok"}),
        "lone surrogate escape in an x- value": _with_header(
            base, text.replace('"__metadata__":{', '"__metadata__":{"x-s":"\\ud800",', 1)),
        "x- key alone": edit_meta(base, **{"x-": "v"}),
        "BOM before the header": _with_header(base, "\ufeff" + text),
        "header depth 40 in an x- value position": _with_header(base, text[:-1] + ',"x":' + "[" * 40 + "]" * 40 + "}"),
    }
    # A shape written "-0" somewhere a zero is valid cannot exist in a valid bundle, but the
    # safetensors layer must treat "-0" as 0: a zero-size extra tensor is then "unexpected".
    hdr, body = split(base)
    hdr["zz"] = {"dtype": "F32", "shape": [0], "data_offsets": [len(body), len(body)]}
    cases["zero-size extra tensor"] = join(hdr, body)
    cases["zero-size extra tensor, shape -0"] = _with_header(join(hdr, body), _header_text(join(hdr, body))
                                                              .replace('"shape":[0]', '"shape":[-0]'))
    return cases


def test_python_reader_quirks_and_edge_cases_get_the_same_verdict_from_c():
    for what, data in _quirk_cases().items():
        py, c = _python_accepts(data), _c_accepts(data)
        assert py == c, f"{what}: Python {'accepts' if py else 'rejects'}, C {'accepts' if c else 'rejects'}"


def test_both_readers_reject_the_forms_a_loose_regex_would_let_through():
    """A trailing newline ($) and non-ASCII digits (\\d) are not valid in format v1; both
    readers reject them (bundle.py uses fullmatch over ASCII classes, bundle.c checks by hand)."""
    cases = _quirk_cases()
    for what in ("model_id with one trailing newline", "created_at with Arabic-Indic digits",
                 "created_at with a trailing newline", "parent is a newline"):
        assert not _python_accepts(cases[what]), what
        assert not _c_accepts(cases[what]), what
    assert _python_accepts(cases["bits 4.0 and group 32.0"])


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.data())
def test_mutated_bundles_get_the_same_verdict_from_c_and_python(which, data):
    kinds = ["flip-header", "flip-any", "truncate", "insert", "length", "json"]
    _agree(mutate_bundle(SEEDS[which], data, kinds, 6))


_meta_values = st.one_of(st.text(max_size=12), st.sampled_from(
    ["1", "2", "lstm-ac", "cogbert-bundle", "2026-01-01T00:00:00Z", "2026-01-01T00:00:00.123Z\n", "m-1\n", ""]))


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.sampled_from(
    ["format", "format_version", "model_id", "architecture", "created_at", "parent", "x-a", "other"]), _meta_values)
def test_metadata_edits_get_the_same_verdict(which, key, value):
    _agree(edit_meta(SEEDS[which], **{key: value}))


_json_leaf = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
              | st.sampled_from([4, 8, 32, 64, 128, 4.0, 8.0, "affine", "none", "discrete", "standardize"]))
_json = st.recursive(_json_leaf, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.sampled_from(["kind", "clip", "layers", "bits", "group_size", "obs_dim", "encoder", "hidden", "action",
                     "size", "encoder.0", "lstm.ih", "lstm.hh", "policy", "value", "x"]), kids, max_size=4),
    max_leaves=12)


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.sampled_from(["config", "normalization", "quantization"]), _json)
def test_inner_json_edits_get_the_same_verdict(which, key, value):
    _agree(edit_meta(SEEDS[which], **{key: json.dumps(value)}))


# -- the C suites, run from here so CI runs them ------------------------------------------------


def _make(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(["make", "-C", str(NATIVE), f"PYTHON={sys.executable}", *args],
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"make {' '.join(args)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def test_c_tests_pass():
    out = _make("test").stdout
    assert re.search(r"^\d+ passed, 0 failed$", out, re.M), out[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_c_tests_pass_under_address_and_undefined_behaviour_sanitizers():
    out = _make("sanitize").stdout
    assert re.search(r"^\d+ passed, 0 failed$", out, re.M), out[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fuzzing_the_bundle_reader_finds_nothing():
    seconds = int(os.environ.get("COGBERT_FUZZ_SECONDS", "30"))
    p = _make("fuzz", f"FUZZ_SECONDS={seconds}", timeout=seconds + 300)
    text = p.stdout + p.stderr
    runs = re.search(r"Done (\d+) runs|fuzz driver: (\d+) runs", text)
    assert runs, text[-2000:]
    assert int(runs.group(1) or runs.group(2)) > 1000


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not (shutil.which("qemu-aarch64") and shutil.which("aarch64-linux-gnu-gcc")),
                    reason="NEON kernels run only on ARM, or here under qemu-aarch64 with an arm64 "
                           "cross compiler (apt-get install qemu-user gcc-aarch64-linux-gnu), absent here")
def test_neon_kernels_pass_the_c_tests_under_qemu():
    out = _make("arm64-test", timeout=900).stdout
    assert re.search(r"^\d+ passed, 0 failed$", out, re.M), out[-2000:]
    assert "kernel 3 vs portable C" in out


def test_the_c_example_runs_a_decision_loop_on_bundles_from_the_cli(tmp_path):
    _make("build/c_embed")
    src = (ROOT / "examples" / "c_embed" / "main.c").read_text()
    includes = re.findall(r'#include [<"]([^>"]+)[>"]', src)
    assert [i for i in includes if not i.startswith(("std", "math", "time", "string"))] == ["cogbert.h"], includes
    exe = Path(sys.executable).parent
    fp32, int8 = tmp_path / "m.safetensors", tmp_path / "m8.safetensors"
    subprocess.run([str(exe / "cogbert"), "bundle", "init", str(fp32), "--seed", "1"], check=True, capture_output=True)
    subprocess.run([str(exe / "cogbert"), "bundle", "quantize", str(fp32), str(int8), "--bits", "8"], check=True,
                   capture_output=True)
    for path, label in ((fp32, "fp32"), (int8, "int8")):
        p = subprocess.run([str(NATIVE / "build" / "c_embed"), str(path), "300"], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        assert f"({label} weights" in p.stdout and "900 decisions" in p.stdout, p.stdout
        counts = [int(v) for v in p.stdout.split("actions:")[1].split()]
        assert sum(counts) == 900 and len(counts) == 8
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(fp32.read_bytes()[:-4])
    p = subprocess.run([str(NATIVE / "build" / "c_embed"), str(bad)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "outside" in p.stderr


def test_the_binding_is_found_through_cogbert_native_lib_first(tmp_path):
    built = sorted((NATIVE / "build").glob("_cogbert_native*"))
    assert built, "make -C native builds the binding into native/build/"
    code = ("from cogbert_edge.inference.backends import native_backend as nb, available_backends;"
            "print(nb.native_available(), 'native' in available_backends(), nb.native_error())")
    for path, expect in ((built[0], "True True"), (tmp_path / "missing.so", "False False")):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COGBERT_NATIVE_LIB": str(path)})
        assert p.returncode == 0, p.stderr
        assert p.stdout.startswith(expect), p.stdout
    assert "missing.so" in p.stdout, "an explicit path that does not load is reported, not replaced"
