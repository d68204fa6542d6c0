"""The ``discovery`` command line: one module per command, ``app`` holds the group."""
