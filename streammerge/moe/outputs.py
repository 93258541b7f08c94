"""The MoE output architectures: which tensor goes where, and the output's config.json.

Tensors are written with the per-expert names (Mixtral `block_sparse_moe.experts.{j}.w1/w2/w3`,
Qwen2-MoE `mlp.experts.{j}.*_proj`), the layout every transformers version reads: 4.x directly, 5.x
through its checkpoint conversion (it fuses them into `experts.gate_up_proj` / `down_proj` at load; the
tests load the output in the installed version). Each expert tensor is then an exact copy of its
source, so a slot can be checked bit for bit. The choice of output follows mergekit-moe 0.1.5: Mixtral
unless shared experts are asked for (Mixtral has none), Qwen2-MoE with exactly one shared expert.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .config import MoEConfig

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_SLOT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
SOURCE_TYPES = {"mixtral": ("llama", "mistral"), "qwen": ("llama", "mistral", "qwen2")}


@dataclass(frozen=True)
class Copy:
    """One output tensor copied from one input: `model` is a config reference; `scale` multiplies it."""

    out_name: str
    model: str
    in_name: str
    scale: float | None = None
    noise: float | None = None        # the expert's noise_scale: N(0, noise²) added before the scale


def choose(cfg: MoEConfig, model_types: dict[str, str]) -> tuple[str, str]:
    """(output, why): the output architecture for this config and the reason, as mergekit chooses."""
    asked = (cfg.architecture or "").lower()
    shared = len(cfg.shared_experts or [])
    kinds = set(model_types.values())
    if len(kinds) != 1:
        listed = ", ".join(f"{m}: {t}" for m, t in model_types.items())
        raise ConfigError(f"experts: every model must have the same model_type for a MoE output ({listed})")
    kind = kinds.pop()
    options = [a for a in ("mixtral", "qwen") if a.startswith(asked)]
    reasons = []
    for arch in options:
        if kind not in SOURCE_TYPES[arch]:
            reasons.append(f"{arch} takes {'/'.join(SOURCE_TYPES[arch])} models, these are {kind}")
        elif arch == "mixtral" and shared:
            reasons.append("mixtral has no shared experts")
        elif arch == "qwen" and shared != 1:
            reasons.append(f"qwen (Qwen2-MoE) needs exactly one shared expert, got {shared}")
        elif arch == "qwen" and cfg.gate_mode not in ("random", "uniform_random") and \
                not cfg.shared_experts[0].positive_prompts:  # type: ignore[index]
            reasons.append("qwen (Qwen2-MoE) needs prompts for its shared expert's gate")
        else:
            why = (f"architecture: {cfg.architecture}" if cfg.architecture else
                   "auto: Mixtral unless shared experts are asked for" if arch == "mixtral" else
                   "auto: one shared expert, which Mixtral cannot hold")
            return arch, why
    raise ConfigError("architecture: no output architecture fits this config (" + "; ".join(reasons) + ")")


def gate_names(arch: str, layer: int) -> tuple[str, str | None]:
    """(router weight, shared-expert gate or None) of one layer."""
    if arch == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.gate.weight", None
    return f"model.layers.{layer}.mlp.gate.weight", f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def expert_copies(arch: str, cfg: MoEConfig, layer: int, prefix: str = "model.layers") -> list[Copy]:
    """Every expert MLP tensor of one layer, copied from its expert (down_proj scaled by residual_scale)."""
    out = []
    for j, e in enumerate(cfg.experts):
        for part in MLP_PARTS:
            src = f"{prefix}.{layer}.mlp.{part}.weight"
            scale = e.residual_scale if part == "down_proj" else None
            if arch == "mixtral":
                name = f"model.layers.{layer}.block_sparse_moe.experts.{j}.{MIXTRAL_SLOT[part]}.weight"
            else:
                name = f"model.layers.{layer}.mlp.experts.{j}.{part}.weight"
            out.append(Copy(name, e.source_model, src, scale, e.noise_scale))
    if arch == "qwen":
        e = cfg.shared_experts[0]  # type: ignore[index]
        for part in MLP_PARTS:
            out.append(Copy(f"model.layers.{layer}.mlp.shared_expert.{part}.weight", e.source_model,
                            f"{prefix}.{layer}.mlp.{part}.weight", e.residual_scale if part == "down_proj" else None,
                            e.noise_scale))
    return out


def missing_biases(arch: str, layer_suffixes: tuple[str, ...]) -> list[str]:
    """Qwen2-MoE's attention has q/k/v biases; a Llama base has none, so they are written as zeros (mergekit)."""
    if arch != "qwen":
        return []
    return [f"self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj") if f"self_attn.{p}.bias" not in layer_suffixes]


def out_config(arch: str, base: dict, cfg: MoEConfig, dtype: str) -> dict:
    """config.json of the output, from the base's (as mergekit builds it from the base's config)."""
    out = dict(base)
    out.pop("transformers_version", None)
    out.update(torch_dtype=dtype, dtype=dtype, num_experts_per_tok=cfg.experts_per_token, sliding_window=None)
    if arch == "mixtral":
        out.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=len(cfg.experts))
    else:
        size = base["intermediate_size"]
        out.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", num_experts=len(cfg.experts),
                   decoder_sparse_step=1, norm_topk_prob=True, use_sliding_window=False, qkv_bias=True,
                   shared_expert_intermediate_size=size, moe_intermediate_size=size, mlp_only_layers=[])
    return out
