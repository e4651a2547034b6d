from gridlib.life import population, run, step


def test_blinker_oscillates():
    grid = [[0, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert step(grid) == [[0, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_block_is_still():
    grid = [[1, 1, 0], [1, 1, 0], [0, 0, 0]]
    assert step(grid) == grid


def test_lonely_cell_dies():
    assert step([[0, 0, 0], [0, 1, 0], [0, 0, 0]]) == [[0, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_population():
    assert population([[1, 0], [1, 1]]) == 3


def test_run_two_generations():
    grid = [[0, 0, 0], [1, 1, 1], [0, 0, 0]]
    assert run(grid, 2) == grid
