"""superagent participant (see docs/ARCHITECTURE.md); filled in by the next milestones."""
