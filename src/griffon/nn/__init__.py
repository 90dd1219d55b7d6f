"""Layers of the Griffin family, one concept per module."""
