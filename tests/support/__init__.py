"""Helpers shared by the whole test suite: ports (``ports``), waiting for a condition
(``wait``), and real processes with their logs (``procs``, ``logs``)."""
