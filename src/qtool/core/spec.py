"""QuantSpec: what gets quantized to how many bits, with one honest name for it.

Grammar of a name (case-insensitive on input, canonical on output):

    W<bits>[*]A<bits>[KV<bits>][-g<group>][-sym][-token|-tensor|-cluster][-static|-dynamic]

* `W16A16` is the float model. Weights are asymmetric per output channel unless `-g<group>`
  (groups run along each row's input dimension; a ragged last group keeps the remainder) or
  `-sym` say otherwise. `W2*` is ABQ-LLM's bit balance: 5 symmetric levels {-2..2}, which need
  3-bit storage, so it is never printed as plain `W2`.
* Activations (inputs of every linear) are asymmetric; per-token dynamic by default, `-tensor`
  means one static range per tensor from calibration, `-cluster` one range per channel cluster
  (RPTQ; static unless `-dynamic`).
* `KV<bits>` quantizes the key and value projections' outputs per token and head (dynamic,
  asymmetric); without it the KV cache stays 16-bit. With `-cluster` K and V take one range per
  channel cluster instead, static unless `-dynamic` (`W4A16KV4-cluster` is RPTQ's "W4A4KV").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qtool.core.errors import QtoolError

FLOAT = 16
_GRANULARITY = ("token", "tensor", "cluster")
_CORE = re.compile(r"^W(\d+)(\*?)A(\d+)(?:KV(\d+))?$", re.IGNORECASE)
_GROUP = re.compile(r"^g(\d+)$", re.IGNORECASE)
_HELP = "expected e.g. W4A16-g128, W4A4, W8A8-tensor, W4A16KV4, W2*A8-g64"


@dataclass(frozen=True)
class QuantSpec:
    w_bits: int = FLOAT
    a_bits: int = FLOAT
    kv_bits: int = FLOAT
    group: int = 0  # 0: one group per output channel
    w_sym: bool = False
    bit_balance: bool = False  # ABQ "W2*": 5 levels, stored in 3 bits
    a_granularity: str = "token"
    a_static: bool = False

    def __post_init__(self):
        for what, bits in (("weight", self.w_bits), ("activation", self.a_bits), ("KV", self.kv_bits)):
            if not (2 <= bits <= 8 or bits == FLOAT):
                raise QtoolError(f"{what} bits must be 2..8 or 16, got {bits}; {_HELP}")
        if self.group < 0 or (self.group and self.group % 8):
            raise QtoolError(f"group size must be a positive multiple of 8, got {self.group}")
        if self.bit_balance and self.w_bits != 2:
            raise QtoolError("bit balance (*) applies to 2-bit weights only, as in W2*A8")
        if self.a_granularity not in _GRANULARITY:
            raise QtoolError(f"activation granularity must be one of {', '.join(_GRANULARITY)}")

    # -- what is quantized ----------------------------------------------------------------------
    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < FLOAT

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < FLOAT

    @property
    def quantizes_kv(self) -> bool:
        return self.kv_bits < FLOAT

    @property
    def uses_ranges(self) -> bool:
        """Whether the activation granularity matters: activations are quantized, or K and V are
        quantized per cluster (`W4A16KV4-cluster`)."""
        return self.quantizes_activations or (self.quantizes_kv and self.a_granularity == "cluster")

    @property
    def is_float(self) -> bool:
        return not (self.quantizes_weights or self.quantizes_activations or self.quantizes_kv)

    @property
    def w_levels(self) -> int:
        """Number of representable weight values."""
        return 5 if self.bit_balance else 2**self.w_bits

    @property
    def w_storage_bits(self) -> int:
        """Bits each stored weight code occupies (bit balance needs 3 for its 5 levels)."""
        return 3 if self.bit_balance else self.w_bits

    # -- names ------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        core = f"W{self.w_bits}{'*' if self.bit_balance else ''}A{self.a_bits}"
        if self.quantizes_kv:
            core += f"KV{self.kv_bits}"
        parts = [core]
        if self.quantizes_weights:
            if self.group:
                parts.append(f"g{self.group}")
            if self.w_sym and not self.bit_balance:
                parts.append("sym")
        if self.uses_ranges and self.a_granularity != "token":
            parts.append(self.a_granularity)
        if self.uses_ranges and self.a_static != _default_static(self.a_granularity):
            parts.append("static" if self.a_static else "dynamic")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.name


def same_weight_format(a: QuantSpec, b: QuantSpec) -> bool:
    """True when both specs quantize weights identically (activation and KV parts may differ)."""
    return (a.w_bits, a.group, a.w_sym, a.bit_balance) == (b.w_bits, b.group, b.w_sym, b.bit_balance)


def _default_static(granularity: str) -> bool:
    return granularity != "token"


def parse_spec(text: str) -> QuantSpec:
    """Parse a spec name; any error names the bad part and shows valid examples."""
    if not isinstance(text, str) or not text.strip():
        raise QtoolError(f"empty quantization spec; {_HELP}")
    head, *options = text.strip().split("-")
    core = _CORE.match(head)
    if not core:
        raise QtoolError(f"invalid quantization spec '{text}': cannot read '{head}'; {_HELP}")
    w_bits, star, a_bits, kv_bits = int(core[1]), bool(core[2]), int(core[3]), int(core[4] or FLOAT)
    fields: dict = dict(w_bits=w_bits, a_bits=a_bits, kv_bits=kv_bits, bit_balance=star, w_sym=star)
    static = None
    seen: dict[str, str] = {}  # option kind -> the option that set it (each kind at most once)
    for opt in options:
        low = opt.lower()
        if _GROUP.match(low):
            kind = "group size"
            fields["group"] = int(low[1:])
            if fields["group"] < 1:
                raise QtoolError(f"invalid quantization spec '{text}': group size must be >= 1, got '{opt}'; {_HELP}")
        elif low == "sym":
            kind = "sym"
            fields["w_sym"] = True
        elif low in _GRANULARITY:
            kind = "activation granularity"
            fields["a_granularity"] = low
        elif low in ("static", "dynamic"):
            kind = "static/dynamic"
            static = low == "static"
        else:
            raise QtoolError(f"invalid quantization spec '{text}': unknown option '{opt}'; {_HELP}")
        if kind in seen:
            raise QtoolError(f"invalid quantization spec '{text}': '{opt}' repeats the {kind} ({seen[kind]}); {_HELP}")
        seen[kind] = opt
    granularity = fields.get("a_granularity", "token")
    fields["a_static"] = _default_static(granularity) if static is None else static
    return QuantSpec(**fields)
