"""Real 7-8B architectures' shapes as ``LlamaConfig`` keyword arguments, for measurements with random weights (no
real 7B weights are needed: speed and memory do not depend on the values). Used by ``benchmarks/random_model.py``,
``benchmarks/gpu_7b_inprocess.py`` and ``benchmarks/delta_size.py``; ``tiny`` is for CPU dry runs."""

SHAPES: dict[str, dict] = {
    # Llama-2-7B: MHA (32 kv heads), 32 layers, d 4096, vocab 32000
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rope_theta=10000.0, tie_word_embeddings=False),
    # Llama-3-8B: GQA (8 kv heads), 32 layers, d 4096, vocab 128256
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False),
}
