"""Integer sequences and divisibility."""


def fibonacci(n):
    """The first n Fibonacci numbers, starting 0, 1."""
    result = []
    a, b = 0, 1
    for _ in range(n):
        result.append(a)
        a, b = b, a + b
    return result


def gcd(a, b):
    """Greatest common divisor (Euclid), always non-negative."""
    a, b = abs(a), abs(b)
    while b:
        a, b = b, a % b
    return a


def lcm(a, b):
    """Least common multiple; 0 when either argument is 0."""
    if a == 0 or b == 0:
        return 0
    return abs(a * b) // gcd(a, b)


def digit_sum(n, base=10):
    """Sum of the digits of |n| in the given base."""
    n = abs(n)
    total = 0
    while n > 0:
        total += n % base
        n //= base
    return total


def collatz_steps(n):
    """Number of Collatz steps to reach 1 from n >= 1."""
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps
