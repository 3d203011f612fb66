"""`python -m daemon` is `flywatch`."""

from daemon.cli import main

raise SystemExit(main())
