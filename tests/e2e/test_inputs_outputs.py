"""Inputs beyond safetensors, resume, tokenizer and chat template handling."""

import json
import shutil

import torch

from conftest import load_dir, merge, shard_bytes, write_yaml
from e2e.test_methods_basic import config_for
from streammerge import RunOptions, run


def test_pickled_bin_inputs_merge_like_safetensors(tiny_family, tmp_path):
    base, experts = tiny_family
    pickled = []
    for e in experts:
        d = tmp_path / ("bin-" + e.name)
        d.mkdir()
        shutil.copy(e / "config.json", d / "config.json")
        torch.save(load_dir(e), d / "pytorch_model.bin")
        pickled.append(d)
    a = load_dir(merge(config_for("linear", base, experts), tmp_path, "st"))
    b = load_dir(merge(config_for("linear", base, pickled), tmp_path, "bin"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_skips_finished_shards_and_gives_identical_bytes(tiny_family, tmp_path):
    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("task_arithmetic", base, experts))
    full = tmp_path / "full"
    run(cfg, full, RunOptions(max_memory=2 << 30, progress=False, out_shard_size=60_000))
    expected = shard_bytes(full)
    assert len(expected) > 2
    partial = tmp_path / "partial"
    shutil.copytree(full, partial)
    shards = sorted(expected)
    (partial / shards[-1]).unlink()            # as if killed before the last shard committed
    (partial / "model.safetensors.index.json").unlink()
    (partial / (shards[-2] + ".partial")).write_bytes(b"junk")
    first = (partial / shards[0]).stat().st_mtime_ns
    report = run(cfg, partial, RunOptions(max_memory=2 << 30, progress=False, out_shard_size=60_000, resume=True))
    assert shard_bytes(partial) == expected
    assert (partial / shards[0]).stat().st_mtime_ns == first  # not rewritten
    assert sum(s.skipped for s in report.shards) == len(shards) - 1
    assert not list(partial.glob("*.partial"))


def test_resume_refuses_a_different_config(tiny_family, tmp_path):
    import pytest

    from streammerge.errors import ResumeError

    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", config_for("linear", base, experts))
    out = tmp_path / "o"
    run(cfg, out, RunOptions(max_memory=2 << 30, progress=False))
    other = config_for("linear", base, experts)
    other["models"][0]["parameters"]["weight"] = 0.9
    with pytest.raises(ResumeError, match="different config"):
        run(write_yaml(tmp_path / "d.yml", other), out, RunOptions(max_memory=2 << 30, progress=False, resume=True))


def _with_full_tokenizer(src, dst):
    """A copy whose tokenizer.json numbers as many tokens as the embedding has rows (256): the case where
    tokenizer_source changes nothing in mergekit either (tests/test_vocab.py has the others)."""
    shutil.copytree(src, dst)
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(253)])}
    (dst / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                                                    "added_tokens": []}))
    return dst


def test_tokenizer_source_and_chat_template(tiny_family, tmp_path):
    base, experts = tiny_family
    base = _with_full_tokenizer(base, tmp_path / "base")  # the session's fixture models stay untouched
    experts = [_with_full_tokenizer(e, tmp_path / e.name) for e in experts]
    donor = experts[1]
    (donor / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    cfg = config_for("task_arithmetic", base, experts) | {"tokenizer_source": str(donor),
                                                           "chat_template": "{{ messages | length }} messages"}
    out = merge(cfg, tmp_path)
    tok = json.loads((out / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 77 and tok["chat_template"] == "{{ messages | length }} messages"
    assert (out / "generation_config.json").exists()


def test_global_parameter_given_per_model_warns(tiny_family, tmp_path):
    from streammerge.merge import check

    base, experts = tiny_family
    cfg = config_for("linear", base, experts)
    cfg["models"][0]["parameters"]["normalize"] = False
    plan = check(write_yaml(tmp_path / "c.yml", cfg), RunOptions(max_memory=2 << 30))
    assert any("models[0].parameters.normalize" in w and "global parameter" in w for w in plan.warnings)
