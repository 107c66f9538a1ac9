"""Droid: a real-time task service (REST + Socket.IO + worker) on Tornado."""

__version__ = "0.1.0"
