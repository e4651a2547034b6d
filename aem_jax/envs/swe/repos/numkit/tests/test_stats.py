import pytest

from numkit.stats import mean, median, mode, variance


def test_mean():
    assert mean([1, 2, 3, 6]) == 3


def test_mean_empty():
    with pytest.raises(ValueError):
        mean([])


def test_median_odd():
    assert median([5, 1, 3]) == 3


def test_median_even():
    assert median([4, 1, 3, 2]) == 2.5


def test_variance_population():
    assert variance([2, 4, 4, 4, 5, 5, 7, 9]) == 4


def test_variance_sample():
    assert variance([1, 2, 3, 4], sample=True) == pytest.approx(5 / 3)


def test_variance_sample_needs_two():
    with pytest.raises(ValueError):
        variance([1], sample=True)


def test_mode():
    assert mode([3, 1, 3, 2, 1, 3]) == 3


def test_mode_tie_smallest():
    assert mode([2, 1, 2, 1]) == 1
