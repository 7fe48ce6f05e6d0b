"""The miniature RE-AdaptIR example: a real small base LM (SmolLM2-135M-Instruct) and a RepLLaMA-style retriever.

- `examples.prepare_base`: convert the fetched 4-bit GGUF into a float32 safetensors checkpoint folder, once.
- `examples.encoding`: the retriever's encoding convention (prefixes, EOS, mean or last-token pooling, L2 norm).
- `examples.bm25`: a small BM25 (k1 0.9, b 0.4) used to mine hard negatives.
- `examples.make_retriever`: train the LoRA retriever and write `examples/assets/repllama-smol/` (mean pooling);
  `examples/assets/repllama-smol-last/` is its last-token (EOS) continuation, made with `--pooling last`.
"""
