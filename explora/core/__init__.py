"""Layer 1, the base: errors, atomic io and hashing, configuration mechanics, precision, schedules, logging.

Imports nothing else from explora.
"""
