"""Steps 5 and 6, train and gate: environments (``envs/``), trainers (``train/``: PPO in
simulation, V-trace on fleet logs, export), off-policy evaluation (``ope``), the promotion
gate (``gate``) and the heuristic baselines (``baseline``)."""
