"""mergekit 0.1.5's example configs, unchanged but for nothing: the repository names they use are served
by the stand-in hub (tiny 40-layer models under those names), with the flags mergekit's README shows."""

from __future__ import annotations

import dataclasses
import re

import pytest

from hub_helpers import _fresh_hub_memo, fake_hub, hub_env  # noqa: F401  (fixtures)
from streammerge.cli import main

NAMES = ["psmathur/orca_mini_v3_13b", "garage-bAInd/Platypus2-13B", "WizardLM/WizardLM-13B-V1.2",
         "TheBloke/Llama-2-13B-fp16"]

# the examples as mergekit 0.1.5 shipped them (linear.yml, gradient-slerp.yml, orcamini-platy-44layer.yml, ties.yml)
EXAMPLES = {
    "linear": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
""",
    "gradient-slerp": """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
""",
    "orcamini-platy-44layer": """
slices:
  - sources:
    - model: psmathur/orca_mini_v3_13b
      layer_range: [0, 24]
  - sources:
    - model: garage-bAInd/Platypus2-13B
      layer_range: [20, 40]
merge_method: passthrough
dtype: float16
""",
    "ties": """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
}
# the flags mergekit's README shows with its examples, a set per example
FLAGS = [["--lazy-unpickle", "--allow-crimes"], ["--copy-tokenizer", "--out-shard-size", "1B", "--lazy-unpickle"], []]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    from streammerge import synth

    spec = dataclasses.replace(synth.PRESETS["tiny"], hidden=32, intermediate=64, layers=40, vocab=128)
    root = tmp_path_factory.mktemp("standins")
    base, experts = synth.make_family(root, spec, len(NAMES) - 1, seed=11, shard_size=256 << 10)
    return dict(zip(NAMES, [*experts, base]))


def _run(capsys, cfg, out, flags) -> str:
    rc = main(["run", str(cfg), str(out), "--no-progress", *flags])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.err


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_mergekit_examples_run_unchanged_over_the_hub(example, capsys, tmp_path, stand_ins, fake_hub):
    for name, folder in stand_ins.items():
        fake_hub.add(name, folder)
    text = EXAMPLES[example]
    local = text
    for name, folder in stand_ins.items():
        local = re.sub(rf"\b{re.escape(name)}\b", str(folder), local)
    (tmp_path / "hub.yml").write_text(text)
    (tmp_path / "local.yml").write_text(local)
    _run(capsys, tmp_path / "local.yml", tmp_path / "local", [])
    expected = {p.name: p.read_bytes() for p in (tmp_path / "local").glob("*.safetensors")}
    flags = FLAGS[list(EXAMPLES).index(example) % len(FLAGS)]
    _run(capsys, tmp_path / "hub.yml", tmp_path / "hub", flags)
    got = {p.name: p.read_bytes() for p in (tmp_path / "hub").glob("*.safetensors")}
    assert got == expected and got, (example, flags)
    assert (tmp_path / "hub" / "mergekit_config.yml").read_text() == text


def test_check_of_three_hub_models_reads_under_one_percent_of_the_weights(capsys, tmp_path, fake_hub, tmp_path_factory):
    from streammerge import synth

    spec = dataclasses.replace(synth.PRESETS["tiny"], hidden=256, intermediate=704, layers=2, vocab=2048)
    base, experts = synth.make_family(tmp_path_factory.mktemp("bigger"), spec, 2, seed=5, shard_size=2 << 20)
    for name, folder in zip(("org/base", "org/a", "org/b"), (base, *experts)):
        fake_hub.add(name, folder)
    (tmp_path / "c.yml").write_text("merge_method: ties\nbase_model: org/base\nmodels:\n"
                                    "  - model: org/a\n    parameters: {weight: 0.5, density: 0.5}\n"
                                    "  - model: org/b\n    parameters: {weight: 0.5, density: 0.5}\n")
    assert main(["check", str(tmp_path / "c.yml")]) == 0, capsys.readouterr().err
    weights = sum(fake_hub.weight_bytes(n) for n in ("org/base", "org/a", "org/b"))
    served = sum(n for k, n in fake_hub.served.items() if k.endswith(".safetensors"))
    assert served < weights / 100, (served, weights)
