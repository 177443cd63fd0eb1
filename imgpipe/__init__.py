"""The library the stages, the commands and both orchestrators share, in rooms by concern.

Each room is a package whose docstring says what it owns; a room imports only from the rooms
before it in ``ROOMS`` (``tests/code/test_stages.py`` fails on an import against that order, lazy
ones inside functions included). The library imports no stage (``components``), no command
(``commands``) and no orchestrator (``pipelines``).
"""

ROOMS = ("core", "data", "model", "evaluation", "export", "tracking", "monitoring")
"""Lowest first: ``data`` may import ``core``; ``monitoring`` may import every other room."""
