"""The LSTM recurrence of the training sequence as one MLX operation with a hand-written gradient.

Every trainer differentiates ``model.sequence`` through MLX. Its encoder, input gates and heads
run on all T steps at once, but the recurrence is T small steps, and at our sizes (tens of rows,
64-256 hidden) MLX spends its time building and scheduling the graph of those steps, not
computing them: autodiff of a 128-step sequence costs ~270 ms on the 2-core CPU machine, about
16 operations forward and twice as many backward per step, each with ~20 us of overhead.

Here the recurrence is an ``mx.custom_function`` whose forward and backward are plain numpy loops
(one matmul and a handful of element-wise operations per step, ~1-3 us each), and whose backward
is the LSTM's textbook gradient (BPTT) instead of a recorded graph. The gates are recomputed in
the backward from the saved ``h`` and ``c`` with one large matmul over all steps, so only the
``dh`` / ``dc`` recurrence stays sequential. Measured 11x faster for that sequence, gradients equal
to MLX's own to float32 rounding (``tests/test_train.py``).

It is used on the CPU, for fp32 parameters, outside ``mx.compile`` (numpy needs evaluated arrays);
elsewhere :func:`train_sequence` is ``model.sequence`` itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cogbert_edge._internal.mlx import import_mlx
from cogbert_edge.inference.model import ModelConfig, encode, heads, sequence

__all__ = ["lstm_scan", "train_sequence"]

_fn: dict[str, Any] = {}


def _resets(keep: np.ndarray) -> list[bool]:
    """Per step, whether any row's state is reset there (episodes are long: most steps keep all)."""
    return [bool(r) for r in (keep[:, :, 0] != 1.0).any(axis=1)]


def _ifog(a: np.ndarray, H: int) -> np.ndarray:
    """The last axis from the model's gate order (i, f, g, o) to (i, f, o, g): one slice for the
    three sigmoid gates."""
    return np.concatenate([a[..., :2 * H], a[..., 3 * H:], a[..., 2 * H:3 * H]], axis=-1)


def _forward(ih: np.ndarray, w: np.ndarray, h: np.ndarray, c: np.ndarray,
             keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    T, B, G = ih.shape
    H = G // 4
    # sigmoid(x) = (tanh(x / 2) + 1) / 2, so the sigmoid gates' pre-activations are halved ahead
    # of time and one tanh per step serves all four gates (numpy's per-call cost dominates here).
    scale = np.where(np.arange(G) < 3 * H, 0.5, 1.0).astype(np.float32)
    ihs = _ifog(ih, H) * scale
    wts = np.ascontiguousarray(_ifog(w.T, H) * scale)
    resets = _resets(keep)
    hs = np.empty((T, B, H), np.float32)
    cs = np.empty((T, B, H), np.float32)
    g = np.empty((B, G), np.float32)
    for t in range(T):
        if resets[t]:
            h, c = h * keep[t], c * keep[t]
        np.matmul(h, wts, out=g)
        g += ihs[t]
        np.tanh(g, out=g)
        s = g[:, :3 * H]
        s *= 0.5
        s += 0.5
        c = g[:, H:2 * H] * c + g[:, :H] * g[:, 3 * H:]
        h = g[:, 2 * H:3 * H] * np.tanh(c)
        hs[t], cs[t] = h, c
    return hs, cs


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * np.tanh(0.5 * x) + 0.5


def _backward(ih: np.ndarray, w: np.ndarray, h0: np.ndarray, c0: np.ndarray, keep: np.ndarray,
              hs: np.ndarray, cs: np.ndarray, dhs: np.ndarray, dcs: np.ndarray) -> tuple[np.ndarray, ...]:
    T, B, G = ih.shape
    H = G // 4
    hprev = np.concatenate([h0[None], hs[:-1]]) * keep
    cprev = np.concatenate([c0[None], cs[:-1]]) * keep
    g = ih + (hprev.reshape(-1, H) @ w.T).reshape(T, B, G)
    i, f = _sigmoid(g[..., :H]), _sigmoid(g[..., H:2 * H])
    gg, o = np.tanh(g[..., 2 * H:3 * H]), _sigmoid(g[..., 3 * H:])
    tc = np.tanh(cs)
    # Everything that does not depend on the recurrence, for all steps at once; the factors of
    # dc for the i, f and g gates side by side, so that one multiplication per step gives all three.
    dc_from_dh = o * (1.0 - tc * tc)
    from_dc = np.stack([gg * i * (1.0 - i), cprev * f * (1.0 - f), i * (1.0 - gg * gg)], axis=2)
    do_from_dh = tc * o * (1.0 - o)
    resets = _resets(keep)
    dgates = np.empty_like(g)
    d4 = dgates.reshape(T, B, 4, H)
    dh_next = np.zeros((B, H), np.float32)
    dc_next = np.zeros((B, H), np.float32)
    for t in range(T - 1, -1, -1):
        dh = dhs[t] + dh_next
        dc = dh * dc_from_dh[t]
        dc += dcs[t]
        dc += dc_next
        np.multiply(dc[:, None, :], from_dc[t], out=d4[t, :, :3])
        np.multiply(dh, do_from_dh[t], out=d4[t, :, 3])
        dh_next = dgates[t] @ w
        dc_next = dc * f[t]
        if resets[t]:
            dh_next *= keep[t]
            dc_next *= keep[t]
    dw = dgates.reshape(-1, G).T @ hprev.reshape(-1, H)
    return dgates, dw, dh_next, dc_next


def lstm_scan() -> Any:
    """The MLX operation ``(ih [T,B,4H], w_hh [4H,H], h0, c0 [B,H], keep [T,B,1]) -> (hs, cs)``:
    ``hs[t], cs[t]`` are the LSTM's ``h`` and ``c`` after step t, the state multiplied by ``keep[t]``
    before it (0 where an episode starts), gates in ``model.lstm_cell``'s order (i, f, g, o)."""
    if "scan" in _fn:
        return _fn["scan"]
    mx = import_mlx()

    @mx.custom_function
    def scan(ih: Any, w: Any, h0: Any, c0: Any, keep: Any) -> tuple[Any, Any]:
        hs, cs = _forward(*(np.asarray(a, np.float32) for a in (ih, w, h0, c0, keep)))
        return mx.array(hs), mx.array(cs)

    @scan.vjp
    def scan_vjp(primals: Any, cotangents: Any, outputs: Any) -> tuple[Any, ...]:
        ih, w, h0, c0, keep = (np.asarray(a, np.float32) for a in primals)
        hs, cs = (np.asarray(a, np.float32) for a in outputs)
        dhs, dcs = (np.asarray(a, np.float32) for a in cotangents)
        dgates, dw, dh0, dc0 = _backward(ih, w, h0, c0, keep, hs, cs, dhs, dcs)
        # ``keep`` is data (episode boundaries): no gradient flows into it.
        return mx.array(dgates), mx.array(dw), mx.array(dh0), mx.array(dc0), mx.zeros_like(primals[4])

    _fn["scan"] = scan
    return scan


def train_sequence(F: Any, config: ModelConfig, obs: Any, h: Any, c: Any, starts: Any, *,
                   fused: bool = True) -> tuple[Any, Any, Any, Any]:
    """``model.sequence`` on MLX arrays for training: the same numbers, with the recurrence as one
    operation (:func:`lstm_scan`). ``fused=False`` (or quantized weights) is the reference graph."""
    mx = import_mlx()
    if not fused or getattr(F, "quant", None) or mx.default_device() != mx.cpu:
        return sequence(F, config, obs, h, c, starts, mx.stack)
    ih = F.linear("lstm.ih", encode(F, config, obs))
    keep = (1.0 - starts)[..., None]
    hs, cs = lstm_scan()(ih, F.param("lstm.hh.weight"), h, c, keep)
    head, value = heads(F, hs)
    return head, value, hs[-1], cs[-1]
