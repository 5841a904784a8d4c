"""Export's post-training check: a sound quantization passes; one that breaks the policy is
refused with its numbers."""

import numpy as np
import pytest

from cogbert_cloud.learn.baseline import soft_heuristic
from cogbert_cloud.learn.train.export import ExportRefused, export_bundle
from cogbert_edge import Bundle, load_bundle

ENV = "ProductionChain-v0"
SHORT = {"episode_length": 64}


def test_a_sound_int8_export_passes_and_records_its_check():
    fp32 = soft_heuristic(4.0, width=32)
    out, report = export_bundle(fp32, ENV, bits=8, episodes=40, env_kwargs=SHORT)
    assert report["action_agreement"] > 0.95 and report["return_drop"] - 2 * report["return_drop_se"] <= 0.02
    again = load_bundle(out.to_bytes())
    assert again.quant and "x-export" in again.extra and "x-golden" in again.extra


def test_a_quantization_that_breaks_the_policy_is_refused_with_the_numbers():
    # One large weight in each rule unit's g-gate row, on an input that is always zero: fp32
    # does not see it, but it sets the quantization group's scale, and the rule's own weights
    # (0.5) round to zero, so the quantized policy forgets the rule.
    fp32 = soft_heuristic(4.0, width=32)
    p = {k: np.array(v) for k, v in fp32.tensors.items()}
    p["encoder.0.weight"][31], p["encoder.0.bias"][31] = 0.0, 0.0
    for unit in range(6):
        p["lstm.ih.weight"][2 * 32 + unit, 31] = 1000.0
    broken = Bundle.create(fp32.config, p)
    with pytest.raises(ExportRefused, match=r"int8 loses .*--bits 32"):
        export_bundle(broken, ENV, bits=8, episodes=40, env_kwargs=SHORT)
    _, report = export_bundle(broken, ENV, bits=32, episodes=40, env_kwargs=SHORT)   # fp32 is the way out
    assert report["return_drop"] == 0
