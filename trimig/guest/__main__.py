"""``python -m trimig.guest`` runs the built-in workload guest (see trimig.guest.workload)."""

from .workload import main

raise SystemExit(main())
