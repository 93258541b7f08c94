"""The gate forward holds one band of one layer plus the activations: its peak stays within the budget
on a model whose weights (let alone a full forward) would not fit, and every budget gives the same gates."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from streammerge.arch import infer_arch
from streammerge.io.reader import open_model
from streammerge.moe.config import Expert
from streammerge.moe.gates import hidden_gates
from streammerge.synth import SynthSpec, make_family

SPEC = SynthSpec(hidden=256, intermediate=1024, layers=6, vocab=1024, heads=8, kv_heads=4)
EXPERTS = [Expert(source_model="a", positive_prompts=["the merge model", "a tensor shard of the base"]),
           Expert(source_model="b", positive_prompts=["expert chunk budget memory"], negative_prompts=["the layer"])]
SLACK = 8 << 20  # malloc's arenas and torch's small temporaries

SCRIPT = """
import json, sys, threading, time
import psutil, torch
from streammerge.pipeline import bound_malloc
from streammerge.arch import infer_arch
from streammerge.io.reader import open_model
from streammerge.moe.config import Expert
from streammerge.moe.gates import hidden_gates
bound_malloc()  # as the run does before its gate step
path, budget, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
experts = [Expert.model_validate(e) for e in json.loads(sys.argv[4])]
mf = open_model(path)
arch = infer_arch(mf)
# a first call pays the libraries' one-time start-up (the tokenizers library, torch's kernels and thread
# pool: about 12 MiB once per process, inside the run's allocator slack); the second is the forward's own
hidden_gates(mf, arch, experts, "hidden", budget)
proc = psutil.Process()
rss0, peak, done = proc.memory_info().rss, [0], threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.0005)
t = threading.Thread(target=poll)
t.start()
g = hidden_gates(mf, arch, experts, "hidden", budget)
done.set()
t.join()
torch.save(g, out)
print(json.dumps({"delta": peak[0] - rss0}))
"""


@pytest.mark.slow  # a subprocess and a 6-layer model: about 15 s on 2 cores
def test_gate_forward_peak_within_budget_and_same_gates_at_every_budget(tmp_path):
    base, _ = make_family(tmp_path / "fam", SPEC, 1, seed=3)
    budget = 1 << 20
    assert SPEC.n_bytes > budget + SLACK  # even the stored weights could not be held, let alone a full forward
    experts = json.dumps([e.model_dump() for e in EXPERTS])
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(base), str(budget), str(tmp_path / "g.pt"), experts],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    delta = json.loads(r.stdout.strip().splitlines()[-1])["delta"]
    assert delta <= budget + SLACK, f"the gate forward took {delta / 2**20:.1f} MiB over a {budget >> 20} MiB budget"
    small = torch.load(tmp_path / "g.pt")
    mf = open_model(base)
    arch = infer_arch(mf)
    for other in (1 << 30,):
        assert torch.equal(hidden_gates(mf, arch, EXPERTS, "hidden", other), small), other
