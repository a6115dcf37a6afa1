"""`python -m mlops`: the same entry point as the `mlops` console script."""

from mlops.cli import main

raise SystemExit(main())
