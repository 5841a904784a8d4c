"""Export: a trained model to a quantized bundle, checked against fp32 in simulation.

The check runs both policies through the Policy API (what a device runs) on the same seeded
episodes: greedy action agreement along the fp32 policy's own trajectories, and the mean
return of each. Export refuses, with the numbers, when the quantized policy loses more than
``max_return_drop`` (2 %) of the fp32 return, beyond noise: episodes are paired (same seeds),
and the loss must exceed the limit by two standard errors of the paired difference. A policy
whose greedy actions agree 99 % of the time can still end some episodes far apart (one
different action early changes everything after it); two standard errors keep that noise from
refusing a sound export, while a broken quantization loses far more than that. The exported
bundle carries ``x-golden`` outputs (for the device's install check) and its training and check
metrics as ``x-`` metadata, and keeps the fp32 bundle's own (action bounds, training config).
"""

from __future__ import annotations

import json

import numpy as np

from cogbert_cloud.errors import ExportRefused
from cogbert_cloud.learn.envs import make_vec_env
from cogbert_cloud.learn.train.ppo import evaluate
from cogbert_edge import Bundle, Policy
from cogbert_edge.inference.quant import plan, quantize_params
from cogbert_edge.update.agent import golden_outputs

__all__ = ["export_bundle", "ExportRefused", "action_agreement"]




def action_agreement(fp32: Bundle, quant: Bundle, env_id: str, *, episodes: int = 8, seed: int = 777,
                     env_kwargs: dict | None = None) -> float:
    """Share of fp32 greedy decisions the quantized model repeats, on fp32's trajectories.

    Continuous actions agree when every dimension is within 5 % of the action range (of the
    bounds, or of 2 standard deviations of the fp32 policy when unbounded)."""
    p, q = Policy(fp32, "numpy"), Policy(quant, "numpy")
    env = make_vec_env(env_id, episodes, seed=seed, **(env_kwargs or {}))
    obs, _ = env.reset(seed=seed)
    sp, sq = p.initial_state(episodes), q.initial_state(episodes)
    alive = np.ones(episodes, bool)
    agree = total = 0
    while alive.any():
        dp = p.act_batch(obs, sp, deterministic=True)
        dq = q.act_batch(obs, sq, deterministic=True)
        agree += int(_same(p, np.asarray(dp.action), np.asarray(dq.action))[alive].sum())
        total += int(alive.sum())
        obs, _, term, trunc, _ = env.step(np.asarray(dp.action))
        ended = (term | trunc)[:, None]
        alive &= ~(term | trunc)
        sp, sq = _zero(dp.state, ended), _zero(dq.state, ended)
    return agree / max(total, 1)


def _zero(s, ended: np.ndarray):
    """The state with the rows of ended episodes zeroed (their next episode starts afresh)."""
    return type(s)(np.where(ended, 0, s.h).astype(np.float32), np.where(ended, 0, s.c).astype(np.float32))


def _same(policy: Policy, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.ndim == 1:
        return a == b
    bounds = policy.action_bounds
    scale = (bounds.high - bounds.low) if bounds is not None else 2.0 * np.exp(policy.bundle.tensors["policy.log_std"])
    return (np.abs(a - b) <= 0.05 * scale).all(axis=-1)


def export_bundle(fp32: Bundle, env_id: str | None, *, bits: int = 8, group_size: int = 64,
                  max_return_drop: float = 0.02, episodes: int = 100, extra: dict | None = None,
                  env_kwargs: dict | None = None) -> tuple[Bundle, dict]:
    """Quantize ``fp32`` and check it in ``env_id`` (no check without an environment).
    Returns the bundle to release and the check's report."""
    params = {k: np.asarray(v) for k, v in fp32.tensors.items()}
    if bits == 32:
        quant = fp32
        layers: dict = {}
    else:
        layers = plan(fp32.config, bits, group_size)
        # The fp32 bundle's metadata (action bounds, training config) goes with the quantized one.
        quant = Bundle.create(fp32.config, quantize_params(params, layers), quant=layers, parent=fp32.model_id,
                              extra=dict(fp32.extra))
    report: dict = {"bits": bits, "group_size": group_size}
    if env_id is not None:
        g32 = np.asarray(evaluate(fp32, env_id, episodes, env_kwargs=env_kwargs))
        gq = np.asarray(evaluate(quant, env_id, episodes, env_kwargs=env_kwargs))
        r32, rq = float(g32.mean()), float(gq.mean())
        scale = max(abs(r32), 1e-9)
        drop = (r32 - rq) / scale
        se = float((g32 - gq).std(ddof=1) / np.sqrt(episodes) / scale) if episodes > 1 else 0.0
        report.update(return_fp32=round(r32, 3), return_quantized=round(rq, 3), return_drop=round(drop, 4),
                      return_drop_se=round(se, 4),
                      action_agreement=round(action_agreement(fp32, quant, env_id, env_kwargs=env_kwargs), 4),
                      episodes=episodes)
        if bits != 32 and drop - 2 * se > max_return_drop:
            raise ExportRefused(f"int{bits} loses {drop:.1%} ± {se:.1%} of the fp32 return ({rq:.2f} vs {r32:.2f} "
                                f"over {episodes} paired episodes; the limit is {max_return_drop:.0%} beyond two "
                                f"standard errors); greedy action agreement {report['action_agreement']:.1%}. "
                                f"Export with more bits (--bits {32 if bits == 8 else 8}) instead.")
    meta = {"x-golden": json.dumps(golden_outputs(quant)), "x-export": json.dumps(report)}
    meta.update({k: v for k, v in (extra or {}).items()})
    out = Bundle.create(quant.config, dict(quant.tensors), quant=dict(quant.quant), parent=fp32.model_id,
                        extra={**dict(quant.extra), **meta})
    return out, report
