"""Shared reads: stages of a batch that read the same models are built in one run that reads each
input band once; every output is byte-identical to its config run alone, the reader reads no input
byte twice, members planned for different band sizes still agree, a killed shared run resumes, and a
budget too small for the whole wave is a clear error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from streammerge.bands import pass_groups
from streammerge.batch.recipe import parse_recipe
from streammerge.batch.stages import run_stages
from streammerge.batch.wave import WaveItem, plan_wave, run_wave
from streammerge.cli import main
from streammerge.errors import BudgetError
from streammerge.io.reader import RowReader
from streammerge.options import RunOptions

from conftest import shard_bytes


def _doc(name: str, method: str, base, experts, **params) -> dict:
    doc = {"name": name, "merge_method": method, "dtype": "bfloat16",
           "models": [{"model": str(e), "parameters": {"weight": 0.5, **params}} for e in experts]}
    if method != "linear":
        doc["base_model"] = str(base)
    return doc


def _sweep(base, experts) -> list[dict]:
    return [_doc("ties3", "ties", base, experts, density=0.3), _doc("ties7", "ties", base, experts, density=0.7),
            _doc("dare", "dare_ties", base, experts, density=0.5), _doc("lin", "linear", base, experts)]


def _recipe(path: Path, docs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


@pytest.fixture
def reads(monkeypatch) -> list[tuple[str, int, int]]:
    """Every input read the reader makes: (file, offset, bytes)."""
    seen: list[tuple[str, int, int]] = []
    real = RowReader.pread_into

    def spy(self, path, offset, out, stamp=None):
        seen.append((str(Path(path).resolve()), offset, out.numel() * out.element_size()))
        return real(self, path, offset, out, stamp)

    monkeypatch.setattr(RowReader, "pread_into", spy)
    return seen


def _overlaps(spans: list[tuple[str, int, int]]) -> list[tuple]:
    by_file: dict[str, list[tuple[int, int]]] = {}
    for f, off, n in spans:
        by_file.setdefault(f, []).append((off, off + n))
    bad = []
    for f, iv in by_file.items():
        iv.sort()
        bad += [(f, a, b) for a, b in zip(iv, iv[1:]) if b[0] < a[1]]
    return bad


def test_a_sweep_reads_each_input_byte_once_and_equals_each_config_alone(tmp_path, tiny_family, reads):
    base, experts = tiny_family
    docs = _sweep(base, experts)
    recipe = _recipe(tmp_path / "r.yml", docs)
    results = run_stages(recipe, parse_recipe(recipe.read_text()), tmp_path / "out", RunOptions(progress=False))
    assert [r.shared_with for r in results][0] == ("ties7", "dare", "lin")
    assert _overlaps(reads) == [] and reads, "an input byte was read twice in the shared run"
    disk = sum(n for _, _, n in reads)
    assert results[0].wave_bytes_read == disk
    assert results[0].wave_bytes_alone == sum(r.bytes_read for r in results) > 3 * disk
    assert sum(r.bytes_read - r.bytes_shared for r in results) == disk
    reads.clear()
    for doc in docs:
        single = {k: v for k, v in doc.items() if k != "name"}
        (tmp_path / "one.yml").write_text(yaml.safe_dump(single))
        assert main(["run", str(tmp_path / "one.yml"), str(tmp_path / doc["name"]), "--no-progress"]) == 0
        assert shard_bytes(tmp_path / "out" / doc["name"]) == shard_bytes(tmp_path / doc["name"]) != {}
    assert sum(n for _, _, n in reads) == results[0].wave_bytes_alone


def test_outputs_planned_for_different_bands_and_passes_still_equal_their_runs_alone(tmp_path, tiny_family):
    """One output reads in bands of 3 rows, another of 5 (sub-bands of the group's), ties in several
    passes (rounds of the group's reads): each output's bytes are its run's alone."""
    base, experts = tiny_family
    docs = _sweep(base, experts)
    recipe = _recipe(tmp_path / "r.yml", docs)
    rows = [3, 5, 4, 16]
    items = [WaveItem(d["name"], yaml.safe_dump({k: v for k, v in d.items() if k != "name"}), tmp_path / d["name"],
                      RunOptions(progress=False, chunk_rows=r)) for d, r in zip(docs, rows)]
    wave = plan_wave(recipe, items, 8 << 30, 2)
    assert any(len(pass_groups(t)) > 1 for t in wave.plans[0].tensors), "ties should need several passes here"
    reports, disk = run_wave(recipe, wave)
    assert disk == wave.bytes_in() < wave.bytes_alone()
    for d, item in zip(docs, items):
        (tmp_path / "one.yml").write_text(item.text)
        assert main(["run", str(tmp_path / "one.yml"), str(tmp_path / f"{d['name']}-alone"), "--no-progress",
                     "--chunk-rows", "7"]) == 0
        assert shard_bytes(item.out) == shard_bytes(tmp_path / f"{d['name']}-alone") != {}


def test_a_killed_shared_run_resumes_and_keeps_its_finished_shards(tmp_path, tiny_family):
    base, experts = tiny_family
    recipe = _recipe(tmp_path / "r.yml", _sweep(base, experts)[:3])
    stages = parse_recipe(recipe.read_text())
    options = RunOptions(progress=False, out_shard_size=200_000)
    seen = {"bytes": 0}

    def stop_late(recipe_path, wave):
        def count(n):
            seen["bytes"] += n
            if seen["bytes"] >= wave.bytes_in() * 2 // 3:
                raise KeyboardInterrupt
        return run_wave(recipe_path, wave, on_progress=count)

    with pytest.raises(KeyboardInterrupt):
        run_stages(recipe, stages, tmp_path / "out", options, run_shared=stop_late)
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/*.safetensors")}
    assert kept, "the interrupted run should have finished some shards"
    assert [r.status for r in run_stages(recipe, stages, tmp_path / "out", options)] == ["resumed"] * 3
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items()), "a finished shard was written again"
    run_stages(recipe, stages, tmp_path / "clean", options, shared=False)
    for s in stages:
        assert shard_bytes(tmp_path / "out" / s.name) == shard_bytes(tmp_path / "clean" / s.name)


def _floor(cfg: Path) -> int:
    from streammerge import merge

    with pytest.raises(BudgetError) as e:
        merge.check(cfg, RunOptions(max_memory=1 << 20))
    return int(re.search(r"at least (\d+)MiB", str(e.value).replace("\n", " "))[1]) << 20


def test_a_wave_the_budget_cannot_hold_is_a_clear_error_and_no_shared_reads_runs_it(tmp_path, tiny_family,
                                                                                  fresh_baseline):
    base, experts = tiny_family
    docs = _sweep(base, experts)
    recipe = _recipe(tmp_path / "r.yml", docs)
    texts = [yaml.safe_dump({k: v for k, v in d.items() if k != "name"}) for d in docs]
    floors = []
    for d, text in zip(docs, texts):
        (tmp_path / f"{d['name']}.yml").write_text(text)
        floors.append(_floor(tmp_path / f"{d['name']}.yml"))
    budget = max(floors) + (2 << 20)
    opts = RunOptions(progress=False, max_memory=budget)
    items = [WaveItem(d["name"], t, tmp_path / d["name"], opts) for d, t in zip(docs, texts)]
    with pytest.raises(BudgetError) as e:
        plan_wave(recipe, items, budget, 2)
    msg = str(e.value)
    assert "ties3, ties7, dare, lin" in msg and "--no-shared-reads" in msg and "raise --max-memory" in msg
    rc = main(["batch", str(recipe), str(tmp_path / "out"), "--no-progress", "--max-memory", f"{budget >> 20}MiB",
               "--no-shared-reads"])
    assert rc == 0 and all((tmp_path / "out" / d["name"] / "model.safetensors").exists() or
                           (tmp_path / "out" / d["name"] / "model.safetensors.index.json").exists() for d in docs)


def test_check_names_the_stages_that_share_reads(capsys, tmp_path, tiny_family):
    base, experts = tiny_family
    docs = _sweep(base, experts)[:2] + [{**_doc("later", "linear", base, experts), "models": [
        {"model": "ties3", "parameters": {"weight": 1.0}}]}]
    recipe = _recipe(tmp_path / "r.yml", docs)
    assert main(["batch", str(recipe), str(tmp_path / "out"), "--check"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "build, shared reads with ties7" in out and "build, shared reads with ties3" in out
    assert "build (after ties3; checked then)" in out
    assert main(["batch", str(recipe), str(tmp_path / "out"), "--check", "--no-shared-reads"]) == 0
    assert "shared reads" not in capsys.readouterr().out


def test_the_batch_report_says_what_sharing_saved(tmp_path, tiny_family, capsys):
    import json

    base, experts = tiny_family
    recipe = _recipe(tmp_path / "r.yml", _sweep(base, experts)[:2])
    assert main(["batch", str(recipe), str(tmp_path / "out"), "--no-progress", "--report", str(tmp_path / "b.json")]) == 0
    rep = json.loads((tmp_path / "b.json").read_text())
    assert rep["bytes_alone"] == sum(s["bytes_read"] for s in rep["stages"]) == 2 * rep["bytes_from_files"]
    assert rep["stages"][1]["bytes_shared"] == rep["stages"][1]["bytes_read"] > 0
    assert rep["stages"][0]["shared_with"] == ["ties7"]
    for stage in rep["stages"]:
        assert sum(sh["bytes_read"] for sh in stage["shards"]) == stage["bytes_read"]
        assert sum(sh["bytes_shared"] for sh in stage["shards"]) == stage["bytes_shared"]
        assert all(sh["seconds"] > 0 and sh["gb_per_s"] > 0 for sh in stage["shards"])
    assert "one stage at a time would read" in " ".join(capsys.readouterr().out.split())
    for name in ("ties3", "ties7"):
        manifest = json.loads((tmp_path / "out" / name / ".streammerge" / "manifest.json").read_text())
        assert set(manifest["shards"]) == {p.name for p in (tmp_path / "out" / name).glob("*.safetensors")}


def _every_method(base, experts) -> list[dict]:
    """One config per registered method, with the parameters it requires."""
    from streammerge.methods import METHODS
    from streammerge.methods.registry import REQUIRED

    values = {"weight": 0.5, "density": 0.5, "t": 0.4, "epsilon": 0.1}
    docs = []
    for name, spec in METHODS.items():
        models = [{"model": str(e), "parameters": {p.name: values.get(p.name, 0.5) for p in spec.params
                                                   if p.per_model and (p.default is REQUIRED or p.name in values)}}
                  for e in experts[:min(spec.max_models or 3, 3)]]
        doc = {"name": name, "merge_method": name, "dtype": "bfloat16", "models": models,
               "parameters": {p.name: values.get(p.name, 0.5) for p in spec.params
                              if not p.per_model and p.default is REQUIRED}}
        if spec.base != "ignored":
            doc["base_model"] = str(base)
        docs.append(doc)
    return docs


def test_no_method_changes_the_input_bands_it_shares(tmp_path, tiny_family):
    """Every method reads the same band buffers in one shared run: one that wrote into its inputs would
    change the outputs computed after it, which then differ from their runs alone."""
    base, experts = tiny_family
    docs = _every_method(base, experts)
    recipe = _recipe(tmp_path / "r.yml", [*docs, {**docs[0], "name": "linear-again"}])
    stages = parse_recipe(recipe.read_text())
    results = run_stages(recipe, stages, tmp_path / "out", RunOptions(progress=False))
    assert len(results[0].shared_with) == len(docs)
    run_stages(recipe, stages, tmp_path / "alone", RunOptions(progress=False), shared=False)
    for s in stages:
        assert shard_bytes(tmp_path / "out" / s.name) == shard_bytes(tmp_path / "alone" / s.name) != {}, s.name


def test_a_failing_output_stops_the_whole_shared_run_with_its_error(tmp_path, tiny_family, monkeypatch):
    """Each output computes in its own lane thread: a method failing in one lane must stop the others
    and surface as the run's error (not hang, not be lost), and leave that output uncommitted."""
    import threading

    from streammerge.runner import BandRunner

    base, experts = tiny_family
    recipe = _recipe(tmp_path / "r.yml", _sweep(base, experts))
    stages = parse_recipe(recipe.read_text())
    real, calls = BandRunner.run_band, {"lin": 0}

    def flaky(self, t, job, reduces, band, states, stats, *rest):
        if self.plan.method == "linear":
            calls["lin"] += 1
            if calls["lin"] == 3:
                raise RuntimeError("boom in the linear lane")
        return real(self, t, job, reduces, band, states, stats, *rest)

    monkeypatch.setattr(BandRunner, "run_band", flaky)
    result: dict = {}

    def go():
        try:
            run_stages(recipe, stages, tmp_path / "out", RunOptions(progress=False, out_shard_size=200_000))
        except BaseException as e:
            result["error"] = e

    worker = threading.Thread(target=go, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the shared run hung after one output failed"
    assert "boom in the linear lane" in str(result.get("error"))
    assert not (tmp_path / "out" / "lin" / "model.safetensors.index.json").exists()
    assert not (tmp_path / "out" / "lin" / "config.json").exists()
