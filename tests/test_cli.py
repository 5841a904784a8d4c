"""The commands, run as real processes the way users run them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cogbert_edge import load_bundle


def run(*args: str, ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent
    cmd = [str(exe / args[0]), *args[1:]]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, **(env or {})})
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_bundle_init_quantize_inspect(tmp_path):
    fp32, int4 = tmp_path / "m.safetensors", tmp_path / "m4.safetensors"
    run("cogbert", "bundle", "init", "--obs-dim", "64", "--hidden", "256", "--actions", "8", "--seed", "3",
        str(fp32))
    run("cogbert", "bundle", "quantize", str(fp32), str(int4), "--bits", "4", "--group-size", "32")
    info = json.loads(run("cogbert", "bundle", "inspect", str(int4), "--json").stdout)
    src = load_bundle(fp32)
    assert info["parent"] == src.model_id
    assert info["quantization"]["label"] == "int4"
    assert info["quantization"]["layers"]["lstm.hh"] == {"bits": 4, "group_size": 32}
    assert info["config"]["hidden"] == 256 and info["bytes"] == int4.stat().st_size
    assert "lstm.hh" in run("cogbert", "bundle", "inspect", str(int4)).stdout


def test_same_seed_gives_the_same_weights(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for p in (a, b):
        run("cogbert", "bundle", "init", "--seed", "9", "--model-id", "same", str(p))
    ta, tb = load_bundle(a).tensors, load_bundle(b).tensors
    assert all((ta[k] == tb[k]).all() for k in ta)


def test_broken_bundle_is_a_clear_error_and_exit_code_2(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\0\0\0\0\0\0\0{}")
    p = run("cogbert", "bundle", "inspect", str(bad), ok=False)
    assert p.returncode == 2 and "header claims 16 bytes" in p.stderr and "Traceback" not in p.stderr


def test_quantizing_a_quantized_bundle_is_refused(tmp_path):
    fp32, q = tmp_path / "m.safetensors", tmp_path / "q.safetensors"
    run("cogbert", "bundle", "init", "--obs-dim", "8", "--hidden", "32", "--encoder", "32", str(fp32))
    run("cogbert", "bundle", "quantize", str(fp32), str(q), "--bits", "8", "--group-size", "32")
    p = run("cogbert", "bundle", "quantize", str(q), str(tmp_path / "x.safetensors"), "--bits", "4", ok=False)
    assert p.returncode == 2 and "already quantized" in p.stderr


def test_bench_edge_json_has_a_row_per_backend_quant_and_batch():
    p = run("cogbert-bench", "edge", "--backends", "numpy", "--quant", "fp32,int8", "--batch", "1,4",
            "--steps", "30", "--warmup", "5", "--json")
    out = json.loads(p.stdout)
    assert out["suite"] == "edge" and out["model"]["hidden"] == 256
    rows = {(r["backend"], r["quant"], r["batch"]) for r in out["results"]}
    assert rows == {("numpy", q, b) for q in ("fp32", "int8") for b in (1, 4)}
    for r in out["results"]:
        assert set(r) >= {"backend", "quant", "batch", "p50_us", "p95_us", "p99_us", "decisions_per_s",
                          "bundle_bytes"}
        assert 0 < r["p50_us"] <= r["p95_us"] <= r["p99_us"] and r["decisions_per_s"] > 0


def test_bench_peer_rows_compute_the_same_model():
    p = run("cogbert-bench", "edge", "--backends", "onnxruntime", "--quant", "fp32", "--batch", "1",
            "--steps", "20", "--warmup", "2", "--json")
    (row,) = json.loads(p.stdout)["results"]
    assert row["backend"] == "onnxruntime" and row["max_abs_diff_vs_numpy"] < 1e-4


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_rolls_back_the_broken_release(tmp_path):
    """A small fleet demo: real broker, ingest, devices, training, gate and canary rollouts. The
    broken release of round 2 must be rolled back by the canary analysis, and every record the
    devices logged must be stored exactly once."""
    # Six devices, 6 s stages: the first stage's canary test then has about ten telemetry
    # intervals a cohort (measured p 0.001-0.003 for the collapsed policy).
    out = json.loads(run("cogbert", "demo", "--devices", "6", "--rounds", "2", "--initial-steps", "8192",
                         "--train-steps", "8192", "--collect-seconds", "4", "--stage-seconds", "6",
                         "--eval-episodes", "8", "--gate-sim-episodes", "8", "--workdir", str(tmp_path / "work"),
                         "--report", str(tmp_path / "report"), "--json").stdout)
    r1, r2 = out["rounds"]
    assert r1["decision"] in {"promoted", "rolled_back", "rejected_by_gate", "training_failed"}
    assert r2["injected_fault"] and r2["decision"] == "rolled_back"
    assert r2["gate"]["bypassed"]["decision"] == "reject" and r2["gate"]["bypassed"]["reasons"]
    assert out["rolled_back"][-1] == r2["release"] and out["final"]["release"] != r2["release"]
    assert out["lost_records"] == 0 and out["experience"]["duplicates"] == 0 and out["experience"]["logged"] > 0
    assert out["eval_episodes"] == 8 and out["gain_vs_heuristic_ci95_pct"] > 0
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"report.md", "metrics.json", "returns.png"}

# -- mistakes are one line and a documented exit code ------------------------------------------

def _one_line_error(p: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert p.returncode == code, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert re.match(r"^cogbert(-bench)?( [\w-]+)*: error: ", lines[0]), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_a_missing_file_is_one_line_and_exit_2(tmp_path):
    _one_line_error(run("cogbert", "bundle", "inspect", str(tmp_path / "missing.safetensors"), ok=False), 2,
                    "missing.safetensors", "No such file")
    _one_line_error(run("cogbert", "bundle", "quantize", str(tmp_path), str(tmp_path / "q"), "--bits", "8",
                        ok=False), 2, "Is a directory")


def test_bad_flags_are_one_line_and_exit_2(tmp_path):
    _one_line_error(run("cogbert", "bundle", "inspect", "--no-such-flag", "x", ok=False), 2, "--no-such-flag")
    _one_line_error(run("cogbert", "no-such-command", ok=False), 2, "invalid choice")
    _one_line_error(run("cogbert", "bundle", "quantize", "a", "b", "--bits", "7", ok=False), 2, "--bits")
    _one_line_error(run("cogbert-bench", "edge", "--no-such-flag", ok=False), 2, "--no-such-flag")
    _one_line_error(run("cogbert", "--log-level", "LOUD", "bundle", "inspect", "x", ok=False), 2, "LOUD")
    _one_line_error(run("cogbert", "device", "simulate", "--devices", "two", ok=False), 2, "devices")


def test_both_commands_print_their_version():
    from cogbert_edge import __version__
    assert run("cogbert", "--version").stdout.strip() == f"cogbert {__version__}"
    assert run("cogbert-bench", "--version").stdout.strip() == f"cogbert-bench {__version__}"


def test_simulating_with_a_bundle_that_does_not_fit_the_environment_says_why(tmp_path):
    bundle = tmp_path / "m.safetensors"
    run("cogbert", "bundle", "init", "--obs-dim", "64", "--hidden", "32", "--encoder", "32", "--actions", "8",
        str(bundle))
    p = run("cogbert", "device", "simulate", "--devices", "1", "--bundle", str(bundle), "--env",
            "ProductionChain-v0", "--pki", str(tmp_path / "pki"), ok=False)
    _one_line_error(p, 2, "does not fit ProductionChain-v0", "obs 64")


def test_run_demo_help_installs_nothing(tmp_path):
    root = Path(__file__).resolve().parent.parent
    venv = tmp_path / "venv-that-must-not-appear"
    p = subprocess.run(["bash", str(root / "run"), "demo", "--help"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COGBERT_VENV": str(venv), "COGBERT_SKIP_SYSTEM": "0",
                            "PATH": "/usr/local/bin:/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert "./run demo" in p.stdout and "--devices" in p.stdout and "COGBERT_DEMO_DEVICES" in p.stdout
    assert not venv.exists() and "installing" not in p.stderr
