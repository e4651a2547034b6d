"""Grid construction and transforms."""


def make_grid(rows, cols, fill=0):
    """A rows x cols grid of fill (rows are independent lists)."""
    return [[fill] * cols for _ in range(rows)]


def transpose(grid):
    """Rows become columns."""
    if not grid:
        return []
    return [[grid[r][c] for r in range(len(grid))] for c in range(len(grid[0]))]


def rotate_clockwise(grid):
    """The grid turned 90 degrees clockwise."""
    return [list(row) for row in zip(*grid[::-1])]


def flip_horizontal(grid):
    """Each row reversed."""
    return [row[::-1] for row in grid]


def neighbours(grid, row, col, diagonal=False):
    """Values around (row, col) inside the grid, in reading order."""
    steps = [(-1, 0), (0, -1), (0, 1), (1, 0)]
    if diagonal:
        steps = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
    values = []
    for dr, dc in steps:
        r, c = row + dr, col + dc
        if 0 <= r < len(grid) and 0 <= c < len(grid[0]):
            values.append(grid[r][c])
    return values
