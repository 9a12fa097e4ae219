"""The coordinator-participant protocol (see docs/ARCHITECTURE.md and docs/participant.md).

- ``messages``: every signal, query and reply as a frozen keyword-only dataclass; errors as
  an ``ErrorReply`` with an ``ErrorCode``.
- ``version``: the protocol version every request and answer carries, and the rule for
  which versions interoperate.
- ``client``: ``ParticipantClient``, the coordinator's async client (httpx).
- ``server``: ``rpc_app``, the participant's Starlette app that decodes, fences and
  dispatches to its ``AgentService``.
- ``errors``: what the client raises.

This package imports no role package (``coordinator``, ``participant``, ``proxy``).
"""
