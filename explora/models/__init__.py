"""Layer 2: backbones and their checkpoints, the multispectral and temporal encoders, the ExPLoRA
parameterisation, parameter counts and exports.
"""
