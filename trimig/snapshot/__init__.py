"""File snapshots: a guest saved with mapped-ram (``file:`` URIs) and restored from it.

* ``file.py``: :func:`open_snapshot`, the checked layout of a mapped-ram file (read with
  ``trimig/inspect/``) and page reads from its slots;
* ``eager.py``: every page read before the guest runs;
* ``lazy.py``: :class:`LazyRestore`, the guest runs at once and faults its pages in from the
  file (userfaultfd, as a postcopy destination), a fill thread brings the rest;
* ``restore.py``: :class:`Restore`, either one, with its figures (time to first step);
* ``cli.py``: ``trimig snapshot`` and ``trimig restore``.

The writer is ``savevm/mapped_ram.py``; ``docs/snapshots.md`` describes it all.
"""
