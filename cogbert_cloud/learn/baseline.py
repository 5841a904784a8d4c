"""The documented ProductionChain heuristic (``docs/production-chain.md`` section 7) as a Cogbert
model: a fleet's natural first release, and policies of known, graded quality for testing
off-policy evaluation.

:func:`soft_heuristic` sets an LSTM actor-critic's weights by hand to the rule (release below a
base-stock level, maintain the most worn station above a wear threshold, not while one is
down), with the policy head's scale as an inverse temperature: 0 is uniform random, large is
the deterministic heuristic. It samples, so its logs support off-policy evaluation of nearby
policies. :func:`fit_value_head` gives it a Monte-Carlo critic (ridge regression of its own
discounted returns), so that doubly-robust estimates have a value to work with.
"""

from __future__ import annotations

import numpy as np

from cogbert_cloud.learn.ope import Episodes, collect_episodes
from cogbert_edge import ActionSpace, Bundle, ModelConfig, init_params
from cogbert_edge.inference.model import NumpyMath, sequence

__all__ = ["soft_heuristic", "fit_value_head", "hidden_states"]

ENV = "ProductionChain-v0"


def soft_heuristic(inv_temp: float = 1.5, *, base_stock: float = 9.0, threshold: float = 0.85,
                   width: int = 32, seed: int = 0) -> Bundle:
    """The baseline rule as an LSTM actor-critic bundle for ProductionChain-v0 (3 stations).

    Encoder units 0-5 compute the rule's inputs (position below / above the base stock, each
    sensor above the threshold, some station down); the other units are random features for the
    value head. The LSTM passes its input through (gates saturated open, forget gate closed).
    """
    cfg = ModelConfig(obs_dim=15, action=ActionSpace.of_discrete(8), encoder=(width,), hidden=width)
    p = init_params(cfg, seed, policy_gain=1.0)
    rng = np.random.default_rng(seed)
    w = np.zeros((width, 15), np.float32)
    b = np.zeros(width, np.float32)
    position = np.array([6, 6, 6, 12, -12] + [0] * 10, np.float32)   # sum(B) + FG - backlog
    w[0], b[0] = -position, base_stock - 0.5
    w[1], b[1] = position, 0.5 - base_stock
    for k in range(3):
        w[2 + k, 11 + k], b[2 + k] = 4.0, -4.0 * threshold
    w[5, 5:11] = 1.0
    w[6:] = 0.7 * rng.standard_normal((width - 6, 15))
    b[6:] = 0.3 * rng.standard_normal(width - 6)
    ih, ih_b = np.zeros((4 * width, width), np.float32), np.zeros(4 * width, np.float32)
    ih_b[:width], ih_b[width:2 * width], ih_b[3 * width:] = 6.0, -6.0, 6.0
    ih[2 * width:3 * width] = 0.5 * np.eye(width)
    head, head_b = np.zeros((8, width), np.float32), np.zeros(8, np.float32)
    for a in range(8):
        if a % 2:
            head[a, 0], head[a, 1] = 4.0, -4.0
        if a >= 2:
            head[a, 2 + (a // 2 - 1)], head[a, 5], head_b[a] = 4.0, -4.0, -2.0
    p.update({"encoder.0.weight": w, "encoder.0.bias": b, "lstm.ih.weight": ih, "lstm.ih.bias": ih_b,
              "lstm.hh.weight": np.zeros((4 * width, width), np.float32),
              "policy.weight": inv_temp * head, "policy.bias": inv_temp * head_b})
    return Bundle.create(cfg, p)


def fit_value_head(bundle: Bundle, gamma: float, *, episodes: int = 200, seed: int = 9,
                   env_kwargs: dict | None = None) -> Bundle:
    """The bundle with its value head refit (ridge) to its own discounted returns-to-go."""
    eps = collect_episodes(bundle, ENV, episodes * 256, seed, env_kwargs=env_kwargs)
    h = hidden_states(bundle, eps)[eps.mask]
    ret = np.zeros_like(eps.reward)
    acc = np.zeros(eps.n)
    for t in range(eps.reward.shape[1] - 1, -1, -1):
        acc = eps.reward[:, t] + gamma * acc
        ret[:, t] = acc
    x = np.concatenate([h, np.ones((len(h), 1))], axis=1)
    coef = np.linalg.solve(x.T @ x + 1e-3 * np.eye(x.shape[1]), x.T @ ret[eps.mask])
    params = dict(bundle.tensors)
    params["value.weight"] = coef[None, :-1].astype(np.float32)
    params["value.bias"] = coef[-1:].astype(np.float32)
    return Bundle.create(bundle.config, params, parent=bundle.model_id)


def hidden_states(bundle: Bundle, eps: Episodes) -> np.ndarray:
    """The LSTM outputs ``[N, T, hidden]`` along the episodes, from the zero state."""
    cfg, captured = bundle.config, []

    def stack(hs: list) -> np.ndarray:
        captured.append(np.stack(hs))
        return captured[-1]

    obs = np.ascontiguousarray(eps.obs.transpose(1, 0, 2))
    h0 = np.zeros((obs.shape[1], cfg.hidden), np.float32)
    sequence(NumpyMath(bundle.fp32_params()), cfg, obs, h0, h0.copy(), np.zeros(obs.shape[:2], np.float32), stack)
    return captured[0].transpose(1, 0, 2)
