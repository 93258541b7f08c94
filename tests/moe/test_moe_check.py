"""`streammerge check` on MoE configs: validated from headers, config.json and tokenizer files only (no
torch), each mistake a clear error naming the key; and gates that do not depend on the budget."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from moe_helpers import SPEC, _gates_cache, moe_config, moe_family, write_config  # noqa: F401  (fixtures)

from streammerge.arch import infer_arch
from streammerge.cli import main
from streammerge.io.reader import open_model
from streammerge.moe.config import Expert
from streammerge.moe.gates import hidden_gates
from streammerge.synth import make_family


def check(tmp_path, doc, capsys) -> tuple[int, str, str]:
    cfg = write_config(tmp_path / "moe.yml", doc)
    code = main(["check", str(cfg)])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


def test_check_prints_the_choice_and_reads_no_torch(moe_family, tmp_path):
    base, experts = moe_family
    cfg = write_config(tmp_path / "moe.yml", moe_config(base, experts, 2))
    code = ("import sys; from streammerge.cli import main; c = main(['check', sys.argv[1]]); "
            "print(c, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "0 False"
    assert "moe mixtral (auto: Mixtral unless shared experts are asked for)" in r.stdout
    assert "block_sparse_moe.experts" in r.stdout or "tensors" in r.stdout


@pytest.fixture(scope="module")
def wide_expert(tmp_path_factory):
    import dataclasses

    _, experts = make_family(tmp_path_factory.mktemp("wide"), dataclasses.replace(SPEC, hidden=128), 1, seed=1)
    return experts[0]


def test_expert_with_another_hidden_size(moe_family, wide_expert, tmp_path, capsys):
    base, experts = moe_family
    doc = moe_config(base, experts, 2)
    doc["experts"][1]["source_model"] = str(wide_expert)
    code, _, err = check(tmp_path, doc, capsys)
    assert code == 1
    assert "experts[1]" in err and "hidden_size 128, the base has 64" in err


def test_missing_prompts_for_hidden(moe_family, tmp_path, capsys):
    base, experts = moe_family
    doc = moe_config(base, experts, 2, gate_mode="hidden")
    del doc["experts"][1]["positive_prompts"]
    code, _, err = check(tmp_path, doc, capsys)
    assert code == 1 and "experts[1].positive_prompts" in err and "add positive_prompts" in err
    doc["gate_mode"] = "random"  # random gates need no prompts
    assert check(tmp_path, doc, capsys)[0] == 0


def test_unknown_gate_mode(moe_family, tmp_path, capsys):
    base, experts = moe_family
    code, _, err = check(tmp_path, moe_config(base, experts, 2, gate_mode="hiddn"), capsys)
    assert code == 1 and "gate_mode: 'hiddn' is not a gate mode" in err and "hidden_avg" in err


def test_more_experts_per_token_than_experts(moe_family, tmp_path, capsys):
    base, experts = moe_family
    code, _, err = check(tmp_path, moe_config(base, experts, 2, experts_per_token=3), capsys)
    assert code == 1 and "experts_per_token: 3 is more than the 2 experts" in err


def test_refused_settings_are_errors(moe_family, tmp_path, capsys):
    base, experts = moe_family
    doc = moe_config(base, experts, 2)
    doc["experts"][0]["noise_scale"] = -0.01
    code, _, err = check(tmp_path, doc, capsys)
    assert code == 1 and "noise_scale" in err and "standard deviation" in err
    code, _, err = check(tmp_path, moe_config(base, experts, 2, architecture="deepseek"), capsys)
    assert code == 1 and "DeepSeek-style outputs are not implemented" in err
    doc = moe_config(base, experts, 2)
    doc["shared_experts"] = [{"source_model": str(experts[2]), "positive_prompts": ["x y"]}]
    code, out, _ = check(tmp_path, dict(doc, architecture="mixtral"), capsys)
    assert code == 1
    code, out, _ = check(tmp_path, doc, capsys)  # auto: one shared expert -> Qwen2-MoE
    assert code == 0 and "moe qwen" in out


def test_missing_tokenizer_json(moe_family, tmp_path, capsys):
    import shutil

    base, experts = moe_family
    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    (copy / "tokenizer.json").unlink()
    code, _, err = check(tmp_path, moe_config(copy, experts, 2), capsys)
    assert code == 1 and "tokenizer.json: missing" in err


def test_same_gates_at_every_budget(moe_family):
    base, _ = moe_family
    mf = open_model(base)
    arch = infer_arch(mf)
    experts = [Expert(source_model="a", positive_prompts=["the cat sat on the mat", "merge the model weights"]),
               Expert(source_model="b", positive_prompts=["math proofs need care"], negative_prompts=["a dog"])]
    ref = hidden_gates(mf, arch, experts, "hidden_avg", 1 << 30)
    for budget in (200_000, 600_000):  # bands of 64 rows up to whole matrices
        assert torch.equal(hidden_gates(mf, arch, experts, "hidden_avg", budget), ref)
    with pytest.raises(Exception, match="raise --max-memory"):
        hidden_gates(mf, arch, experts, "hidden_avg", 10_000)
