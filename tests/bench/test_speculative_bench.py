"""``fleetlm bench speculative`` end to end on the embedded model (short settings): both
runs in the JSON, fewer steps with drafts, identical greedy tokens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FLEETLM = shutil.which("fleetlm", path=str(Path(sys.executable).parent))


def test_bench_speculative_writes_json_with_identical_tokens(tmp_path):
    out = tmp_path / "spec.json"
    fleetlm = FLEETLM
    assert fleetlm, "the fleetlm entry point is not installed in this environment"
    r = subprocess.run([fleetlm, "bench", "speculative", "--no-compile", "--requests", "1",
                        "--passage-words", "30", "--max-new-tokens", "24",
                        "--draft-model", "smollm2-135m", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    plain, spec = data["runs"]["plain"], data["runs"]["speculative"]
    assert data["greedy_identical"] is True
    assert plain["generated_tokens"] == spec["generated_tokens"] > 0
    assert spec["steps"] < plain["steps"]  # the copied passage is drafted and accepted
    assert 0 < spec["draft_tokens_accepted"] <= spec["draft_tokens_proposed"]
    assert spec["acceptance"] == round(spec["draft_tokens_accepted"] / spec["draft_tokens_proposed"], 3)
    assert "acceptance" not in plain and len(plain["decode_tok_s_per_request"]) == 1
    assert data["speedup"] > 0
    # the model as its own draft: whatever it proposes where prompt lookup found nothing is
    # accepted, so it takes no more steps than prompt lookup alone, for the same tokens
    drafted = data["runs"]["draft_model"]
    assert drafted["generated_tokens"] == plain["generated_tokens"]
    assert drafted["steps"] <= spec["steps"] and drafted["draft_model_tokens_proposed"] >= 0
    assert data["speedup_draft_model"] > 0


def test_bench_speculative_refuses_a_bad_setting():
    r = subprocess.run([FLEETLM, "bench", "speculative", "--speculative-tokens",
                        "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "speculative_tokens=0: must be >= 1" in r.stderr
