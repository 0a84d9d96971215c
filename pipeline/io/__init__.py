"""Everything that touches storage. Only this package imports fsspec."""
