"""Tiny random checkpoints of each architecture habit supports, built from configs (no download).

Each config keeps what makes its architecture differ from plain Llama, scaled down: Llama 3.x's
`llama3` rope scaling, Mistral's sliding window, Qwen2's q/k/v biases, Qwen3's q/k norms and
explicit head_dim, Gemma 3's sliding/global layer pattern, scaled embeddings and (1 + w) norms,
Phi-3's fused qkv and gate_up projections. The window sizes are small enough that the tests'
examples (up to ~200 tokens) cross them. Weights are random: fit for format, equivalence and
speed tests, never for quality claims.
"""

from __future__ import annotations

from pathlib import Path

# name → (config class name in transformers, model class name, config overrides)
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.3)

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, max_position_embeddings=4096,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 256})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        tie_word_embeddings=False, sliding_window=48, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=32)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        # 6 layers, 5 sliding then 1 global: the real models' pattern, which llama.cpp hard-codes
        tie_word_embeddings=True, head_dim=32, num_key_value_heads=1, sliding_window=48,
        num_hidden_layers=6, query_pre_attn_scalar=32,
        final_logit_softcapping=None, attn_logit_softcapping=None)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        tie_word_embeddings=False, num_key_value_heads=4, sliding_window=None)),
}


def build_arch(folder: Path, arch: str, tokenizer) -> Path:
    """Write a random 2-layer `arch` model plus `tokenizer` (a PreTrainedTokenizerFast) to folder."""
    import torch
    import transformers

    config_name, model_name, extra = ARCHS[arch]
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = getattr(transformers, config_name)(**(COMMON | ids | extra))
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
