"""trimig: live migration of running guests (precopy and postcopy), built on trio."""

__version__ = "0.1.0"
