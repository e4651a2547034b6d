from numkit.seq import collatz_steps, digit_sum, fibonacci, gcd, lcm


def test_fibonacci():
    assert fibonacci(8) == [0, 1, 1, 2, 3, 5, 8, 13]


def test_fibonacci_empty():
    assert fibonacci(0) == []


def test_gcd():
    assert gcd(84, 36) == 12


def test_gcd_negative():
    assert gcd(-12, 18) == 6


def test_lcm():
    assert lcm(4, 6) == 12


def test_lcm_zero():
    assert lcm(0, 5) == 0


def test_digit_sum():
    assert digit_sum(9875) == 29


def test_digit_sum_binary():
    assert digit_sum(13, base=2) == 3


def test_collatz():
    assert collatz_steps(6) == 8


def test_collatz_one():
    assert collatz_steps(1) == 0
