"""Conway's Game of Life on a bounded grid of 0/1 cells."""
from gridlib.grid import neighbours


def step(grid):
    """One generation: birth on 3 neighbours, survival on 2 or 3."""
    result = []
    for r, row in enumerate(grid):
        new_row = []
        for c, cell in enumerate(row):
            alive = sum(neighbours(grid, r, c, diagonal=True))
            if cell == 1 and alive in (2, 3):
                new_row.append(1)
            elif cell == 0 and alive == 3:
                new_row.append(1)
            else:
                new_row.append(0)
        result.append(new_row)
    return result


def population(grid):
    """Number of live cells."""
    return sum(sum(row) for row in grid)


def run(grid, generations):
    """The grid after a number of generations."""
    for _ in range(generations):
        grid = step(grid)
    return grid
