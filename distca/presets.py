"""Model shape presets (``model.preset``): published architecture numbers."""

from __future__ import annotations

from typing import Any

# Published architecture numbers (from the models' config.json files).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_kv_heads=2,
                 ffn_hidden_size=352, vocab_size=512, rope_theta=10000.0, norm_eps=1e-5,
                 max_position_embeddings=8192),
    "llama3-8b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_kv_heads=8,
                      ffn_hidden_size=14336, vocab_size=128256, rope_theta=500000.0,
                      norm_eps=1e-5, max_position_embeddings=131072),
    "codellama-34b": dict(num_layers=48, hidden_size=8192, num_attention_heads=64,
                          num_kv_heads=8, ffn_hidden_size=22016, vocab_size=32000,
                          rope_theta=1000000.0, norm_eps=1e-5, max_position_embeddings=16384),
    "qwen2.5-7b": dict(num_layers=28, hidden_size=3584, num_attention_heads=28, num_kv_heads=4,
                       ffn_hidden_size=18944, vocab_size=152064, rope_theta=1000000.0,
                       norm_eps=1e-6, max_position_embeddings=32768, qkv_bias=True),
}
