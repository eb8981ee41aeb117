"""What tuning may try for one setting (`Range`). Each method declares its search space in its own file
(`Method.search_space`), and TUNE_CONFIG["spaces"] may replace a range; kd/tuning/ draws the values."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

from kd.rules import is_int, is_number


@dataclass(frozen=True)
class Range:
    """Numbers from `low` to `high`, drawn on a log scale when `log` (a weight that matters by its order of
    magnitude), whole numbers when `integer`."""
    low: float
    high: float
    log: bool = False
    integer: bool = False

    def problem(self) -> str | None:
        """Why the range cannot be searched, in words; None when it can."""
        if not (is_number(self.low) and is_number(self.high)):
            return "its bounds must be numbers"
        if self.integer and not (is_int(self.low) and is_int(self.high)):
            return "a whole-number setting needs whole-number bounds"
        if self.low >= self.high:
            return f"it is empty or inverted ({self.low} >= {self.high})"
        if self.log and self.low <= 0:
            return f"a log-scale range must start above 0 (it starts at {self.low})"
        return None

    def suggest(self, trial: Any, name: str) -> float | int:
        """The value an Optuna trial draws for setting `name`."""
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(name, float(self.low), float(self.high), log=self.log)

    def __str__(self) -> str:
        return f"{self.low:g}..{self.high:g}{' (log)' if self.log else ''}"

    @classmethod
    def parse(cls, value: Any, integer: bool = False) -> Range:
        """A range as TUNE_CONFIG["spaces"] writes it: [low, high] or [low, high, "log"]."""
        if not isinstance(value, (list, tuple)) or len(value) not in (2, 3) or (
                len(value) == 3 and value[2] != "log"):
            raise ValueError("must be [low, high] or [low, high, \"log\"]")
        return cls(value[0], value[1], log=len(value) == 3, integer=integer)


def settings_text(values: Mapping[str, Any]) -> str:
    """Settings as the log and report.md show them: "temperature 4, kd_weight 0.9"."""
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in values.items())
