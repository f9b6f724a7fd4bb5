"""Bytes, frames, sockets and keys. Never imports transformers, torch or ``homespec.model``."""
