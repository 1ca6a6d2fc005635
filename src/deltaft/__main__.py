"""``python -m deltaft``: the ``deltaft`` command (also what ``torchrun -m deltaft`` runs)."""

from __future__ import annotations

from deltaft.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
