"""Layer 4: whole jobs assembled from the layers below (pre-train, fine-tune, memory estimate, demo).
"""
