"""MAPPO and IPPO on MLX, with Cogbert's recurrent model as the actor.

* **Actor**: the edge model (encoder MLP, LSTM, heads; ``cogbert_edge.inference.model``) shared by
  every agent of a *role*, with the agent's one-hot id appended to its local observation
  (``actor_input``). One bundle per role is what devices run (:meth:`MARLTrainer.bundles`).
* **Critic** (``critic="central"``, MAPPO, Yu et al. 2022): a second recurrent model of the same
  kind on the *global state* plus the agent's one-hot id (an agent-specific global state); only its
  value head is used and it never leaves the cloud. ``critic="local"`` is IPPO (de Witt et al.
  2020): each agent's value is the actor's own value head on its local observation.
* Value normalisation (running mean and std of the returns; the critic predicts normalised
  values), Huber value loss, clip 0.2, few epochs, GAE, Adam with gradient clipping, linear decay.
* **Roles** (``roles="shared"``: one actor for all agents; ``"per_agent"``: one actor per agent,
  heterogeneous; or a list naming each agent's role).

Rollouts run the numpy reference math (what devices run); learning differentiates the sequence
form with MLX over the whole rollout (truncated BPTT from the state the rollout started with),
exactly like the single-agent trainer (:mod:`cogbert_cloud.learn.train.ppo`), whose building
blocks (observation statistics, bundle export) this reuses.

A time limit ends an episode without bootstrapping its value (as MAPPO's reference code does on
MPE); the production line's episodes are long against 1 / (1 - gamma).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cogbert_cloud.learn.marl.envs import MultiAgentVecEnv, make_marl_env
from cogbert_cloud.learn.train._lstm import train_sequence
from cogbert_cloud.learn.train.common import Metrics, RunningMeanStd, bundle_from, split_params, to_mx, to_np
from cogbert_edge._internal.mlx import import_mlx
from cogbert_edge.errors import ConfigError
from cogbert_edge.inference.bundle import Bundle
from cogbert_edge.inference.model import (
    ActionSpace,
    ModelConfig,
    NumpyMath,
    entropy,
    init_params,
    log_prob,
    sequence,
    step,
)
from cogbert_edge.site.agent import actor_input

__all__ = ["MARLConfig", "MARLTrainer", "actor_input", "evaluate_bundles", "MARL_PRESETS", "marl_preset"]


@dataclass
class MARLConfig:
    env: str = "ProductionLine-v0"
    critic: str = "central"            # "central" (MAPPO) or "local" (IPPO)
    roles: Any = "shared"              # "shared", "per_agent", or one role name per agent
    num_envs: int = 16
    rollout: int = 128
    epochs: int = 5
    minibatches: int = 2
    lr: float = 5e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 1.0
    huber_delta: float = 10.0
    max_grad_norm: float = 10.0
    encoder: tuple[int, ...] = (64,)
    hidden: int = 64
    anneal: bool = True
    seed: int = 0
    env_kwargs: dict = field(default_factory=dict)


MARL_PRESETS: dict[str, dict] = {
    "ProductionLine-v0": dict(num_envs=16, rollout=128, epochs=4, minibatches=2, lr=7e-4,
                              ent_coef=0.01),
    # MAPPO's MPE settings (15 epochs on easy tasks, one minibatch), with fewer environments.
    "mpe2:simple_spread_v3": dict(num_envs=16, rollout=25, epochs=10, minibatches=1, lr=7e-4,
                                  ent_coef=0.01, gamma=0.99),
}


def marl_preset(env: str, **overrides: Any) -> MARLConfig:
    base = dict(MARL_PRESETS.get(env, {}))
    base.update({k: v for k, v in overrides.items() if v is not None})
    return MARLConfig(env=env, **base)


def _role_list(roles: Any, agents: list[str]) -> list[str]:
    if roles == "shared":
        return ["agent"] * len(agents)
    if roles == "per_agent":
        return list(agents)
    if isinstance(roles, (list, tuple)) and len(roles) == len(agents) and all(isinstance(r, str) for r in roles):
        return list(roles)
    raise ConfigError(f"roles must be 'shared', 'per_agent' or one role name per agent ({len(agents)}), got {roles!r}")


def _sample(logits: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    z = logits - logits.max(-1, keepdims=True)
    logp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
    probs = np.exp(logp_all)
    u = rng.random(probs.shape[:-1] + (1,))
    a = np.minimum((probs.cumsum(-1) < u).sum(-1), probs.shape[-1] - 1)
    return a, np.take_along_axis(logp_all, a[..., None], -1)[..., 0]


class MARLTrainer:
    """MAPPO (``critic="central"``) or IPPO (``critic="local"``) on a multi-agent vector environment."""

    def __init__(self, cfg: MARLConfig, *, env: MultiAgentVecEnv | None = None) -> None:
        if cfg.critic not in ("central", "local"):
            raise ConfigError(f"critic must be 'central' (MAPPO) or 'local' (IPPO), got {cfg.critic!r}")
        self.mx = import_mlx()
        import mlx.optimizers as optim
        self.cfg = cfg
        self.env = env if env is not None else make_marl_env(cfg.env, cfg.num_envs, cfg.seed, **cfg.env_kwargs)
        e = self.env
        self.A, self.N = e.n_agents, e.num_envs
        self.role_of = _role_list(cfg.roles, e.agents)
        self.roles = sorted(set(self.role_of), key=self.role_of.index)
        self.members = {r: np.array([k for k, x in enumerate(self.role_of) if x == r]) for r in self.roles}
        act = ActionSpace.of_discrete(e.n_actions)
        self.actor_model = ModelConfig(obs_dim=e.obs_dim + self.A, action=act, encoder=tuple(cfg.encoder),
                                       hidden=cfg.hidden)
        self.critic_model = ModelConfig(obs_dim=e.state_dim + self.A, action=act, encoder=tuple(cfg.encoder),
                                        hidden=cfg.hidden)
        self.params: dict[str, dict[str, np.ndarray]] = {}
        self.norms: dict[str, RunningMeanStd] = {}
        for i, r in enumerate(self.roles):
            p, _ = split_params(init_params(self.actor_model, cfg.seed + 101 * i, policy_gain=0.01))
            self.params[f"actor/{r}"] = p
            self.norms[f"actor/{r}"] = RunningMeanStd(self.actor_model.obs_dim)
        if cfg.critic == "central":
            p, _ = split_params(init_params(self.critic_model, cfg.seed + 997))
            self.params["critic"] = p
            self.norms["critic"] = RunningMeanStd(self.critic_model.obs_dim)
        self.params_mx = {k: to_mx(v) for k, v in self.params.items()}
        self.opt = optim.Adam(learning_rate=cfg.lr, bias_correction=True)
        self.opt.init(self.params_mx)
        self.value_norm = RunningMeanStd(1)
        self.rng = np.random.default_rng(cfg.seed + 7)
        self.update_idx = 0
        self.steps = 0
        self.episode_returns: list[float] = []
        self.curve: list[dict] = []
        self.obs, self.state = e.reset(cfg.seed)
        H = cfg.hidden
        self.h = {k: np.zeros((self.N * len(self.members[r]), H), np.float32) for k, r in self._actor_keys()}
        self.c = {k: np.zeros_like(v) for k, v in self.h.items()}
        self.hc_crit = np.zeros((self.N * self.A, H), np.float32), np.zeros((self.N * self.A, H), np.float32)
        self.starts = np.ones(self.N, np.float32)
        self._ids = np.broadcast_to(np.arange(self.A), (self.N, self.A))
        self._update_norms(self.obs[None], self.state[None])
        self._grad_fn = self._make_grad_fn()

    def _actor_keys(self) -> list[tuple[str, str]]:
        return [(f"actor/{r}", r) for r in self.roles]

    # -- inputs ---------------------------------------------------------------------------------

    def _actor_in(self, obs: np.ndarray, r: str) -> np.ndarray:
        """``obs [..., N, A, D]`` -> the role's actor inputs ``[..., N * A_r, D + A]``."""
        idx = self.members[r]
        x = actor_input(obs[..., idx, :], idx, self.A)
        return x.reshape(x.shape[:-3] + (-1, x.shape[-1]))

    def _critic_in(self, state: np.ndarray) -> np.ndarray:
        """``state [..., N, S]`` -> ``[..., N * A, S + A]`` (the global state and each agent's id)."""
        s = np.repeat(state[..., None, :], self.A, axis=-2)
        x = actor_input(s, np.arange(self.A), self.A)
        return x.reshape(x.shape[:-3] + (-1, x.shape[-1]))

    def _update_norms(self, obs: np.ndarray, state: np.ndarray) -> None:
        for k, r in self._actor_keys():
            self.norms[k].update(self._actor_in(obs, r).reshape(-1, self.actor_model.obs_dim))
        if "critic" in self.norms:
            self.norms["critic"].update(self._critic_in(state).reshape(-1, self.critic_model.obs_dim))

    # -- rollout ----------------------------------------------------------------------------------

    def collect(self) -> dict[str, Any]:
        cfg, N, A = self.cfg, self.N, self.A
        T = cfg.rollout
        Fs = {k: NumpyMath({**self.params[k], **self.norms[k].as_params()}) for k in self.params}
        buf: dict[str, Any] = {
            "obs": np.zeros((T, N, A, self.env.obs_dim), np.float32),
            "state": np.zeros((T, N, self.env.state_dim), np.float32),
            "actions": np.zeros((T, N, A), np.int32), "logp": np.zeros((T, N, A), np.float32),
            "values": np.zeros((T, N, A), np.float32), "rewards": np.zeros((T, N, A), np.float32),
            "dones": np.zeros((T, N), np.float32), "starts": np.zeros((T, N), np.float32),
            "h0": {k: v.copy() for k, v in self.h.items()}, "c0": {k: v.copy() for k, v in self.c.items()},
            "hc0_crit": (self.hc_crit[0].copy(), self.hc_crit[1].copy()),
        }
        vstd, vmean = float(self.value_norm.std[0]), float(self.value_norm.mean[0])
        for t in range(T):
            buf["obs"][t], buf["state"][t], buf["starts"][t] = self.obs, self.state, self.starts
            values, actions, logps = self._act(Fs, self.obs, self.state, self.starts)
            buf["values"][t] = values * vstd + vmean
            buf["actions"][t], buf["logp"][t] = actions, logps
            self.obs, self.state, rewards, dones, info = self.env.step(actions)
            buf["rewards"][t], buf["dones"][t] = rewards, dones
            if "episode_return" in info:
                self.episode_returns.extend(info["episode_return"][info["ended"]].mean(axis=1).tolist())
            self.starts = dones.astype(np.float32)
        values, _, _ = self._act(Fs, self.obs, self.state, self.starts, advance=False)
        last = values * vstd + vmean
        adv = np.zeros((T, N, A), np.float32)
        gae = np.zeros((N, A), np.float32)
        for t in reversed(range(T)):
            next_v = last if t == T - 1 else buf["values"][t + 1]
            nonterminal = (1.0 - buf["dones"][t])[:, None]
            delta = buf["rewards"][t] + cfg.gamma * next_v * nonterminal - buf["values"][t]
            gae = delta + cfg.gamma * cfg.gae_lambda * nonterminal * gae
            adv[t] = gae
        buf["adv"], buf["ret"] = adv, adv + buf["values"]
        self.steps += T * N
        return buf

    def _act(self, Fs: dict, obs: np.ndarray, state: np.ndarray, starts: np.ndarray,
             advance: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        N, A = self.N, self.A
        actions = np.zeros((N, A), np.int64)
        logps = np.zeros((N, A), np.float32)
        values = np.zeros((N, A), np.float32)
        for k, r in self._actor_keys():
            idx = self.members[r]
            keep = np.repeat(1.0 - starts, len(idx))[:, None].astype(np.float32)
            head, v, h, c = step(Fs[k], self.actor_model, self._actor_in(obs, r), self.h[k] * keep, self.c[k] * keep)
            a, lp = _sample(head, self.rng)
            actions[:, idx] = a.reshape(N, len(idx))
            logps[:, idx] = lp.reshape(N, len(idx))
            values[:, idx] = v.reshape(N, len(idx))
            if advance:
                self.h[k], self.c[k] = h, c
        if "critic" in Fs:
            keep = np.repeat(1.0 - starts, A)[:, None].astype(np.float32)
            _, v, h, c = step(Fs["critic"], self.critic_model, self._critic_in(state),
                              self.hc_crit[0] * keep, self.hc_crit[1] * keep)
            values = v.reshape(N, A)
            if advance:
                self.hc_crit = (h, c)
        return values, actions, logps

    # -- learning ---------------------------------------------------------------------------------

    def _make_grad_fn(self) -> Any:
        mx, cfg = self.mx, self.cfg
        from cogbert_edge.inference.backends.mlx_backend import MLXMath
        actor_model, critic_model = self.actor_model, self.critic_model
        central = cfg.critic == "central"
        keys = self._actor_keys()

        def huber(x: Any) -> Any:
            a = mx.abs(x)
            d = cfg.huber_delta
            return mx.where(a <= d, 0.5 * x * x, d * (a - 0.5 * d))

        def loss(params: dict, norms: dict, batch: dict, clip: float) -> tuple[Any, Any]:
            pg_total, ent_total, v_total, kl_total, n_roles = 0.0, 0.0, 0.0, 0.0, 0
            for k, _r in keys:
                b = batch[k]
                F = MLXMath({**params[k], **norms[k]})
                heads, values, _, _ = train_sequence(F, actor_model, b["x"], b["h0"], b["c0"], b["starts"])
                onehot = (mx.arange(actor_model.action.size)[None, None, :] == b["actions"][..., None])
                logp = log_prob(F, actor_model, heads, b["actions"], onehot.astype(mx.float32))
                ratio = mx.exp(logp - b["logp"])
                adv = b["adv"]
                pg_total = pg_total - mx.minimum(ratio * adv, mx.clip(ratio, 1 - clip, 1 + clip) * adv).mean()
                ent_total = ent_total + entropy(F, actor_model, heads).mean()
                kl_total = kl_total + ((ratio - 1) - (logp - b["logp"])).mean()
                if not central:
                    v_total = v_total + huber(values - b["ret"]).mean()
                n_roles += 1
            if central:
                b = batch["critic"]
                F = MLXMath({**params["critic"], **norms["critic"]})
                _, values, _, _ = train_sequence(F, critic_model, b["x"], b["h0"], b["c0"], b["starts"])
                v_total = huber(values - b["ret"]).mean()
            total = pg_total + cfg.vf_coef * v_total - cfg.ent_coef * ent_total
            return total, (pg_total, v_total, ent_total / n_roles, kl_total / n_roles)

        return mx.value_and_grad(loss)

    def _batch(self, buf: dict, envs: np.ndarray, adv_n: np.ndarray, ret_n: np.ndarray) -> dict:
        mx, A = self.mx, self.A
        H = self.cfg.hidden
        N = buf["obs"].shape[1]
        out: dict[str, dict] = {}
        starts_env = buf["starts"][:, envs]
        for k, r in self._actor_keys():
            idx = self.members[r]
            n = len(idx)
            sub = buf["obs"][:, envs]
            h0 = buf["h0"][k].reshape(N, n, H)[envs].reshape(-1, H)
            c0 = buf["c0"][k].reshape(N, n, H)[envs].reshape(-1, H)
            out[k] = {"x": mx.array(self._actor_in(sub, r)), "h0": mx.array(h0), "c0": mx.array(c0),
                      "starts": mx.array(np.repeat(starts_env, n, axis=1)),
                      "actions": mx.array(buf["actions"][:, envs][:, :, idx].reshape(len(buf["actions"]), -1)),
                      "logp": mx.array(buf["logp"][:, envs][:, :, idx].reshape(len(buf["logp"]), -1)),
                      "adv": mx.array(adv_n[:, envs][:, :, idx].reshape(len(adv_n), -1)),
                      "ret": mx.array(ret_n[:, envs][:, :, idx].reshape(len(ret_n), -1))}
        if "critic" in self.params:
            h0, c0 = buf["hc0_crit"]
            out["critic"] = {"x": mx.array(self._critic_in(buf["state"][:, envs])),
                             "h0": mx.array(h0.reshape(N, A, H)[envs].reshape(-1, H)),
                             "c0": mx.array(c0.reshape(N, A, H)[envs].reshape(-1, H)),
                             "starts": mx.array(np.repeat(starts_env, A, axis=1)),
                             "ret": mx.array(ret_n[:, envs].reshape(len(ret_n), -1))}
        return out

    def learn(self, buf: dict, frac: float, *, epochs: int | None = None) -> dict[str, float]:
        mx, cfg = self.mx, self.cfg
        N = buf["obs"].shape[1]
        import mlx.optimizers as optim
        lr = cfg.lr * (frac if cfg.anneal else 1.0)
        clip = cfg.clip * (frac if cfg.anneal else 1.0)
        self.opt.learning_rate = lr
        # Value normalisation: the critic learns returns standardised by running statistics.
        self.value_norm.update(buf["ret"].reshape(-1, 1))
        ret_n = ((buf["ret"] - self.value_norm.mean[0]) / self.value_norm.std[0]).astype(np.float32)
        adv = buf["adv"]
        adv_n = ((adv - adv.mean()) / (adv.std() + 1e-8)).astype(np.float32)
        norms = {k: {n: mx.array(v) for n, v in self.norms[k].as_params().items()} for k in self.params}
        per = max(1, N // cfg.minibatches)
        stats = []
        for _ in range(cfg.epochs if epochs is None else epochs):
            order = self.rng.permutation(N)
            for s in range(0, N, per):
                batch = self._batch(buf, order[s:s + per], adv_n, ret_n)
                (loss, aux), grads = self._grad_fn(self.params_mx, norms, batch, clip)
                grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
                self.params_mx = self.opt.apply_gradients(grads, self.params_mx)
                mx.eval(self.params_mx, self.opt.state, loss, aux)
                stats.append([float(loss)] + [float(a) for a in aux])
        self.params = {k: to_np(v) for k, v in self.params_mx.items()}
        m = np.mean(stats, axis=0)
        return {"loss": float(m[0]), "pg_loss": float(m[1]), "v_loss": float(m[2]), "entropy": float(m[3]),
                "approx_kl": float(m[4]), "lr": lr}

    def train(self, total_steps: int, *, metrics: Metrics | None = None, log_every: int = 0) -> dict:
        """Train for ``total_steps`` environment steps (each one decision per agent)."""
        cfg = self.cfg
        per_update = cfg.rollout * self.N
        n_updates = max(1, total_steps // per_update)
        t0 = time.monotonic()
        while self.update_idx < n_updates:
            frac = 1.0 - self.update_idx / n_updates
            buf = self.collect()
            info = self.learn(buf, frac)
            self._update_norms(buf["obs"], buf["state"])
            self.update_idx += 1
            recent = self.episode_returns[-2 * self.N:]
            row = {"update": self.update_idx, "steps": self.steps, "wall_s": round(time.monotonic() - t0, 2),
                   "episode_return": float(np.mean(recent)) if recent else None, **info}
            self.curve.append(row)
            if metrics:
                metrics.write(**row)
            if log_every and self.update_idx % log_every == 0:
                print(f"update {self.update_idx}/{n_updates} steps {self.steps} return {row['episode_return']}",
                      flush=True)
        return {"steps": self.steps, "updates": self.update_idx, "wall_s": time.monotonic() - t0}

    # -- V-trace fine-tuning from joined fleet logs ---------------------------------------------

    def finetune_vtrace(self, episodes: list[Any], *, epochs: int = 2, rho_bar: float = 1.0,
                        c_bar: float = 1.0) -> dict[str, float]:
        """Improve the actors and the critic from joined site logs (:func:`~.join.join_site`).

        Each agent's importance ratio uses its *own* behaviour log-probability (the devices ran
        independent actors); V-trace (Espeholt et al. 2018) targets, with the critic on the joined
        global state, replace GAE; the update is then the clipped surrogate from the current policy,
        so a step stays small however stale the logs are. Episodes of one length are batched.
        """
        if not episodes:
            raise ConfigError("no joined episodes to fine-tune on")
        T = len(episodes[0].steps)
        eps = [e for e in episodes if len(e.steps) == T]
        A, H, cfg = self.A, self.cfg.hidden, self.cfg
        if eps[0].obs.shape[1:] != (A, self.env.obs_dim):
            raise ConfigError(f"joined observations {eps[0].obs.shape[1:]} do not fit this trainer ({A}, "
                              f"{self.env.obs_dim})")
        obs = np.stack([e.obs for e in eps], axis=1)                     # [T, N, A, D]
        state = np.stack([e.state for e in eps], axis=1)                 # [T, N, S]
        actions = np.stack([e.actions for e in eps], axis=1)             # [T, N, A]
        blogp = np.stack([e.log_prob for e in eps], axis=1)
        rewards = np.stack([e.reward for e in eps], axis=1)
        dones = np.stack([e.done for e in eps], axis=1).astype(np.float32)
        N = obs.shape[1]
        starts = np.zeros((T, N), np.float32)
        starts[0] = 1.0
        # The current policy's log-probabilities and values along the logged trajectories.
        logp = np.zeros((T, N, A), np.float32)
        values = np.zeros((T, N, A), np.float32)
        for k, r in self._actor_keys():
            idx = self.members[r]
            F = NumpyMath({**self.params[k], **self.norms[k].as_params()})
            x = self._actor_in(obs, r)
            z = np.zeros((x.shape[1], H), np.float32)
            heads, v, _, _ = sequence(F, self.actor_model, x, z, z.copy(), np.repeat(starts, len(idx), 1), np.stack)
            heads = heads - heads.max(-1, keepdims=True)
            lp_all = heads - np.log(np.exp(heads).sum(-1, keepdims=True))
            a = actions[:, :, idx].reshape(T, -1)
            logp[:, :, idx] = np.take_along_axis(lp_all, a[..., None], -1)[..., 0].reshape(T, N, len(idx))
            values[:, :, idx] = v.reshape(T, N, len(idx))
        if "critic" in self.params:
            F = NumpyMath({**self.params["critic"], **self.norms["critic"].as_params()})
            x = self._critic_in(state)
            z = np.zeros((x.shape[1], H), np.float32)
            _, v, _, _ = sequence(F, self.critic_model, x, z, z.copy(), np.repeat(starts, A, 1), np.stack)
            values = v.reshape(T, N, A)
        values = values * float(self.value_norm.std[0]) + float(self.value_norm.mean[0])
        rho = np.exp(logp - blogp)
        rho_c, c = np.minimum(rho, rho_bar), np.minimum(rho, c_bar)
        nonterm = (1.0 - dones)[..., None]
        next_v = np.concatenate([values[1:], np.zeros_like(values[:1])]) * nonterm
        delta = rho_c * (rewards + cfg.gamma * next_v - values)
        vs_minus_v = np.zeros_like(values)
        acc = np.zeros((N, A), np.float32)
        for t in reversed(range(T)):
            acc = delta[t] + cfg.gamma * c[t] * nonterm[t] * acc
            vs_minus_v[t] = acc
        vs = vs_minus_v + values
        next_vs = np.concatenate([vs[1:], np.zeros_like(vs[:1])]) * nonterm
        adv = rho_c * (rewards + cfg.gamma * next_vs - values)
        zeros = {k: np.zeros((N * len(self.members[r]), H), np.float32) for k, r in self._actor_keys()}
        buf = {"obs": obs.astype(np.float32), "state": state, "actions": actions.astype(np.int32), "logp": logp,
               "starts": starts, "adv": adv.astype(np.float32), "ret": vs.astype(np.float32),
               "h0": zeros, "c0": {k: v.copy() for k, v in zeros.items()},
               "hc0_crit": (np.zeros((N * A, H), np.float32), np.zeros((N * A, H), np.float32))}
        info = self.learn(buf, 1.0, epochs=epochs)
        # Clipped: beyond rho_bar by more than float32 rounding (on-policy logs give ratios of 1 +- 1e-6).
        info.update(rho_mean=float(rho.mean()), rho_clipped_frac=float((rho > rho_bar * (1 + 1e-4)).mean()),
                    max_abs_log_rho=float(np.abs(logp - blogp).max()), episodes=len(eps), joint_steps=T * N)
        return info

    # -- export -------------------------------------------------------------------------------------

    def bundles(self, **kw: Any) -> dict[str, Bundle]:
        """One actor bundle per role (the critic stays in the cloud). ``extra`` records the role,
        its agents and the agent count, which a device needs to build its input."""
        out = {}
        more = dict(kw.pop("extra", None) or {})
        for k, r in self._actor_keys():
            extra = {"x-marl-role": r, "x-marl-n-agents": str(self.A),
                     "x-marl-agents": ",".join(self.env.agents[i] for i in self.members[r]),
                     "x-marl-algorithm": "mappo" if self.cfg.critic == "central" else "ippo"}
            extra.update(more)
            out[r] = bundle_from(self.actor_model, self.params[k], self.norms[k], extra=extra, **kw)
        return out

    def role_map(self) -> dict[str, str]:
        """Agent name -> role."""
        return dict(zip(self.env.agents, self.role_of, strict=True))


def evaluate_bundles(bundles: dict[str, Bundle], role_of: dict[str, str], env_id: str, episodes: int, *,
                     seed: int, deterministic: bool = False, env_kwargs: dict | None = None,
                     backend: str = "numpy") -> np.ndarray:
    """Per-episode return (mean over agents of each agent's return; the team return on the line)
    of role bundles through the Policy API, as devices run them, on ``episodes`` seeded instances."""
    from cogbert_edge import Policy
    env = make_marl_env(env_id, episodes, seed, **(env_kwargs or {}))
    agents = env.agents
    policies = {r: Policy(b, backend, seed=seed + i) for i, (r, b) in enumerate(sorted(bundles.items()))}
    members = {r: np.array([k for k, a in enumerate(agents) if role_of[a] == r]) for r in policies}
    states = {r: policies[r].initial_state(episodes * len(m)) for r, m in members.items()}
    obs, _ = env.reset(seed)
    total = np.zeros(episodes)
    done = np.zeros(episodes, bool)
    while not done.all():
        actions = np.zeros((episodes, env.n_agents), np.int64)
        for r, idx in members.items():
            x = actor_input(obs[:, idx], idx, env.n_agents).reshape(-1, env.obs_dim + env.n_agents)
            d = policies[r].act_batch(x, states[r], deterministic=deterministic)
            actions[:, idx] = np.asarray(d.action).reshape(episodes, len(idx))
            states[r] = d.state
        obs, _, rewards, dones, info = env.step(actions)
        total += np.where(done, 0.0, rewards.mean(axis=1))
        done |= dones
    return total

