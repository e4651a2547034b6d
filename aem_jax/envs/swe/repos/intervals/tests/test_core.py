import pytest

from intervals.core import intersection, length, merge, overlaps, total_length, validate


def test_validate_rejects_reversed():
    with pytest.raises(ValueError):
        validate((5, 2))


def test_length():
    assert length((3, 8)) == 5


def test_length_empty():
    assert length((4, 4)) == 0


def test_overlaps():
    assert overlaps((1, 5), (4, 9))


def test_touching_do_not_overlap():
    assert not overlaps((1, 5), (5, 9))


def test_intersection():
    assert intersection((1, 5), (3, 9)) == (3, 5)


def test_intersection_none():
    assert intersection((1, 3), (3, 9)) is None


def test_merge():
    assert merge([(5, 7), (1, 3), (2, 4)]) == [(1, 4), (5, 7)]


def test_merge_touching():
    assert merge([(1, 3), (3, 5)]) == [(1, 5)]


def test_merge_nested():
    assert merge([(1, 10), (2, 3)]) == [(1, 10)]


def test_total_length():
    assert total_length([(0, 4), (2, 6), (10, 11)]) == 7
