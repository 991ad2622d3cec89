"""Language-model tools: generation speed, sampling and speculative decoding (Hugging Face causal LMs)."""
