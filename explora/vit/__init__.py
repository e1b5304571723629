"""Layer 1, the ViT toolkit on top of timm: LoRA layers and the token-level forward.

Imports only explora.core.
"""
