"""superagent: many small HTTP services on a fleet of ordinary machines."""

__version__ = "0.1.0"
