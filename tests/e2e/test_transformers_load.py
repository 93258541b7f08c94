"""The merged folder is a checkpoint transformers loads and runs."""

import pytest
import torch

from conftest import merge
from e2e.test_methods_basic import config_for


@pytest.mark.parametrize("shard_size", [None, 50_000])
def test_output_loads_in_transformers_and_runs_forward(shard_size, tiny_family, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (it is in the parity extra)")
    base, experts = tiny_family
    opts = {"out_shard_size": shard_size} if shard_size else {}
    out = merge(config_for("task_arithmetic", base, experts), tmp_path, **opts)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 4, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    sd = model.state_dict()
    from conftest import load_dir

    merged = load_dir(out)
    for k, v in merged.items():
        assert torch.equal(sd[k].to(v.dtype), v), k
