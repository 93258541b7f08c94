"""What a synthetic Llama checkpoint is: its spec, the presets, its tensors and its ``config.json``.

Torch-free, so the command line can list the presets (and check a spec) without importing torch;
``streammerge.synth`` draws and writes the tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DTYPE_SIZES", "PRESETS", "SynthSpec", "hf_config", "numel", "tensor_shapes"]

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
}


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
        "max_position_embeddings": 2048,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": spec.heads,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tie_embeddings,
        "torch_dtype": spec.dtype,
        "use_cache": True,
        "vocab_size": spec.vocab,
    }
