"""`python -m serving.logger`: the log writer process (serving/logger/writer.py)."""

from serving.logger.writer import main

raise SystemExit(main())
