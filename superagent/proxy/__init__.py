"""The data plane: the reverse proxy (see docs/ARCHITECTURE.md)."""

from superagent.proxy.compiled import drop_stale

drop_stale()  # a compiled module older than its source never shadows it
