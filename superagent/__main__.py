"""``python -m superagent`` is the ``superagent`` command."""

from superagent.cli import main

raise SystemExit(main())
