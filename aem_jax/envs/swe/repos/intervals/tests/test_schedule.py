from intervals.schedule import fits, free_slots, max_concurrent


def test_free_slots():
    assert free_slots([(9, 10), (12, 13)], 8, 17) == [(8, 9), (10, 12), (13, 17)]


def test_free_slots_min_length():
    assert free_slots([(9, 10), (11, 13)], 9, 14, min_length=2) == []


def test_free_slots_fully_busy():
    assert free_slots([(8, 17)], 8, 17) == []


def test_max_concurrent():
    assert max_concurrent([(1, 4), (2, 5), (3, 6), (7, 8)]) == 3


def test_max_concurrent_back_to_back():
    assert max_concurrent([(1, 3), (3, 5)]) == 1


def test_max_concurrent_empty():
    assert max_concurrent([]) == 0


def test_fits():
    assert fits([(9, 10), (12, 13)], (10, 12))


def test_does_not_fit():
    assert not fits([(9, 10), (12, 13)], (11, 13))
