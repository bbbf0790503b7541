"""Contracts every stage shares: graph I/O names and specs, the KV-cache layout, file hashing and the
build report. ``export``, ``engines`` and ``runtime`` are siblings over these; nothing here imports torch."""
