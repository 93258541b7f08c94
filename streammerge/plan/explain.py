"""`streammerge check`: the plan as a person reads it."""

from __future__ import annotations

from collections import Counter

from .ir import Plan
from .passes import summary


def _fmt(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def print_plan(plan: Plan, console, diagnostics=None) -> None:
    """The plan on `console` (stdout: `check > plan.txt` holds it); its warnings on `diagnostics` (stderr)."""
    from rich.markup import escape
    from rich.table import Table

    diagnostics = diagnostics or console
    console.print(f"[bold]method[/bold] {plan.method}; {len(plan.models)} model(s):")
    for i, m in enumerate(plan.models):
        console.print(f"  \\[{i}] {escape(str(m))}", highlight=False, soft_wrap=True)
    multi = sum(1 for t in plan.tensors if not t.read_once and t.passes > 1)
    shapes = Counter((*t.reduces, "map") for t in plan.tensors)
    passes = "; ".join(f"{' > '.join(p)}" + (f" x{n}" if len(shapes) > 1 else "") for p, n in shapes.items())
    console.print(f"[bold]tensors[/bold] {len(plan.tensors)} ({plan.out_layers} layers); passes per tensor: "
                  f"{plan.tensors[0].passes if plan.tensors else 0} ({passes or 'none'}); re-read for later passes: {multi}")
    console.print(f"[bold]reads[/bold]: {summary(plan)}")
    if plan.model_sweeps:
        console.print(f"[bold]whole-model sweeps[/bold] {plan.model_sweeps} before the per-tensor passes (scope: model)")
    kinds = Counter(t.out_dtype for t in plan.tensors)
    console.print(f"[bold]bytes[/bold] in {_fmt(plan.bytes_in)}, out {_fmt(plan.bytes_out)}; output dtype(s): "
                  + ", ".join(f"{k} x{v}" for k, v in kinds.items()))
    if plan.downloads:
        console.print(f"[bold]download[/bold] {len(plan.downloads)} file(s) from the hub, "
                      f"{_fmt(sum(n for _, n in plan.downloads))}, before the merge (into the hub cache)")
    table = Table(title="output shards")
    for col in ("shard", "tensors", "size"):
        table.add_column(col)
    for s in plan.shards:
        table.add_row(s.filename, str(len(s.tensors)), _fmt(s.nbytes))
    console.print(table)
    widest = max(plan.tensors, key=lambda t: t.row_elems, default=None)
    console.print(f"[bold]memory[/bold] budget {_fmt(plan.budget)}; estimated peak {_fmt(plan.peak_estimate)} "
                  f"(process baseline {_fmt(plan.baseline_rss)})"
                  + (f"; widest row {widest.name} ({widest.row_elems} elements)" if widest else ""))
    if plan.device in ("cuda", "auto"):
        if plan.gpu_budget:
            console.print(f"[bold]device memory[/bold] budget {_fmt(plan.gpu_budget)} (--max-gpu-memory); "
                          f"estimated peak of device buffers {_fmt(plan.gpu_peak_estimate)}")
        else:
            console.print("[bold]device memory[/bold] budget not checked here: a CUDA run takes 80% of the GPU's memory "
                          "unless --max-gpu-memory is given")
    if plan.tokenizer_model is not None:
        console.print(f"[bold]tokenizer[/bold] and generation files from \\[{plan.tokenizer_model}] "
                      "(unless --no-copy-tokenizer)", highlight=False)
    for w in plan.warnings:
        diagnostics.print(f"[yellow]warning:[/yellow] {escape(w)}", soft_wrap=True)
    console.print("[green]ok[/green]: the config and the checkpoints' headers are consistent.")
