"""``python -m pipeline``: the same as the ``sitewatch`` console script."""

from __future__ import annotations

from pipeline.cli import main

if __name__ == "__main__":
    main()
