"""Integrations with other libraries (Hugging Face transformers, ...).

Nothing here imports those libraries at import time: each helper works on the objects it is
given.
"""
