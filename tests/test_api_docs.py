"""docs/api.md's examples run: every ```python block, in order, in one namespace, in a temporary folder
(the examples build their own tiny checkpoints with streammerge.synth)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def test_the_api_page_has_examples():
    blocks = python_blocks(DOC.read_text())
    assert len(blocks) >= 6
    joined = "\n".join(blocks)
    for call in ("streammerge.run(", "streammerge.check(", "merge_state_dicts(", "merge_tensors(", "synth.make_family("):
        assert call in joined, call


def test_the_api_page_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "api_doc"}
    for i, block in enumerate(python_blocks(DOC.read_text())):
        exec(compile(block, f"{DOC.name} block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "unknown option 'max_memroy'; did you mean 'max_memory'" in printed
    assert "ConfigError" in printed and "CheckpointError" in printed   # check's problems, printed by the example
    assert (tmp_path / "merged" / "model.safetensors").is_file()
