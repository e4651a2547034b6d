import pytest

from shopcart.cart import Cart


def test_add_and_subtotal():
    cart = Cart()
    cart.add("apple", 50, 3)
    cart.add("pear", 120)
    assert cart.subtotal() == 270


def test_add_merges_quantity():
    cart = Cart()
    cart.add("apple", 50, 2)
    cart.add("apple", 50, 3)
    assert cart.items["apple"] == (50, 5)


def test_add_rejects_price_change():
    cart = Cart()
    cart.add("apple", 50)
    with pytest.raises(ValueError):
        cart.add("apple", 60)


def test_add_rejects_zero_quantity():
    with pytest.raises(ValueError):
        Cart().add("apple", 50, 0)


def test_remove_partial():
    cart = Cart()
    cart.add("apple", 50, 3)
    cart.remove("apple", 2)
    assert cart.items["apple"] == (50, 1)


def test_remove_all():
    cart = Cart()
    cart.add("apple", 50, 2)
    cart.remove("apple", 2)
    assert "apple" not in cart.items


def test_remove_missing():
    with pytest.raises(KeyError):
        Cart().remove("apple")


def test_count():
    cart = Cart()
    cart.add("apple", 50, 2)
    cart.add("pear", 10, 5)
    assert cart.count() == 7
