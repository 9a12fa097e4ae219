"""The data plane: the reverse proxy (see docs/ARCHITECTURE.md)."""
