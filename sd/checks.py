"""Argument checks shared by the pipeline, the samplers and training: each idea of a bad value, written once.

No tutorial counterpart. Errors speak to the user: what was wrong and what is accepted (STYLE.md, habit 8).
"""

import argparse
import dataclasses
import math
import numbers

MAX_CONFIG_INT = 2**20  # no size in a model config is this large (SD 1.5's largest: CLIP's 49,408-token vocabulary)
MAX_LEVELS = 16  # resolution levels of a VAE or UNet: each halves the size, so 16 is already a 65536x downscale


def is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # Python's, or numpy's np.bool_


def is_int(value) -> bool:
    """An integer (Python's or numpy's), not a bool (True is an int to Python, but never a step count, a size or
    a seed)."""
    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_number(value) -> bool:
    """A real number (int, float, numpy's float32 ...), not a bool."""
    return isinstance(value, numbers.Real) and not is_bool(value)


def is_finite_number(value) -> bool:
    """An int or a float that is not NaN or ±inf (a NaN guidance scale gives a black image, silently), not a bool."""
    return is_number(value) and math.isfinite(value)


def check(condition: bool, message: str) -> None:
    """Raise ValueError(message) unless condition holds."""
    if not condition:
        raise ValueError(message)


# What each field type of a model config accepts: sizes and counts are positive integers (not bools), norm epsilons
# and scales finite numbers > 0, per-level tuples non-empty. A config file or a checkpoint's metadata can hold anything.
# Keyed by the field's annotation (a type, not a string: these files do not use `from __future__ import annotations`).
_FIELD_RULES = {
    int: (lambda v: is_int(v) and 0 < v <= MAX_CONFIG_INT, f"a positive integer up to {MAX_CONFIG_INT}"),
    float: (lambda v: is_finite_number(v) and v > 0, "a finite number > 0"),
    tuple[int, ...]: (lambda v: isinstance(v, tuple) and 0 < len(v) <= MAX_LEVELS
                      and all(is_int(c) and 0 < c <= MAX_CONFIG_INT for c in v),
                      f"a list of 1 to {MAX_LEVELS} positive integers up to {MAX_CONFIG_INT}"),
    tuple[bool, ...]: (lambda v: isinstance(v, tuple) and 0 < len(v) <= MAX_LEVELS and all(isinstance(c, bool) for c in v),
                       f"a list of 1 to {MAX_LEVELS} true/false"),
}


def check_config_fields(cfg) -> None:
    """Each field of a model config dataclass as its annotation says (_FIELD_RULES): ValueError naming the field,
    its value and what is accepted. The relations between fields each config checks itself, after this."""
    for field in dataclasses.fields(cfg):
        accepts, accepted = _FIELD_RULES[field.type]
        value = getattr(cfg, field.name)
        check(accepts(value), f"{type(cfg).__name__}.{field.name} must be {accepted}, got {value!r}")


class UsageError(ValueError):
    """A command line argparse refuses (an unknown option, a value of the wrong type): exit code 2, as argparse's."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises a UsageError (one line from the `sd` command's error boundary, exit code 2) where it would
    print its usage and exit. For `sd` and `sd train` alike."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


class NonFiniteError(RuntimeError):
    """NaN or inf appeared in a model's output or a step's result; the message says where."""
