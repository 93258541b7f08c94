"""The Llama-family decoder forward, one layer at a time, read from the checkpoint as it goes.

Why its own module: MoE router gates need the base's hidden states for a handful of prompts, and a
whole-model forward (what mergekit-moe does) needs the whole model in memory. Here each layer's weights
are read from the checkpoint through `RowReader`, applied to every prompt's hidden states and freed, and
each linear layer is read in row bands sized to the budget, so the peak is one band plus the
activations whatever the model's size. It matches transformers' LlamaDecoderLayer: RMSNorm, rotary
embeddings (rope_theta; other rope scalings are refused), grouped-query attention with a causal and
padding mask, SiLU-gated MLP; biases are added where the checkpoint has them (Qwen2). Compute is fp32.
Padding is on the right and positions count real tokens from 0, so a padded prompt's states equal the
unpadded prompt's.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .arch import Arch
from .errors import BudgetError, CheckpointError, ConfigError
from .io.header import TensorInfo
from .io.reader import ModelFiles, RowReader

F32 = torch.float32
MATMUL_ROWS = 64  # output rows per matmul: fixed, so the banding a budget picks never changes a result


class LayerForward:
    """Runs a Llama-shaped checkpoint's decoder layers on a batch, reading each layer when it runs."""

    def __init__(self, model: ModelFiles, arch: Arch, budget: int):
        cfg = model.config or {}
        self.model, self.arch, self.budget = model, arch, budget
        try:
            self.hidden = int(cfg["hidden_size"])
            self.heads = int(cfg["num_attention_heads"])
            self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{model.path}/config.json: {e} is missing or not a number; the layer-at-a-time "
                                  "forward needs hidden_size and num_attention_heads") from None
        self.head_dim = int(cfg.get("head_dim") or self.hidden // self.heads)
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{model.path}/config.json: hidden_act {act!r}; the layer-at-a-time forward does SiLU only")
        rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
        scaling = cfg.get("rope_scaling") or {}
        kind = (scaling.get("rope_type") or scaling.get("type") or rope.get("rope_type") or "default")
        if kind != "default":
            raise ConfigError(f"{model.path}/config.json: rope scaling {kind!r} is not implemented in the "
                              "layer-at-a-time forward (only plain rotary embeddings with rope_theta)")
        self.theta = float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0)
        self.reader = RowReader()

    def close(self) -> None:
        self.reader.close()

    # -- weights ------------------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        info = self.model.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.model.path}: tensor {name!r} is missing (the forward needs it)")
        return info

    def _vector(self, name: str) -> torch.Tensor:
        info = self._info(name)
        return self.reader.read_rows(info, 0, 1).to(F32).reshape(-1)

    def _linear(self, x: torch.Tensor, layer: int, part: str, spare: int) -> torch.Tensor:
        """x @ W.T (+ b), W read in bands of output rows that fit `spare` bytes (stored + fp32 copy)."""
        info = self._info(self.arch.layer_tensor(layer, part + ".weight"))
        rows, cols = info.shape
        unit = min(rows, MATMUL_ROWS)
        per_unit = unit * cols * (info.itemsize + 4)
        if per_unit > spare:
            raise BudgetError(f"the gate forward: {unit} rows of {info.name!r} need {per_unit} bytes but the budget "
                              f"leaves {max(spare, 0)} after the activations; raise --max-memory")
        band = unit * (spare // per_unit)  # rows read at once: whole matmul units, as many as fit
        flat = x.reshape(-1, cols)
        out = torch.empty(flat.shape[0], rows, dtype=F32)
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            w = self.reader.read_rows(info, r0, r1).to(F32)
            for u0 in range(r0, r1, unit):  # fixed units: the same products whatever the band, so any budget
                u1 = min(r1, u0 + unit)     # gives the same bits (a product into a strided `out=` is slow)
                out[:, u0:u1] = flat @ w[u0 - r0:u1 - r0].T
            del w
        out = out.view(*x.shape[:-1], rows)
        bias = self.model.tensors.get(self.arch.layer_tensor(layer, part + ".bias"))
        if bias is not None:
            out += self.reader.read_rows(bias, 0, 1).to(F32).reshape(-1)
        return out

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    # -- the forward --------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of `ids` [B, T]: only the rows of the tokens used are read."""
        name = self.arch.embed_name()
        if name is None:
            raise CheckpointError(f"{self.model.path}: no input embedding tensor found")
        info = self._info(name)
        uniq = torch.unique(ids).tolist()
        if uniq and (uniq[0] < 0 or uniq[-1] >= info.shape[0]):
            raise CheckpointError(f"{self.model.path}: token id {uniq[-1]} is outside {name!r}'s {info.shape[0]} rows; "
                                  "the tokenizer does not belong to this model")
        rows = torch.stack([self.reader.read_rows(info, r, r + 1).to(F32).reshape(-1) for r in uniq])
        return rows[torch.searchsorted(torch.tensor(uniq), ids)]

    def activation_bytes(self, batch: int, seq: int) -> int:
        """fp32 activations of one layer over the batch (upper bound): residual, norms, q/k/v, scores, MLP."""
        cfg = self.model.config or {}
        inter = int(cfg.get("intermediate_size") or 4 * self.hidden)
        n = batch * seq
        return 4 * (n * (6 * self.hidden + 3 * inter) + 3 * batch * self.heads * seq * seq)

    def layer(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One decoder layer on x [B, T, H]; `mask` [B, T] is True on real tokens."""
        b, t, _ = x.shape
        spare = self.budget - self.activation_bytes(b, t)
        h = self._norm(x, self._vector(self.arch.layer_tensor(i, "input_layernorm.weight")))
        q = self._linear(h, i, "self_attn.q_proj", spare).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self._linear(h, i, "self_attn.k_proj", spare).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self._linear(h, i, "self_attn.v_proj", spare).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self._rope(mask)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & mask[:, None, None, :]
        allowed = allowed | torch.eye(t, dtype=torch.bool)[None, None]  # a pad row attends to itself: no NaN
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
        del q, k, v, scores
        x = x + self._linear(attn.transpose(1, 2).reshape(b, t, -1), i, "self_attn.o_proj", spare)
        h = self._norm(x, self._vector(self.arch.layer_tensor(i, "post_attention_layernorm.weight")))
        g = self._linear(h, i, "mlp.gate_proj", spare)
        u = self._linear(h, i, "mlp.up_proj", spare)
        g = torch.nn.functional.silu(g) * u
        del u
        return x + self._linear(g, i, "mlp.down_proj", spare)

    def _rope(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0).to(F32)  # real tokens from 0; right pads after
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(F32) / self.head_dim))
        freqs = pos[..., None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos(), emb.sin()

    def layer_inputs(self, ids: torch.Tensor, mask: torch.Tensor, layers: int) -> Iterator[torch.Tensor]:
        """The input hidden states of layers 0 .. layers-1 (transformers' hidden_states[0 .. layers-1])."""
        x = self.embed(ids)
        for i in range(layers):
            yield x
            if i + 1 < layers:
                x = self.layer(i, x, mask)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
