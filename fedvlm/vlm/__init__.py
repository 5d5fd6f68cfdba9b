"""Vision-language models: built-in tiny presets, loading through ``from_pretrained``, fine-tuning strategies.

Submodules import torch/transformers lazily where they can, so ``import fedvlm.vlm`` stays cheap.
"""
