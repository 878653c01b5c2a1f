"""README's table of which category-alignment head each shipped config uses is the configs' truth."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `(configs/[\w.-]+\.yaml)` \| (language|union|decoupled) \|")


def readme_heads() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    return {m.group(1): m.group(2) for m in map(ROW.match, text.splitlines()) if m}


def test_readme_says_which_head_every_training_config_uses():
    """Every config that trains a model (not a PEFT stage: those keep their base's head) is a row
    of the README's head table, and the row's head is the config's (bugs caught: a config's head
    changed without the README, e.g. the demo switched to the union head while the README still
    says language; a new config left out of the table; a row for a config that no longer exists)."""
    from ppt.config import load_config

    documented = readme_heads()
    training = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")
                      if "peft" not in (yaml.safe_load(p.read_text()) or {}))
    assert sorted(documented) == training
    for config, head in documented.items():
        assert load_config(ROOT / config).model.head == head, config
