"""What a synthetic Llama checkpoint is: its spec, the presets, its tensors and its ``config.json``.

Torch-free, so the command line can list the presets (and check a spec) without importing torch;
``streammerge.synth`` draws and writes the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DTYPE_SIZES", "FAST_PRESETS", "PRESETS", "PRESET_SHARD_SIZES", "SynthSpec", "hf_config", "numel",
           "tensor_shapes"]

DTYPE_SIZES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
"""The checkpoint dtypes a spec may ask for, with their item sizes."""


@dataclass(frozen=True)
class SynthSpec:
    """The shape of a synthetic Llama checkpoint."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    dtype: str = "bfloat16"
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    max_positions: int = 2048

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_SIZES:
            raise ValueError(f"SynthSpec.dtype: expected one of {sorted(DTYPE_SIZES)}, got {self.dtype!r}")
        for field in ("hidden", "intermediate", "layers", "vocab", "heads", "kv_heads"):
            if getattr(self, field) < 1:
                raise ValueError(f"SynthSpec.{field}: expected a positive integer, got {getattr(self, field)}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(
                f"SynthSpec: hidden ({self.hidden}) must be a multiple of heads ({self.heads}), "
                f"and heads a multiple of kv_heads ({self.kv_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_params(self) -> int:
        return sum(numel(shape) for _, shape in tensor_shapes(self))

    @property
    def n_bytes(self) -> int:
        return self.n_params * DTYPE_SIZES[self.dtype]


PRESETS: dict[str, SynthSpec] = {
    "tiny": SynthSpec(hidden=64, intermediate=176, layers=4, vocab=256, heads=4, kv_heads=2),
    # ~25M parameters: big enough to time, small enough for a test run.
    "small": SynthSpec(hidden=512, intermediate=1408, layers=6, vocab=8192, heads=8, kv_heads=4),
    # TinyLlama-1.1B's shape.
    "1b": SynthSpec(hidden=2048, intermediate=5632, layers=22, vocab=32000, heads=32, kv_heads=4),
    # OpenLLaMA-3B's shape: 3.43B parameters, 6.85 GB in bf16 (the GPU benchmark's default).
    "3b": SynthSpec(hidden=3200, intermediate=8640, layers=26, vocab=32000, heads=32, kv_heads=32),
    # Llama-3-8B's shape: 8.03B parameters, 16.1 GB in bf16.
    "8b": SynthSpec(hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32, kv_heads=8,
                    rope_theta=500000.0, max_positions=8192),
    # Llama-3-70B's shapes with 2 of its 80 layers: the full 128256 x 8192 embedding and lm_head (2.1 GB
    # each) and 470 MB MLP matrices, 7.6 GB in bf16: the tensors that span several bands at a 1 GiB budget.
    "70b-slab": SynthSpec(hidden=8192, intermediate=28672, layers=2, vocab=128256, heads=64, kv_heads=8,
                          rope_theta=500000.0, max_positions=8192),
    # Llama-3-70B's shape: 70.6B parameters, 141 GB in bf16 (for machines with the disk).
    "70b-full": SynthSpec(hidden=8192, intermediate=28672, layers=80, vocab=128256, heads=64, kv_heads=8,
                          rope_theta=500000.0, max_positions=8192),
}

PRESET_SHARD_SIZES: dict[str, int] = {"8b": 5 * 10**9, "70b-slab": 5 * 10**9, "70b-full": 5 * 10**9}
"""Shard size per preset where it is not the writer's default: Hugging Face's 5 GB for the Llama-3 shapes."""

FAST_PRESETS = frozenset(PRESET_SHARD_SIZES)
"""Presets written by ``streammerge.synth_fast`` (GB/s, tiled seeded pools) rather than drawn per element."""


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_shapes(spec: SynthSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of ``LlamaForCausalLM`` with its shape, in layer (and shard) order."""
    h, i, kv = spec.hidden, spec.intermediate, spec.kv_heads * spec.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for layer in range(spec.layers):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not spec.tie_embeddings:
        out.append(("lm_head.weight", (spec.vocab, h)))
    return out


def hf_config(spec: SynthSpec) -> dict:
    """``config.json`` of the checkpoint."""
    # The keys transformers 4.4x writes for LlamaForCausalLM (rope_theta / torch_dtype spelling, which
    # transformers 5 still reads); transformers_version is left out so the bytes do not depend on it.
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": spec.max_positions,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_embeddings,
        "torch_dtype": spec.dtype,
        "use_cache": True,
        "vocab_size": spec.vocab,
    }
