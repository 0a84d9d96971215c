"""Pure torch math: no I/O, no Ray. Shapes are given in each docstring. Imports nothing of the
pipeline outside this package."""
