"""Layer 3: the generic training loop (steps, optimiser groups, data order, checkpoints, logs, DDP/FSDP2).

Knows objectives only through explora.objectives.base.
"""
