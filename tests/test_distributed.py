"""Data-parallel training with mlx.distributed: two processes on the ring backend make the
same update as one process with the combined batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# Float sums in another order: parameters after one Adam step agree to ~1e-7 here.
TOL = 1e-5


def test_two_processes_make_the_same_update_as_one_with_the_combined_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    single = tmp_path / "single.npz"
    subprocess.run([sys.executable, str(ROOT / "tests" / "dp_worker.py"), str(single)], env=env, check=True,
                   timeout=300)
    launch = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
    double = tmp_path / "double.npz"
    proc = subprocess.run([launch, "--backend", "ring", "--hosts", "127.0.0.1", "-n", "2", sys.executable,
                           str(ROOT / "tests" / "dp_worker.py"), str(double)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    a, b = np.load(single), np.load(double)
    assert set(a.files) == set(b.files)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a.files)
    assert worst <= TOL, worst
    # and the update is not a no-op (a test that could not fail would prove nothing)
    from cogbert_cloud.learn.train.ppo import PPOConfig, PPOTrainer
    from cogbert_edge.inference.model import init_params
    t = PPOTrainer(PPOConfig(env="CartPoleNoVel-v1", num_envs=4, encoder=(16,), hidden=16, seed=3))
    init = init_params(t.model, 3, policy_gain=0.01)
    assert max(float(np.abs(a[k] - init[k]).max()) for k in a.files) > 1e-3
