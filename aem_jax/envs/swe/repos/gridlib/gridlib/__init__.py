"""Grids as lists of rows."""
