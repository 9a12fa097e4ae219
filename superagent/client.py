"""A client of the coordinator API, for the CLI (synchronous: one command, one answer).

``Client`` takes the coordinator URLs in order of preference and tries the next one when a
coordinator cannot be reached or has no leader; any coordinator takes writes (followers
forward them), so no redirect is needed. Errors become ``ClientError`` with the server's
own message.

What each node runs is known to the leader alone (its heartbeats are not in Raft): a
follower answers a list of nodes or apps with ``"live": false`` and null run-time fields.
A GET answered that way is asked again of the leader its ``X-Superagent-Leader`` names,
once, and the leader goes first for the client's later requests; so ``superagent nodes``,
``status`` and the URLs ``deploy`` prints are complete whichever coordinator is listed
first.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from superagent.errors import SuperagentError

DEFAULT_SERVER = "http://127.0.0.1:7100"
TOKEN_FILE = Path(".superagent") / "admin-token"  # written by `superagent up`
RETRY_STATUSES = {502, 503, 504}


class ClientError(SuperagentError):
    """The coordinator refused the request or could not be reached."""

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        self.status = status
        self.code = code
        super().__init__(message)


def resolve_servers(server: str | None) -> list[str]:
    """--server, else SUPERAGENT_SERVER, else the local default; comma-separated lists."""
    raw = server or os.environ.get("SUPERAGENT_SERVER") or DEFAULT_SERVER
    urls = [u.strip().rstrip("/") for u in raw.split(",") if u.strip()]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ClientError(f"server URL {url!r} must start with http:// or https://")
    if not urls:
        raise ClientError("no coordinator URL given")
    return urls


def resolve_token(token: str | None) -> tuple[str, str]:
    """``(token, where it came from)``: --token, else SUPERAGENT_TOKEN, else
    ./.superagent/admin-token; ``("", "")`` when none is found."""
    if token:
        return token.strip(), "--token"
    if os.environ.get("SUPERAGENT_TOKEN"):
        return os.environ["SUPERAGENT_TOKEN"].strip(), "SUPERAGENT_TOKEN"
    try:
        return TOKEN_FILE.read_text().strip(), f"./{TOKEN_FILE}"
    except OSError:
        return "", ""


class Client:
    def __init__(self, servers: Sequence[str], token: str, *, timeout: float = 120.0,
                 token_source: str = "") -> None:
        self.servers = list(servers)
        self.token = token
        self.token_source = token_source  # named when the token is refused
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"<Client servers={self.servers}>"

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        return {**headers, **(extra or {})}

    @contextmanager
    def stream(self, method: str, path: str, *, headers: dict[str, str] | None = None,
               content: Any = None, json: Any = None, timeout: float | None = None
               ) -> Iterator[httpx.Response]:
        """A streamed response from the first coordinator that answers.

        The next coordinator is tried when one cannot be reached or answers 502/503/504;
        a POST carries one Idempotency-Key across those attempts (a 504 may have committed),
        and a file body is rewound for each.
        """
        headers = self._headers(headers)
        if method == "POST":
            headers.setdefault("idempotency-key", secrets.token_hex(16))
        start = content.tell() if hasattr(content, "seek") else None
        limit = httpx.Timeout(timeout if timeout is not None else self.timeout, connect=3.0)
        failures: list[str] = []
        for index, url in enumerate(self.servers):
            last = index == len(self.servers) - 1
            if start is not None:
                content.seek(start)
            with httpx.Client(timeout=limit) as http:
                request = http.build_request(method, f"{url}{path}", headers=headers,
                                             content=content, json=json)
                try:
                    response = http.send(request, stream=True)
                except httpx.HTTPError as exc:
                    failures.append(f"{url}: {_describe(exc)}")
                    continue
                try:
                    if response.status_code in RETRY_STATUSES and not last:
                        response.read()
                        failures.append(f"{url}: {_message(response)}")
                        continue
                    if response.status_code >= 400:
                        response.read()
                        raise _error(url, response, token=self.token, source=self.token_source)
                    yield response
                    return
                finally:
                    response.close()
        raise ClientError("no coordinator answered: " + "; ".join(failures))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of ``method path``; raises ClientError. A GET that a follower
        answered without the leader's live view is asked of the leader (module docstring)."""
        doc, answered, leader = self._request(method, path, **kwargs)
        if (method == "GET" and isinstance(doc, dict) and doc.get("live") is False
                and leader and answered != leader):
            configured = self.servers
            self.servers = [leader, *(s for s in self.servers if s != leader)]
            with contextlib.suppress(ClientError):  # gone meanwhile: the follower's answer
                live, answered, _ = self._request(method, path, **kwargs)
                if answered != leader:
                    # the leader did not answer, another coordinator did: the leader does
                    # not go first for later requests, which would each try it in vain
                    self.servers = configured
                return live
            self.servers = configured
        return doc

    def _request(self, method: str, path: str, **kwargs: Any) -> tuple[Any, str, str]:
        """(the JSON answer, the URL of the coordinator that gave it, the leader's URL it
        named or "")."""
        with self.stream(method, path, **kwargs) as response:
            try:
                response.read()
            except httpx.HTTPError as exc:
                raise ClientError(f"the answer was cut off: {_describe(exc)}") from None
            url = str(response.url)
            answered = next((s for s in self.servers if url.startswith(s.rstrip("/") + "/")),
                            "")
            leader = response.headers.get("x-superagent-leader", "").rstrip("/")
            try:
                return response.json(), answered.rstrip("/"), leader
            except ValueError:
                return response.text, answered.rstrip("/"), leader

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:200]}"
    if isinstance(body, dict) and "detail" in body:
        return f"{body['detail']} (HTTP {response.status_code}, {body.get('error')})"
    return f"HTTP {response.status_code}"


def _error(url: str, response: httpx.Response, *, token: str, source: str) -> ClientError:
    code = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            code = str(body.get("error", ""))
    except ValueError:
        pass
    if response.status_code == 401 and not token:
        return ClientError(f"{url}: not authorised — no token given: pass --token, set "
                           f"SUPERAGENT_TOKEN or run where `superagent up` wrote "
                           f"{TOKEN_FILE} ({_message(response)})", status=401, code=code)
    if response.status_code == 401:
        hint = (" (written by an earlier `superagent up`?): pass --token or set"
                " SUPERAGENT_TOKEN" if source.endswith(str(TOKEN_FILE)) else "")
        where = f" from {source}" if source else ""
        return ClientError(f"{url}: not authorised — the token{where} was refused{hint}"
                           f" ({_message(response)})", status=401, code=code)
    return ClientError(_message(response), status=response.status_code, code=code)
