"""``python -m curate`` runs the ``curate`` command line."""

from curate.cli import main

raise SystemExit(main())
