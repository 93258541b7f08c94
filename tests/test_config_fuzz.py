"""Generated configs: whatever the YAML (mergekit-ish keys with random values, shared subtrees written as
anchors and aliases, merge keys, random scalars, random text), loading it and planning it against real
checkpoints end in a plan or a StreammergeError; never another exception, never a hang."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from conftest import no_hang
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streammerge import RunOptions
from streammerge.config import load_config_text
from streammerge.errors import StreammergeError
from streammerge.methods import METHODS
from streammerge.plan.build import build_plan

FUZZ = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])
PARAM_NAMES = sorted({p.name for spec in METHODS.values() for p in spec.params}) + ["wieght", "x"]
MODEL_PATHS: list[str] = []  # filled by the `models` fixture: two real checkpoints, then nonsense


@pytest.fixture(scope="module", autouse=True)
def models(tmp_path_factory):
    from streammerge import synth

    spec = synth.SynthSpec(hidden=16, intermediate=32, layers=2, vocab=32, heads=2, kv_heads=1)
    base, (expert,) = synth.make_family(tmp_path_factory.mktemp("fuzz"), spec, 1, seed=3)
    deep = synth.write_checkpoint(tmp_path_factory.mktemp("deep") / "deep", synth.SynthSpec(
        hidden=16, intermediate=32, layers=3, vocab=32, heads=2, kv_heads=1), seed=4)
    MODEL_PATHS[:] = [str(base), str(expert), str(deep), "missing/model", "a+lora", ""]
    yield
    MODEL_PATHS.clear()


def _no_hang(seconds: float = 5.0):
    return no_hang(seconds, "loading or planning a config")


scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(["nan", "inf", "-inf", "1e400", "0.5", "true", "*", "", "mlp", "self_attn"])
           | st.text(max_size=8))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(PARAM_NAMES + ["model", "value", "filter", "sources"]) | st.text(max_size=4), inner, max_size=3),
    max_leaves=6)

# mostly meaningful configs (so that most examples reach the planner), damaged afterwards by `mutated`
fractions = st.floats(0, 1) | st.sampled_from([0.0, 0.5, 1.0])
conditions = st.fixed_dictionaries({"value": fractions}, optional={"filter": st.sampled_from(["mlp", "self_attn", "*", "norm"])})
values = fractions | st.lists(fractions, min_size=1, max_size=4) | st.lists(conditions, min_size=1, max_size=3)
params = st.dictionaries(st.sampled_from(PARAM_NAMES), values, max_size=3)
model_refs = st.sampled_from([0, 0, 1, 1, 2, 3]).map(lambda i: MODEL_PATHS[i])  # filled in by the fixture
layer_ranges = st.sampled_from([[0, 2], [0, 2], [0, 1], [1, 2], [0, 3]])
options = {"dtype": st.sampled_from(["bfloat16", "float16", "fp32"]), "out_dtype": st.sampled_from(["bfloat16", "float32"]),
           "tokenizer_source": st.sampled_from(["base", "union"]), "name": st.text(max_size=8)}


@st.composite
def documents(draw) -> dict:
    """A config for one registered method, its parameters mostly among the method's own."""
    method = draw(st.sampled_from(sorted(METHODS)))
    own = sorted(p.name for p in METHODS[method].params) or ["weight"]
    mparams = st.dictionaries(st.sampled_from(own) | st.sampled_from(PARAM_NAMES), values, max_size=3)
    base, expert = MODEL_PATHS[0], MODEL_PATHS[1]
    doc: dict = {"merge_method": method}
    if draw(st.integers(0, 3)):
        doc["base_model"] = draw(st.sampled_from([base, base, expert]) | model_refs)
    if draw(st.booleans()):
        entries = [{"model": m} for m in draw(st.lists(st.sampled_from([base, expert]) | model_refs, min_size=1, max_size=3))]
        doc["models"] = entries
    else:
        doc["slices"] = []
        for _ in range(draw(st.integers(1, 2))):
            span = draw(layer_ranges)  # one span a slice, mostly: sources of different lengths are an error
            models = draw(st.lists(st.sampled_from([base, expert]) | model_refs, min_size=1, max_size=3))
            doc["slices"].append({"sources": [{"model": m, "layer_range": span if draw(st.integers(0, 5)) else
                                               draw(layer_ranges)} for m in models]})
        entries = [src for sl in doc["slices"] for src in sl["sources"]]
    for entry in entries:
        if draw(st.booleans()):
            entry["parameters"] = draw(mparams)
    if draw(st.booleans()):
        doc["parameters"] = draw(mparams)
    for key, strategy in options.items():
        if not draw(st.integers(0, 4)):
            doc[key] = draw(strategy)
    return doc


def _containers(node, out: list) -> list:
    if isinstance(node, dict):
        out.append(node)
        for v in node.values():
            _containers(v, out)
    elif isinstance(node, list):
        out.append(node)
        for v in node:
            _containers(v, out)
    return out


@st.composite
def mutated(draw) -> dict:
    """A document with up to three places replaced by junk, and one subtree shared between places:
    yaml.safe_dump writes a shared subtree once with an anchor, then as aliases, as a hand-written config
    reuses a parameter block."""
    doc = copy.deepcopy(draw(documents()))  # drawn values may be the strategies' own constants: never edit them
    shared = copy.deepcopy(draw(params))
    for entry in doc.get("models") or []:
        if draw(st.booleans()):
            entry["parameters"] = shared
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 3]))):
        where = draw(st.sampled_from(_containers(doc, [])))
        if isinstance(where, dict):
            key = draw(st.sampled_from(sorted(where)) if where and draw(st.booleans()) else
                       st.sampled_from(PARAM_NAMES + ["weight", "layer_range", "sources", "models", "extra"]))
            where[key] = draw(junk)
        elif where:
            where[draw(st.integers(0, len(where) - 1))] = draw(junk)
        else:
            where.append(draw(junk))
    return doc


def _load_and_plan(text: str) -> None:
    with _no_hang():
        try:
            config = load_config_text(text, "fuzz.yml")
            build_plan(config, None, RunOptions(max_memory=2 << 30))
        except StreammergeError as e:
            assert len(str(e)) < 20_000, "an error message as long as the input"


@FUZZ
@given(doc=mutated())
def test_generated_configs_load_and_plan_or_fail_cleanly(doc):
    _load_and_plan(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


@FUZZ
@given(doc=mutated(), cut=st.integers(0, 10**4), insert=st.sampled_from(
    ["&a ", "*a", "<<: *a\n", "[", "]", "{", "}", ": ", "- ", "\n  ", "!!binary ", "!!python/object ", "? ", "\t",
     "2001-13-45", "\ufeff", "\x00", "&a [*a]", "9" * 120]), times=st.integers(1, 3))
def test_damaged_config_text_fails_cleanly(doc, cut, insert, times):
    text = yaml.safe_dump(doc, sort_keys=False)
    for k in range(times):
        at = (cut * (k + 1)) % (len(text) + 1)
        text = text[:at] + insert + text[at:]
    _load_and_plan(text)


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("ab:- []{},&*!<\n'\"#|>?%@`.0123456789\t")),
                    max_size=200))
def test_random_text_fails_cleanly(text):
    _load_and_plan(text)


def test_the_models_used_are_real(tmp_path):
    """The fuzz reaches the planner: a config over the fixture's models plans."""
    base, expert = MODEL_PATHS[:2]
    doc = {"merge_method": "linear", "models": [{"model": base, "parameters": {"weight": 0.5}},
                                                {"model": expert, "parameters": {"weight": 0.5}}]}
    assert build_plan(load_config_text(yaml.safe_dump(doc)), None, RunOptions(max_memory=2 << 30)).tensors
    assert Path(base).is_dir()
