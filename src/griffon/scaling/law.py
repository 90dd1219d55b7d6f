"""The scaling law ``model=auto`` plans with: ``L(N, D) = E + A / N^alpha + B / D^beta`` in bits per
byte, fitted by :func:`griffon.scaling.fit.fit_parametric` on a calibration sweep
(:mod:`griffon.scaling.calibrate`), and where its file is: this machine's, written by ``griffon
scaling calibrate``, else the one shipped with griffon."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from griffon.atomic import atomic_write
from griffon.config import ConfigError
from griffon.files import CONFIG_BYTES, FileError, read_json


@dataclass
class ScalingLaw:
    """``L(N, D) = E + A / N^alpha + B / D^beta`` (bits per byte; ``N`` non-embedding parameters,
    ``D`` training bytes) and where it was measured."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    source: dict[str, Any]

    @classmethod
    def from_fit(cls, fit: dict[str, Any], source: dict[str, Any]) -> ScalingLaw:
        """The law of a parametric fit (:func:`griffon.scaling.fit.fit_parametric`'s dict)."""
        return cls(E=fit["E"], A=fit["A"], alpha=fit["alpha"], B=fit["B"], beta=fit["beta"], source=source)

    def predict(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def describe(self) -> str:
        return (
            f"L = {self.E:.3g} + {self.A:.3g} / N^{self.alpha:.3g} + {self.B:.3g} / D^{self.beta:.3g} bits/byte"
            f" ({self.source.get('machine', 'unknown machine')}, {self.source.get('date', 'undated')})"
        )

    def save(self, path: str | Path) -> None:
        text = json.dumps(asdict(self), indent=2) + "\n"
        atomic_write(Path(path), lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: str | Path) -> ScalingLaw:
        try:
            d = read_json(path, CONFIG_BYTES, "a scaling law file")
            return cls(**{k: d[k] for k in ("E", "A", "alpha", "B", "beta")}, source=d.get("source", {}))
        except (FileError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} is not a scaling law file ({e}); rerun `griffon scaling calibrate`") from None


def user_law_path() -> Path:
    """Where ``griffon scaling calibrate`` writes this machine's law (used instead of the shipped one)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "griffon" / "auto_law.json"


def shipped_law_path() -> Path:
    return Path(str(resources.files("griffon.scaling") / "auto_law.json"))


def default_law() -> tuple[ScalingLaw, Path]:
    """This machine's calibrated law if there is one, else the shipped one; and its path."""
    path = user_law_path() if user_law_path().is_file() else shipped_law_path()
    return ScalingLaw.load(path), path
