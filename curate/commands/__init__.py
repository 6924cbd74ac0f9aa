"""One module per ``curate`` command: ``add_arguments(parser)`` and ``run(args) -> int``."""
