import pytest

from shopcart.pricing import add_tax, bulk_discount, format_cents, percent_off, round_half_up


def test_round_half_up():
    assert [round_half_up(x) for x in (0.4, 0.5, 2.5)] == [0, 1, 3]


def test_percent_off():
    assert percent_off(1000, 15) == 850


def test_percent_off_rounding():
    assert percent_off(999, 50) == 500


def test_percent_off_range():
    with pytest.raises(ValueError):
        percent_off(100, 101)


def test_bulk_discount_below_threshold():
    assert bulk_discount(100, 9) == 900


def test_bulk_discount_at_threshold():
    assert bulk_discount(100, 10) == 950


def test_add_tax():
    assert add_tax(1000, 8) == 1080


def test_add_tax_rounding():
    assert add_tax(105, 10) == 116


def test_format_cents():
    assert format_cents(1234) == "$12.34"


def test_format_cents_small_and_negative():
    assert format_cents(-5) == "-$0.05"
