"""What every Cogbert trainer shares: parameters between numpy and MLX, observation
statistics, checkpoints in the object store, progress and metrics, and data parallelism.

Parameters are the model's flat ``{tensor name: array}`` (see ``cogbert_edge.inference.model``), split
into the *trainable* weights and the observation normalizer (``obs_norm.mean``/``std``), which
is estimated from data and baked into the exported bundle.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np

from cogbert_cloud.data.store import ObjectStore
from cogbert_edge._internal.log import event
from cogbert_edge._internal.mlx import import_mlx
from cogbert_edge.inference.bundle import Bundle
from cogbert_edge.inference.model import ModelConfig

__all__ = ["RunningMeanStd", "split_params", "to_mx", "to_np", "Checkpoint", "Progress", "Metrics",
           "DataParallel", "NORM_KEYS", "RETURN_SCALE_KEY", "return_scale_of"]

NORM_KEYS = ("obs_norm.mean", "obs_norm.std")
# The units of a bundle's value head: PPO and behaviour cloning train it on rewards divided by the
# standard deviation of the discounted return, and record that divisor here, so that the next
# trainer (V-trace on fleet logs, PPO continuing from the release) targets the same units instead
# of reading a value estimate five or ten times off as an advantage.
RETURN_SCALE_KEY = "x-return-scale"


def return_scale_of(bundle: Bundle) -> float | None:
    """The divisor the bundle's value head was trained with, or None when it does not say."""
    raw = bundle.extra.get(RETURN_SCALE_KEY)
    try:
        scale = float(raw) if raw is not None else None
    except ValueError:
        return None
    return scale if scale is not None and np.isfinite(scale) and scale > 0 else None
_log = logging.getLogger("cogbert.train")


def split_params(params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(trainable, normalizer)."""
    return ({k: v for k, v in params.items() if k not in NORM_KEYS},
            {k: params[k] for k in NORM_KEYS})


def to_mx(params: dict[str, np.ndarray]) -> dict:
    mx = import_mlx()
    return {k: mx.array(np.asarray(v, np.float32)) for k, v in params.items()}


def to_np(params: dict) -> dict[str, np.ndarray]:
    return {k: np.array(v, dtype=np.float32) for k, v in params.items()}


class RunningMeanStd:
    """Parallel-algorithm running mean and variance (as VecNormalize keeps them)."""

    def __init__(self, dim: int, eps: float = 1e-4) -> None:
        self.mean = np.zeros(dim, np.float64)
        self.var = np.ones(dim, np.float64)
        self.count = eps

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).reshape(-1, self.mean.size)
        self.update_moments(x.mean(0), x.var(0), x.shape[0])

    def update_moments(self, b_mean: np.ndarray, b_var: np.ndarray, n: float) -> None:
        delta = b_mean - self.mean
        total = self.count + n
        self.mean = self.mean + delta * n / total
        self.var = (self.var * self.count + b_var * n + delta ** 2 * self.count * n / total) / total
        self.count = total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var + 1e-8)

    def as_params(self) -> dict[str, np.ndarray]:
        return {"obs_norm.mean": self.mean.astype(np.float32), "obs_norm.std": self.std.astype(np.float32)}

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count}

    @classmethod
    def from_state(cls, s: dict) -> RunningMeanStd:
        r = cls(len(s["mean"]))
        r.mean, r.var, r.count = np.array(s["mean"]), np.array(s["var"]), float(s["count"])
        return r


@dataclass
class Checkpoint:
    """Arrays (parameters, optimizer moments, environment arrays) and a JSON state, stored as
    one ``.npz`` object; read back with ``allow_pickle=False`` (no pickle, ever)."""

    arrays: dict[str, np.ndarray]
    state: dict

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        # Typed as Any: numpy's stub would read a "**arrays" key as its allow_pickle flag.
        arrays: dict[str, Any] = {"__state__": np.frombuffer(json.dumps(self.state).encode(), np.uint8),
                                  **self.arrays}
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Checkpoint:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        state = json.loads(arrays.pop("__state__").tobytes())
        return cls(arrays, state)

    def save(self, store: ObjectStore, key: str) -> None:
        store.put(key, self.to_bytes())

    @classmethod
    def load(cls, store: ObjectStore, key: str) -> Checkpoint:
        return cls.from_bytes(store.get(key))


def bundle_from(config: ModelConfig, trainable: dict[str, np.ndarray], norm: RunningMeanStd, **kw) -> Bundle:
    return Bundle.create(config, {**trainable, **norm.as_params()}, **kw)


class Progress:
    """Visible progress wherever training runs.

    ``mode``: ``"bar"`` draws a one-line bar on ``stream`` (a terminal); ``"log"`` writes a
    structured ``train_progress`` log event every ``every_s`` seconds (steps, steps/s, episode
    return, losses, ETA) for a Kubernetes Job or CI, where a bar is noise; ``"off"`` writes
    nothing. ``enabled`` (the ``--progress/--no-progress`` flag) True forces the bar, False turns
    progress off, None (the default) picks the bar on a terminal and log lines otherwise.
    """

    def __init__(self, total: int, stream: TextIO = sys.stderr, enabled: bool | None = None, *,
                 every_s: float = 10.0, what: str = "steps") -> None:
        self.total, self.stream, self.what = total, stream, what
        if enabled is None:
            self.mode = "bar" if stream.isatty() else "log"
        else:
            self.mode = "bar" if enabled else "off"
        self.enabled = self.mode == "bar"
        self.every_s = every_s
        self.t0 = time.monotonic()
        self._last_log = self.t0

    def update(self, done: int, **info: object) -> None:
        if self.mode == "off":
            return
        now = time.monotonic()
        elapsed = max(now - self.t0, 1e-9)
        rate = done / elapsed
        if self.mode == "log":
            if now - self._last_log < self.every_s and done < self.total:
                return
            self._last_log = now
            eta = (self.total - done) / rate if rate > 0 else None
            row: dict[str, object] = {self.what: done, "total": self.total, "per_s": round(rate, 1),
                                      "elapsed_s": round(elapsed, 1),
                                      "eta_s": round(eta, 1) if eta is not None else None}
            row.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()})
            event(_log, "train_progress", metrics=row)
            return
        frac = min(1.0, done / max(self.total, 1))
        bar = "=" * int(30 * frac) + ">" + " " * (30 - int(30 * frac))
        eta = (self.total - done) / rate if rate > 0 else 0.0
        extra = " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        self.stream.write(f"\r[{bar}] {frac * 100:5.1f}% {done}/{self.total} {self.what} {rate:,.0f}/s "
                          f"eta {eta:.0f}s {extra}   ")
        self.stream.flush()

    def close(self) -> None:
        if self.mode == "bar":
            self.stream.write("\n")


class Metrics:
    """Metrics as JSON lines (a file, or nowhere), and as TensorBoard scalars in ``tensorboard``
    (a directory) when ``tensorboardX`` or ``torch.utils.tensorboard`` is installed; every
    numeric field of a row becomes the scalar ``train/FIELD`` at step ``steps`` (or the row's
    index). ``self.tensorboard`` says whether event files are being written."""

    def __init__(self, path: str | None, tensorboard: str | None = None) -> None:
        self.f = open(path, "a") if path else None
        self._tb = _summary_writer(tensorboard) if tensorboard else None
        self.tensorboard = self._tb is not None
        self._rows = 0

    def write(self, **row: object) -> None:
        if self.f:
            self.f.write(json.dumps(row, default=float) + "\n")
            self.f.flush()
        if self._tb is not None:
            steps = row.get("steps", self._rows)
            step = int(steps) if isinstance(steps, (int, float, np.integer, np.floating)) else self._rows
            for k, v in row.items():
                if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and k != "steps":
                    self._tb.add_scalar(f"train/{k}", float(v), step)
        self._rows += 1

    def close(self) -> None:
        if self.f:
            self.f.close()
        if self._tb is not None:
            self._tb.close()


def _summary_writer(logdir: str):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(logdir)


class DataParallel:
    """Gradient averaging across processes with ``mlx.distributed`` (ring backend, started by
    ``mlx.launch``). With one process it does nothing."""

    def __init__(self) -> None:
        mx = import_mlx()
        self.mx = mx
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.size = self.group.size() if self.group is not None else 1
        self.rank = self.group.rank() if self.group is not None else 0

    def average(self, grads: dict) -> dict:
        if self.size == 1:
            return grads
        from mlx.utils import tree_map
        return tree_map(lambda g: self.mx.distributed.all_sum(g, group=self.group) / self.size, grads)

    def sum_scalar(self, x: float) -> float:
        if self.size == 1:
            return x
        return float(self.mx.distributed.all_sum(self.mx.array(x), group=self.group).item())

    def sum_array(self, x: np.ndarray) -> np.ndarray:
        """Elementwise sum over processes (in float32 on the wire: MLX's CPU reductions)."""
        if self.size == 1:
            return x
        summed = self.mx.distributed.all_sum(self.mx.array(np.asarray(x, np.float32)), group=self.group)
        return np.array(summed, dtype=np.float64)
