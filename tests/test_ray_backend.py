"""--backend ray on a local Ray cluster started here: byte-identical to the local backend, and a worker
killed mid-shard leaves no shard under its final name while the job completes on Ray's retry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import write_yaml

ray = pytest.importorskip("ray")

from streammerge.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    marker = tmp_path_factory.mktemp("fault") / "died"
    marker.write_text("armed: remove to make shard 0's next first attempt die\n")
    old = os.environ.get("STREAMMERGE_RAY_FAULT")
    os.environ["STREAMMERGE_RAY_FAULT"] = f"0:{marker}"  # the workers inherit it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield marker
    ray.shutdown()
    if old is None:
        os.environ.pop("STREAMMERGE_RAY_FAULT", None)
    else:
        os.environ["STREAMMERGE_RAY_FAULT"] = old


def _config(tmp_path, family) -> Path:
    base, experts = family
    return write_yaml(tmp_path / "ties.yml", {
        "merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
        "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]})


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")}


def test_ray_output_is_byte_identical_to_local(cluster, tmp_path, tiny_family, capsys):
    cfg = _config(tmp_path, tiny_family)
    common = ["--no-progress", "--out-shard-size", "200KiB"]
    assert main(["run", str(cfg), str(tmp_path / "local"), *common]) == 0
    assert main(["run", str(cfg), str(tmp_path / "ray"), *common, "--backend", "ray"]) == 0, capsys.readouterr().err
    local = _shards(tmp_path / "local")
    assert len([n for n in local if n.endswith(".safetensors")]) >= 2
    assert _shards(tmp_path / "ray") == local


def test_a_worker_killed_mid_shard_is_retried_and_leaves_no_partial_shard(cluster, tmp_path, tiny_family, capsys):
    cfg = _config(tmp_path, tiny_family)
    common = ["--no-progress", "--out-shard-size", "200KiB"]
    assert main(["run", str(cfg), str(tmp_path / "local"), *common]) == 0
    cluster.unlink()  # arm the fault: shard 0's first attempt exits its worker after one band
    assert main(["run", str(cfg), str(tmp_path / "ray"), *common, "--backend", "ray"]) == 0, capsys.readouterr().err
    assert cluster.exists()  # the worker did die once
    assert not list((tmp_path / "ray").glob("*.partial"))
    assert _shards(tmp_path / "ray") == _shards(tmp_path / "local")
