"""Tiny random Llama / Qwen2 models for the structural tests (built from transformers configs)."""
import torch


def tiny_model(kind: str = "llama", seed: int = 0, layers: int = 3, heads: int = 4, kv: int = 2,
               hidden: int = 32, inter: int = 48, vocab: int = 64):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                  max_position_embeddings=64, tie_word_embeddings=(kind == "qwen2"))
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is tiny (std 0.02): make layers matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3 / p.shape[1] ** 0.5 * 3)
    return model


def calib(n: int = 4, length: int = 16, vocab: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def one_thread():
    """Tiny ops are dominated by thread hand-offs on a busy 2-core machine: run them on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
