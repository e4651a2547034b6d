"""Half-open intervals [start, end) as (start, end) tuples."""


def validate(interval):
    """Returns the interval, raising ValueError when end < start."""
    start, end = interval
    if end < start:
        raise ValueError(f"interval ends before it starts: {interval}")
    return interval


def length(interval):
    """Number of integers in [start, end)."""
    start, end = validate(interval)
    return end - start


def overlaps(a, b):
    """Whether two intervals share at least one point."""
    return a[0] < b[1] and b[0] < a[1]


def intersection(a, b):
    """The common part of two intervals, or None."""
    start, end = max(a[0], b[0]), min(a[1], b[1])
    if start >= end:
        return None
    return (start, end)


def merge(intervals):
    """Sorted union of intervals; touching intervals are joined."""
    result = []
    for start, end in sorted(intervals):
        if result and start <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], end))
        else:
            result.append((start, end))
    return result


def total_length(intervals):
    """Length of the union of the intervals."""
    return sum(length(interval) for interval in merge(intervals))
