"""`dws tiny-model DIR`: a deterministic, tiny Qwen3-architecture checkpoint that transformers and vLLM both load.

The Hub is unreachable in tests, CI and the demo, so the model is built here: a byte-level BPE tokenizer with no
merges (256 byte tokens + chat specials, built with `tokenizers`), a 2-layer Qwen3 with tied embeddings, weights drawn
like a real model's (normal, std 0.02; norms at 1), saved as bf16 safetensors. Same seed -> same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, vocab_size=320, max_position_embeddings=1024)


def _byte_vocab() -> dict[str, int]:
    # GPT-2's reversible byte -> printable-unicode map, so every byte string round-trips through the tokenizer.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in sorted(zip(printable, codes))}


def build_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = _byte_vocab()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": DEFAULT_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }, indent=1))
    return tok.get_vocab_size()


def build_tiny_model(out: str | Path, *, seed: int = 0, **overrides) -> Path:
    """Write config, bf16 safetensors weights and tokenizer to `out`; returns the folder."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_tokens = build_tokenizer(out)
    cfg = {**DEFAULT_CONFIG, **overrides}
    if cfg["vocab_size"] < n_tokens:
        raise ValueError(f"vocab_size {cfg['vocab_size']} is smaller than the tokenizer's {n_tokens} tokens")
    config = Qwen3Config(**cfg, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=10000.0,
                         bos_token_id=None, eos_token_id=SPECIALS.index("<|im_end|>") + 256,
                         pad_token_id=SPECIALS.index("<|endoftext|>") + 256, torch_dtype="bfloat16",
                         initializer_range=0.02)
    gen = torch.Generator().manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * config.initializer_range)
    model = model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)  # defaults only; keep the folder minimal
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="dws tiny-model", description="Write the deterministic tiny Qwen3 checkpoint "
                                 "(config, bf16 safetensors, byte-level tokenizer) that tests and the demo use.")
    ap.add_argument("dir", help="output folder (created)")
    ap.add_argument("--seed", type=int, default=0, help="weights seed; same seed -> same bytes (default 0)")
    args = ap.parse_args(argv)
    out = build_tiny_model(args.dir, seed=args.seed)
    print(f"tiny Qwen3 model written to {out}")
    return 0
