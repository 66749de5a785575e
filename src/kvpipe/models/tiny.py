"""Tiny random-initialised causal LMs with a trained byte-level BPE tokenizer, built offline.

They give the tests and the smoke workflow real Qwen2/Llama/Gemma 3 code paths (RoPE, GQA, Qwen2's
k/v projection biases; Gemma 3's q/k norms, query_pre_attn_scalar and sliding-window layers with
their own RoPE base) in milliseconds. The same (vocab_size, tokenizer_seed, family) always yields the
same tokenizer, so two tiny models can share one, as same-family real models do. Like Qwen2.5, the
Qwen2/Llama tokenizer's eos is <|endoftext|> while a turn ends with <|im_end|>: the generation config
lists both. Like the Gemma 3 GGUF, the gemma3 tokenizer has Gemma's special tokens but no chat
template (models.*.chat_template supplies one), and its generation config names only <eos>.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The trainer gives the special tokens the first ids, in this order.
END_OF_TEXT, IM_END = SPECIAL_TOKENS.index("<|endoftext|>"), SPECIAL_TOKENS.index("<|im_end|>")

GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]   # Gemma's ids 0, 1, 2
GEMMA_EOS, END_OF_TURN = GEMMA_SPECIAL_TOKENS.index("<eos>"), GEMMA_SPECIAL_TOKENS.index("<end_of_turn>")
SLIDING_WINDOW = 8   # gemma3: tokens a sliding-window layer attends to

# ChatML, the format of the Qwen2.5 instruct models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_WORDS = (
    "the of and to in is was by for with on as at from that which who what when where how why "
    "context question answer born city river year founded capital known called named built "
    "Norman France king army church village mountain lake north south east west river valley "
    "engineer painter doctor farmer merchant scholar poet pilot 1 2 3 4 5 6 7 8 9 0 , . ? ! : ; ' \" ( )"
).split()


def _corpus(seed: int, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) for _ in range(lines)]


def build_tokenizer(vocab_size: int = 512, seed: int = 0, arch: str = "qwen2") -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer: ChatML special tokens and template, or for gemma3
    Gemma's special tokens and no template."""
    gemma = arch == "gemma3"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=GEMMA_SPECIAL_TOKENS if gemma else SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    if gemma:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def _gemma3(common: dict[str, Any], head_dim: int) -> Gemma3ForCausalLM:
    """Gemma 3 with alternating sliding-window (even) and full-attention (odd) layers, Gemma's RoPE bases
    (1M global, 10k local) and an attention scale query_pre_attn_scalar^-½ that is not 1/√head_dim."""
    layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(common["num_hidden_layers"])]
    return Gemma3ForCausalLM(Gemma3TextConfig(**common | {"rope_theta": 1e6}, head_dim=head_dim, layer_types=layer_types,
                                              sliding_window=SLIDING_WINDOW, rope_local_base_freq=10000.0,
                                              query_pre_attn_scalar=4 * head_dim, pad_token_id=0))


def build_model(spec: dict[str, Any], vocab_size: int) -> PreTrainedModel:
    """A random-initialised Qwen2, Llama or Gemma 3 model from a `tiny` model source spec.

    Qwen2/Llama turns end at <|im_end|> or <|endoftext|>; Gemma 3's generation config names only <eos>.
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(spec["seed"])
    if spec["arch"] == "gemma3":
        model = _gemma3(common, spec["hidden_size"] // spec["heads"])
        model.generation_config = GenerationConfig(eos_token_id=GEMMA_EOS)
        return model
    model = Qwen2ForCausalLM(Qwen2Config(**common)) if spec["arch"] == "qwen2" else LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config = GenerationConfig(eos_token_id=[IM_END, END_OF_TEXT])
    return model
