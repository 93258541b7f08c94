"""Router gates from prompts, computed out of core, with mergekit-moe 0.1.5's definitions.

The router input, as mergekit defines it: for layer i, the hidden state *entering* decoder layer i
(transformers' `hidden_states[i]`, so layer 0 sees the embeddings, and the last layer's output is never
needed). Prompts are tokenized with the base's tokenizer as mergekit does: the tokenizer's bos token
text prepended, no other special tokens. Per expert and layer:
- `hidden`: the state at each prompt's last token; `hidden_avg`: the mean over the prompt's real tokens
  (mergekit divides by the padded length, counting pad positions; we mask them);
- the mean over the expert's positive prompts, minus the mean over its negative prompts, normalised
  to unit length (clamped at 1e-8);
- `cheap_embed`: the sum of the prompt tokens' embedding rows over all prompts, normalised, the same
  for every layer (then positive minus negative, normalised again), reading only those rows;
- `random` / `uniform_random`: standard normal / U(-1/sqrt(H), 1/sqrt(H)) from the counter-based Philox
  stream keyed by --random-seed (mergekit uses torch's global generator: same statistics, other values).
The base runs one layer at a time (`streammerge.forward`), all prompts at once, in fp32 (mergekit
loads the base in bf16, so its gates differ from these by bf16 rounding).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..arch import Arch
from ..errors import CheckpointError, ConfigError
from ..forward import LayerForward
from ..io.reader import ModelFiles
from .config import Expert


def bos_text(model_dir: Path) -> str:
    """The bos token's text from tokenizer_config.json ('' when there is none), as mergekit prepends it."""
    p = model_dir / "tokenizer_config.json"
    if not p.is_file():
        return ""
    bos = json.loads(p.read_text()).get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    return bos or ""


def load_tokenizer(model_dir: Path):
    """The base's fast tokenizer from its tokenizer.json (through the `tokenizers` package)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("gate modes that read prompts need the 'tokenizers' package: pip install "
                          "'streammerge[moe]'") from None
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; prompt-based gates tokenize with the base's tokenizer.json "
                              "(convert a slow tokenizer with transformers' save_pretrained first)")
    return Tokenizer.from_file(str(path))


def tokenize(model_dir: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T], mask [B, T]) right-padded; bos text prepended and no special tokens added (mergekit)."""
    tok = load_tokenizer(model_dir)
    bos = bos_text(model_dir)
    seqs = [tok.encode(bos + p, add_special_tokens=False).ids for p in prompts]
    if any(not s for s in seqs):
        raise ConfigError("a prompt tokenizes to no tokens; write a longer prompt")
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return ids, mask


def _pool(x: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, T, H] -> [B, H]: the last real token (hidden) or the mean over real tokens (hidden_avg)."""
    if mode == "hidden":
        last = mask.long().sum(-1) - 1
        return x[torch.arange(x.shape[0]), last]
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def _groups(experts: list[Expert]) -> tuple[list[str], list[tuple[slice, slice | None]]]:
    """All prompts in one list, and per expert where its positive and negative prompts are."""
    prompts: list[str] = []
    where = []
    for e in experts:
        pos = slice(len(prompts), len(prompts) + len(e.positive_prompts or []))
        prompts += e.positive_prompts or []
        neg = None
        if e.negative_prompts:
            neg = slice(len(prompts), len(prompts) + len(e.negative_prompts))
            prompts += e.negative_prompts
        where.append((pos, neg))
    return prompts, where


def hidden_gates(model: ModelFiles, arch: Arch, experts: list[Expert], mode: str, budget: int) -> torch.Tensor:
    """[layers, experts, hidden] for hidden / hidden_avg, one decoder layer in memory at a time."""
    prompts, where = _groups(experts)
    ids, mask = tokenize(model.path, prompts)
    fwd = LayerForward(model, arch, budget)
    out = torch.empty(arch.num_layers, len(experts), fwd.hidden)
    threads = torch.get_num_threads()
    # a few dozen tokens make each product tiny: one thread, no thread-team barriers (5x faster on 2 cores)
    torch.set_num_threads(1)
    try:
        for i, x in enumerate(fwd.layer_inputs(ids, mask, arch.num_layers)):
            pooled = _pool(x, mask, mode)
            for j, (pos, neg) in enumerate(where):
                v = pooled[pos].mean(0)
                if neg is not None:
                    v = v - pooled[neg].mean(0)
                out[i, j] = _unit(v)
    finally:
        torch.set_num_threads(threads)
        fwd.close()
    return out


def cheap_embed_gates(model: ModelFiles, arch: Arch, experts: list[Expert]) -> torch.Tensor:
    """[layers, experts, hidden] from the prompt tokens' embedding rows only."""
    fwd = LayerForward(model, arch, 0)
    rows = []
    try:
        for e in experts:
            vecs = []
            for prompts in (e.positive_prompts or [], e.negative_prompts or []):
                if not prompts:
                    continue
                ids, mask = tokenize(model.path, prompts)
                emb = fwd.embed(ids) * mask[..., None]
                vecs.append(_unit(emb.sum((0, 1))))
            v = vecs[0] - vecs[1] if len(vecs) == 2 else vecs[0]
            rows.append(_unit(v))
    finally:
        fwd.close()
    return torch.stack(rows)[None].expand(arch.num_layers, -1, -1).contiguous()


def random_gates(layers: int, experts: int, hidden: int, mode: str, seed: int) -> torch.Tensor:
    """[layers, experts, hidden] from the Philox stream of the seed: the same gates on every run."""
    from ..kernels.philox import philox_uniform_torch, stream_id  # a few MB of draws: no JIT compile for that

    def philox_uniform(seed: int, stream: int, start: int, count: int) -> torch.Tensor:
        return philox_uniform_torch(seed, stream, start, count, None)

    n = layers * experts * hidden
    stream = stream_id(0, f"moe.gates.{mode}")
    if mode == "uniform_random":
        scale = (1.0 / hidden) ** 0.5
        return (philox_uniform(seed, stream, 0, n) * (2 * scale) - scale).view(layers, experts, hidden)
    u = philox_uniform(seed, stream, 0, 2 * n).double()
    u1, u2 = u[:n] + 2.0**-25, u[n:]  # Box-Muller; u1 in (0, 1)
    z = (-2.0 * u1.log()).sqrt() * torch.cos(2 * torch.pi * u2)
    return z.float().view(layers, experts, hidden)


def compute_gates(model: ModelFiles, arch: Arch, experts: list[Expert], mode: str, budget: int,
                  seed: int) -> torch.Tensor:
    """Router rows for `experts` (experts then shared experts) per layer: [layers, len(experts), hidden]."""
    hidden = int((model.config or {}).get("hidden_size", 0))
    if mode in ("random", "uniform_random"):
        return random_gates(arch.num_layers, len(experts), hidden, mode, seed)
    if mode == "cheap_embed":
        return cheap_embed_gates(model, arch, experts)
    return hidden_gates(model, arch, experts, mode, budget)
