"""What a setting's value may be (`Rule`), and the rules many settings share. The config sections
(kd/experiment/config.py) and every method's own settings (kd/methods/) are checked with them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Rule:
    """A setting's allowed values: in words, for the one-line error, and as a check."""
    allowed: str
    check: Callable[[Any], bool]


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def one_of(*choices: Any) -> Rule:
    return Rule(f"one of {', '.join(map(str, choices))}", lambda value: value in choices)


def int_at_least(low: int) -> Rule:
    return Rule(f"an integer >= {low}", lambda value: is_int(value) and value >= low)


POSITIVE = Rule("a number > 0", lambda value: is_number(value) and value > 0)
NON_NEGATIVE = Rule("a number >= 0", lambda value: is_number(value) and value >= 0)
POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)
BOOL = Rule("true or false", lambda value: isinstance(value, bool))
UNIT_INTERVAL = Rule("a number in [0, 1]", lambda value: is_number(value) and 0 <= value <= 1)
BELOW_ONE = Rule("a number in [0, 1)", lambda value: is_number(value) and 0 <= value < 1)
NON_EMPTY_TEXT = Rule("a non-empty text", lambda value: isinstance(value, str) and value.strip() != "")
