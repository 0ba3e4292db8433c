"""``python -m benchmarks.e2e``: see the package docstring."""

from .cli import main

raise SystemExit(main())
