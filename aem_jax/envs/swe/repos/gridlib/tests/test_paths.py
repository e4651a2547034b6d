from gridlib.paths import count_paths, shortest_path


def test_count_paths_open():
    assert count_paths([[0, 0, 0], [0, 0, 0], [0, 0, 0]]) == 6


def test_count_paths_wall():
    assert count_paths([[0, 0, 0], [0, 1, 0], [0, 0, 0]]) == 2


def test_count_paths_single_row():
    assert count_paths([[0, 0, 0, 0]]) == 1


def test_shortest_path_open():
    assert shortest_path([[0, 0, 0], [0, 0, 0]], (0, 0), (1, 2)) == 3


def test_shortest_path_around_wall():
    grid = [[0, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert shortest_path(grid, (0, 0), (0, 2)) == 6


def test_shortest_path_blocked():
    assert shortest_path([[0, 1], [1, 0]], (0, 0), (1, 1)) == -1


def test_shortest_path_same_cell():
    assert shortest_path([[0]], (0, 0), (0, 0)) == 0
