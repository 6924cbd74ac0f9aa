"""``python -m curate`` runs the ``curate`` command line."""

from stcorpus.curate.cli import main

raise SystemExit(main())
