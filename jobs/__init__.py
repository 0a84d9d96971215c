"""Entrypoints for scheduled runs (`python -m jobs.<name>`). The library never imports them."""
