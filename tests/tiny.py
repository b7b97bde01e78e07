"""Tiny random causal LMs from transformers configs (Llama, Qwen2, Mistral, OPT, Gemma 3, GPT-2 shapes) and a tiny
tokenizer trained in memory, so tests run in seconds with no hub."""
from __future__ import annotations

import functools

import torch
import transformers as tf

VOCAB = 384

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256),
    "qwen2": lambda: tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256),
    "mistral": lambda: tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                        max_position_embeddings=256),
    "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=VOCAB, max_position_embeddings=256, word_embed_proj_dim=64),
    # Gemma 3: sliding and full attention blocks (different masks and rotary tables), q/k norms, scaled and tied
    # embeddings, BOS first; a window of 8 so that 16-token calibration windows tell the two kinds apart
    "gemma3": lambda: tf.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                          num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=VOCAB,
                                          max_position_embeddings=256, sliding_window=8,
                                          layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256,
                                  bos_token_id=0, eos_token_id=0),
}


def tiny_model(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[kind]())
    model.eval()
    return model


TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog. " * 5 +
              "Compression keeps meaning per bit; pruning removes weights and quantization rounds them. " * 5)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 1, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TRAIN_TEXT], trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    return fast


def save_tiny(path, kind="llama", seed=0):
    model = tiny_model(kind, seed)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return model
