"""Descriptive statistics."""


def mean(values):
    """Arithmetic mean of a non-empty sequence."""
    if not values:
        raise ValueError("mean of empty data")
    return sum(values) / len(values)


def median(values):
    """Median (mean of the two middle values for even lengths)."""
    if not values:
        raise ValueError("median of empty data")
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2 == 1:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def variance(values, sample=False):
    """Population variance (sample variance with sample=True)."""
    count = len(values)
    if count < 2 and sample:
        raise ValueError("sample variance needs at least two values")
    centre = mean(values)
    squares = sum((value - centre) ** 2 for value in values)
    return squares / (count - 1 if sample else count)


def mode(values):
    """Most frequent value; the smallest one on ties."""
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    best = max(counts.values())
    return min(value for value, count in counts.items() if count == best)
