"""Joining a site's fleet logs into multi-agent training data.

Each agent of a site is its own device with its own outbox: what reaches the store is one log per
device. A site agent logs every decision in a session named for the site's episode, with its step
in that episode (:meth:`cogbert_edge.site.agent.SiteAgent.step`). :func:`join_site` rebuilds the
joint experience: for each ``(session, step)`` the rows of every member, in agent-index order,
and the global state the centralized critic needs (the members' local observations side by side,
then the episode's progress: the same ``state()`` as ``ProductionLine-v0``).

Each stored record is read once (a record stored in several overlapping batches is read from the
first, as :class:`~cogbert_cloud.data.dataset.ExperienceDataset` does), and each ``(session,
step)`` of a member is taken once; a step some member has no record for is left out and counted
(``incomplete``), a member's second record of the same ``(session, step)`` is dropped and counted
(``duplicates``). So a joint step reaches the trainer exactly once, or not at all and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cogbert_cloud.data.dataset import ExperienceDataset
from cogbert_edge.errors import ConfigError
from cogbert_edge.wire.records import DONE, TRUNCATED

__all__ = ["JointEpisode", "JoinReport", "join_site"]


@dataclass
class JointEpisode:
    """One site episode as the trainer consumes it; ``T`` joint steps, ``A`` agents."""

    site: str
    session: str
    steps: np.ndarray      # [T] step in the episode
    obs: np.ndarray        # [T, A, obs_dim] local observations (the agent id stripped)
    actions: np.ndarray    # [T, A]
    log_prob: np.ndarray   # [T, A] each agent's behaviour log-probability of its own action
    reward: np.ndarray     # [T, A]
    done: np.ndarray       # [T] the episode ended after this step (terminated or truncated)
    state: np.ndarray      # [T, A * obs_dim + 1] the global state
    models: list[list[str]]  # [T][A] model version that decided


@dataclass
class JoinReport:
    episodes: list[JointEpisode] = field(default_factory=list)
    joint_steps: int = 0
    incomplete: int = 0       # (session, step) that some member has no record of
    duplicates: int = 0       # a member's extra records of one (session, step)
    records: dict[str, int] = field(default_factory=dict)   # member -> records read


def join_site(dataset: ExperienceDataset, fleet: str, site: str, members: list[str], *,
              episode_length: int) -> JoinReport:
    """The joint episodes of ``site`` (``members`` in agent-index order) from ``dataset``."""
    if not members or len(set(members)) != len(members):
        raise ConfigError(f"a site needs distinct members, got {members!r}")
    if episode_length < 1:
        raise ConfigError(f"episode_length must be >= 1, got {episode_length}")
    A = len(members)
    report = JoinReport()
    rows: list[dict[tuple[str, int], tuple]] = []
    for m in members:
        got: dict[tuple[str, int], tuple] = {}
        covered = 0
        n = 0
        for b in dataset.batches(fleet, m):
            start = max(0, covered + 1 - b.first)      # records up to `covered` were read already
            for r in range(start, b.n):
                session = b.sessions[b.session_idx[r]]
                key = (session, int(b.step[r]))
                n += 1
                if key in got:
                    report.duplicates += 1
                    continue
                got[key] = (b.obs[r], int(b.action[r]), float(b.log_prob[r]), float(b.reward[r]),
                            bool(b.flags[r] & (DONE | TRUNCATED)), b.models[b.model_idx[r]])
            covered = max(covered, b.last)
        rows.append(got)
        report.records[m] = n
    keys = set().union(*[set(g) for g in rows])
    complete = sorted(k for k in keys if all(k in g for g in rows))
    report.incomplete = len(keys) - len(complete)
    by_session: dict[str, list[int]] = {}
    for session, step in complete:
        by_session.setdefault(session, []).append(step)
    for session, steps in sorted(by_session.items()):
        steps.sort()
        per = [[g[(session, s)] for g in rows] for s in steps]
        obs_full = np.stack([np.stack([np.asarray(x[0], np.float32) for x in row]) for row in per])
        obs = obs_full[..., :obs_full.shape[-1] - A]      # the actor input ends with the one-hot id
        T = len(steps)
        prog = (np.asarray(steps, np.float32) / episode_length)[:, None]
        ep = JointEpisode(
            site=site, session=session, steps=np.asarray(steps), obs=obs,
            actions=np.array([[x[1] for x in row] for row in per], np.int64),
            log_prob=np.array([[x[2] for x in row] for row in per], np.float32),
            reward=np.array([[x[3] for x in row] for row in per], np.float32),
            done=np.array([any(x[4] for x in row) for row in per]),
            state=np.concatenate([obs.reshape(T, -1), prog], axis=1).astype(np.float32),
            models=[[x[5] for x in row] for row in per])
        report.episodes.append(ep)
        report.joint_steps += T
    return report
