"""mailhost: a complete mail server for an organisation's own domains, on Twisted."""

__version__ = "0.1.0"
