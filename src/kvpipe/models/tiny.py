"""Tiny random-initialised causal LMs with a trained byte-level BPE tokenizer, built offline.

They give the tests and the smoke workflow real Qwen2/Llama code paths (RoPE, GQA, Qwen2's
k/v projection biases) in milliseconds. The same (vocab_size, tokenizer_seed) always yields the same
tokenizer, so two tiny models can share one, as same-family real models do. Like Qwen2.5, the
tokenizer's eos is <|endoftext|> while a turn ends with <|im_end|>: the generation config lists both.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
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


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer with ChatML special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(spec: dict[str, Any], vocab_size: int) -> PreTrainedModel:
    """A random-initialised Qwen2 or Llama model from a `tiny` model source spec; turns end at <|im_end|> or <|endoftext|>."""
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
    model = Qwen2ForCausalLM(Qwen2Config(**common)) if spec["arch"] == "qwen2" else LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config = GenerationConfig(eos_token_id=[IM_END, END_OF_TEXT])
    return model
