"""quantlite inside other tools: transformers (huggingface.py) and lm-evaluation-harness (lm_eval.py)."""
