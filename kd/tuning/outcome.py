"""What tuning chose (`Tuned`): the final runs train at it (variant "tuned") and at the defaults ("default")."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tuned:
    """The outcome of both stages: the common recipe and each method's chosen settings."""
    recipe: dict[str, float]              # lr and weight_decay every student trains with
    settings: dict[str, dict[str, Any]]   # method -> the chosen value of each searched setting

    def changed(self, method: str, defaults: dict[str, Any]) -> bool:
        """Whether tuning chose other settings for `method` than its defaults (else its default runs would
        repeat its tuned ones exactly)."""
        return any(defaults[key] != value for key, value in self.settings.get(method, {}).items())
