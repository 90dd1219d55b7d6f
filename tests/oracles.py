"""The reference implementations as test oracles (:mod:`griffon.references`): a test that needs a
reference package that is not installed is skipped."""

from __future__ import annotations

import pytest

from griffon import references
from griffon.config import ModelConfig


def deepmind():
    try:
        return references.deepmind()
    except references.ReferenceUnavailable as e:
        pytest.skip(str(e))


def deepmind_fields(cfg: ModelConfig) -> dict:
    return references.deepmind_fields(cfg)


def deepmind_pair(cfg: ModelConfig, seed: int = 0):
    try:
        return references.deepmind_pair(cfg, seed)
    except references.ReferenceUnavailable as e:
        pytest.skip(str(e))


def hf_pair(cfg: ModelConfig, seed: int = 0):
    try:
        return references.hf_pair(cfg, seed)
    except references.ReferenceUnavailable as e:
        pytest.skip(str(e))
