"""quantlite inside other tools: transformers (huggingface.py), PEFT LoRA (peft.py) and
lm-evaluation-harness (lm_eval.py)."""
