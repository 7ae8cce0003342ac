"""`python -m raylm ...` is the same as the `raylm` console script."""
from raylm.cli import main

raise SystemExit(main())
