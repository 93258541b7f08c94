#!/usr/bin/env python
"""Benchmark `streammerge moe` against mergekit-moe 0.1.5 on the 1.1B synthetic family, in the same run.

    python scripts/bench_moe.py --data /work/bench-data-moe --max-memory 1GiB --out docs/bench-moe.md

A 4-expert Mixtral (gate_mode hidden, two prompts per expert) from `streammerge.synth`'s 1b preset:
the family's three experts and the base itself as the fourth (so the family is 4 checkpoints, not 5).
The synthetic checkpoints carry streammerge.synth's word-level tokenizer (18 words), so the prompts are
made of those words; both tools tokenize them with it. Each tool runs as a child under /usr/bin/time
-v (bench_merge.measure); streammerge gets a fresh gates cache, so its time includes the gate forward.
Afterwards the output is loaded in transformers and generates, and the two outputs are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import TIME_BIN, machine, measure, warm  # noqa: E402

from streammerge.synth import PRESETS, make_family  # noqa: E402

PROMPTS = [["the merge model", "a tensor shard"], ["the stream of memory", "base layer weight"],
           ["expert chunk budget", "a chunk of the shard"], ["and the weight of a layer", "memory budget and model"]]
GiB = 1 << 30


def config(base: Path, experts: list[Path]) -> dict:
    return {"base_model": str(base), "gate_mode": "hidden", "dtype": "bfloat16", "experts_per_token": 2,
            "experts": [{"source_model": str(e), "positive_prompts": p} for e, p in zip(experts, PROMPTS)]}


def verify(out: Path) -> str:
    """Load in transformers and generate 4 tokens; returns a line for the record."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 3, 4, 5]])
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    return f"{type(model).__name__} loaded ({model.config.num_local_experts} experts), generated {gen[0, 4:].tolist()}"


def compare(a: Path, b: Path, layers: int) -> str:
    """Router rows (max |difference|) and one layer's experts (bit for bit) of our output vs mergekit's."""
    import torch
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    if ".gate.weight" in k or ".layers.0.mlp.experts" in k or ".layers.0.block_sparse_moe.experts" in k:
                        out[k] = h.get_tensor(k)
        return out

    x, y = tensors(a), tensors(b)
    diff = max((x[f"model.layers.{i}.block_sparse_moe.gate.weight"].float()
                - y[f"model.layers.{i}.mlp.gate.weight"].float()).abs().max().item() for i in range(layers))
    fused = torch.stack([torch.cat([x[f"model.layers.0.block_sparse_moe.experts.{j}.w1.weight"],
                                    x[f"model.layers.0.block_sparse_moe.experts.{j}.w3.weight"]]) for j in range(4)])
    same = torch.equal(fused, y["model.layers.0.mlp.experts.gate_up_proj"])
    return f"router rows: max |ours - mergekit| = {diff:.4f} (bf16); layer 0 experts bit for bit: {same}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="/work/bench-data-moe")
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--max-memory", default="1GiB")
    ap.add_argument("--work", default=None, help="output folders (default: a temp folder, deleted)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)
    spec = PRESETS[args.preset]
    base, experts = make_family(Path(args.data) / args.preset, spec, 3, reuse=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-moe-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "moe.yml"
    cfg.write_text(yaml.safe_dump(config(base, [*experts, base]), sort_keys=False))
    warm([base, *experts])
    use_time = os.access(TIME_BIN, os.X_OK)
    env_cache = work / "gates-cache"
    shutil.rmtree(env_cache, ignore_errors=True)
    os.environ["STREAMMERGE_CACHE"] = str(env_cache)
    rows = []
    ours = work / "streammerge"
    cmd = [sys.executable, "-m", "streammerge.cli", "moe", str(cfg), str(ours), "--max-memory", args.max_memory,
           "--no-progress", "--overwrite"]
    rc, wall, rss, cpu, how = measure(cmd, work / "streammerge.log", use_time)
    rows.append(("streammerge moe --max-memory " + args.max_memory, rc, wall, rss, cpu))
    notes = [verify(ours)] if rc == 0 else [f"streammerge failed: see {work / 'streammerge.log'}"]
    if not args.skip_mergekit:
        theirs = work / "mergekit"
        shutil.rmtree(theirs, ignore_errors=True)
        mk = Path(sys.executable).with_name("mergekit-moe")
        rc2, wall2, rss2, cpu2, _ = measure([str(mk), str(cfg), str(theirs), "--device", "cpu"],
                                            work / "mergekit.log", use_time)
        rows.append(("mergekit-moe 0.1.5", rc2, wall2, rss2, cpu2))
        if rc2 == 0 and rc == 0:
            notes.append(compare(ours, theirs, spec.layers))
        elif rc2 != 0:
            notes.append(f"mergekit-moe failed (exit {rc2}): " + (work / "mergekit.log").read_text()[-400:])
    lines = [f"machine: {machine()}; peak RSS by {how}", "",
             "| tool | exit | wall s | peak RSS GiB | CPU s |", "|---|---|---|---|---|"]
    for name, code, w, r, c in rows:
        lines.append(f"| {name} | {code} | {w:.1f} | {r / GiB:.2f} | {c:.1f} |")
    lines += ["", *notes]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    (work / "result.json").write_text(json.dumps({"rows": rows, "notes": notes}, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r[1] == 0 for r in rows[:1]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
