"""``cogbert cloud plot RUN_DIR``: a training run's learning curve, from its ``metrics.jsonl``, to PNG.

The top panel is the mean return of the last 20 finished episodes against environment steps
(PPO), the bottom one the losses; a V-trace run (no episodes) plots its losses against
sequences. The figure goes to ``RUN_DIR/learning-curve.png`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cogbert_edge.errors import ConfigError

__all__ = ["register", "plot_run"]


def register(csub: argparse._SubParsersAction) -> None:
    p = csub.add_parser("plot", help="draw a training run's learning curve (metrics.jsonl) to PNG")
    p.add_argument("run_dir", type=Path, help="the --out directory of cogbert cloud train")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/learning-curve.png)")
    p.set_defaults(func=lambda a: print(plot_run(a.run_dir, a.out)) or 0)


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: pass the --out directory of a training run")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(f"{path}:{n}: not a JSON line") from None
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        raise ConfigError(f"{path} holds no metrics yet")
    return rows


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the run's learning curve; returns the PNG's path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(Path(run_dir) / "metrics.jsonl")
    x_key = "steps" if "steps" in rows[0] else "sequences"
    title = Path(run_dir).name
    train = Path(run_dir) / "train.json"
    if train.is_file():
        try:
            info = json.loads(train.read_text())
            title = f"{info.get('env') or info.get('data') or title} ({info.get('mode', '')})"
        except ValueError:
            pass
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    xs = [r.get(x_key, i) for i, r in enumerate(rows)]
    ret = [(x, r["episode_return"]) for x, r in zip(xs, rows, strict=True) if r.get("episode_return") is not None]
    if ret:
        top.plot([p[0] for p in ret], [p[1] for p in ret], color="C0")
        top.set_ylabel("episode return (last 20)")
    else:
        top.text(0.5, 0.5, "no finished episodes (fleet data)", ha="center", va="center", transform=top.transAxes)
    top.set_title(title)
    top.grid(alpha=0.3)
    for i, key in enumerate(("loss", "pg_loss", "v_loss", "entropy")):
        pts = [(x, r[key]) for x, r in zip(xs, rows, strict=True) if isinstance(r.get(key), (int, float))]
        if pts:
            bottom.plot([p[0] for p in pts], [p[1] for p in pts], label=key, color=f"C{i + 1}")
    bottom.set_xlabel(x_key)
    bottom.set_ylabel("loss")
    bottom.legend(loc="best", fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "learning-curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
