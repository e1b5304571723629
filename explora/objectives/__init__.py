"""Layer 3: the self-supervised (DinoV2, MAE) objectives the engine trains.
"""
