"""Regular expressions from an adapter_config.json run in bounded time: a pattern that
backtracks catastrophically under Python's ``re`` is validated (accepted or refused) in
well under a second, and what RE2 cannot run (lookaround, backreferences) or what is too
long is refused with the key named and the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fleetlm.adapters import AdapterError, AdapterStore
from fleetlm.adapters.random import make_random_adapter
from fleetlm.models.config import LlamaConfig

HOSTILE = "(([a-z_.0-9])+)+Z"  # exponential backtracking in `re` on any module name

# each case: adapter_config.json changes that put HOSTILE where PEFT runs it as a regex
CASES: dict[str, dict[str, Any]] = {
    "target_modules": {"target_modules": HOSTILE},
    "exclude_modules": {"exclude_modules": HOSTILE},
    "rank_pattern": {"rank_pattern": {HOSTILE: 2}},
    "alpha_pattern": {"alpha_pattern": {HOSTILE: 3.0}},
    "layers_pattern": {"target_modules": ["q_proj"], "layers_to_transform": [0],
                       "layers_pattern": HOSTILE},
}

# run in a child process: under `re` the hostile pattern never returns, and a thread
# stuck in the regex engine would hold the GIL, so only a process can be given a deadline
CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from fleetlm.adapters import AdapterError
    from fleetlm.adapters.peft_format import inspect_folder
    from fleetlm.adapters.random import make_random_adapter
    from fleetlm.models.loader import read_config

    base_folder, work, cases = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    cfg = read_config(base_folder)
    inspect_folder("warm-up", make_random_adapter(work / "warm-up", cfg, rank=4), cfg, 64)
    for case, changes in cases.items():
        folder = make_random_adapter(work / case, cfg, rank=4)
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
        t = time.perf_counter()
        try:
            inspect_folder(case, folder, cfg, 64)
            outcome = "accepted"
        except AdapterError as e:
            outcome = "refused: " + str(e)
        print(json.dumps({"case": case, "seconds": time.perf_counter() - t,
                          "outcome": outcome}), flush=True)
""")


def test_hostile_patterns_are_validated_within_a_second(tmp_path: Path, tiny_base: Path) -> None:
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_base), str(tmp_path),
                               json.dumps(CASES)], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"validation did not finish in 90 s (catastrophic backtracking); "
                    f"finished cases: {out!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["case"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(results) == set(CASES)
    for case, r in results.items():
        assert r["seconds"] < 1.0, (case, r)
    # PEFT would select no module with it: the weights are then unexpected
    assert results["target_modules"]["outcome"].startswith("refused: ")
    assert "do not select" in results["target_modules"]["outcome"]
    for case in ("exclude_modules", "rank_pattern", "alpha_pattern"):
        assert results[case]["outcome"] == "accepted", results[case]


def _adapter_with(tmp_path: Path, base_cfg: LlamaConfig, changes: dict[str, Any]) -> Path:
    """A random rank-4 adapter whose adapter_config.json has ``changes`` applied."""
    folder = make_random_adapter(tmp_path / "src", base_cfg, rank=4)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("changes, key", [
    ({"rank_pattern": {"q(?=_proj)": 2}}, "rank_pattern key 'q(?=_proj)'"),
    ({"alpha_pattern": {"(?<!k)_proj": 2.0}}, "alpha_pattern key '(?<!k)_proj'"),
    ({"target_modules": r".*(q)_pro(?!x)j"}, r"target_modules '.*(q)_pro(?!x)j'"),
    ({"exclude_modules": r"(.*)\1"}, r"exclude_modules '(.*)\\1'"),
    ({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "(?=layers)layers"},
     "layers_pattern '(?=layers)layers'"),
])
def test_patterns_re2_cannot_run_are_refused(tmp_path: Path, base_cfg: LlamaConfig,
                                             changes: dict[str, Any], key: str) -> None:
    folder = _adapter_with(tmp_path, base_cfg, changes)
    store = AdapterStore(tmp_path / "store", base_cfg)
    with pytest.raises(AdapterError) as e:
        store.add(folder, name="la")
    msg = str(e.value)
    assert key in msg, msg
    assert "RE2" in msg and "lookaround" in msg and "backreferences" in msg, msg
    assert list(store.root.iterdir()) == []


@pytest.mark.parametrize("changes, key", [
    ({"rank_pattern": {"q_proj|" + "x" * 1000: 4}}, "rank_pattern key"),
    ({"target_modules": "(q_proj|" + "x" * 1000 + ")"}, "target_modules"),
    ({"exclude_modules": "x" * 1001}, "exclude_modules"),
])
def test_overlong_patterns_are_refused(tmp_path: Path, base_cfg: LlamaConfig,
                                       changes: dict[str, Any], key: str) -> None:
    folder = _adapter_with(tmp_path, base_cfg, changes)
    with pytest.raises(AdapterError, match=f"{key}.* characters long; the limit is 1000"):
        AdapterStore(tmp_path / "store", base_cfg).add(folder)


def test_too_many_pattern_keys_are_refused(tmp_path: Path, base_cfg: LlamaConfig) -> None:
    folder = _adapter_with(tmp_path, base_cfg, {"rank_pattern": {f"layers\\.{i}\\.q_proj": 4 for i in range(1001)}})
    with pytest.raises(AdapterError, match="rank_pattern has 1001 keys; the limit is 1000"):
        AdapterStore(tmp_path / "store", base_cfg).add(folder)


def test_invalid_regex_still_named(tmp_path: Path, base_cfg: LlamaConfig) -> None:
    folder = _adapter_with(tmp_path, base_cfg, {"rank_pattern": {"q_proj(": 4}})
    with pytest.raises(AdapterError, match=r"rank_pattern key 'q_proj\(' is not a valid regular "
                                           r"expression"):
        AdapterStore(tmp_path / "store", base_cfg).add(folder)
