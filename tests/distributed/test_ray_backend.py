"""`run --backend ray` on a local Ray cluster started here (ray.init(num_cpus=2)): the same bytes as the
local backend, a worker SIGKILLed mid-shard leaves no partial shard and the job completes on Ray's
retry or on --resume. Skipped when the `ray` extra is not installed (the option checks run anyway). The
cluster tests are `slow` (pytest -m slow tests/distributed): starting the cluster and its workers, each
importing torch, takes 30-60 s on 2 shared cores."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from conftest import write_yaml
from streammerge import RunOptions
from streammerge.cli import main
from streammerge.errors import ConfigError, OutputError, StreammergeError
from streammerge.merge import run

HOOKS = Path(__file__).resolve().parent / "hooks"
SHARD = 100_000   # bytes: the tiny family's ties merge comes out in several shards


def _config(family) -> dict:
    base, experts = family
    return {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
            "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.5}} for e in experts]}


def _opts(**kw) -> RunOptions:
    return RunOptions(max_memory=1 << 30, progress=False, out_shard_size=SHARD, chunk_rows=8, **kw)


def _files(d: Path) -> dict[str, object]:
    """Every file of an output folder but the lock (whose bytes mean nothing), the manifest included
    (it lists the shards in plan order, whatever order the workers finished them in)."""
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file() and f.name != "lock"}


@pytest.fixture(scope="module")
def ties_cfg(tiny_family, tmp_path_factory) -> Path:
    return write_yaml(tmp_path_factory.mktemp("ray_cfg") / "ties.yml", _config(tiny_family))


@pytest.fixture(scope="module")
def local_out(ties_cfg, tmp_path_factory) -> tuple[Path, Path]:
    tmp, cfg = tmp_path_factory.mktemp("ray_local"), ties_cfg
    run(cfg, tmp / "out", _opts())
    assert len(list((tmp / "out").glob("model-*.safetensors"))) >= 3
    return cfg, tmp / "out"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local cluster for the module; its workers load hooks/sitecustomize.py (the kill switch)."""
    ray = pytest.importorskip("ray")
    kill_dir = tmp_path_factory.mktemp("kill")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(HOOKS), *sys.path]))
        mp.setenv("STREAMMERGE_TEST_KILL_DIR", str(kill_dir))
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 object_store_memory=80 << 20)
    yield kill_dir
    ray.shutdown()


@pytest.mark.slow
def test_ray_run_is_byte_identical_to_local(cluster, local_out, tmp_path):
    cfg, ref = local_out
    report = run(cfg, tmp_path / "out", _opts(backend="ray"))
    assert _files(tmp_path / "out") == _files(ref)
    assert [s.filename for s in report.shards] == sorted(p.name for p in ref.glob("model-*.safetensors"))
    assert all(not s.skipped and s.bytes_written > 0 and s.bytes_read > 0 for s in report.shards)


@pytest.mark.slow
def test_worker_killed_mid_shard_is_retried_and_leaves_no_partial(cluster, local_out, tmp_path):
    cfg, ref = local_out
    (cluster / "arm").touch()
    run(cfg, tmp_path / "out", _opts(backend="ray"))
    assert (cluster / "fired").exists(), "no worker was killed: the test proves nothing"
    (cluster / "fired").unlink()
    assert not list((tmp_path / "out").rglob("*.partial"))
    assert _files(tmp_path / "out") == _files(ref)


@pytest.mark.slow
def test_worker_killed_without_retries_then_resume_reruns_only_missing_shards(cluster, local_out, tmp_path,
                                                                              monkeypatch):
    from streammerge import ray_backend

    cfg, ref = local_out
    out = tmp_path / "out"
    monkeypatch.setattr(ray_backend, "MAX_RETRIES", 0)
    (cluster / "arm").touch()
    with pytest.raises(OutputError, match="--resume"):
        run(cfg, out, _opts(backend="ray"))
    assert (cluster / "fired").exists()
    (cluster / "fired").unlink()
    killed = Path((cluster / "killed_in").read_text())
    assert not killed.exists(), "a partial shard was left under its final name"
    assert not (out / "model.safetensors.index.json").exists()
    recorded = set(json.loads((out / ".streammerge" / "manifest.json").read_text())["shards"])
    assert killed.name not in recorded
    kept = {name: (out / name).stat().st_ino for name in recorded}

    report = run(cfg, out, _opts(backend="ray", resume=True))
    assert {s.filename for s in report.shards if s.skipped} == recorded
    assert {name: (out / name).stat().st_ino for name in recorded} == kept  # not rewritten
    assert _files(out) == _files(ref) and not list(out.rglob("*.partial"))


@pytest.mark.slow
def test_batch_on_ray_runs_each_stage_to_the_local_bytes(cluster, tiny_family, tmp_path, monkeypatch):
    """`batch --backend ray`: every stage of a two-stage recipe is a Ray run (one task per shard), its
    tensors byte-identical to the local batch's; the later stage reads the earlier one's output."""
    import yaml

    from streammerge import ray_backend

    sent: list[int] = []
    real = ray_backend.ray_shards
    monkeypatch.setattr(ray_backend, "ray_shards", lambda *a, **kw: sent.append(1) or real(*a, **kw))
    base, experts = tiny_family
    first = {"name": "s1", **_config((base, experts[:2]))}
    second = {"name": "s2", "merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": "s1", "parameters": {"weight": 0.5}},
                         {"model": str(experts[2]), "parameters": {"weight": 0.5}}]}
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump_all([first, second], sort_keys=False))
    flags = ["--no-progress", "--out-shard-size", str(SHARD)]
    assert main(["batch", str(recipe), str(tmp_path / "local"), *flags]) == 0
    assert not sent
    assert main(["batch", str(recipe), str(tmp_path / "ray"), "--backend", "ray", *flags]) == 0
    assert len(sent) == 2, "each stage goes to Ray"
    for stage in ("s1", "s2"):
        local, on_ray = (sorted((tmp_path / d / stage).glob("*.safetensors")) for d in ("local", "ray"))
        assert len(local) >= 3 and [f.name for f in local] == [f.name for f in on_ray]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(local, on_ray)), stage
    # the first stage names no folder of the batch, so even its manifest is the same
    assert _files(tmp_path / "local" / "s1") == _files(tmp_path / "ray" / "s1")


def test_missing_ray_is_a_clear_error(ties_cfg, tmp_path, monkeypatch):
    cfg = ties_cfg
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(StreammergeError, match=r"pip install 'streammerge\[ray\]'"):
        run(cfg, tmp_path / "out", _opts(backend="ray"))


def test_backend_options_are_checked():
    with pytest.raises(ConfigError, match="--backend"):
        RunOptions(backend="spark")
    with pytest.raises(ConfigError, match="--address"):
        RunOptions(ray_address="127.0.0.1:6379")
    assert RunOptions(backend="ray", ray_address="auto").ray_address == "auto"


def test_cli_address_without_ray_backend_is_refused(ties_cfg, tmp_path, capsys):
    cfg = ties_cfg
    assert main(["run", str(cfg), str(tmp_path / "o"), "--address", "127.0.0.1:1", "--no-progress"]) != 0
    assert "--address" in capsys.readouterr().err
