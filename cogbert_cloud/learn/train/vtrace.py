"""Off-policy-corrected actor-critic (V-trace, Espeholt et al. 2018) on logged fleet sequences.

Devices logged each decision with the behaviour policy's log-probability, under whatever
model version they ran, and the recurrent state at the start of every sequence
(:class:`cogbert_cloud.data.dataset.Sequence`). For each minibatch of sequences:

1. run the current model over the sequence from the logged state, the first ``burn_in`` steps
   only rebuilding the state (the logged state came from an older model), with truncated BPTT
   over the rest;
2. importance ratios ``pi(a|x) / mu(a|x)``, clipped at ``rho_bar`` and ``c_bar``, give the
   V-trace value targets ``v_s`` and the policy-gradient advantages
   ``rho_s (r_s + gamma v_{s+1} - V(x_s))`` (targets are not differentiated);
3. loss = policy gradient + ``vf_coef`` * value error - ``ent_coef`` * entropy; Adam.

The last step of a sequence that did not end an episode only bootstraps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from cogbert_cloud.data.dataset import Sequence
from cogbert_cloud.learn.train._lstm import train_sequence
from cogbert_cloud.learn.train.common import (
    RETURN_SCALE_KEY,
    DataParallel,
    Metrics,
    Progress,
    RunningMeanStd,
    bundle_from,
    return_scale_of,
    split_params,
    to_mx,
    to_np,
)
from cogbert_edge._internal.mlx import import_mlx
from cogbert_edge.inference.bounds import ActionBounds
from cogbert_edge.inference.bundle import Bundle
from cogbert_edge.inference.model import entropy, log_prob

__all__ = ["VTraceConfig", "VTraceTrainer", "pad_sequences"]


@dataclass
class VTraceConfig:
    lr: float = 3e-4
    gamma: float = 0.99
    rho_bar: float = 1.0
    c_bar: float = 1.0
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    batch_sequences: int = 32
    burn_in: int = 8
    epochs: int = 4
    seed: int = 0
    # Rewards are multiplied by this before the value targets. None: 1 / the starting bundle's
    # return scale (the units its value head was trained in), else 1.
    reward_scale: float | None = None


def pad_sequences(seqs: list[Sequence], bounds: ActionBounds | None = None) -> dict[str, np.ndarray]:
    """Stack sequences time-major ``[T, B, ...]`` with a validity mask. Continuous actions are
    ``[T, B, act_dim]``; with ``bounds`` the logged (squashed) actions are mapped back to the
    Gaussian's ``u``, and ``log_det`` holds the squash's log-Jacobian at each."""
    T, B = max(len(s.seqs) for s in seqs), len(seqs)
    D = seqs[0].obs.shape[1]
    act = seqs[0].action
    act_shape = (T, B) if act.ndim == 1 else (T, B, act.shape[1])
    out = {"obs": np.zeros((T, B, D), np.float32),
           "actions": np.zeros(act_shape, np.int32 if act.ndim == 1 else np.float32),
           "logp": np.zeros((T, B), np.float32), "reward": np.zeros((T, B), np.float32),
           "done": np.zeros((T, B), np.float32), "mask": np.zeros((T, B), np.float32),
           "h0": np.stack([s.h0 for s in seqs]).astype(np.float32),
           "c0": np.stack([s.c0 for s in seqs]).astype(np.float32)}
    for b, s in enumerate(seqs):
        n = len(s.seqs)
        out["obs"][:n, b] = s.obs
        out["actions"][:n, b] = s.action
        out["logp"][:n, b] = s.log_prob
        out["reward"][:n, b] = s.reward
        out["done"][:n, b] = s.done | s.truncated
        out["mask"][:n, b] = 1.0
    out["log_det"] = np.zeros((T, B), np.float32)
    if bounds is not None and act.ndim == 2:
        out["actions"] = bounds.unsquash(out["actions"])
        out["log_det"] = (bounds.log_det(out["actions"]) * out["mask"]).astype(np.float32)
    return out


class VTraceTrainer:
    def __init__(self, init: Bundle, cfg: VTraceConfig | None = None) -> None:
        self.mx = import_mlx()     # first: it puts OpenBLAS under MLX before MLX loads
        import mlx.optimizers as optim
        self.cfg = cfg or VTraceConfig()
        self.model = init.config
        self.params, norm = split_params(init.fp32_params())
        self.norm = RunningMeanStd(self.model.obs_dim)
        self.norm.mean = norm["obs_norm.mean"].astype(np.float64)
        self.norm.var = norm["obs_norm.std"].astype(np.float64) ** 2
        self.params_mx = to_mx(self.params)
        self.opt = optim.Adam(learning_rate=self.cfg.lr, bias_correction=True)
        self.opt.init(self.params_mx)
        self.dp = DataParallel()
        self.rng = np.random.default_rng(self.cfg.seed)
        self._grad = self._make_grad()
        self.parent = init.model_id
        scale = return_scale_of(init)
        self.reward_scale = (self.cfg.reward_scale if self.cfg.reward_scale is not None
                             else 1.0 / scale if scale is not None else 1.0)
        self.bounds = (None if self.model.action.discrete else
                       ActionBounds.from_extra(init.extra, self.model.action.size))

    def _make_grad(self):
        mx, cfg, model = self.mx, self.cfg, self.model
        from cogbert_edge.inference.backends.mlx_backend import MLXMath

        def loss(params, norm, obs, h0, c0, actions, mu_logp, reward, done, mask, log_det):
            F = MLXMath({**params, **norm})
            T = obs.shape[0]
            starts = mx.zeros(mask.shape)
            heads, values, _, _ = train_sequence(F, model, obs, h0, c0, starts)
            onehot = None
            if model.action.discrete:
                onehot = (mx.arange(model.action.size)[None, None, :] == actions[..., None]).astype(mx.float32)
            # Continuous and bounded: the density of the logged (applied) action is the
            # Gaussian's at its pre-image over the squash's Jacobian, as the device logged it.
            logp = log_prob(F, model, heads, actions, onehot) - log_det
            ratio = mx.stop_gradient(mx.exp(logp - mu_logp))
            rho = mx.minimum(ratio, cfg.rho_bar)
            cs = mx.minimum(ratio, cfg.c_bar)
            v = mx.stop_gradient(values)
            # Next values: within the sequence; after an episode end, nothing.
            v_next = mx.concatenate([v[1:], v[-1:]], axis=0) * (1.0 - done)
            deltas = rho * (reward + cfg.gamma * v_next - v)
            acc = mx.zeros(v.shape[1:])
            vs_minus_v = []
            for t in range(T - 1, -1, -1):
                acc = deltas[t] + cfg.gamma * cs[t] * (1.0 - done[t]) * acc
                vs_minus_v.append(acc)
            vs = mx.stack(vs_minus_v[::-1]) + v
            vs_next = mx.concatenate([vs[1:], vs[-1:]], axis=0) * (1.0 - done)
            adv = rho * (reward + cfg.gamma * vs_next - v)
            # Learn on steps after burn-in that have a successor (or end the episode).
            last = mx.concatenate([mask[1:], mx.zeros(mask[:1].shape)], axis=0)
            learn = mask * mx.maximum(last, done)
            learn = learn * (mx.arange(T)[:, None] >= cfg.burn_in).astype(mx.float32)
            n = mx.maximum(learn.sum(), 1.0)
            pg = -(logp * adv * learn).sum() / n
            vloss = 0.5 * (((vs - values) ** 2) * learn).sum() / n
            ent = (entropy(F, model, heads) * learn).sum() / n
            return pg + cfg.vf_coef * vloss - cfg.ent_coef * ent, (pg, vloss, ent, (ratio * learn).sum() / n)

        return mx.value_and_grad(loss)

    def train(self, sequences: list[Sequence], *, metrics: Metrics | None = None, progress: bool | None = None) -> dict:
        mx, cfg = self.mx, self.cfg
        import mlx.optimizers as optim
        seqs = [s for s in sequences if len(s.seqs) > cfg.burn_in + 1 and s.obs.shape[1] == self.model.obs_dim]
        if not seqs:
            raise ValueError("no usable sequences (each needs more than burn_in + 1 steps)")
        norm = {k: mx.array(v) for k, v in self.norm.as_params().items()}
        total = cfg.epochs * len(seqs)
        bar = Progress(total, enabled=progress, what="sequences")
        done_n, stats, t0 = 0, [], time.monotonic()
        for epoch in range(cfg.epochs):
            order = self.rng.permutation(len(seqs))
            for k in range(0, len(seqs), cfg.batch_sequences):
                batch = pad_sequences([seqs[i] for i in order[k:k + cfg.batch_sequences]], self.bounds)
                batch["reward"] = batch["reward"] * self.reward_scale
                args = [mx.array(batch[x]) for x in ("obs", "h0", "c0", "actions", "logp", "reward", "done", "mask",
                                                     "log_det")]
                (loss, aux), grads = self._grad(self.params_mx, norm, *args)
                grads = self.dp.average(grads)
                grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
                self.params_mx = self.opt.apply_gradients(grads, self.params_mx)
                mx.eval(self.params_mx, self.opt.state, loss, aux)
                stats.append([float(loss)] + [float(a) for a in aux])
                done_n += len(order[k:k + cfg.batch_sequences])
                bar.update(done_n, loss=float(loss), pg_loss=float(aux[0]), v_loss=float(aux[1]))
                if metrics:
                    metrics.write(epoch=epoch, sequences=done_n, loss=float(loss), pg_loss=float(aux[0]),
                                  v_loss=float(aux[1]), entropy=float(aux[2]), mean_ratio=float(aux[3]))
        bar.close()
        self.params = to_np(self.params_mx)
        s = np.mean(stats, axis=0)
        return {"sequences": len(seqs), "transitions": int(sum(len(x.seqs) for x in seqs)), "updates": len(stats),
                "wall_s": round(time.monotonic() - t0, 2), "loss": float(s[0]), "mean_ratio": float(s[4])}

    def bundle(self, **kw) -> Bundle:
        # The value head is now in the units V-trace trained it in: say so for the next trainer.
        extra = {RETURN_SCALE_KEY: repr(1.0 / self.reward_scale)}
        if self.bounds is not None:
            extra.update(self.bounds.metadata())
        kw["extra"] = {**extra, **kw.get("extra", {})}
        return bundle_from(self.model, self.params, self.norm, parent=self.parent, **kw)
