"""`streammerge check` reads configs, index files and headers only, so it must not import torch (importing
torch is most of a second or more; issue 5 asks for check in under 2 s on a 1.1B model)."""

import subprocess
import sys

import pytest
import torch

from conftest import write_yaml
from streammerge.io.header import DTYPES, FLOAT_CODES, ITEMSIZE
from streammerge.plan.build import promote_float

# A fresh interpreter (the test process has torch loaded): check each config with the CLI, then say
# whether torch was imported.
_SCRIPT = """
import sys
from streammerge.cli import main
codes = [main(["check", cfg]) for cfg in sys.argv[1:]]
print(codes, "torch" in sys.modules)
"""


def _check_in_fresh_process(*configs) -> str:
    r = subprocess.run([sys.executable, "-c", _SCRIPT, *map(str, configs)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]  # (the plans are printed on stdout before it)


def _configs(base, experts) -> dict[str, dict]:
    """One method of each family module (the method table imports every family; none may import torch)."""
    b, e = str(base), [str(x) for x in experts]
    weighted = [{"model": m, "parameters": {"weight": 0.3, "density": 0.5}} for m in e]
    return {
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 0.5}} for m in e[:2]]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": b, "models": weighted, "dtype": "bfloat16"},
        "nuslerp": {"merge_method": "nuslerp", "models": [{"model": m, "parameters": {"weight": 0.5}} for m in e[:2]]},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": [{"model": m} for m in e]},
        "widen": {"merge_method": "widen", "base_model": b, "models": [{"model": m} for m in e]},
        "ties": {"merge_method": "ties", "base_model": b, "models": weighted, "dtype": "bfloat16"},
    }


def test_check_does_not_import_torch(tiny_family, tmp_path):
    configs = _configs(*tiny_family)
    paths = [write_yaml(tmp_path / f"{name}.yml", doc) for name, doc in configs.items() if name != "ties"]
    assert _check_in_fresh_process(*paths) == f"{[0] * len(paths)} False"


def test_check_ties_does_not_import_torch(tiny_family, tmp_path):
    path = write_yaml(tmp_path / "ties.yml", _configs(*tiny_family)["ties"])
    assert _check_in_fresh_process(path) == "[0] False"


def test_float_promotion_without_torch_is_torchs():
    for a in FLOAT_CODES:
        for b in FLOAT_CODES:
            expected = torch.promote_types(DTYPES[a][0], DTYPES[b][0])
            assert DTYPES[promote_float(a, b)][0] == expected, (a, b)


def test_item_sizes_without_torch_are_torchs():
    assert list(DTYPES) == list(ITEMSIZE)
    for code, (dtype, size) in DTYPES.items():
        assert dtype.itemsize == size == ITEMSIZE[code], code


def test_the_method_table_imports_no_torch_and_no_kernel():
    """Every family module (selective.py included) imports torch and its kernels inside the functions
    that compute, so importing the whole table loads neither."""
    code = ("import sys; from streammerge.methods import METHODS; "
            "print(len(METHODS), 'torch' in sys.modules, any('kernels' in m for m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1:] == ["False", "False"]


def test_check_of_model_wide_ties_does_not_import_torch(tiny_family, tmp_path):
    """scope: model's parameters are tested by ModelPass.check at plan time; only the run builds the
    threshold finders (which need torch)."""
    doc = dict(_configs(*tiny_family)["ties"], parameters={"scope": "model"})
    path = write_yaml(tmp_path / "ties_model.yml", doc)
    assert _check_in_fresh_process(path) == "[0] False"
