"""Layer 3: evaluation protocols on frozen features: feature caching, linear probe, kNN, metrics, reports.
"""
