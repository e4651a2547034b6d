from gridlib.grid import flip_horizontal, make_grid, neighbours, rotate_clockwise, transpose


def test_make_grid():
    assert make_grid(2, 3, fill=7) == [[7, 7, 7], [7, 7, 7]]


def test_make_grid_rows_independent():
    grid = make_grid(2, 2)
    grid[0][0] = 1
    assert grid[1][0] == 0


def test_transpose():
    assert transpose([[1, 2, 3], [4, 5, 6]]) == [[1, 4], [2, 5], [3, 6]]


def test_transpose_empty():
    assert transpose([]) == []


def test_rotate_clockwise():
    assert rotate_clockwise([[1, 2], [3, 4]]) == [[3, 1], [4, 2]]


def test_flip_horizontal():
    assert flip_horizontal([[1, 2, 3]]) == [[3, 2, 1]]


def test_neighbours_corner():
    assert neighbours([[1, 2], [3, 4]], 0, 0) == [2, 3]


def test_neighbours_diagonal_centre():
    grid = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert neighbours(grid, 1, 1, diagonal=True) == [1, 2, 3, 4, 6, 7, 8, 9]


def test_neighbours_edge():
    grid = [[1, 2, 3], [4, 5, 6]]
    assert neighbours(grid, 1, 2) == [3, 5]
