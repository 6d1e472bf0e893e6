"""`python -m fusedmlp ...` runs the command line."""

from .cli.main import main

raise SystemExit(main())
