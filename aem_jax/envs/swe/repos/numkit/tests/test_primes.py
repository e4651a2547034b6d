import pytest

from numkit.primes import factorize, is_prime, primes_up_to


def test_small_primes():
    assert [n for n in range(12) if is_prime(n)] == [2, 3, 5, 7, 11]


def test_square_of_prime_is_not_prime():
    assert not is_prime(49)


def test_large_prime():
    assert is_prime(7919)


def test_primes_up_to():
    assert primes_up_to(20) == [2, 3, 5, 7, 11, 13, 17, 19]


def test_primes_up_to_includes_limit():
    assert primes_up_to(13)[-1] == 13


def test_primes_up_to_small():
    assert primes_up_to(1) == []


def test_factorize():
    assert factorize(360) == [2, 2, 2, 3, 3, 5]


def test_factorize_prime():
    assert factorize(97) == [97]


def test_factorize_rejects_one():
    with pytest.raises(ValueError):
        factorize(1)
