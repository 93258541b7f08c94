"""`chat_template:` resolved as mergekit 0.1.5 resolves it: a shipped name, `auto`, or a literal template."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import write_yaml
from streammerge import RunOptions, run
from streammerge.config import parse_config
from streammerge.errors import ConfigError
from streammerge.io.chat_templates import model_chat_template, resolve_chat_template, template_names

NAMES = ["alpaca", "chatml", "exaone", "llama3", "mistral"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": " What is 2+2?\n"},
     {"role": "assistant", "content": "4 "}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
    [{"role": "system", "content": "S"}, {"role": "user_context", "content": " ctx "}, {"role": "user", "content": "q"}],
    [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}],
    [{"role": "system", "content": "one"}, {"role": "system", "content": "two"}, {"role": "user", "content": "u"},
     {"role": "tool", "content": "t"}],
]


def _model_with_template(root: Path, name: str, template: str | list | None, jinja: str | None = None) -> Path:
    d = root / name
    d.mkdir()
    cfg = {"model_max_length": 8} | ({"chat_template": template} if template is not None else {})
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja is not None:
        (d / "chat_template.jinja").write_text(jinja)
    return d


def test_the_shipped_names_are_mergekits():
    assert template_names() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_a_name_resolves_to_its_template_not_the_word(name):
    text = resolve_chat_template(name, [])
    assert text != name and "{%" in text and "messages" in text


def test_a_literal_template_is_kept_and_a_bad_value_is_an_error_naming_the_choices():
    literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_chat_template(literal, []) == literal
    assert resolve_chat_template(None, []) is None
    parse_config({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": literal})
    for bad in ("chatmel", "{{ short }}", "x" * 30):  # not a name; under 20 characters; no '{'
        with pytest.raises(ConfigError) as e:
            parse_config({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": bad}, "c.yml")
        assert "chat_template:" in str(e.value) and "alpaca, chatml, exaone, llama3, mistral or auto" in str(e.value)
    # a name-like value with a newline is a literal (mergekit's rule), so this one is refused as too short
    with pytest.raises(ConfigError):
        parse_config({"merge_method": "linear", "models": [{"model": "a"}], "chat_template": "chatml\n"})


def test_auto_takes_the_most_common_template_among_the_inputs(tmp_path):
    a = "{{ 'template A' }}{% for m in messages %}{% endfor %}"
    b = "{{ 'template B' }}{% for m in messages %}{% endfor %}"
    m1 = _model_with_template(tmp_path, "m1", b)
    m2 = _model_with_template(tmp_path, "m2", "  " + a + "\n")     # compared stripped
    m3 = _model_with_template(tmp_path, "m3", None, jinja=a)        # chat_template.jinja, as transformers saves it
    m4 = _model_with_template(tmp_path, "m4", [{"name": "default", "template": b}, {"name": "tool_use", "template": "t"}])
    none = _model_with_template(tmp_path, "none", None)
    assert resolve_chat_template("auto", [m1, m2, m3, none]) == a
    assert resolve_chat_template("auto", [m1, m4, m2, m3]) == b  # a tie: the first in the config's order
    assert resolve_chat_template("auto", [none, tmp_path / "missing"]) is None  # the tokenizer keeps its own
    assert model_chat_template(m4) == b


def test_jinja_file_wins_over_tokenizer_config(tmp_path):
    m = _model_with_template(tmp_path, "m", "{{ 'from config' }}{% if x %}{% endif %}", jinja="{{ 'from file' }} {% if x %}{% endif %}")
    assert model_chat_template(m) == "{{ 'from file' }} {% if x %}{% endif %}"


def test_run_writes_the_named_template_and_drops_the_donors(tiny_family, tmp_path):
    base, experts = tiny_family
    donor = tmp_path / "donor"
    shutil.copytree(base, donor)
    (donor / "chat_template.jinja").write_text("{{ 'the donor template, replaced' }}{% if x %}{% endif %}")
    cfg = write_yaml(tmp_path / "c.yml", {"merge_method": "linear", "chat_template": "chatml", "models": [
        {"model": str(donor), "parameters": {"weight": 0.5}}, {"model": str(experts[0]), "parameters": {"weight": 0.5}}]})
    out = tmp_path / "out"
    run(cfg, out, RunOptions(max_memory=2 << 30, progress=False))
    chatml = resolve_chat_template("chatml", [])
    assert (out / "chat_template.jinja").read_text() == chatml
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == chatml


# -- parity: rendered as mergekit 0.1.5's templates render -----------------------------------------------

def _tokenizer(model: Path):
    from e2e.parity import mergekit_or_skip

    mergekit_or_skip()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def _render(tok, template: str | None, messages: list[dict], prompt: bool) -> str:
    try:
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=prompt)
    except Exception as e:  # mistral's raise_exception: the same message from both
        return f"error: {e}"


@pytest.mark.parity
def test_every_shipped_template_renders_like_mergekits(tiny_family):
    tok = _tokenizer(tiny_family[0])
    from importlib import resources

    theirs_dir = resources.files("mergekit._data.chat_templates")
    assert sorted(f.name.removesuffix(".jinja") for f in theirs_dir.iterdir() if f.name.endswith(".jinja")) == NAMES
    for name in NAMES:
        ours, theirs = resolve_chat_template(name, []), (theirs_dir / f"{name}.jinja").read_text()
        for messages in CONVERSATIONS:
            for prompt in (False, True):
                assert _render(tok, ours, messages, prompt) == _render(tok, theirs, messages, prompt), (name, messages)


@pytest.mark.parity
@pytest.mark.parametrize("setting", ["chatml", "auto"])
def test_merged_folder_renders_like_mergekits(tiny_family, tmp_path, setting):
    """The whole path, both tools, each output folder loaded by transformers: `auto` picks llama3, the
    template of two of the three inputs."""
    from e2e.parity import mergekit_or_skip

    mergekit_or_skip()
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, experts = tiny_family
    models = []
    for i, (src, name) in enumerate([(base, "llama3"), (experts[0], "llama3"), (experts[1], "alpaca")]):
        d = tmp_path / f"m{i}"
        shutil.copytree(src, d)
        tc = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps(tc | {"chat_template": resolve_chat_template(name, [])}))
        models.append(d)
    doc = {"merge_method": "linear", "chat_template": setting,
           "models": [{"model": str(m), "parameters": {"weight": 1 / 3}} for m in models]}
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(doc))), str(tmp_path / "mk"),
              MergeOptions(lazy_unpickle=True, quiet=True))
    run(write_yaml(tmp_path / "c.yml", doc), tmp_path / "ours", RunOptions(max_memory=2 << 30, progress=False))
    theirs, ours = _tokenizer(tmp_path / "mk"), _tokenizer(tmp_path / "ours")
    for messages in CONVERSATIONS[:3]:
        for prompt in (False, True):
            assert _render(ours, None, messages, prompt) == _render(theirs, None, messages, prompt)
    if setting == "auto":
        assert "<|start_header_id|>" in _render(ours, None, CONVERSATIONS[0], False)


def test_no_copy_tokenizer_says_the_template_is_not_saved(tiny_family, tmp_path):
    from streammerge.merge import check

    base, experts = tiny_family
    cfg = write_yaml(tmp_path / "c.yml", {"merge_method": "linear", "chat_template": "chatml", "models": [
        {"model": str(m), "parameters": {"weight": 0.5}} for m in experts[:2]]})
    warning = "chat_template: --no-copy-tokenizer writes no tokenizer, so the chat template is not saved (as in mergekit)"
    assert warning in check(cfg, RunOptions(max_memory=2 << 30, copy_tokenizer=False)).warnings
    assert warning not in check(cfg, RunOptions(max_memory=2 << 30)).warnings


def test_unreadable_tokenizer_files_count_as_no_template(tmp_path):
    import os

    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "tokenizer_config.json")  # reading it would block forever
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer_config.json").write_bytes(b"\xff\xfe not json")
    listed = _model_with_template(tmp_path, "listed", [{"name": "tool_use", "template": "{{ x }}"}])
    assert [model_chat_template(d) for d in (fifo, bad, listed)] == [None, None, None]
