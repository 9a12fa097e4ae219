"""The agent's link to the coordinator cluster: join, heartbeat, fetch release artifacts.

``CoordinatorLink.run`` registers this node with the cluster (``POST /api/v1/nodes/register``)
and then heartbeats every ``interval`` with a compact status (``POST
/api/v1/nodes/{node}/heartbeat``) until cancelled. It reports ``started`` at once: an agent
whose coordinators are all down still starts and serves what it runs, and joins when one
comes up. A heartbeat answered 404 ``unknown_node`` (the cluster forgot the node, e.g. after
its state was rebuilt) makes the link register again and carry on.

Any coordinator accepts these requests (followers forward them to the leader), but every
answer may name the leader in ``X-Superagent-Leader``, and the link sends its next requests
there: ``Endpoints`` keeps that preference and otherwise walks the configured URLs in turn.
A 503 (``NoLeader`` during an election), a 5xx, a connection error or a timeout moves to the
next URL; when every URL failed the link waits (``superagent.backoff.Backoff``: 0.2 s
doubling to 5 s) and tries again, forever. ``Reachability`` turns successes and failures
into one warning per outage and one info line when the cluster answers ("joined
coordinator", "coordinator reachable again"), never one line per attempt.

``fetch_artifact`` streams a content-addressed blob (``GET /api/v1/artifacts/{sha256}``)
into a temporary file beside its destination, checks the sha256 and renames it into place.
A coordinator that lacks the blob (404), is down, or serves bytes with another hash is
skipped for the next; when none served it intact, ``ArtifactUnavailable`` names the hash and
what each URL said, and nothing is left on disk.

Credentials. A machine enrolled once keeps its own credential in ``<data_dir>/credential``
(0600) and bears it on every request. A new machine enrols first (``enrol``, before the
agent serves anything): it makes its credential, writes it beside the final file
(``credential.pending``), sends its hash and signal key with the join token as bearer
(``POST /api/v1/nodes/enrol``) and moves the file into place once the cluster accepted it,
so a retry after a lost answer sends the same values and is answered as a repeat. A
refusal (401/403/409/400: unknown, used or expired token, name taken) raises
``EnrolmentRefused`` with the coordinator's explanation; an unreachable cluster is retried.
A cluster still in migration accepts the old shared ``secret`` instead (see
docs/participant.md, "Migrating").

``Endpoints`` and ``Reachability`` do no I/O (they are tested synchronously);
``CoordinatorLink`` only moves requests and handles time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
import trio

from superagent.backoff import Backoff
from superagent.errors import ConfigError
from superagent.names import SHA256
from superagent.participant.errors import (
    ArtifactUnavailable,
    ChecksumMismatch,
    EnrolmentRefused,
)
from superagent.rpc import credentials as creds

log = structlog.get_logger("superagent.participant.joiner")

LEADER_HEADER = "X-Superagent-Leader"
BACKOFF_START = 0.2  # seconds: an election usually ends within a few hundred milliseconds
BACKOFF_MAX = 5.0  # seconds: a node rejoins within this long after the cluster is back
HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats
REQUEST_TIMEOUT = 5.0  # seconds per network operation (connect, each read, each write)
MAX_ARTIFACT = 512 * 1024 * 1024  # bytes: the RPC's own bound on an uploaded release
_CHUNK = 64 * 1024


# --- pure parts ------------------------------------------------------------------------------


def normalise_url(url: str) -> str | None:
    """``url`` as the base URL of a coordinator's API (no trailing '/'); None if it is not
    an http(s) URL with a host and without query or fragment."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.query or parts.fragment or "@" in parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def parse_coordinator_urls(values: Iterable[str], *, source: str = "--coordinator"
                           ) -> tuple[str, ...]:
    """Comma-separated (and/or repeated) coordinator URLs, normalised and deduplicated.

    Raises ConfigError naming the first bad URL (or saying that none was given).
    """
    urls: list[str] = []
    for value in values:
        for item in value.split(","):
            if not item.strip():
                continue
            url = normalise_url(item)
            if url is None:
                raise ConfigError(f"{item.strip()!r} is not a coordinator URL: use"
                                  " http(s)://HOST:PORT", source=source)
            if url not in urls:
                urls.append(url)
    if not urls:
        raise ConfigError("no coordinator URL given", source=source)
    return tuple(urls)


class Endpoints:
    """Which coordinator to ask next: the leader when one was named (or the last that
    answered), then the configured URLs in order. Pure state, no I/O."""

    def __init__(self, urls: Iterable[str]) -> None:
        self.urls: tuple[str, ...] = tuple(urls)
        if not self.urls:
            raise ValueError("at least one coordinator URL is needed")
        self.preferred: str | None = None

    def __repr__(self) -> str:
        return f"<Endpoints preferred={self.preferred} urls={list(self.urls)}>"

    @property
    def first(self) -> str:
        return self.preferred or self.urls[0]

    def order(self) -> list[str]:
        """Every URL once, the preferred one first."""
        head = [self.preferred] if self.preferred else []
        return head + [u for u in self.urls if u != self.preferred]

    def walk(self) -> Iterator[str]:
        """One round over the URLs that follows a leader named during the round: after
        each yielded URL the order is recomputed, skipping URLs already tried."""
        tried: set[str] = set()
        while True:
            url = next((u for u in self.order() if u not in tried), None)
            if url is None:
                return
            tried.add(url)
            yield url

    def answered(self, url: str, leader: str | None) -> None:
        """``url`` answered; ``leader`` is its X-Superagent-Leader header, if any."""
        named = normalise_url(leader) if leader else None
        self.preferred = named or url

    def failed(self, url: str) -> None:
        if self.preferred == url:
            self.preferred = None


class Reachability:
    """Turns request outcomes into log lines: one warning when an outage begins, one info
    line when the cluster answers for the first time or again. ``succeeded`` and ``failed``
    return the event to log, or None when nothing changed."""

    def __init__(self) -> None:
        self.joined = False
        self.down = False

    def __repr__(self) -> str:
        return f"<Reachability joined={self.joined} down={self.down}>"

    def succeeded(self) -> str | None:
        if not self.joined:
            self.joined, self.down = True, False
            return "joined coordinator"
        if self.down:
            self.down = False
            return "coordinator reachable again"
        return None

    def failed(self) -> str | None:
        if self.down:
            return None
        self.down = True
        return "coordinator unreachable; retrying" if self.joined else \
            "no coordinator reachable yet; retrying"


class _RoundFailed(Exception):
    """Every coordinator failed one round; ``tried`` says how, per URL."""

    def __init__(self, tried: dict[str, str], *, refused: bool = False) -> None:
        self.tried = tried
        self.refused = refused  # the cluster answered, and refused this machine's credential
        super().__init__("; ".join(f"{u}: {why}" for u, why in tried.items()))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _status_reason(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", "")
    except (ValueError, AttributeError):
        error = ""
    return f"{response.status_code} {error or response.reason_phrase}".strip()


# --- the link --------------------------------------------------------------------------------


class CoordinatorLink:
    """This node's membership in the coordinator cluster (see the module docstring).

    ``status`` is called before every heartbeat for the compact status to send.
    """

    def __init__(self, urls: list[str], *, secret: str = "", node: str, address: str,
                 groups: list[str] | tuple[str, ...], capacity: int,
                 status: Callable[[], dict[str, Any]], interval: float = HEARTBEAT_INTERVAL,
                 request_timeout: float = REQUEST_TIMEOUT, join_token: str = "",
                 credential_file: Path | None = None) -> None:
        normalised = [normalise_url(u) for u in urls]
        bad = [u for u, n in zip(urls, normalised, strict=True) if n is None]
        if bad or not urls:
            raise ConfigError(f"bad coordinator URL {bad[0]!r}" if bad
                              else "no coordinator URL given", source="coordinator")
        self.endpoints = Endpoints(dict.fromkeys(n for n in normalised if n is not None))
        self.secret = secret
        self.join_token = join_token
        self.credential_file = credential_file
        self.credential = (creds.read_credential(credential_file)
                           if credential_file is not None else None)
        if not (self.credential or secret or join_token):
            raise ConfigError("no credential to join the cluster with: give a join token"
                              " (superagent nodes join-token)", source="participant")
        self.node = node
        if self.credential and join_token:
            log.info("already enrolled: the join token is not used (remove the credential"
                     " file to enrol again)", node=node, credential=str(credential_file))
        self.address = address
        self.groups = list(groups)
        self.capacity = capacity
        self.status = status
        self.interval = interval
        self.request_timeout = request_timeout
        self.reachability = Reachability()
        self.registrations = 0  # successful registrations (a re-registration counts)
        self.heartbeats = 0  # heartbeats the cluster accepted
        self._log = log.bind(node=node)

    def __repr__(self) -> str:
        return (f"<CoordinatorLink node={self.node} leader={self.leader_url}"
                f" joined={self.reachability.joined} down={self.reachability.down}"
                f" heartbeats={self.heartbeats}>")

    @property
    def leader_url(self) -> str:
        """Where the next request goes first: the leader's API when a coordinator named
        it, else the coordinator that answered last, else the first configured URL."""
        return self.endpoints.first

    @property
    def needs_enrolment(self) -> bool:
        return self.credential is None and bool(self.join_token)

    def _auth(self) -> dict[str, str]:
        """This machine's credential (the legacy shared secret before it has one)."""
        return {"Authorization": f"Bearer {self.credential or self.secret}"}

    def _client(self) -> httpx.AsyncClient:
        # trust_env=False: cluster traffic goes straight to the coordinators, never
        # through an HTTP proxy configured for the machine's outbound traffic.
        return httpx.AsyncClient(timeout=self.request_timeout, trust_env=False)

    # ------------------------------------------------------------------ enrolment
    async def enrol(self) -> None:
        """Exchange the join token for this machine's credential (see the module
        docstring); retries while no coordinator answers. Raises EnrolmentRefused."""
        if not self.needs_enrolment:
            return
        assert self.credential_file is not None, "enrolment needs a credential file"
        pending = self.credential_file.with_name(self.credential_file.name + ".pending")
        credential = creds.read_credential(pending)
        if credential is None:
            credential = creds.new_credential()
            creds.write_credential(pending, credential)
        body = {"node": self.node, "credential_sha256": creds.credential_hash(credential),
                "signal_key": creds.signal_key(credential)}
        backoff = Backoff(BACKOFF_START, BACKOFF_MAX)
        async with self._client() as client:
            while True:
                try:
                    response = await self._round(
                        client, "POST", "/api/v1/nodes/enrol", body,
                        headers={"Authorization": f"Bearer {self.join_token}"})
                except _RoundFailed as exc:
                    event = self.reachability.failed()
                    if event is not None:
                        self._log.warning(event, tried=exc.tried)
                    await trio.sleep(backoff.next())
                    continue
                break
        if response.status_code != 200:
            detail = _json(response).get("detail") or _status_reason(response)
            raise EnrolmentRefused(f"the cluster refused to enrol node {self.node!r}:"
                                   f" {detail}", status_hint=response.status_code)
        os.replace(pending, self.credential_file)
        self.credential = credential
        self._log.info("enrolled", coordinator=str(response.url))

    # ------------------------------------------------------------------ membership
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Register, then heartbeat every ``interval`` until cancelled; never raises for a
        coordinator that is down, slow or in an election (see the module docstring)."""
        backoff = Backoff(BACKOFF_START, BACKOFF_MAX)
        async with self._client() as client:
            task_status.started()
            registered = False
            refused_logged: str | None = None  # logged once while it lasts
            while True:
                try:
                    if not registered:
                        await self._register(client)
                        registered = True
                    elif not await self._heartbeat(client):
                        registered = False  # the cluster does not know this node
                        continue
                except _RoundFailed as exc:
                    event = ("the cluster refuses this machine's credential (revoked?): enrol"
                             " it again with a join token issued for this node"
                             if exc.refused else self.reachability.failed())
                    if event is not None and event != refused_logged:
                        self._log.warning(event, tried=exc.tried)
                    refused_logged = event if exc.refused else None
                    await trio.sleep(backoff.next())
                    continue
                refused_logged = None
                event = self.reachability.succeeded()
                if event is not None:
                    self._log.info(event, leader=self.leader_url)
                backoff.reset()
                await trio.sleep(self.interval)

    async def _register(self, client: httpx.AsyncClient) -> None:
        body = {"node": self.node, "address": self.address, "groups": self.groups,
                "capacity": self.capacity}
        response = await self._round(client, "POST", "/api/v1/nodes/register", body)
        if response.status_code != 200:
            raise _RoundFailed({str(response.url): _status_reason(response)},
                               refused=response.status_code in (401, 403))
        self.registrations += 1
        self._log.debug("registered", created=_json(response).get("created"),
                        coordinator=str(response.url))

    async def _heartbeat(self, client: httpx.AsyncClient) -> bool:
        """True when the heartbeat was accepted, False when the node must register again."""
        response = await self._round(client, "POST", f"/api/v1/nodes/{self.node}/heartbeat",
                                     {"status": self.status()})
        if response.status_code == 404 and _json(response).get("error") == "unknown_node":
            self._log.info("coordinator does not know this node; registering again")
            return False
        if response.status_code != 200:
            raise _RoundFailed({str(response.url): _status_reason(response)},
                               refused=response.status_code in (401, 403))
        self.heartbeats += 1
        return True

    async def _round(self, client: httpx.AsyncClient, method: str, path: str,
                     body: dict[str, Any], *, headers: dict[str, str] | None = None
                     ) -> httpx.Response:
        """The first answer below 500 from the coordinators, leader first; raises
        _RoundFailed when every one failed."""
        tried: dict[str, str] = {}
        for url in self.endpoints.walk():
            try:
                response = await client.request(method, url + path, json=body,
                                                 headers=headers or self._auth())
            except httpx.HTTPError as exc:
                tried[url] = _reason(exc)
                self.endpoints.failed(url)
                continue
            if response.status_code >= 500:
                tried[url] = _status_reason(response)
                self.endpoints.failed(url)
                self._follow(url, response, answered=False)
                continue
            self._follow(url, response, answered=True)
            return response
        raise _RoundFailed(tried)

    def _follow(self, url: str, response: httpx.Response, *, answered: bool) -> None:
        leader = response.headers.get(LEADER_HEADER)
        if answered:
            self.endpoints.answered(url, leader)
        elif leader and normalise_url(leader) not in (None, url):
            self.endpoints.answered(url, leader)  # a 503 that still names the leader

    # ------------------------------------------------------------------ artifacts
    async def fetch_artifact(self, sha256: str, dest: Path) -> Path:
        """Download the blob ``sha256`` to ``dest`` (replacing it) and return ``dest``.

        The leader is asked first, then the other coordinators. Raises ChecksumMismatch
        (400) for a malformed hash and ArtifactUnavailable when no coordinator served the
        blob intact; then nothing is left beside ``dest``.
        """
        expected = sha256.strip().lower()
        if not SHA256.fullmatch(expected):
            raise ChecksumMismatch(f"{sha256!r} is not a sha256 hex digest", expected=sha256,
                                   actual="")
        tried: dict[str, str] = {}
        async with self._client() as client:
            for url in self.endpoints.walk():
                why = await self._fetch_from(client, url, expected, dest)
                if why is None:
                    self._log.info("artifact fetched", sha256=expected, coordinator=url,
                                   bytes=dest.stat().st_size)
                    return dest
                tried[url] = why
                self._log.warning("artifact not fetched", sha256=expected, coordinator=url,
                                  reason=why)
        raise ArtifactUnavailable(expected, tried)

    async def _fetch_from(self, client: httpx.AsyncClient, url: str, expected: str,
                          dest: Path) -> str | None:
        """Stream the blob from one coordinator into place; None on success, else why not."""
        fd, tmp_name = _temp_beside(dest)
        tmp = Path(tmp_name)
        try:
            async with client.stream("GET", f"{url}/api/v1/artifacts/{expected}",
                                     headers=self._auth()) as response:
                if response.status_code != 200:
                    if response.status_code >= 500:
                        self.endpoints.failed(url)
                    return _status_reason(response) if response.status_code != 404 \
                        else "404 not found"
                digest = hashlib.sha256()
                size = 0
                async with trio.wrap_file(os.fdopen(fd, "wb")) as out:
                    fd = -1  # owned by ``out`` now
                    async for chunk in response.aiter_bytes(_CHUNK):
                        size += len(chunk)
                        if size > MAX_ARTIFACT:
                            return f"over {MAX_ARTIFACT} bytes"
                        digest.update(chunk)
                        await out.write(chunk)
                    await out.flush()
                    await trio.to_thread.run_sync(os.fsync, out.wrapped.fileno())
            if digest.hexdigest() != expected:
                return f"sha256 mismatch: the blob served has sha256 {digest.hexdigest()}"
            os.replace(tmp, dest)
            return None
        except httpx.HTTPError as exc:
            self.endpoints.failed(url)
            return _reason(exc)
        finally:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _temp_beside(dest: Path) -> tuple[int, str]:
    path = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), str(path)


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        doc = response.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
