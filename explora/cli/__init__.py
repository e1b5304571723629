"""Layer 5: the ``explora`` command line; parses arguments and calls the recipes, nothing more.
"""
