import pytest

from qtool.core.errors import QtoolError
from qtool.core.spec import QuantSpec, parse_spec


@pytest.mark.parametrize(
    "text, canonical, fields",
    [
        ("W4A16-g128", "W4A16-g128", dict(w_bits=4, a_bits=16, group=128)),
        ("w3a16-G128", "W3A16-g128", dict(w_bits=3, group=128)),
        ("W4A16", "W4A16", dict(w_bits=4, group=0, w_sym=False)),
        ("W8A8", "W8A8", dict(a_bits=8, a_granularity="token", a_static=False)),
        ("W8A8-tensor", "W8A8-tensor", dict(a_granularity="tensor", a_static=True)),
        ("W8A8-tensor-dynamic", "W8A8-tensor-dynamic", dict(a_granularity="tensor", a_static=False)),
        ("W4A4-cluster", "W4A4-cluster", dict(a_granularity="cluster", a_static=True)),
        ("W4A16KV4", "W4A16KV4", dict(kv_bits=4, a_bits=16)),
        ("W2*A8-g64", "W2*A8-g64", dict(bit_balance=True, w_sym=True, w_bits=2)),
        ("W4A16-g128-sym", "W4A16-g128-sym", dict(w_sym=True)),
        ("W16A16", "W16A16", dict(w_bits=16, a_bits=16, kv_bits=16)),
    ],
)
def test_parse_and_print(text, canonical, fields):
    spec = parse_spec(text)
    assert spec.name == canonical
    assert parse_spec(spec.name) == spec
    for key, value in fields.items():
        assert getattr(spec, key) == value


def test_bit_balance_is_stored_in_three_bits():
    spec = parse_spec("W2*A8")
    assert spec.w_levels == 5 and spec.w_storage_bits == 3
    assert parse_spec("W2A8").w_levels == 4 and parse_spec("W2A8").w_storage_bits == 2


def test_float_spec():
    assert parse_spec("W16A16").is_float
    assert not parse_spec("W16A16KV4").is_float


@pytest.mark.parametrize(
    "bad", ["", "W4", "W4A", "W1A16", "W9A16", "W4A16-g100", "W4A16-x", "W3*A8", "A4W4", "W4A16-g0x"]
)
def test_invalid_specs_raise_clear_errors(bad):
    with pytest.raises(QtoolError) as info:
        parse_spec(bad)
    assert "\n" not in str(info.value)


def test_dataclass_validation():
    with pytest.raises(QtoolError):
        QuantSpec(a_granularity="channel")


@pytest.mark.parametrize(
    "bad, message",
    [
        ("W4A16-g0", "group size must be >= 1, got 'g0'"),
        ("W4A16-sym-sym", "'sym' repeats the sym"),
        ("W4A16-g64-g128", "'g128' repeats the group size (g64)"),
        ("W4A8-token-tensor", "'tensor' repeats the activation granularity (token)"),
        ("W4A8-static-dynamic", "'dynamic' repeats the static/dynamic (static)"),
        ("W4A16--g64", "unknown option ''"),
        ("   ", "empty quantization spec"),
    ],
)
def test_the_grammar_is_strict(bad, message):
    with pytest.raises(QtoolError) as info:
        parse_spec(bad)
    assert message in str(info.value)
