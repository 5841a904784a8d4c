"""The long-running composition (``serve``), the operator API (``api``), the continuous-learning
loop (``loop``), and the one-machine demo and its report (``demo``, ``report``)."""
