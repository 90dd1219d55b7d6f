"""Tokenizers, data preparation, the embedded corpus and the packing loader."""
