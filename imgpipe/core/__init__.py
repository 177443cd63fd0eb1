"""What every room stands on, and nothing about images or models: params.yaml's typed sections
(``params``, the only home of a tunable default), the project's errors (``errors``), atomic
file writes and hashing (``fileio``), quiet logs and progress bars (``logs``), the process pools
of the data stages (``parallel``), the headless matplotlib setup (``figures``) and ending a
finished process without the interpreter's teardown (``process``).

Imports no other room.
"""
