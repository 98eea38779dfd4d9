"""Tiny random-weight Llama (2- and 3-style) / Mistral / Qwen2 / Qwen3 checkpoints and a small byte-level BPE tokenizer,
written to local directories so loading code runs through ``from_pretrained`` with no hub."""
from __future__ import annotations

import os

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Pruning removes heads, channels and layers from a language model after training.",
    "Perplexity is the exponential of the mean negative log-likelihood per predicted token.",
    "Wikipedia is a free online encyclopedia written collaboratively by volunteers.",
]
VOCAB = 320
# Llama-3's RoPE scaling over a short original context, so a window of more than 64 tokens already
# reaches the rescaled frequencies.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_config(arch: str, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "llama3":  # GQA 4 (8 query heads on 2 KV heads), head_dim * heads != hidden
        return LlamaConfig(**{**common, "num_attention_heads": 8, "rope_scaling": LLAMA3_ROPE,
                              **overrides})
    if arch == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if arch == "qwen2":
        common.pop("head_dim")  # Qwen2 derives head_dim from hidden_size / heads
        return Qwen2Config(use_sliding_window=False, **common)
    if arch == "qwen3":  # q_norm / k_norm over each head; head_dim * heads != hidden, as Qwen3's
        return Qwen3Config(use_sliding_window=False, **{**common, "head_dim": 12, **overrides})
    if arch == "gemma3":  # sandwich norms, GeGLU, scaled embeddings, local and global layers
        return Gemma3TextConfig(**{**common, "head_dim": 16, "query_pre_attn_scalar": 16,
                                   "sliding_window": 64, "tie_word_embeddings": True,
                                   "layer_types": ["sliding_attention", "full_attention",
                                                   "sliding_attention"], **overrides})
    raise ValueError(arch)


def make_model_dir(path: str, arch: str = "llama", seed: int = 0, **overrides) -> str:
    """Writes a random-weight model (weights large enough to give non-trivial logits) + tokenizer."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):  # Qwen2's q/k/v biases start at zero: make them count
                p.normal_(0, 0.1)
            elif "norm" in name and isinstance(model.config, Gemma3TextConfig):
                p.normal_(0.0, 0.3)  # Gemma's scale is 1 + weight, which starts at zero
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3's start at ones
                p.normal_(1.0, 0.3)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path
