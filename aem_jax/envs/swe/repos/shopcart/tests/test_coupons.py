import pytest

from shopcart.coupons import apply_coupon, best_coupon, parse_coupon


def test_parse_percent():
    assert parse_coupon(" save20 ") == ("percent", 20)


def test_parse_flat():
    assert parse_coupon("FLAT500") == ("flat", 500)


def test_parse_unknown():
    with pytest.raises(ValueError):
        parse_coupon("FREE")


def test_apply_percent():
    assert apply_coupon(2000, "SAVE10") == 1800


def test_apply_flat_floor_zero():
    assert apply_coupon(300, "FLAT500") == 0


def test_apply_below_minimum():
    assert apply_coupon(900, "SAVE10", minimum=1000) == 900


def test_apply_at_minimum():
    assert apply_coupon(1000, "FLAT100", minimum=1000) == 900


def test_best_coupon():
    assert best_coupon(2000, ["SAVE10", "FLAT300", "SAVE5"]) == "FLAT300"


def test_best_coupon_none_helps():
    assert best_coupon(100, ["SAVE0"]) is None
