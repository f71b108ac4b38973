"""Argument checks shared by the pipeline, the samplers and training: each idea of a bad value, written once.

No tutorial counterpart. Errors speak to the user: what was wrong and what is accepted (STYLE.md, habit 8).
"""

import math


def is_int(value) -> bool:
    """An integer, not a bool (True is an int to Python, but never a step count, a size or a seed)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """An int or a float that is not NaN or ±inf (a NaN guidance scale gives a black image, silently), not a bool."""
    return is_number(value) and math.isfinite(value)


def check(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds."""
    if not condition:
        raise ValueError(message)


class NonFiniteError(RuntimeError):
    """NaN or inf appeared in a model's output or a step's result; the message says where."""
