"""Recurrent PPO from vectorised simulator rollouts, on MLX, with the edge model's definition.

Rollouts run the policy with the numpy reference math (``cogbert_edge.inference.model.step``), which is
the faster of the two at the batch sizes of a rollout; learning differentiates the same
model's sequence form (``cogbert_edge.inference.model.sequence``) with MLX. Each update:

1. collects ``rollout`` steps from ``num_envs`` environments, keeping the LSTM state across
   updates and resetting it where an episode starts; a truncated episode's reward is
   bootstrapped with the value of its final observation;
2. computes GAE advantages;
3. runs ``epochs`` passes of minibatches of whole environment sequences (truncated BPTT over
   the rollout, from the state the rollout started with), clipped surrogate + value loss -
   entropy bonus, Adam with gradient clipping, linearly decayed learning rate and clip range;
4. updates the observation statistics (frozen during the rollout and its update, so the
   behaviour and the learner see the same inputs).

Data-parallel: started under ``mlx.launch``, each process steps its own environments (seeded
apart) and gradients are averaged with ``mlx.distributed`` before every optimizer step.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from cogbert_cloud.data.store import ObjectStore
from cogbert_cloud.learn.envs import make_vec_env
from cogbert_cloud.learn.train._lstm import train_sequence
from cogbert_cloud.learn.train.common import (
    RETURN_SCALE_KEY,
    Checkpoint,
    DataParallel,
    Metrics,
    Progress,
    RunningMeanStd,
    bundle_from,
    split_params,
    to_mx,
    to_np,
)
from cogbert_edge._internal.mlx import import_mlx
from cogbert_edge.errors import ConfigError
from cogbert_edge.inference.bounds import ActionBounds
from cogbert_edge.inference.model import (
    LOG_2PI,
    ActionSpace,
    ModelConfig,
    NumpyMath,
    entropy,
    init_params,
    log_prob,
    step,
)

__all__ = ["PPOConfig", "PPOTrainer", "preset", "evaluate"]


@dataclass
class PPOConfig:
    env: str = "CartPoleNoVel-v1"
    num_envs: int = 8
    rollout: int = 32
    epochs: int = 20
    minibatches: int = 1
    lr: float = 1e-3
    gamma: float = 0.98
    gae_lambda: float = 0.8
    clip: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    encoder: tuple[int, ...] = (64,)
    hidden: int = 64
    normalize_reward: bool = True
    anneal: bool = True
    seed: int = 0
    checkpoint_every: int = 0         # updates; 0 = only at the end
    env_kwargs: dict = field(default_factory=dict)
    vectorization: str = "auto"       # Gymnasium envs without a same-step vector_entry_point: sync or async
    log_std_init: float = 0.0         # continuous actions: initial log standard deviation
    # With --from: this times KL(policy || the starting policy) joins the loss, so that a
    # candidate stays within reach of the fleet's logs (the gate's effective sample size).
    ref_kl: float = 0.0
    # With --from: keep the starting policy's observation normalisation. Updating it moves the
    # policy on every input without a gradient step, outside PPO's clip and the ref_kl penalty
    # (the gate's effective sample size for a fine-tuned candidate on fleet logs: 4-8 with the
    # statistics updated, 92 frozen, 1,245 frozen with ref_kl 0.3; docs/training.md).
    freeze_norm: bool = True
    compile: bool = False             # mx.compile the update (same numbers; not measured faster yet, see docs)


def preset(env: str, **overrides: object) -> PPOConfig:
    """The configuration for ``env`` from the shipped ``configs/ppo.yml`` (its ``default`` entry,
    then the environment's), with ``overrides`` (None values ignored) on top."""
    from cogbert_cloud.learn.train.config import resolve
    cfg, _ = resolve(PPOConfig, "ppo", env, base={"env": env}, flags=dict(overrides))
    return cfg


class PPOTrainer:
    def __init__(self, cfg: PPOConfig, *, store: ObjectStore | None = None, prefix: str = "train",
                 init: dict[str, np.ndarray] | None = None, init_return_scale: float | None = None) -> None:
        self.mx = import_mlx()
        import mlx.optimizers as optim
        self.cfg = cfg
        self.dp = DataParallel()
        self.store, self.prefix = store, prefix
        n_local = cfg.num_envs // self.dp.size
        if n_local * self.dp.size != cfg.num_envs:
            raise ValueError(f"num_envs {cfg.num_envs} must divide over {self.dp.size} processes")
        # Process r steps environments r*n .. r*n+n-1 of the whole batch, seeded as one process
        # stepping them all would seed them.
        self.env_seed = cfg.seed + self.dp.rank * n_local
        self.env = make_vec_env(cfg.env, n_local, seed=self.env_seed, vectorization=cfg.vectorization,
                                **cfg.env_kwargs)
        obs_shape, space = self.env.single_observation_space.shape, self.env.single_action_space
        if not obs_shape:
            raise ConfigError(f"{cfg.env}: the observation space has no shape; "
                              "give the environment a Box observation space")
        obs_dim = obs_shape[0]
        n_actions = getattr(space, "n", None)
        self.discrete = n_actions is not None
        self.bounds: ActionBounds | None = None
        if n_actions is not None:
            action = ActionSpace.of_discrete(int(n_actions))
        elif space.shape:
            action = ActionSpace.of_continuous(int(space.shape[0]))
            low, high = getattr(self.env, "low", None), getattr(self.env, "high", None)
            if low is not None and high is not None:
                self.bounds = ActionBounds(low, high)
        else:
            raise ConfigError(f"{cfg.env}: the action space is neither discrete nor a Box")
        self.model = ModelConfig(obs_dim=obs_dim, action=action, encoder=tuple(cfg.encoder), hidden=cfg.hidden)
        if init is not None:
            params = init
        else:
            params = init_params(self.model, cfg.seed, policy_gain=0.01)
            if not self.discrete:
                params["policy.log_std"] = np.full(action.size, cfg.log_std_init, np.float32)
        self.params, norm = split_params(params)
        self.params_mx = to_mx(self.params)
        if cfg.ref_kl < 0:
            raise ConfigError(f"ref_kl must be >= 0, got {cfg.ref_kl}")
        # The policy PPO started from (with --from, the fleet's), for the ref_kl penalty.
        # It sees observations through its own normalisation, as the fleet's devices do, not
        # through the statistics this run keeps updating.
        self.ref_mx = to_mx({**self.params, **norm}) if init is not None and cfg.ref_kl > 0 else None
        self.norm = RunningMeanStd(obs_dim)
        if init is not None:
            self.norm.mean = norm["obs_norm.mean"].astype(np.float64)
            self.norm.var = norm["obs_norm.std"].astype(np.float64) ** 2
        self.opt = optim.Adam(learning_rate=cfg.lr, bias_correction=True)
        self.opt.init(self.params_mx)
        self.rng = np.random.default_rng(cfg.seed + 7 * self.dp.rank)
        self.ret_rms = RunningMeanStd(1)
        if init_return_scale is not None and cfg.normalize_reward:
            # Continue in the units the release's value head was trained in, weighted as one
            # update's worth of returns, so the first advantages are not a rescaled guess.
            self.ret_rms.var[:] = init_return_scale ** 2
            self.ret_rms.count = float(cfg.num_envs * cfg.rollout)
        self.ret_acc = np.zeros(n_local)
        self.update_idx = 0
        self.steps = 0
        self.episode_returns: list[float] = []
        obs, _ = self.env.reset(seed=self.env_seed)
        self.obs = obs
        self.norm_frozen = init is not None and cfg.freeze_norm
        self._update_norm(obs)
        self.h = np.zeros((n_local, cfg.hidden), np.float32)
        self.c = np.zeros_like(self.h)
        self.starts = np.ones(n_local, np.float32)
        self._grad_fn = self._make_grad_fn()

    # -- one update -------------------------------------------------------------------------

    def _update_norm(self, x: np.ndarray) -> None:
        """Observation statistics over every process's observations."""
        if self.norm_frozen:
            return
        x = np.asarray(x, np.float64)
        n = self.dp.sum_array(np.array([x.shape[0]], np.float64))[0]
        total = self.dp.sum_array(x.sum(0))
        mean = total / n
        var = self.dp.sum_array(((x - mean) ** 2).sum(0)) / n
        self.norm.update_moments(mean, var, n)

    def _make_grad_fn(self):
        mx, cfg, model = self.mx, self.cfg, self.model
        from cogbert_edge.inference.backends.mlx_backend import MLXMath

        def loss(params, norm, obs, h0, c0, starts, actions, old_logp, adv, ret, clip, ref):
            F = MLXMath({**params, **norm})
            heads, values, _, _ = train_sequence(F, model, obs, h0, c0, starts, fused=not cfg.compile)
            onehot = None
            if model.action.discrete:
                onehot = (mx.arange(model.action.size)[None, None, :] == actions[..., None]).astype(mx.float32)
            # Continuous: ``actions`` are the Gaussian samples before the squash; the squash's
            # Jacobian does not depend on the parameters, so it cancels in the ratio.
            logp = log_prob(F, model, heads, actions, onehot)
            ratio = mx.exp(logp - old_logp)
            pg = -mx.minimum(ratio * adv, mx.clip(ratio, 1 - clip, 1 + clip) * adv).mean()
            vloss = 0.5 * ((values - ret) ** 2).mean()
            ent = entropy(F, model, heads).mean()
            total = pg + cfg.vf_coef * vloss - cfg.ent_coef * ent
            kl = mx.array(0.0)
            if ref is not None:
                # The reference runs its own recurrence from the rollout's states: the two
                # policies stay close, so their states do too.
                R = MLXMath(ref)
                ref_heads, _, _, _ = train_sequence(R, model, obs, h0, c0, starts, fused=not cfg.compile)
                ref_heads = mx.stop_gradient(ref_heads)
                if model.action.discrete:
                    logp_all = heads - mx.logsumexp(heads, axis=-1, keepdims=True)
                    ref_all = ref_heads - mx.logsumexp(ref_heads, axis=-1, keepdims=True)
                    kl = (mx.exp(logp_all) * (logp_all - ref_all)).sum(-1).mean()
                else:
                    ls, rls = params["policy.log_std"], mx.stop_gradient(ref["policy.log_std"])
                    kl = (rls - ls + (mx.exp(2 * ls) + (heads - ref_heads) ** 2) / (2 * mx.exp(2 * rls))
                          - 0.5).sum(-1).mean()
                total = total + cfg.ref_kl * kl
            approx_kl = ((ratio - 1) - (logp - old_logp)).mean()
            clipfrac = (mx.abs(ratio - 1) > clip).astype(mx.float32).mean()
            return total, (pg, vloss, ent, approx_kl, clipfrac, kl)

        grad = mx.value_and_grad(loss)
        # Compiled: the update is hundreds of small operations per step of the sequence, and at
        # these sizes MLX spends most of its time building and scheduling the graph, not
        # computing (profiled on CartPoleNoVel: 94 % of the wall in the update). The shapes are
        # fixed per run (rollout x minibatch), so it compiles once; ``clip`` is an array input
        # so its annealing does not recompile.
        return mx.compile(grad) if cfg.compile else grad

    def collect(self) -> dict[str, np.ndarray]:
        cfg, model = self.cfg, self.model
        T, N = cfg.rollout, self.env.num_envs
        F = NumpyMath({**self.params, **self.norm.as_params()})
        buf = {k: np.zeros((T, N), np.float32) for k in ("starts", "rewards", "dones", "values", "logp")}
        buf["obs"] = np.zeros((T, N, model.obs_dim), np.float32)
        if self.discrete:
            buf["actions"] = np.zeros((T, N), np.int32)
        else:
            buf["actions"] = np.zeros((T, N, model.action.size), np.float32)
            std = np.exp(self.params["policy.log_std"]).astype(np.float32)
        buf["h0"], buf["c0"] = self.h.copy(), self.c.copy()
        for t in range(T):
            keep = (1.0 - self.starts)[:, None]
            buf["obs"][t], buf["starts"][t] = self.obs, self.starts
            head, value, self.h, self.c = step(F, model, self.obs, self.h * keep, self.c * keep)
            if self.discrete:
                logp_all = head - F.logsumexp(head)
                probs = np.exp(logp_all)
                u = self.rng.random((N, 1))
                actions = np.minimum((probs.cumsum(-1) < u * probs.sum(-1, keepdims=True)).sum(-1),
                                     model.action.size - 1)
                logp = logp_all[np.arange(N), actions]
                applied = actions
            else:
                noise = self.rng.standard_normal(head.shape).astype(np.float32)
                actions = head + std * noise
                logp = -0.5 * (noise * noise).sum(-1) - float(np.log(std).sum()) - 0.5 * LOG_2PI * model.action.size
                applied = self.bounds.squash(actions) if self.bounds is not None else actions
            obs, reward, term, trunc, info = self.env.step(applied)
            reward = reward.astype(np.float64)
            ended = term | trunc
            if ended.any() and "episode_return" in info:
                self.episode_returns.extend(info["episode_return"][info["_final_obs"]].tolist())
            if cfg.normalize_reward:
                self.ret_acc = self.ret_acc * cfg.gamma + reward
                self.ret_rms.update(self.ret_acc[:, None])
                self.ret_acc[ended] = 0.0
                reward = reward / float(np.sqrt(self.ret_rms.var[0] + 1e-8))
            boot = trunc & ~term
            if boot.any():    # a time limit is not a terminal state: bootstrap its value
                _, v_final, _, _ = step(F, model, info["final_obs"][boot], self.h[boot], self.c[boot])
                reward[boot] += cfg.gamma * v_final
            buf["actions"][t], buf["values"][t] = actions, value
            buf["logp"][t] = logp
            buf["rewards"][t], buf["dones"][t] = reward, ended
            self.obs, self.starts = obs, ended.astype(np.float32)
        keep = (1.0 - self.starts)[:, None]
        _, last_value, _, _ = step(F, model, self.obs, self.h * keep, self.c * keep)
        adv = np.zeros((T, N), np.float32)
        gae = np.zeros(N, np.float32)
        for t in reversed(range(T)):
            next_v = last_value if t == T - 1 else buf["values"][t + 1]
            nonterminal = 1.0 - buf["dones"][t]
            delta = buf["rewards"][t] + cfg.gamma * next_v * nonterminal - buf["values"][t]
            gae = delta + cfg.gamma * cfg.gae_lambda * nonterminal * gae
            adv[t] = gae
        buf["adv"], buf["ret"] = adv, adv + buf["values"]
        self.steps += T * N * self.dp.size
        return buf

    def learn(self, buf: dict[str, np.ndarray], frac: float) -> dict[str, float]:
        mx, cfg = self.mx, self.cfg
        import mlx.optimizers as optim
        lr = cfg.lr * (frac if cfg.anneal else 1.0)
        clip = cfg.clip * (frac if cfg.anneal else 1.0)
        self.opt.learning_rate = lr
        norm = {k: mx.array(v) for k, v in self.norm.as_params().items()}
        N = self.env.num_envs
        per = max(1, N // cfg.minibatches)
        stats = []
        for _ in range(cfg.epochs):
            order = self.rng.permutation(N)
            for k in range(0, N, per):
                idx = order[k:k + per]
                adv = buf["adv"][:, idx]
                # Normalized over the minibatch of every process together, so that N processes
                # compute exactly the update one process would on the combined batch.
                n = self.dp.sum_scalar(float(adv.size))
                mean = self.dp.sum_scalar(float(adv.sum())) / n
                var = self.dp.sum_scalar(float(((adv - mean) ** 2).sum())) / n
                adv = (adv - mean) / (np.sqrt(var) + 1e-8)
                args = [mx.array(buf["obs"][:, idx]), mx.array(buf["h0"][idx]), mx.array(buf["c0"][idx]),
                        mx.array(buf["starts"][:, idx]), mx.array(buf["actions"][:, idx]),
                        mx.array(buf["logp"][:, idx]), mx.array(adv), mx.array(buf["ret"][:, idx]),
                        mx.array(clip, dtype=mx.float32), self.ref_mx]
                (loss, aux), grads = self._grad_fn(self.params_mx, norm, *args)
                grads = self.dp.average(grads)
                grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
                self.params_mx = self.opt.apply_gradients(grads, self.params_mx)
                mx.eval(self.params_mx, self.opt.state, loss, aux)
                stats.append([float(loss)] + [float(a) for a in aux])
        self.params = to_np(self.params_mx)
        s = np.mean(stats, axis=0)
        return {"loss": s[0], "pg_loss": s[1], "v_loss": s[2], "entropy": s[3], "approx_kl": s[4],
                "clipfrac": s[5], "ref_kl": s[6], "lr": lr}

    def train(self, total_steps: int, *, metrics: Metrics | None = None, progress: bool | None = None) -> dict:
        cfg = self.cfg
        per_update = cfg.rollout * cfg.num_envs
        n_updates = max(1, total_steps // per_update)
        bar = Progress(n_updates * per_update, enabled=progress if self.dp.rank == 0 else False)
        t0 = time.monotonic()
        while self.update_idx < n_updates:
            frac = 1.0 - self.update_idx / n_updates
            buf = self.collect()
            info = self.learn(buf, frac)
            self._update_norm(buf["obs"].reshape(-1, self.model.obs_dim))
            self.update_idx += 1
            recent = self.episode_returns[-20:]
            row = {"update": self.update_idx, "steps": self.steps, "wall_s": round(time.monotonic() - t0, 2),
                   "episode_return": float(np.mean(recent)) if recent else None, **info}
            if metrics and self.dp.rank == 0:
                metrics.write(**row)
            bar.update(self.steps, episode_return=row["episode_return"], loss=float(info["loss"]),
                       v_loss=float(info["v_loss"]), entropy=float(info["entropy"]))
            if cfg.checkpoint_every and self.update_idx % cfg.checkpoint_every == 0:
                self.save()
        bar.close()
        if self.store is not None:
            self.save()
        return {"steps": self.steps, "updates": self.update_idx, "wall_s": time.monotonic() - t0}

    # -- evaluation, export, checkpoints ----------------------------------------------------

    def bundle(self, **kw):
        extra = dict(self.bounds.metadata()) if self.bounds is not None else {}
        if self.cfg.normalize_reward:
            extra[RETURN_SCALE_KEY] = repr(float(np.sqrt(self.ret_rms.var[0] + 1e-8)))
        kw["extra"] = {**extra, **kw.get("extra", {})}
        return bundle_from(self.model, self.params, self.norm, **kw)

    def checkpoint(self) -> Checkpoint:
        arrays = {f"param.{k}": v for k, v in self.params.items()}
        from mlx.utils import tree_flatten
        flat = tree_flatten(self.opt.state)   # a list of (path, array) unless given a dict destination
        for k, v in (flat.items() if isinstance(flat, dict) else flat):
            arrays[f"opt.{k}"] = np.array(v)
        env_arrays, env_meta = _env_state(self.env)
        arrays.update(env_arrays)
        arrays.update(obs=self.obs, h=self.h, c=self.c, starts=self.starts, ret_acc=self.ret_acc)
        if self.ref_mx is not None:     # a resumed fine-tune keeps its reference
            arrays.update({f"ref.{k}": np.array(v) for k, v in self.ref_mx.items()})
        state = {"config": dataclasses.asdict(self.cfg), "update": self.update_idx, "steps": self.steps,
                 "norm_frozen": self.norm_frozen,
                 "norm": self.norm.state(), "ret_rms": self.ret_rms.state(), "rng": self.rng.bit_generator.state,
                 "env": env_meta, "episode_returns": self.episode_returns[-100:]}
        return Checkpoint(arrays, state)

    def save(self) -> str:
        key = f"{self.prefix}/checkpoint-{self.update_idx:06d}.npz"
        if self.store is not None and self.dp.rank == 0:
            self.checkpoint().save(self.store, key)
            self.store.put(f"{self.prefix}/latest", key.encode())
        return key

    @classmethod
    def resume(cls, store: ObjectStore, prefix: str) -> PPOTrainer:
        key = store.get(f"{prefix}/latest").decode()
        ck = Checkpoint.load(store, key)
        cfg_d = ck.state["config"]
        cfg_d["encoder"] = tuple(cfg_d["encoder"])
        t = cls(PPOConfig(**cfg_d), store=store, prefix=prefix)
        mx = t.mx
        t.params = {k[len("param."):]: v for k, v in ck.arrays.items() if k.startswith("param.")}
        t.params_mx = to_mx(t.params)
        # The parameters are a flat dict with dotted names ("encoder.0.weight"), so the optimizer
        # state is {name: {"m", "v"}, "step", "learning_rate"}: split at the last dot only
        # (mlx.utils.tree_unflatten would nest "encoder" -> [0] -> "weight", and the optimizer
        # would then start every moment from zero).
        state: dict = {}
        for k, v in ck.arrays.items():
            if k.startswith("opt."):
                name, _, leaf = k[len("opt."):].rpartition(".")
                (state.setdefault(name, {}) if name else state)[leaf] = mx.array(v)
        t.opt.state = state
        if _load_env_state(t.env, ck.arrays, ck.state["env"]):
            t.obs, t.h, t.c = ck.arrays["obs"], ck.arrays["h"], ck.arrays["c"]
            t.starts, t.ret_acc = ck.arrays["starts"], ck.arrays["ret_acc"]
        t.update_idx, t.steps = ck.state["update"], ck.state["steps"]
        t.norm_frozen = bool(ck.state.get("norm_frozen", False))
        ref = {k[len("ref."):]: v for k, v in ck.arrays.items() if k.startswith("ref.")}
        t.ref_mx = to_mx(ref) if ref else None
        t.norm = RunningMeanStd.from_state(ck.state["norm"])
        t.ret_rms = RunningMeanStd.from_state(ck.state["ret_rms"])
        t.rng.bit_generator.state = ck.state["rng"]
        t.episode_returns = list(ck.state["episode_returns"])
        return t


def _env_state(env) -> tuple[dict[str, np.ndarray], dict]:
    """Every array, scalar and generator state of a numpy vector environment. A Gymnasium
    environment's state is its own (it cannot be saved in general): a resumed run starts new
    episodes there."""
    if not hasattr(env, "_rngs"):
        return {}, {"scalars": {}, "rngs": [], "fresh": True}
    arrays, scalars = {}, {}
    for k, v in vars(env).items():
        if isinstance(v, np.ndarray):
            arrays[f"env.{k}"] = v
        elif isinstance(v, (bool, int, float, str)) or v is None:
            scalars[k] = v
    return arrays, {"scalars": scalars, "rngs": [g.bit_generator.state for g in env._rngs]}


def _load_env_state(env, arrays: dict[str, np.ndarray], meta: dict) -> bool:
    """Restore what :func:`_env_state` saved; False when the environment starts afresh."""
    if meta.get("fresh"):
        return False
    for k, v in arrays.items():
        if k.startswith("env."):
            setattr(env, k[4:], v.copy())
    for k, v in meta["scalars"].items():
        setattr(env, k, v)
    for g, s in zip(env._rngs, meta["rngs"], strict=True):
        g.bit_generator.state = s
    return True


def evaluate(bundle, env_id: str, episodes: int = 20, *, seed: int = 12345, deterministic: bool = True,
             backend: str = "numpy", env_kwargs: dict | None = None) -> list[float]:
    """Undiscounted returns of ``episodes`` episodes of the bundle's policy, through the Policy
    API (what a device would run), on seeded environments."""
    from cogbert_edge import Policy
    policy = Policy(bundle, backend, seed=seed)
    env = make_vec_env(env_id, episodes, seed=seed, **(env_kwargs or {}))
    obs, _ = env.reset(seed=seed)
    state = policy.initial_state(episodes)
    returns = np.zeros(episodes)
    done = np.zeros(episodes, bool)
    while not done.all():
        d = policy.act_batch(obs, state, deterministic=deterministic)
        obs, r, term, trunc, _ = env.step(np.asarray(d.action))
        returns += np.where(done, 0.0, r)
        done |= term | trunc
        ended = (term | trunc)[:, None]
        state = type(d.state)(np.where(ended, 0.0, d.state.h).astype(np.float32),
                              np.where(ended, 0.0, d.state.c).astype(np.float32))
    return returns.tolist()
