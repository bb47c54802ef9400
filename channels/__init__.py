"""The delivery side: the worker runtime and one module per provider."""
