"""``cogbert cloud train``: train in a simulator (PPO) or from stored fleet experience
(V-trace), then export a checked, quantized bundle.

    cogbert cloud train --env ProductionChain-v0 --out runs/a --steps 300000
    cogbert cloud train --data file:///var/lib/cogbert --from model.safetensors --out runs/b
    cogbert cloud train --env Pendulum-v1 --out runs/c --hp lr=1e-3 --hp encoder=[128]
    cogbert cloud train --env MyEnv-v0 --env-package mypkg --env-kwargs size=5 --out runs/d
    cogbert cloud train --env ProductionChain-v0 --imitate heuristic --steps 32768 --out runs/bc
    cogbert cloud train --env ProductionChain-v0 --imitate file:///var/lib/cogbert --fleet plant --out runs/bc2

Writes ``OUT/model-fp32.safetensors``, ``OUT/model.safetensors`` (int8 unless ``--bits``),
``OUT/train.json`` (what was done and measured), ``OUT/config.yml`` (the resolved
hyperparameters, also in the bundle's ``x-train-config``) and ``OUT/metrics.jsonl``; checkpoints go to
``--store`` (default ``file://OUT/store``) under ``--prefix``, and ``--resume`` continues the
latest one exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from cogbert_cloud.data.store import open_store
from cogbert_cloud.learn.envs import import_env_packages, is_own_env, resolve_env_id
from cogbert_cloud.learn.train.common import Metrics, return_scale_of
from cogbert_cloud.learn.train.config import parse_hp, parse_kv, resolve, to_plain
from cogbert_edge._internal.fs import atomic_write
from cogbert_edge.errors import ConfigError
from cogbert_edge.inference.bundle import load_bundle

__all__ = ["register", "run_train"]


def register(csub: argparse._SubParsersAction) -> None:
    p = csub.add_parser("train", help="train a policy in simulation (--env) or from fleet data (--data)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--env", help="any Gymnasium id (CartPole-v1, Pendulum-v1, ProductionChain-v0, "
                     "CartPoleNoVel-v1, yours), or MODULE:Class")
    src.add_argument("--data", help="object store URL with fleet experience")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=100_000, help="environment steps (--env)")
    p.add_argument("--from", dest="init", default=None,
                   help="start from this bundle: a path, or store:KEY for an object in --store")
    p.add_argument("--store", default=None, help="checkpoint store URL (default file://OUT/store)")
    p.add_argument("--prefix", default="train")
    p.add_argument("--resume", action="store_true", help="continue the latest checkpoint under --prefix")
    p.add_argument("--checkpoint-every", type=int, default=50, help="updates between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bits", type=int, choices=(32, 8, 4), default=8)
    p.add_argument("--eval-episodes", type=int, default=20)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--num-envs", type=int, default=None)
    p.add_argument("--fleet", default=None, help="only this fleet's data (--data)")
    p.add_argument("--env-package", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (it registers your environments); repeatable")
    p.add_argument("--env-kwargs", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword arguments of the environment's constructor (values read as YAML)")
    p.add_argument("--vectorization", choices=("auto", "sync", "async"), default=None,
                   help="Gymnasium envs: auto (the env's same-step vector_entry_point, else sync), sync, async")
    p.add_argument("--config", type=Path, default=None,
                   help="hyperparameter file (YAML: per-environment entries as in configs/ppo.yml, or flat fields)")
    p.add_argument("--imitate", default=None, metavar="TEACHER",
                   help="behaviour cloning instead of PPO (with --env): 'heuristic' (ProductionChain's documented "
                        "rule, run for --steps decisions) or a store URL of logged fleet decisions; --hp sets "
                        "imitate.* fields (imitate.epochs=20, imitate.temperature=0.5, ...)")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hyperparameter (any field of the config; value read as YAML); repeatable")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    p.set_defaults(func=lambda a: _print(run_train(a)))
    from cogbert_cloud.learn.train.plot import register as register_plot
    register_plot(csub)


def _run_imitate(a: argparse.Namespace, store, metrics: Metrics, hp: dict, imitate_hp: dict) -> dict:
    """Behaviour cloning of ``--imitate``'s teacher into the environment's PPO architecture."""
    from cogbert_cloud.learn.envs import make_vec_env
    from cogbert_cloud.learn.envs.gym_adapter import action_bounds
    from cogbert_cloud.learn.train.export import export_bundle
    from cogbert_cloud.learn.train.imitate import ImitateConfig, clone, heuristic_demonstrations, logged_demonstrations
    from cogbert_cloud.learn.train.ppo import PPOConfig, evaluate
    from cogbert_edge.inference.bounds import ActionBounds
    from cogbert_edge.inference.model import ActionSpace
    env = resolve_env_id(a.env) if not is_own_env(a.env) else a.env
    env_kwargs = parse_kv(a.env_kwargs, "--env-kwargs")
    cfg, sources = resolve(PPOConfig, "ppo", env, config_file=a.config, hp=hp,
                           flags=dict(env=env, seed=a.seed, env_kwargs=env_kwargs or None))
    icfg, _ = resolve(ImitateConfig, "imitate", env, hp=imitate_hp,
                      flags=dict(seed=a.seed, epochs=a.epochs, lr=a.lr))
    probe = make_vec_env(env, 1, seed=0, **cfg.env_kwargs)
    kind, size, low, high = action_bounds(probe.single_action_space, env)
    action = ActionSpace.of_discrete(size) if kind == "discrete" else ActionSpace.of_continuous(size)
    bounds = ActionBounds(low, high) if low is not None and high is not None else None
    if a.imitate == "heuristic":
        demos = heuristic_demonstrations(env, a.steps, seed=a.seed, gamma=cfg.gamma, env_kwargs=cfg.env_kwargs)
    else:
        demos = logged_demonstrations(a.imitate, a.fleet, gamma=cfg.gamma)
    record = {"algorithm": "imitate", "teacher": a.imitate, "config": to_plain(cfg), "imitate": to_plain(icfg),
              "sources": sources, "steps": a.steps, "parent": ""}
    _save_config(a.out, record)
    fp32, info = clone(demos, cfg, icfg, action=action, bounds=bounds, metrics=metrics, progress=a.progress)
    fp32 = type(fp32).create(fp32.config, dict(fp32.tensors), extra={**dict(fp32.extra),
                                                                       "x-train-config": json.dumps(record)})
    returns = evaluate(fp32, env, a.eval_episodes, env_kwargs=cfg.env_kwargs)
    sampled = evaluate(fp32, env, a.eval_episodes, deterministic=False, env_kwargs=cfg.env_kwargs)
    summary = {"mode": "imitate", "env": env, **info, "eval_mean_return": float(np.mean(returns)),
               "eval_sampled_mean_return": float(np.mean(sampled)), "eval_episodes": len(returns)}
    fp32.save(a.out / "model-fp32.safetensors")
    exported, report = export_bundle(fp32, env, bits=a.bits, extra={"x-train": json.dumps(summary)},
                                     env_kwargs=cfg.env_kwargs or None)
    exported.save(a.out / "model.safetensors")
    if a.store:
        store.put(f"{a.prefix}/model.safetensors", (a.out / "model.safetensors").read_bytes())
    summary.update(export=report, model=str(a.out / "model.safetensors"), model_id=exported.model_id,
                   tensorboard=metrics.tensorboard)
    atomic_write(a.out / "train.json", json.dumps(summary, indent=1).encode())
    metrics.close()
    return summary


def _save_config(out: Path, record: dict) -> None:
    """The resolved configuration next to the run: ``--config OUT/config.yml`` repeats it."""
    text = (f"# {record['algorithm']} configuration of this run, resolved from: {', '.join(record['sources'])}\n"
            + yaml.safe_dump(record["config"], sort_keys=True))
    atomic_write(out / "config.yml", text.encode())


def _print(result: dict) -> int:
    print(json.dumps(result))
    return 0


def run_train(a: argparse.Namespace) -> dict:
    a.out.mkdir(parents=True, exist_ok=True)
    store = open_store(a.store or f"file://{(a.out / 'store').resolve()}")
    metrics = Metrics(str(a.out / "metrics.jsonl"), tensorboard=str(a.out / "tensorboard"))
    init = None
    if a.init:
        init = load_bundle(store.get(a.init[6:]) if a.init.startswith("store:") else Path(a.init))
    import_env_packages(a.env_package)
    hp = parse_hp(a.hp)
    imitate_hp = {k[len("imitate."):]: hp.pop(k) for k in list(hp) if k.startswith("imitate.")}
    if getattr(a, "imitate", None):
        if not a.env:
            raise ConfigError("--imitate needs --env: the environment the student will act in")
        return _run_imitate(a, store, metrics, hp, imitate_hp)
    env_kwargs = parse_kv(a.env_kwargs, "--env-kwargs")
    if a.env:
        from cogbert_cloud.learn.train.ppo import PPOConfig, PPOTrainer, evaluate
        if a.resume:
            trainer = PPOTrainer.resume(store, a.prefix)
            sources = ["checkpoint"]
        else:
            env = resolve_env_id(a.env) if not is_own_env(a.env) else a.env
            cfg, sources = resolve(PPOConfig, "ppo", env, config_file=a.config, hp=hp, base={"env": env},
                                   flags=dict(seed=a.seed, epochs=a.epochs, lr=a.lr, num_envs=a.num_envs,
                                              checkpoint_every=a.checkpoint_every, env=env,
                                              env_kwargs=env_kwargs or None, vectorization=a.vectorization))
            trainer = PPOTrainer(cfg, store=store, prefix=a.prefix, init=init.fp32_params() if init else None,
                                 init_return_scale=return_scale_of(init) if init else None)
        config = to_plain(trainer.cfg)
        record = {"algorithm": "ppo", "config": config, "sources": sources, "steps": a.steps,
                  "parent": init.model_id if init else ""}
        _save_config(a.out, record)
        run = trainer.train(a.steps, metrics=metrics, progress=a.progress)
        env_id = trainer.cfg.env
        env_kwargs = trainer.cfg.env_kwargs
        fp32 = trainer.bundle(parent=init.model_id if init else "", extra={"x-train-config": json.dumps(record)})
        if trainer.dp.rank != 0:
            return {"rank": trainer.dp.rank, **run}
        returns = evaluate(fp32, env_id, a.eval_episodes, env_kwargs=env_kwargs)
        # Devices sample their actions (and must, for their logs to support off-policy
        # evaluation); a policy that is still stochastic can do much worse greedily.
        sampled = evaluate(fp32, env_id, a.eval_episodes, deterministic=False, env_kwargs=env_kwargs)
        summary = {"mode": "ppo", "env": env_id, **run, "eval_mean_return": float(np.mean(returns)),
                   "eval_sampled_mean_return": float(np.mean(sampled)),
                   "eval_episodes": len(returns), "processes": trainer.dp.size}
    else:
        from cogbert_cloud.data.dataset import ExperienceDataset
        from cogbert_cloud.learn.train.vtrace import VTraceConfig, VTraceTrainer
        if init is None:
            raise ConfigError("--data needs --from: the model the fleet ran, to continue from")
        vcfg, sources = resolve(VTraceConfig, "vtrace", None, config_file=a.config, hp=hp,
                                flags=dict(seed=a.seed, lr=a.lr, epochs=a.epochs))
        record = {"algorithm": "vtrace", "config": to_plain(vcfg), "sources": sources, "data": a.data,
                  "parent": init.model_id}
        _save_config(a.out, record)
        sequences = list(ExperienceDataset(open_store(a.data), a.fleet).sequences())
        vtrainer = VTraceTrainer(init, vcfg)
        run = vtrainer.train(sequences, metrics=metrics, progress=a.progress)
        fp32 = vtrainer.bundle(extra={"x-train-config": json.dumps(record)})
        env_id = None
        summary = {"mode": "vtrace", "data": a.data, **run}
    from cogbert_cloud.learn.train.export import export_bundle
    fp32.save(a.out / "model-fp32.safetensors")
    exported, report = export_bundle(fp32, env_id, bits=a.bits, extra={"x-train": json.dumps(summary)},
                                     env_kwargs=env_kwargs or None)
    exported.save(a.out / "model.safetensors")
    if a.store:   # a remote run (a Kubernetes Job) hands its result back through the store
        store.put(f"{a.prefix}/model.safetensors", (a.out / "model.safetensors").read_bytes())
    summary.update(export=report, model=str(a.out / "model.safetensors"), model_id=exported.model_id,
                   tensorboard=metrics.tensorboard)
    atomic_write(a.out / "train.json", json.dumps(summary, indent=1).encode())
    metrics.close()
    return summary
