"""`python -m serving`: the model server process (what `mlops stack run serving` execs)."""

from serving.server import main

raise SystemExit(main())
