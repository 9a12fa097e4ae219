"""superagent: many small HTTP services on a fleet of ordinary machines."""

from superagent.compiled import drop_stale

__version__ = "0.1.0"

drop_stale()  # a compiled hot module older than its source never shadows it
