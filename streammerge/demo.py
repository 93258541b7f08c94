"""`streammerge demo`: make tiny seeded checkpoints and merge them: the main job on an embedded default."""

from __future__ import annotations

import tempfile
from pathlib import Path

TEMPLATES = {
    "linear": """\
# streammerge demo: three tiny Llama-shaped fine-tunes averaged with weights.
merge_method: linear
models:
  - model: {e0}
    parameters: {{weight: 0.5}}
  - model: {e1}
    parameters: {{weight: 0.3}}
  - model: {e2}
    parameters: {{weight: 0.2}}
dtype: bfloat16
""",
    "task_arithmetic": """\
# streammerge demo: three task vectors added onto their base.
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {e0}
    parameters: {{weight: 0.5}}
  - model: {e1}
    parameters: {{weight: [0.1, 0.5]}}
  - model: {e2}
    parameters: {{weight: 0.2}}
""",
    "slerp": """\
# streammerge demo: spherical interpolation from the base to one fine-tune, t rising through the layers.
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {e0}
parameters:
  t: [0.0, 0.5, 1.0]
""",
    "ties": """\
# streammerge bench: TIES, each task vector keeps its top half by magnitude, signs elected.
merge_method: ties
base_model: {base}
models:
  - model: {e0}
  - model: {e1}
  - model: {e2}
parameters: {{weight: 0.3333, density: 0.5}}
dtype: bfloat16
""",
    "dare_ties": """\
# streammerge bench: DARE, half of each task vector dropped at random, rescaled, signs elected.
merge_method: dare_ties
base_model: {base}
models:
  - model: {e0}
  - model: {e1}
  - model: {e2}
parameters: {{weight: 0.3333, density: 0.5}}
dtype: bfloat16
""",
    "della": """\
# streammerge bench: DELLA, keep probability rising with each |δ|'s rank in its row.
merge_method: della
base_model: {base}
models:
  - model: {e0}
  - model: {e1}
  - model: {e2}
parameters: {{weight: 0.3333, density: 0.5, epsilon: 0.1}}
dtype: bfloat16
""",
    "passthrough": """\
# streammerge demo: a frankenmerge stacking layers of two models.
merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, {last}]}}]
  - sources: [{{model: {e0}, layer_range: [1, {layers}]}}]
""",
}


def _config_text(template: str, base: Path, experts: list[Path], layers: int) -> str:
    return template.format(base=base, e0=experts[0], e1=experts[1], e2=experts[2], last=layers - 1, layers=layers)


def _merge(console, cfg: Path, text: str, out: Path, options, watch=None):
    """Write the config, merge with a progress bar (inside `watch`, a context manager such as a MemWatch,
    when given), print the per-shard table; the run report."""
    import contextlib

    from .progress import run_with_progress

    cfg.write_text(text)
    with watch if watch is not None else contextlib.nullcontext():
        report = run_with_progress(cfg, out, options, console)
    report.print(console)
    return report


def demo(console, out: Path | None = None, method: str = "linear", progress: bool = True) -> int:
    from . import synth
    from .io.reader import open_model
    from .options import RunOptions

    template = TEMPLATES.get(method)
    if template is None:
        console.print(f"[red]error:[/red] the demo knows {', '.join(TEMPLATES)}; got {method!r}")
        return 2
    with tempfile.TemporaryDirectory(prefix="streammerge-demo-") as tmp:
        root = Path(out) if out else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        console.print(f"making tiny checkpoints in {root} ...")
        spec = synth.PRESETS["tiny"]
        base, experts = synth.make_family(root / "inputs", spec, 3, seed=0)
        text = _config_text(template, base, experts, spec.layers)
        cfg = root / "demo.yml"
        console.print(f"config {cfg}:\n{text}")
        merged = root / "merged"
        _merge(console, cfg, text, merged, RunOptions(max_memory=1 << 30, overwrite=True, progress=progress))
        model = open_model(merged)
        console.print(f"[green]merged model[/green] {merged}: {len(model.tensors)} tensors, "
                      f"{sum(t.nbytes for t in model.tensors.values()) / 1e6:.2f} MB; it loads with "
                      "transformers.AutoModelForCausalLM.from_pretrained")
        if out is None:
            console.print("(temporary folder removed; pass --out DIR to keep it)")
    return 0


def bench(console, options, preset: str, method: str, data: Path | None, watch=None):
    """Merge a synthetic family of `preset` with `method` and print the per-shard throughput table
    (the merge runs inside `watch` when given). For a comparison with mergekit on the same inputs, see
    scripts/bench_merge.py; for the 70B-shaped slab at several budgets, scripts/bench_scale.py."""
    from . import synth

    spec = synth.PRESETS.get(preset)
    template = TEMPLATES.get(method)
    if spec is None or template is None:
        console.print(f"[red]error:[/red] presets: {', '.join(synth.PRESETS)}; methods: {', '.join(TEMPLATES)}")
        return None
    with tempfile.TemporaryDirectory(prefix="streammerge-bench-") as tmp:
        root = Path(data) if data else Path(tmp)
        if preset in synth.FAST_PRESETS:
            from .synth_fast import make_family_fast

            base, experts = make_family_fast(root / preset, spec, 3, seed=0, reuse=True,
                                             shard_size=synth.PRESET_SHARD_SIZES[preset])
        else:
            base, experts = synth.make_family(root / preset, spec, 3, seed=0, reuse=True)
        text = _config_text(template, base, experts, spec.layers)
        return _merge(console, Path(tmp) / "bench.yml", text, Path(tmp) / "merged", options, watch)
