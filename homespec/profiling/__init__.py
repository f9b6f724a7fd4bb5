"""Measurement: local devices, micro-benchmarks, links over the real transport, and profile files (DESIGN §6)."""
