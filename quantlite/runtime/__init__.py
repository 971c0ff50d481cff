"""The layer-streaming Llama runtime: llama.py (the math), streaming.py (where weights live),
generate.py (sampling, stop tokens, chat template, batching). Start with quantlite.load(path)."""
