"""Reading a tune config file: the examples load, a key given twice is refused (at the top
and inside a section), and bad YAML or a missing file are errors naming the file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from fleetlm.errors import ConfigError
from fleetlm.tune.config import load_config

CONFIG = """
name: t
task:
  type: classification
data:
  path: train.csv
train:
  rank: 8
  learning_rate: 0.001
"""


def write(tmp_path: Path, text: str, name: str = "tune.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_a_config_loads_with_paths_from_its_folder(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, CONFIG))
    assert cfg.data.paths == [tmp_path / "train.csv"] and cfg.train.rank == 8


@pytest.mark.parametrize("example", ["banking77.yaml", "clinc150.yaml"])
def test_the_example_configs_are_valid(example: str) -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / example
    assert load_config(path).name == example.removesuffix(".yaml")


def test_a_top_level_key_given_twice_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG + "name: u\n")
    with pytest.raises(ConfigError, match="key 'name' is given twice in one mapping; keep one"
                       ) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: not valid YAML: ")


def test_a_key_given_twice_inside_a_section_is_refused(tmp_path: Path) -> None:
    # PyYAML alone would keep the second rank (16) without a word
    path = write(tmp_path, CONFIG + "  rank: 16\n")
    with pytest.raises(ConfigError, match="key 'rank' is given twice") as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: ") and "line 10" in str(e.value)
    twice = CONFIG.replace("train:\n", "task:\n  type: chat\ntrain:\n")
    with pytest.raises(ConfigError, match="key 'task' is given twice"):
        load_config(write(tmp_path, twice, "sections.yaml"))


def test_bad_yaml_and_a_missing_file_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"tune config {missing} does not exist; pass the path "
                       "of a YAML file"):
        load_config(missing)
    bad = write(tmp_path, "name: t\ntask: [classification\n", "bad.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert str(e.value).startswith(f"{bad}: not valid YAML: ")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'list.yaml'}: the tune config must be "
                       "a mapping of keys, got list"):
        load_config(write(tmp_path, "- name\n", "list.yaml"))


def test_field_problems_are_listed_under_the_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, CONFIG + "  rnak: 4\nseed: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: 2 problem(s) in the tune config:\n")
    assert "  train.rnak: unknown key (check the spelling; see docs/tuning.md for every key)" \
        in msg and "  seed: " in msg
