"""Behaviour cloning: the policy a fleet already runs, distilled into a Cogbert bundle.

Continuous learning should start from what the fleet runs, not from a random network. Two
teachers:

* ``heuristic``: ProductionChain's documented rule (:class:`~cogbert_cloud.learn.envs.HeuristicPolicy`),
  run in the simulator for ``steps`` decisions;
* a store URL (``file://...``, ``s3://...``): the decisions the fleet logged (the experience
  the devices uploaded), whatever controller made them, so a user can start from their own
  controller by logging its decisions through the Device SDK.

The student is the usual LSTM actor-critic (the PPO configuration of the environment, so PPO
can continue from it). Training minimises, over chunks of ``chunk`` consecutive decisions with
truncated BPTT from the zero state (the state resets where an episode starts):

* the cross-entropy between the teacher's action, smoothed by ``label_smoothing`` (a student
  that keeps a little probability on every action samples like the teacher but stays
  stochastic, so its own logs still support off-policy evaluation of nearby policies), and the
  student's policy; for continuous actions, the Gaussian negative log-likelihood (of the
  pre-image of squashed actions);
* ``vf_coef`` times the squared error of the value head against the discounted return-to-go of
  the teacher's episodes, in the reward units PPO's reward normalisation uses, so that PPO
  continues with a critic that already knows the teacher's values.

Discrete students are exported at ``temperature`` (their logits divided by it, see
:class:`ImitateConfig`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cogbert_cloud.learn.envs import make_vec_env
from cogbert_cloud.learn.train._lstm import train_sequence
from cogbert_cloud.learn.train.common import (
    RETURN_SCALE_KEY,
    Metrics,
    Progress,
    RunningMeanStd,
    bundle_from,
    split_params,
    to_mx,
    to_np,
)
from cogbert_cloud.learn.train.ppo import PPOConfig
from cogbert_edge._internal.mlx import import_mlx
from cogbert_edge.errors import ConfigError
from cogbert_edge.inference.bounds import ActionBounds
from cogbert_edge.inference.bundle import Bundle
from cogbert_edge.inference.model import ActionSpace, ModelConfig, init_params, log_prob

__all__ = ["ImitateConfig", "Demonstrations", "heuristic_demonstrations", "logged_demonstrations", "clone"]


@dataclass
class ImitateConfig:
    epochs: int = 20
    chunk: int = 64
    batch_chunks: int = 64
    lr: float = 3e-3
    label_smoothing: float = 0.02
    # The exported policy's logits are divided by this: a student that agrees with the teacher
    # on 95 % of greedy decisions loses much of the teacher's return when it samples at
    # temperature 1 (measured on ProductionChain: 24.5 sampled, 36.9 greedy, heuristic 34.2);
    # 0.5 samples close to its greedy choice while every action keeps a probability well
    # above float rounding, so the logs stay usable for off-policy evaluation.
    temperature: float = 0.5
    vf_coef: float = 0.5
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class Demonstrations:
    """Time-major teacher data ``[T, B, ...]``: observations, actions, rewards, episode starts,
    a validity mask, and the discounted return-to-go of each step (in normalised reward units)."""

    obs: np.ndarray
    actions: np.ndarray
    starts: np.ndarray
    returns: np.ndarray
    mask: np.ndarray
    source: str
    teacher_return: float | None = None    # mean undiscounted return of the teacher's complete episodes
    return_scale: float = 1.0              # the divisor of the rewards in ``returns``


def _returns_to_go(rewards: np.ndarray, ends: np.ndarray, mask: np.ndarray,
                   gamma: float) -> tuple[np.ndarray, float]:
    """Discounted returns within episodes, scaled as PPO scales rewards (by the standard
    deviation of the running discounted return), and that scale."""
    T = rewards.shape[0]
    acc = np.zeros(rewards.shape[1])
    disc = np.zeros_like(rewards, dtype=np.float64)
    for t in range(T):
        acc = acc * gamma + rewards[t]
        disc[t] = acc
        acc = np.where(ends[t], 0.0, acc)
    scale = float(np.sqrt(disc[mask > 0].var() + 1e-8))
    out = np.zeros_like(rewards, dtype=np.float64)
    acc = np.zeros(rewards.shape[1])
    for t in range(T - 1, -1, -1):
        acc = np.where(ends[t], 0.0, acc)
        acc = rewards[t] / scale + gamma * acc
        out[t] = acc
    return out.astype(np.float32), scale


def heuristic_demonstrations(env_id: str, steps: int, *, num_envs: int = 64, seed: int = 0,
                             gamma: float = 0.99, env_kwargs: dict | None = None) -> Demonstrations:
    """``steps`` decisions of ProductionChain's documented heuristic in the simulator."""
    if not env_id.startswith("ProductionChain"):
        raise ConfigError(f"--imitate heuristic is ProductionChain's documented rule; {env_id} has none. "
                          "Log your controller's decisions through the Device SDK and use --imitate STORE_URL")
    from cogbert_cloud.learn.envs import HeuristicPolicy
    env = make_vec_env(env_id, num_envs, seed=seed, **(env_kwargs or {}))
    teacher = HeuristicPolicy(getattr(env, "config", None))
    teacher.reset(num_envs)
    T = max(1, steps // num_envs)
    obs, _ = env.reset(seed=seed)
    buf_obs = np.zeros((T, num_envs, obs.shape[1]), np.float32)
    acts = np.zeros((T, num_envs), np.int32)
    rew = np.zeros((T, num_envs), np.float64)
    ends = np.zeros((T, num_envs), bool)
    starts = np.zeros((T, num_envs), np.float32)
    starts[0] = 1.0
    finished: list[float] = []
    for t in range(T):
        a = teacher.act(obs)
        buf_obs[t], acts[t] = obs, a
        obs, r, term, trunc, info = env.step(a)
        rew[t], ends[t] = r, term | trunc
        if ends[t].any() and "episode_return" in info:
            finished.extend(info["episode_return"][info["_final_obs"]].tolist())
        if t + 1 < T:
            starts[t + 1] = ends[t]
    mask = np.ones((T, num_envs), np.float32)
    returns, scale = _returns_to_go(rew, ends, mask, gamma)
    return Demonstrations(buf_obs, acts, starts, returns, mask, "heuristic",
                          float(np.mean(finished)) if finished else None, scale)


def logged_demonstrations(url: str, fleet: str | None, *, gamma: float = 0.99) -> Demonstrations:
    """The decisions stored in the fleet's experience at ``url``: each logged sequence is one
    column, from an episode start where the log has one."""
    from cogbert_cloud.data.dataset import ExperienceDataset
    from cogbert_cloud.data.store import open_store
    seqs = [s for s in ExperienceDataset(open_store(url), fleet).sequences() if len(s.seqs) > 1]
    if not seqs:
        raise ConfigError(f"no logged decisions in {url}" + (f" for fleet {fleet}" if fleet else ""))
    T, B = max(len(s.seqs) for s in seqs), len(seqs)
    D = seqs[0].obs.shape[1]
    if any(s.obs.shape[1] != D for s in seqs):
        raise ConfigError(f"the logged observations in {url} do not all have {D} values; pass --fleet")
    continuous = seqs[0].action.ndim == 2
    obs = np.zeros((T, B, D), np.float32)
    acts = np.zeros((T, B, seqs[0].action.shape[1]) if continuous else (T, B), np.float32 if continuous else np.int32)
    rew, ends, mask = np.zeros((T, B)), np.zeros((T, B), bool), np.zeros((T, B), np.float32)
    starts = np.zeros((T, B), np.float32)
    starts[0] = 1.0
    for b, s in enumerate(seqs):
        n = len(s.seqs)
        obs[:n, b], acts[:n, b], rew[:n, b], mask[:n, b] = s.obs, s.action, s.reward, 1.0
        ends[:n, b] = s.done | s.truncated
        starts[1:n, b] = ends[:n - 1, b]
    returns, scale = _returns_to_go(rew, ends, mask, gamma)
    return Demonstrations(obs, acts, starts, returns, mask, url, return_scale=scale)


def clone(demos: Demonstrations, model_cfg: PPOConfig, cfg: ImitateConfig | None = None, *,
          action: ActionSpace | None = None, bounds: ActionBounds | None = None,
          metrics: Metrics | None = None, progress: bool | None = None) -> tuple[Bundle, dict]:
    """Fit a student with ``model_cfg``'s architecture to ``demos``; returns the fp32 bundle
    and what was measured (final cross-entropy, agreement with the teacher's actions)."""
    mx = import_mlx()     # first: it puts OpenBLAS under MLX before MLX loads
    import mlx.optimizers as optim

    from cogbert_edge.inference.backends.mlx_backend import MLXMath
    cfg = cfg or ImitateConfig()
    T, B, D = demos.obs.shape
    discrete = demos.actions.ndim == 2
    if action is None:
        if not discrete:
            raise ConfigError("continuous demonstrations need the action space (and bounds) of the environment")
        action = ActionSpace.of_discrete(int(demos.actions.max()) + 1)
    model = ModelConfig(obs_dim=D, action=action, encoder=tuple(model_cfg.encoder), hidden=model_cfg.hidden)
    params, _ = split_params(init_params(model, cfg.seed, policy_gain=0.01))
    norm = RunningMeanStd(D)
    valid = demos.mask.reshape(-1) > 0
    norm.update(demos.obs.reshape(-1, D)[valid])
    acts = demos.actions
    if not discrete and bounds is not None:
        acts = bounds.unsquash(acts)
    # Chunks: [chunk, n_chunks, ...], the time axis cut every ``chunk`` steps.
    L = min(cfg.chunk, T)
    n_cut = T // L

    def cut(x: np.ndarray) -> np.ndarray:
        x = x[:n_cut * L]
        x = x.reshape(n_cut, L, *x.shape[1:])
        return np.ascontiguousarray(np.swapaxes(x, 0, 1).reshape(L, n_cut * B, *x.shape[3:]))

    obs_c, act_c, ret_c, mask_c = cut(demos.obs), cut(acts), cut(demos.returns), cut(demos.mask)
    starts_c = cut(demos.starts)
    starts_c[0] = 1.0            # every chunk starts from the zero state
    n = obs_c.shape[1]
    eps = cfg.label_smoothing
    norm_mx = {k: mx.array(v) for k, v in norm.as_params().items()}

    def loss(p, obs, starts, actions, ret, mask):
        F = MLXMath({**p, **norm_mx})
        h0 = mx.zeros((obs.shape[1], model.hidden))
        heads, values, _, _ = train_sequence(F, model, obs, h0, h0, starts)
        m = mx.maximum(mask.sum(), 1.0)
        if model.action.discrete:
            logp_all = heads - mx.logsumexp(heads, axis=-1, keepdims=True)
            onehot = (mx.arange(model.action.size)[None, None, :] == actions[..., None]).astype(mx.float32)
            target = onehot * (1.0 - eps) + eps / model.action.size
            nll = -(target * logp_all).sum(axis=-1)
            agree = ((mx.argmax(heads, axis=-1) == actions).astype(mx.float32) * mask).sum() / m
        else:
            nll = -log_prob(F, model, heads, actions)
            agree = mx.array(0.0)
        pol = (nll * mask).sum() / m
        vloss = 0.5 * (((values - ret) ** 2) * mask).sum() / m
        return pol + cfg.vf_coef * vloss, (pol, vloss, agree)

    grad_fn = mx.value_and_grad(loss)
    p_mx = to_mx(params)
    opt = optim.Adam(learning_rate=cfg.lr)
    opt.init(p_mx)
    rng = np.random.default_rng(cfg.seed)
    per = max(1, min(cfg.batch_chunks, n))
    total = cfg.epochs * n
    bar = Progress(total, enabled=progress, what="chunks")
    t0, done, stats = time.monotonic(), 0, [0.0, 0.0, 0.0]
    for epoch in range(cfg.epochs):
        order = rng.permutation(n)
        opt.learning_rate = cfg.lr * (1.0 - epoch / cfg.epochs)
        for k in range(0, n, per):
            idx = order[k:k + per]
            args = [mx.array(x[:, idx]) for x in (obs_c, starts_c, act_c, ret_c, mask_c)]
            (_, aux), grads = grad_fn(p_mx, *args)
            grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            p_mx = opt.apply_gradients(grads, p_mx)
            mx.eval(p_mx, opt.state, aux)
            stats = [float(a) for a in aux]
            done += len(idx)
            bar.update(done, nll=stats[0], v_loss=stats[1], agreement=stats[2])
        if metrics:
            metrics.write(epoch=epoch, chunks=done, loss=stats[0] + cfg.vf_coef * stats[1], pg_loss=stats[0],
                          v_loss=stats[1], agreement=stats[2])
    bar.close()
    kw = {"extra": {**(bounds.metadata() if bounds is not None else {}),
                    RETURN_SCALE_KEY: repr(float(demos.return_scale))}}
    trained = to_np(p_mx)
    if model.action.discrete and cfg.temperature != 1.0:
        if cfg.temperature <= 0:
            raise ConfigError(f"imitation temperature must be > 0, got {cfg.temperature}")
        trained["policy.weight"] = trained["policy.weight"] / cfg.temperature
        trained["policy.bias"] = trained["policy.bias"] / cfg.temperature
    bundle = bundle_from(model, trained, norm, **kw)
    info = {"teacher": demos.source, "decisions": int(demos.mask.sum()), "epochs": cfg.epochs,
            "nll": round(stats[0], 4), "v_loss": round(stats[1], 4), "agreement": round(stats[2], 4),
            "teacher_return": demos.teacher_return, "temperature": cfg.temperature,
            "wall_s": round(time.monotonic() - t0, 2)}
    return bundle, info
