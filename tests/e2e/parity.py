"""Run mergekit 0.1.5 in-process on the same YAML and inputs (the parity oracle; never a runtime dependency)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


def mergekit_or_skip():
    try:
        import mergekit
        from importlib.metadata import version
    except ImportError:
        pytest.skip("mergekit is not installed: `pip install -e .[parity]` runs the parity tests")
    v = version("mergekit")
    if v != "0.1.5":
        pytest.skip(f"parity is defined against mergekit 0.1.5, found {v}")


def run_mergekit(config: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    cfg = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    run_merge(cfg, str(out), MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False, quiet=True,
                                          random_seed=0))
    return out
