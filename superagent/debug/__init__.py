"""superagent debug (see docs/ARCHITECTURE.md); filled in by the next milestones."""
