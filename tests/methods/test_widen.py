"""widen: against a dense re-implementation of docs/methods.md's formulas, identities, bands, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_dir, merge, shard_bytes
from streammerge.errors import ConfigError
from test_spherical import mini_family, no_reads, run_method  # noqa: F401  (fixtures)

V, H, I = 20, 8, 12   # vocabulary, hidden, intermediate: tiny, and no two columns tie


def write_model(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"), {"format": "pt"})
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 1, "hidden_size": H,
        "intermediate_size": I, "vocab_size": V, "tie_word_embeddings": False}))
    return path


def shapes() -> dict[str, tuple[int, ...]]:
    return {
        "model.embed_tokens.weight": (V, H),
        "model.layers.0.input_layernorm.weight": (H,),
        "model.layers.0.self_attn.q_proj.weight": (H, H),
        "model.layers.0.self_attn.q_proj.bias": (H,),
        "model.layers.0.mlp.up_proj.weight": (I, H),
        "model.layers.0.mlp.down_proj.weight": (H, I),
        "model.norm.weight": (H,),
        "lm_head.weight": (V, H),
    }


@pytest.fixture(scope="module")
def widen_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A base and three models: a fine-tune (small changes), a continued pre-train (larger ones, some
    columns rescaled) and one that mostly turns columns; fp32, continuous values: no tied differences."""
    root = tmp_path_factory.mktemp("widen")
    g = torch.Generator().manual_seed(21)
    base = {k: torch.randn(s, generator=g) for k, s in shapes().items()}
    models = []
    for i, scale in enumerate((0.01, 0.1, 0.05)):
        m = {}
        for k, w in base.items():
            noise = torch.randn(w.shape, generator=g) * scale
            if w.dim() == 2 and i == 1:
                noise = noise + w * torch.rand(w.shape[1], generator=g) * 0.2   # magnitude changes per column
            m[k] = w + noise
        models.append(write_model(root / f"m{i}", m))
    return write_model(root / "base", base), models


def _ranks(diff: torch.Tensor) -> torch.Tensor:
    n = diff.shape[1]
    ranks = torch.empty_like(diff)
    for k in range(diff.shape[0]):
        order = sorted(range(n), key=lambda j: (float(diff[k, j]), j))
        for r, j in enumerate(order):
            ranks[k, j] = r / n
    return ranks


def _scores(sig: torch.Tensor, t: float, s: float) -> torch.Tensor:
    scores = torch.softmax(sig, dim=0)
    for k in range(sig.shape[0]):
        mean = float(sig[k].mean())
        for j in range(sig.shape[1]):
            if float(sig[k, j]) > t * mean:
                scores[k, j] = s
    return scores


def widen_reference(base: dict, models: list[dict], t: float = 1.0, s: float = 1.0) -> dict[str, torch.Tensor]:
    """docs/methods.md's WIDEN, step by step, dense, in fp64."""
    out = {}
    for name, w0 in base.items():
        w0 = w0.double()
        ws = [m[name].double() for m in models]
        if w0.dim() == 1:
            diff = torch.stack([(w - w0).abs() for w in ws])
            scores = _scores(diff, t, s)
            out[name] = w0 + sum((w - w0) * scores[k] for k, w in enumerate(ws))
            continue
        transposed = "embed_tokens" in name
        a0 = w0.T if transposed else w0
        a = [w.T if transposed else w for w in ws]
        m0 = a0.norm(dim=0)
        dm = torch.stack([(x.norm(dim=0) - m0).abs() for x in a])
        dd = torch.stack([1 - ((x / x.norm(dim=0)) * (a0 / m0)).sum(dim=0) for x in a])
        weights = 0.5 * (_scores(_ranks(dm), t, s) + _scores(_ranks(dd), t, s))
        merged = a0 + sum((x - a0) * weights[k] for k, x in enumerate(a))
        out[name] = merged.T if transposed else merged
    return out


@pytest.mark.parametrize("t, s", [(1.0, 1.0), (0.5, 0.8), (1.3, 2.0), (1e9, 1.0)])
def test_widen_matches_the_dense_reference(t, s, widen_family, tmp_path):
    base, models = widen_family
    cfg = {"merge_method": "widen", "base_model": str(base),
           "parameters": {"above_average_value_ratio": t, "score_calibration_value": s},
           "models": [{"model": str(m)} for m in models]}
    ours = load_dir(merge(cfg, tmp_path, chunk_rows=3))
    ref = widen_reference(load_dir(base), [load_dir(m) for m in models], t, s)
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == torch.float32
        torch.testing.assert_close(ours[k], ref[k].float(), rtol=2 ** -23, atol=1e-7, msg=k)


def test_widen_in_bf16_matches_the_reference_to_one_rounding(widen_family, tmp_path):
    base, models = widen_family
    cfg = {"merge_method": "widen", "base_model": str(base), "dtype": "bfloat16",
           "models": [{"model": str(m)} for m in models]}
    ours = load_dir(merge(cfg, tmp_path))
    ref = widen_reference({k: v.bfloat16() for k, v in load_dir(base).items()},
                          [{k: v.bfloat16() for k, v in load_dir(m).items()} for m in models])
    for k in ref:
        assert ours[k].dtype == torch.bfloat16
        torch.testing.assert_close(ours[k].double(), ref[k], rtol=2 ** -8, atol=1e-6, msg=k)


def test_without_calibration_weights_are_a_softmax_average(widen_family, tmp_path):
    """t large: no score is calibrated, and each column's weights sum to 1 (two softmaxes halved), so
    a merge of a model with a copy of itself is that model."""
    base, models = widen_family
    cfg = {"merge_method": "widen", "base_model": str(base), "parameters": {"above_average_value_ratio": 1e9},
           "models": [{"model": str(models[1])}, {"model": str(models[1].parent / "copy")}]}
    import shutil
    shutil.copytree(models[1], models[1].parent / "copy", dirs_exist_ok=True)
    out, ref = load_dir(merge(cfg, tmp_path)), load_dir(models[1])
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=2 ** -22, atol=1e-7)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_one_model_with_calibration_one_is_that_model_exactly(which, widen_family, tmp_path):
    base, models = widen_family
    cfg = {"merge_method": "widen", "base_model": str(base), "models": [{"model": str(models[which])}]}
    out, ref = load_dir(merge(cfg, tmp_path)), load_dir(models[which])
    assert out.keys() == ref.keys()
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_one_model_is_that_model_on_a_llama_checkpoint(tiny_family_fp32, tmp_path):
    base, experts = tiny_family_fp32
    out = load_dir(merge({"merge_method": "widen", "base_model": str(base), "models": [{"model": str(experts[1])}]},
                         tmp_path))
    ref = load_dir(experts[1])
    assert all(torch.equal(out[k], ref[k]) for k in ref)


def test_the_input_embedding_is_ranked_by_token_and_lm_head_by_hidden_column():
    """A change confined to one token's embedding row is that token's alone: with calibration off and
    s = 0, only a model whose change ranks above average keeps it; the transposed statistics put the
    embedding's ranking on rows, lm_head's on columns."""
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(10, 6, generator=g)
    big_row = w0 + 1e-4 * torch.randn(10, 6, generator=g)   # every token moves a little (no tied ranks) ...
    big_row[3] *= 3.0                                        # ... and token 3 grows
    small = w0 + 1e-3 * torch.randn(10, 6, generator=g)
    params = {"score_calibration_value": 0.0, "above_average_value_ratio": 1.0}
    emb = run_method("widen", [w0, big_row, small], base=0, params=params, kind="embedding", band=4)
    head = run_method("widen", [w0, big_row, small], base=0, params=params, kind="lm_head", band=4)
    ref = widen_reference({"model.embed_tokens.weight": w0, "lm_head.weight": w0},
                          [{"model.embed_tokens.weight": m, "lm_head.weight": m} for m in (big_row, small)], 1.0, 0.0)
    torch.testing.assert_close(emb, ref["model.embed_tokens.weight"].float(), rtol=2 ** -23, atol=1e-7)
    torch.testing.assert_close(head, ref["lm_head.weight"].float(), rtol=2 ** -23, atol=1e-7)
    assert not torch.allclose(emb, head)


@pytest.mark.parametrize("family", ["mini", "custom"])
def test_chunk_size_does_not_change_a_byte(family, mini_family, widen_family, tmp_path):
    base, models = mini_family if family == "mini" else widen_family
    cfg = {"merge_method": "widen", "base_model": str(base), "parameters": {"above_average_value_ratio": 0.9},
           "models": [{"model": str(m)} for m in models]}
    outs = [shard_bytes(merge(cfg, tmp_path, f"rows{n}", chunk_rows=n)) for n in (1, 7, None)]
    assert outs[0] == outs[1] == outs[2]


def test_wide_rows_give_the_same_bits_in_any_bands():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 33000, generator=g).bfloat16() for _ in range(3)]
    for kind in ("layer", "embedding"):
        whole = run_method("widen", xs, base=0, kind=kind)
        for band, split in ((1, False), (2, True)):
            assert torch.equal(run_method("widen", xs, base=0, kind=kind, band=band, split=split), whole)


@pytest.mark.parametrize("cfg, message", [
    (lambda b, e: {"merge_method": "widen", "models": [{"model": str(m)} for m in e]}, "'widen' needs a base model"),
    (lambda b, e: {"merge_method": "widen", "base_model": str(b), "models": [{"model": str(b)}]},
     "'widen' takes at least 1 model(s) besides the base, got 0"),
    (lambda b, e: {"merge_method": "widen", "base_model": str(b), "parameters": {"above_average_value_ratio": -1},
                   "models": [{"model": str(e[0])}]}, "parameter 'above_average_value_ratio' must be in [0, inf], got -1"),
    (lambda b, e: {"merge_method": "widen", "base_model": str(b), "parameters": {"score_calibration_value": "high"},
                   "models": [{"model": str(e[0])}]}, "parameter 'score_calibration_value' must be a float, got 'high'"),
])
def test_config_errors_come_before_any_data(cfg, message, mini_family, tmp_path, no_reads):
    base, experts = mini_family
    with pytest.raises(ConfigError) as e:
        merge(cfg(base, experts), tmp_path)
    assert message in str(e.value)


def test_plan_shape(widen_family, tmp_path, no_reads):
    from test_spherical import plan_passes

    base, models = widen_family
    cfg = {"merge_method": "widen", "base_model": str(base), "models": [{"model": str(m)} for m in models]}
    assert plan_passes(cfg, tmp_path) == {1: {1}, 2: {2}}
