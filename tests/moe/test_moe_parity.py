"""Parity with mergekit-moe 0.1.5 where its definition is sound: `hidden` (mergekit left-pads, so the
last position is each prompt's last token), `cheap_embed`, and the statistics of `random` /
`uniform_random` (mergekit draws from torch's global generator, we from the seeded Philox stream).
mergekit computes hidden states with the base in bf16, we in fp32: gates agree to bf16 rounding."""

from __future__ import annotations

import json

import pytest
import torch
from moe_helpers import _gates_cache, moe_config, moe_family, write_config  # noqa: F401  (fixtures)

from conftest import load_dir
from streammerge.cli import main

pytestmark = pytest.mark.parity
pytest.importorskip("mergekit")


def mergekit_moe(doc: dict, out) -> dict:
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    build(MoEMergeConfig.model_validate(doc), str(out), MergeOptions(), device="cpu")
    return load_dir(out)


@pytest.mark.parametrize("mode,atol", [("hidden", 2e-2), ("cheap_embed", 4e-3)])
def test_same_model_as_mergekit_moe(moe_family, tmp_path, mode, atol):
    base, experts = moe_family
    doc = moe_config(base, experts, 4, gate_mode=mode, dtype="bfloat16")
    cfg = write_config(tmp_path / "moe.yml", doc)
    assert main(["moe", str(cfg), str(tmp_path / "ours"), "--no-progress", "--quiet"]) == 0
    ours = load_dir(tmp_path / "ours")
    theirs = mergekit_moe(doc, tmp_path / "theirs")
    for name, t in theirs.items():
        if name.endswith("experts.gate_up_proj"):  # mergekit writes transformers 5's fused layout
            pre = name.rsplit(".experts.", 1)[0].replace(".mlp", ".block_sparse_moe")
            fused = torch.stack([torch.cat([ours[f"{pre}.experts.{j}.w1.weight"], ours[f"{pre}.experts.{j}.w3.weight"]])
                                 for j in range(4)])
            assert torch.equal(fused, t), name
        elif name.endswith("experts.down_proj"):
            pre = name.rsplit(".experts.", 1)[0].replace(".mlp", ".block_sparse_moe")
            assert torch.equal(torch.stack([ours[f"{pre}.experts.{j}.w2.weight"] for j in range(4)]), t), name
        elif name.endswith("mlp.gate.weight"):
            mine = ours[name.replace(".mlp.", ".block_sparse_moe.")]
            torch.testing.assert_close(mine.float(), t.float(), atol=atol, rtol=0)
        else:
            assert torch.equal(ours[name], t), name
    a = json.loads((tmp_path / "ours" / "config.json").read_text())
    b = json.loads((tmp_path / "theirs" / "config.json").read_text())
    for key in ("architectures", "model_type", "num_local_experts", "num_experts_per_tok", "hidden_size",
                "intermediate_size", "num_hidden_layers", "num_key_value_heads", "vocab_size"):
        assert a.get(key) == b.get(key), key


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_match_mergekit_statistics(moe_family, tmp_path, mode):
    from mergekit.common import ModelReference
    from mergekit.moe.router import get_gate_params

    from streammerge.moe.config import Expert
    from streammerge.moe.gates import random_gates

    base, _ = moe_family
    theirs = get_gate_params(ModelReference.parse(str(base)), None, [Expert(source_model="x")] * 64, mode=mode)
    ours = random_gates(3, 64, 64, mode, seed=5)
    assert ours.shape == theirs.shape == (3, 64, 64)
    assert abs(ours.mean().item() - theirs.mean().item()) < 0.03
    assert ours.std().item() == pytest.approx(theirs.std().item(), rel=0.03)
    if mode == "uniform_random":
        assert ours.abs().max() <= 64**-0.5 and theirs.abs().max() <= 64**-0.5
    assert torch.equal(ours, random_gates(3, 64, 64, mode, seed=5))      # reproducible from the seed
    assert not torch.equal(ours, random_gates(3, 64, 64, mode, seed=6))
