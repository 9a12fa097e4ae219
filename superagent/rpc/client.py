"""The coordinator's side of the RPC: one async client (httpx) for every participant.

Theory of operation. ``ParticipantClient`` turns a typed message into one HTTP request to
the participant at ``address`` (``host:port``) and its answer back into a typed value: the
message's reply class for a 200, ``Refused`` carrying the ``ErrorReply`` otherwise. Every
request carries this side's protocol version; an answer from a peer of another major
version raises ``VersionMismatch`` naming both (see ``version.py``), as does the
participant's own ``VERSION_MISMATCH`` refusal. Transport failures (refused, reset, timed
out) raise ``Unreachable``; retrying is the caller's decision — a signal may be repeated
with the same id, the participant answers a repeat from its ledger.

The client does one attempt per call and owns no connection: the ``httpx.AsyncClient`` is
the caller's and so is its life. ``credentials(address)`` names the bearer each request
carries: the signal key the coordinators keep for that participant (see
``superagent.rpc.credentials``); None sends none, and the participant refuses it.
``Participants`` is the narrow interface callers depend on, so tests can hand in a fake.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol, TypeVar, cast

import httpx

from superagent import codec
from superagent.errors import CodecError
from superagent.rpc import messages as msg
from superagent.rpc import version
from superagent.rpc.errors import BadReply, Refused, Unreachable, VersionMismatch

STATUS_TIMEOUT = 60.0  # a status query answers from memory; this is a hung peer
R = TypeVar("R", bound=msg.Reply)
T = TypeVar("T")


class Participants(Protocol):
    """What a coordinator needs of the RPC (``ParticipantClient``, or a fake in tests)."""

    async def signal(self, address: str, message: msg.Signal[R], *, timeout: float) -> R:
        """Send a JSON signal; raises Refused, Unreachable, VersionMismatch, BadReply."""
        ...

    async def status(self, address: str, *, timeout: float = STATUS_TIMEOUT
                     ) -> msg.StatusReply: ...


class ParticipantClient:
    """The RPC over ``http`` (see the module docstring)."""

    def __init__(self, http: httpx.AsyncClient, *,
                 credentials: Callable[[str], str | None] | None = None) -> None:
        self.http = http
        self.credentials = credentials

    def _headers(self, address: str, extra: Mapping[str, str] | None = None
                 ) -> dict[str, str]:
        bearer = self.credentials(address) if self.credentials is not None else None
        auth = {"authorization": f"Bearer {bearer}"} if bearer else {}
        return {**_HEADERS, **auth, **(extra or {})}

    def __repr__(self) -> str:
        return f"<ParticipantClient protocol={version.CURRENT}>"

    async def signal(self, address: str, message: msg.Signal[R], *, timeout: float) -> R:
        """Send a JSON signal (not ``Upload``: see ``upload``); its typed reply."""
        if isinstance(message, msg.Upload) and not isinstance(message, msg.Prepare):
            raise TypeError("an Upload carries a tarball: use ParticipantClient.upload")
        response = await self._send(address, "POST", f"/v1/signals/{message.type}",
                                    timeout=timeout, json=codec.encode(message))
        return cast(R, self._reply(response, message.REPLY))

    async def upload(self, address: str, message: msg.Upload, archive: bytes, *,
                     timeout: float) -> msg.PrepareReply:
        """Prepare a release from ``archive`` (whose sha256 ``message`` names)."""
        response = await self._send(
            address, "PUT", f"/v1/releases/{message.app}/{message.release}", timeout=timeout,
            content=archive, headers={"X-Superagent-Signal": message.id,
                                      "X-Superagent-Term": str(message.term),
                                      "X-Superagent-Sha256": message.sha256})
        return self._reply(response, msg.PrepareReply)

    async def status(self, address: str, *, timeout: float = STATUS_TIMEOUT
                     ) -> msg.StatusReply:
        response = await self._send(address, "GET", "/v1/status", timeout=timeout)
        return self._reply(response, msg.StatusReply)

    async def logs(self, address: str, query: msg.LogsQuery, *,
                   timeout: float = STATUS_TIMEOUT) -> msg.LogsReply:
        if query.follow:
            raise TypeError("a following logs query streams: use ParticipantClient.follow")
        response = await self._send(address, "GET", "/v1/logs", timeout=timeout,
                                    params=query.params())
        return self._reply(response, msg.LogsReply)

    async def follow(self, address: str, query: msg.LogsQuery) -> AsyncIterator[dict[str, Any]]:
        """The recent lines, then new ones as they come, until the caller stops reading."""
        params = {**query.params(), "follow": "1"}
        try:
            async with self.http.stream("GET", f"http://{address}/v1/logs", params=params,
                                        headers=self._headers(address),
                                        timeout=None) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._reply(response, msg.LogsReply)  # raises the refusal
                self._peer_version(response)
                async for line in response.aiter_lines():
                    if line:
                        yield _json_object(line.encode())
        except httpx.HTTPError as exc:
            raise Unreachable(f"participant {address}: {exc!r}", address=address) from None

    # ------------------------------------------------------------------ internals
    async def _send(self, address: str, method: str, path: str, *, timeout: float,
                    headers: Mapping[str, str] | None = None, **kwargs: Any
                    ) -> httpx.Response:
        try:
            return await self.http.request(method, f"http://{address}{path}", timeout=timeout,
                                           headers=self._headers(address, headers), **kwargs)
        except httpx.HTTPError as exc:
            raise Unreachable(f"participant {address}: {exc!r}", address=address) from None

    def _peer_version(self, response: httpx.Response) -> version.Version:
        peer = version.Version.parse(response.headers.get(version.HEADER))
        version.check(peer, peer_role="participant")
        return peer

    def _reply(self, response: httpx.Response, cls: type[T]) -> T:
        if response.status_code != 200:
            try:
                found = _json_object(response.content)
            except BadReply:
                found = {"detail": response.text[:500]}
            reply = decode_error(found, response.status_code)
            if reply.error is msg.ErrorCode.VERSION_MISMATCH:
                raise VersionMismatch(reply.detail, ours=str(version.CURRENT))
            raise Refused(reply)
        peer = self._peer_version(response)
        doc = _json_object(response.content)
        try:
            return codec.decode(cls, doc, ignore_unknown=version.lenient(peer))
        except CodecError as exc:
            raise BadReply(f"{cls.__name__}: {exc}") from None


_HEADERS = {version.HEADER: str(version.CURRENT)}


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        raise BadReply(f"not JSON: {data[:200]!r}") from None
    if not isinstance(doc, dict):
        raise BadReply(f"not a JSON object: {data[:200]!r}")
    return doc


def decode_error(doc: Mapping[str, Any], status: int) -> msg.ErrorReply:
    """The ``ErrorReply`` of a refusal; an answer that is not one (a proxy's 502 page, a
    newer peer's unknown code) becomes an ``INTERNAL`` one keeping what it said."""
    try:
        return codec.decode(msg.ErrorReply, doc, ignore_unknown=True)
    except CodecError:
        detail = str(doc.get("detail") or doc)[:500]
        return msg.ErrorReply(error=msg.ErrorCode.INTERNAL, status=status, detail=detail)
