"""Scheduling on top of intervals."""
from intervals.core import merge


def free_slots(busy, day_start, day_end, min_length=1):
    """Gaps of at least min_length between busy intervals within the day."""
    slots = []
    cursor = day_start
    for start, end in merge(busy):
        if start - cursor >= min_length:
            slots.append((cursor, min(start, day_end)))
        cursor = max(cursor, end)
    if day_end - cursor >= min_length:
        slots.append((cursor, day_end))
    return slots


def max_concurrent(intervals):
    """The largest number of intervals covering one point."""
    events = []
    for start, end in intervals:
        events.append((start, 1))
        events.append((end, -1))
    # Ends sort before starts at the same time: half-open intervals.
    events.sort(key=lambda event: (event[0], event[1]))
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def fits(busy, meeting):
    """Whether a meeting overlaps none of the busy intervals."""
    start, end = meeting
    for busy_start, busy_end in busy:
        if start < busy_end and busy_start < end:
            return False
    return True
