"""Experiments built on the ``sdpo`` library and kept apart from it: demos and reproductions that
import the library the way a user would (``sdpo`` never imports this package)."""
