"""`streammerge moe` outputs: every slot is its source tensor bit for bit, the router rows equal a dense
transformers reference (full forward, output_hidden_states), the output loads and runs in the installed
transformers, and a prompt routes to the expert whose prompts it matches."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import _gates_cache, moe_config, moe_family, write_config  # noqa: F401  (fixtures)

from conftest import load_dir
from streammerge.cli import main

transformers = pytest.importorskip("transformers")


def build(tmp_path, doc, name="out", *flags) -> tuple:
    cfg = write_config(tmp_path / f"{name}.yml", doc)
    out = tmp_path / name
    assert main(["moe", str(cfg), str(out), "--no-progress", "--quiet", *flags]) == 0
    return cfg, out


def dense_gates(base, experts_prompts, mode):
    """mergekit's definition with transformers, one prompt at a time (no padding): the router input of
    layer i is hidden_states[i]; last token (hidden) or mean (hidden_avg); pos mean - neg mean; unit."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    layers = model.config.num_hidden_layers

    def vec(prompts):
        rows = []
        for p in prompts:
            enc = tok("<s>" + p, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                hs = model(**enc, output_hidden_states=True).hidden_states
            rows.append(torch.stack([hs[i][0, -1] if mode == "hidden" else hs[i][0].mean(0) for i in range(layers)]))
        return torch.stack(rows).mean(0)

    out = []
    for pos, neg in experts_prompts:
        v = vec(pos) - (vec(neg) if neg else 0)
        out.append(v / v.norm(dim=-1, keepdim=True))
    return torch.stack(out, 1)  # [layers, experts, hidden]


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_mixtral_slots_gates_load_and_route(moe_family, tmp_path, mode):
    base, experts = moe_family
    doc = moe_config(base, experts, 2, gate_mode=mode, dtype="float32")
    _, out = build(tmp_path, doc)
    got = load_dir(out)
    src = [load_dir(e) for e in experts[:2]]
    b = load_dir(base)
    for i in range(3):
        for j in range(2):
            for part, slot in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                name = f"model.layers.{i}.block_sparse_moe.experts.{j}.{slot}.weight"
                # float32 output: the bf16 source widened exactly, so compare through the source dtype
                assert torch.equal(got[name].to(torch.bfloat16), src[j][f"model.layers.{i}.mlp.{part}.weight"]), name
        assert torch.equal(got[f"model.layers.{i}.self_attn.q_proj.weight"].bfloat16(),
                           b[f"model.layers.{i}.self_attn.q_proj.weight"])
    assert not any(".mlp." in n for n in got)
    ref = dense_gates(base, [(e["positive_prompts"], e.get("negative_prompts")) for e in doc["experts"]], mode)
    for i in range(3):
        torch.testing.assert_close(got[f"model.layers.{i}.block_sparse_moe.gate.weight"], ref[i], atol=2e-5, rtol=1e-4)
    if mode != "hidden":
        return  # loading and routing: once is enough

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 2
    tok = transformers.AutoTokenizer.from_pretrained(out)
    # routing: the router input of layer 0 is the embedding, so a prompt equal to an expert's one prompt
    # picks that expert at its last token (gate row = that state, normalised)
    for j, e in enumerate(doc["experts"]):
        enc = tok("<s>" + e["positive_prompts"][0], add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            emb = model.model.embed_tokens(enc["input_ids"])[0, -1]
        logits = got["model.layers.0.block_sparse_moe.gate.weight"] @ emb
        if not e.get("negative_prompts"):
            assert int(logits.argmax()) == j
        with torch.no_grad():
            gen = model.generate(enc["input_ids"], max_new_tokens=3, do_sample=False)
        assert gen.shape[1] == enc["input_ids"].shape[1] + 3


def test_qwen2_moe_shared_expert(moe_family, tmp_path):
    base, experts = moe_family
    doc = moe_config(base, experts, 2, gate_mode="hidden")
    doc["shared_experts"] = [{"source_model": str(experts[2]), "positive_prompts": ["merge the model weights"],
                              "residual_scale": 0.5}]
    doc["experts"][1]["residual_scale"] = 0.25
    _, out = build(tmp_path, doc)
    got = load_dir(out)
    src = [load_dir(e) for e in experts[:3]]
    for i in range(3):
        for part in ("gate_proj", "up_proj", "down_proj"):
            s0 = src[0][f"model.layers.{i}.mlp.{part}.weight"]
            assert torch.equal(got[f"model.layers.{i}.mlp.experts.0.{part}.weight"], s0)
            s1 = src[1][f"model.layers.{i}.mlp.{part}.weight"]
            want1 = s1 * 0.25 if part == "down_proj" else s1  # residual_scale in the stored dtype, as mergekit
            assert torch.equal(got[f"model.layers.{i}.mlp.experts.1.{part}.weight"], want1)
            s2 = src[2][f"model.layers.{i}.mlp.{part}.weight"]
            assert torch.equal(got[f"model.layers.{i}.mlp.shared_expert.{part}.weight"],
                               s2 * 0.5 if part == "down_proj" else s2)
        assert got[f"model.layers.{i}.mlp.gate.weight"].shape == (2, 64)
        assert got[f"model.layers.{i}.mlp.shared_expert_gate.weight"].shape == (1, 64)
        assert not got[f"model.layers.{i}.self_attn.q_proj.bias"].any()  # Qwen2-MoE's biases: zeros for Llama
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert model.config.num_experts == 2 and model.config.moe_intermediate_size == 96
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 12]])).logits).all()


def test_resume_and_shards(moe_family, tmp_path):
    base, experts = moe_family
    doc = moe_config(base, experts, 2, gate_mode="cheap_embed")
    cfg, out = build(tmp_path, doc, "out", "--out-shard-size", "200KiB", "--max-memory", "1GiB")
    first = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    assert len(first) > 1 and (out / "model.safetensors.index.json").is_file()
    (out / sorted(first)[-1]).unlink()  # as if interrupted before the last shard
    assert main(["moe", str(cfg), str(out), "--no-progress", "--quiet", "--out-shard-size", "200KiB", "--resume"]) == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == first


def test_noise_scale_adds_reproducible_gaussian_noise_to_the_expert_weights(moe_family, tmp_path):
    """mergekit adds N(0, noise_scale²) to each of the expert's MLP tensors, then residual_scale; ours is drawn
    from the counter-based generator keyed by --random-seed, so the same seed gives the same bytes at any
    chunking, another seed other noise."""
    base, experts = moe_family
    doc = moe_config(base, experts, 2, gate_mode="random")
    doc["experts"][1].update(noise_scale=0.01, residual_scale=0.5)
    _, out = build(tmp_path, doc, "a", "--random-seed", "3")
    _, again = build(tmp_path, doc, "b", "--random-seed", "3", "--chunk-rows", "7")
    _, other = build(tmp_path, doc, "c", "--random-seed", "4")
    got, same, diff = load_dir(out), load_dir(again), load_dir(other)
    src = [load_dir(e) for e in experts[:2]]
    for i in range(3):
        for part, slot in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            name = f"model.layers.{i}.block_sparse_moe.experts.{{}}.{slot}.weight"
            assert torch.equal(got[name.format(0)], src[0][f"model.layers.{i}.mlp.{part}.weight"])  # no noise asked
            assert torch.equal(got[name.format(1)], same[name.format(1)])
            assert not torch.equal(got[name.format(1)], diff[name.format(1)])
            s1 = src[1][f"model.layers.{i}.mlp.{part}.weight"].float()
            noise = got[name.format(1)].float() / (0.5 if part == "down_proj" else 1.0) - s1
            assert abs(noise.mean().item()) < 2e-3 and 0.008 < noise.std().item() < 0.012, (part, noise.std())
