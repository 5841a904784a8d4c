"""The demo's report: ``report.md``, ``metrics.json`` and PNG plots (return per release,
decision latency histogram, rollout timeline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["write_report"]


def write_report(out: Path, summary: dict, *, latencies_us: list[float], audit: list[dict]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=1, default=str))
    files = [out / "metrics.json"]

    # Return per release.
    fig, ax = plt.subplots(figsize=(7, 3.6))
    rel = [r for r in summary["rounds"] if r.get("mean_return") is not None]
    labels = ["initial"] + [f"r{r['round']}: #{r['release']}" for r in rel]
    values = [summary["initial"]["mean_return"]] + [r["mean_return"] for r in rel]
    colors = ["#888"] + [{"promoted": "#2a7", "rolled_back": "#c33"}.get(r["decision"], "#bb7") for r in rel]
    ax.bar(labels, values, color=colors)
    if summary.get("heuristic_return") is not None:
        ax.axhline(summary["heuristic_return"], ls="--", color="#555", lw=1, label="heuristic baseline")
        ax.legend(loc="best", fontsize=8)
    ax.set_ylabel("mean episode return (simulation)")
    ax.set_title("Return per release (green promoted, red rolled back, yellow rejected)")
    fig.tight_layout()
    fig.savefig(out / "returns.png", dpi=110)
    plt.close(fig)
    files.append(out / "returns.png")

    # Decision latency.
    fig, ax = plt.subplots(figsize=(7, 3.4))
    lat = np.asarray(latencies_us)
    if lat.size:
        ax.hist(np.clip(lat, 0, np.percentile(lat, 99.5)), bins=60, color="#37a")
        for q, ls in ((50, "-"), (99, "--")):
            ax.axvline(np.percentile(lat, q), color="k", ls=ls, lw=1, label=f"p{q} {np.percentile(lat, q):.0f} µs")
        ax.legend(fontsize=8)
    ax.set_xlabel("decision latency through Policy.act (µs)")
    ax.set_ylabel("decisions")
    ax.set_title(f"Decision latency of the final stable release ({summary.get('backend', '?')} backend)")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    files.append(out / "latency.png")

    # Rollout timeline from the audit log.
    fig, ax = plt.subplots(figsize=(8, 3.8))
    t0 = summary.get("started_at", 0.0)
    marks = {"rollout_started": ("o", "#37a"), "stage_analysed": ("s", "#999"), "rollout_promoted": ("^", "#2a7"),
             "rollout_aborted": ("X", "#c33"), "release_registered": (".", "#555")}
    rows: dict[int, int] = {}
    for e in audit:
        if e["event"] not in marks or "time_s" not in e:
            continue
        counter = e.get("candidate") or e.get("counter") or 0
        y = rows.setdefault(counter, len(rows))
        m, c = marks[e["event"]]
        ax.scatter(e["time_s"] - t0, y, marker=m, color=c, s=50, zorder=3)
        if e["event"] in ("rollout_promoted", "rollout_aborted"):
            ax.annotate(e["event"].split("_")[1], (e["time_s"] - t0, y), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)
    ax.set_yticks(list(rows.values()), [f"release {k}" for k in rows])
    ax.set_xlabel("seconds since the demo started")
    ax.set_title("Rollout timeline (o start, s stage analysed, ^ promoted, X rolled back)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "rollouts.png", dpi=110)
    plt.close(fig)
    files.append(out / "rollouts.png")

    (out / "report.md").write_text(_markdown(summary))
    files.append(out / "report.md")
    return files


def _markdown(s: dict) -> str:
    lines = [
        "# Cogbert demo report", "",
        f"{s['devices']} simulated devices ran {s['env']} over mutual-TLS MQTT; {len(s['rounds'])} rounds of "
        "collect -> retrain -> gate -> sign -> canary -> promote, "
        f"in {s['seconds']:.0f} s.", "",
        f"- Initial release: mean return **{s['initial']['mean_return']:.1f}**; final stable release "
        f"#{s['final']['release']}: **{s['final']['mean_return']:.1f}** "
        f"(improvement {s['improvement_pct']:+.1f} %).",
        *([f"- The heuristic the plant runs today: **{s['heuristic_return']:.1f}** on the same seeds; the final "
           f"release is {s['gain_vs_heuristic_pct']:+.1f} % against it"
           + (f" (95 % interval ±{s['gain_vs_heuristic_ci95_pct']:.1f} %, {s['eval_episodes']} paired episodes)."
              if s.get("gain_vs_heuristic_ci95_pct") is not None else ".")]
          if s.get("gain_vs_heuristic_pct") is not None else []),
        f"- Rolled back automatically: {', '.join(f'#{r}' for r in s['rolled_back']) or 'none'}.",
        f"- Experience: {s['experience']['logged']} records logged by devices, {s['experience']['stored']} stored, "
        f"**{s['lost_records']} lost**, {s['experience']['duplicates']} duplicates, {s['experience']['gaps']} gaps.",
        "", "| round | release | decision | mean return | gate | rollout |", "|---|---|---|---|---|---|"]
    for r in s["rounds"]:
        gate = r.get("gate") or {}
        ret = "-" if r.get("mean_return") is None else f"{r['mean_return']:.1f}"
        rollout = "; ".join(r.get("rollout_reasons") or []) or r.get("reason") or r.get("rollout", "-")
        release = "-" if r.get("release") is None else f"#{r['release']}"
        verdict = gate.get("decision", "-")
        if "bypassed" in gate:
            verdict = f"bypassed (would {gate['bypassed']['decision']})"
        lines.append(f"| {r['round']} | {release} | {r['decision']} | {ret} | {verdict} | "
                     f"{rollout[:200]} |")
    lines += ["", "![return per release](returns.png)", "", "![decision latency](latency.png)", "",
              "![rollout timeline](rollouts.png)", "", "Full numbers: `metrics.json`."]
    return "\n".join(lines) + "\n"
