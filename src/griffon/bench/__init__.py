"""Benchmarks that ship with the package (``griffon bench ...``); the others are scripts in ``benchmarks/``."""
