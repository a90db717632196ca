"""The one way settings are defined: typed, immutable pydantic models whose fields carry their own default, bounds
and one-line docstring.

Every stage's settings are one :class:`Settings` subclass (attention in ``modules/attention.py``, attention
transfer in ``convert/config.py``, LoRA finetuning in ``finetune/config.py``; :class:`LoopConfig`, the shared
training loop's, here). Settings modules import no torch: the CLI builds its flags from them before loading it. The recipe schema (``recipes.py``) composes them, the CLI generates its flags from their fields
(``cli/options.py``), and ``docs/recipes.md`` is generated from their docstrings, so a new setting is one field in
one class.

``Cls.build(...)`` and ``obj.replace(...)`` raise one :class:`~linearize.errors.ConfigError` naming every problem
(plain construction raises pydantic's ValidationError, a ValueError).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from linearize.errors import ConfigError


class Settings(BaseModel):
    """Base of every settings class: unknown keys are errors, instances are immutable, docstrings document fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)

    @classmethod
    def build(cls, **data: Any):
        """Like ``cls(**data)``, but bad values raise one :class:`~linearize.errors.ConfigError` (one line naming
        every problem) instead of pydantic's multi-line ValidationError."""
        try:
            return cls(**data)
        except ValidationError as e:
            raise ConfigError("; ".join(describe_validation_error(e))) from None

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` applied (instances are immutable); bad values raise ConfigError."""
        return type(self).build(**{**self.model_dump(), **changes})

    @classmethod
    def pick(cls, settings: BaseModel):
        """This class's fields taken from ``settings`` (a stage's settings holding them among others)."""
        return cls.build(**{name: getattr(settings, name) for name in cls.model_fields})


def check(*fields: str, ok: Callable[[Any], bool], says: str):
    """A field validator for ``fields`` (None passes): values where ``ok`` is false are refused with the phrase
    ``says``, reported as ``field=value says`` (e.g. ``window=-1 must be >= 0``)::

        _window = check("window", ok=lambda v: v >= 0, says="must be >= 0 (0 = pure linear)")
    """

    def validate(cls, v):
        if v is not None and not ok(v):
            raise ValueError(says)
        return v

    return field_validator(*fields)(classmethod(validate))


def positive(*fields: str):
    return check(*fields, ok=lambda v: v > 0, says="must be positive")


def one_or_many(*fields: str):
    """A validator for ``str | list[str]`` fields (a data source or a mixture of them): an empty list is refused, a
    one-element list becomes its element, so ``--data x`` (the CLI splits commas) and ``data: x`` are equal."""

    def validate(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("must name at least one source")
            return v[0] if len(v) == 1 else v
        return v

    return field_validator(*fields)(classmethod(validate))


def describe_validation_error(e: ValidationError, prefix: str = "") -> list[str]:
    """One ``key: problem (got value)`` phrase per error of ``e``; ``prefix`` is put before every key path."""
    out = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"] if isinstance(p, int) or not any(c in str(p) for c in "[-")]
        path = prefix + ".".join(loc)
        if err["type"] == "extra_forbidden":
            out.append(f"unknown setting {path}")
        elif err["type"] == "missing":
            out.append(f"missing required setting {path}")
        elif err["type"] == "value_error" and not loc:  # a check across fields: its message names them
            out.append(prefix + err["msg"].removeprefix("Value error, "))
        elif err["type"] == "value_error":  # our own validators: "window=-1 must be >= 0"
            out.append(f"{path}={err['input']!r} {err['msg'].removeprefix('Value error, ')}")
        else:
            text = err["msg"][0].lower() + err["msg"][1:]
            out.append(f"{path}={err['input']!r}: {text}")
    return out


class LoopConfig(Settings):
    """Optimisation settings every training stage shares."""

    lr: float = 1e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup: float = 0.05
    """Fraction of the steps spent in linear warmup."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup (transformers' schedules: cosine with a floor, warmup-stable-decay linear, constant)."""
    min_lr_frac: float = 0.1
    """Final learning rate as a fraction of ``lr`` (cosine and linear)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    checkpoint_every: int = 100
    """Steps between resumable checkpoints (0 = only when interrupted with Ctrl-C)."""
    window_dropout: float = 0.0
    """Fraction of steps on which every linear layer runs without its window and sinks (pure linear attention over
    all keys), so that the state must carry what the window would answer; drawn per step from the seed (a resumed
    run drops the same steps). 0 = off."""

    _lr = positive("lr")
    _non_negative = check("weight_decay", "grad_clip", ok=lambda v: v >= 0, says="must be >= 0")
    _warmup = check("warmup", ok=lambda v: 0 <= v < 1, says="must be in [0, 1)")
    _drop = check("window_dropout", ok=lambda v: 0 <= v < 1, says="must be in [0, 1) (0 = off)")
    _floor = check("min_lr_frac", ok=lambda v: 0 <= v <= 1, says="must be in [0, 1]")
    _cadence = check("checkpoint_every", ok=lambda v: v >= 0, says="must be >= 0 (0 = only at the end and on Ctrl-C)")


# ---------------------------------------------------------------------------------------------------------------
# Sizes in bytes
# ---------------------------------------------------------------------------------------------------------------
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_UNIT_OF = {"": 1, **{u.lower(): f for u, f in _UNITS.items()}}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE]([+-]?[0-9]+))?\s*([a-zA-Z]*)\s*")


def parse_bytes(text: str | int) -> int:
    """A size in bytes from ``"24MiB"``, ``"1.5GB"``, ``"2000000"`` or a number (KB/MB/GB/TB are powers of 1000,
    KiB/MiB/GiB/TiB of 1024; case does not matter). Fractions of a byte are dropped.

    Raises:
        ValueError: not a positive size (the phrase says what is accepted).
    """
    m = _SIZE.fullmatch(str(text)) if isinstance(text, (int, float, str)) and not isinstance(text, bool) else None
    unit = m and _UNIT_OF.get(m.group(3).lower())
    if not unit:
        raise ValueError(f"is not a size: use a number with an optional unit ({', '.join(_UNITS)}), e.g. "
                         "'24MiB', '1.5GB', '2000000'")
    n = int(Decimal(m.group(1) + (f"e{m.group(2)}" if m.group(2) else "")) * unit)
    if n < 1:
        raise ValueError("must be at least 1 byte")
    return n


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, for people (``"24.0 MiB"``); :func:`parse_bytes` reads it back."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:,.1f} TiB"


__all__ = ["format_bytes", "parse_bytes", "LoopConfig", "Settings", "check", "describe_validation_error", "positive"]
