"""`python -m llmlab` is the same as the `llmlab` console script."""

from llmlab.cli import main

raise SystemExit(main())
