"""The servers behind :class:`~ophsd.rollout.sglang.SGLangEngine`: HTTP calls, rotation, health.

:class:`ServerPool` knows every worker server, which of them may serve (alive, and on the weight
version the client last pushed), and picks them in round-robin order. A server that refuses
connections, times out or fails twice with 5xx is taken out of rotation and probed again
(``/health_generate``) after ``dead_cooldown_s``; one that reports other weights is *stale* until
it is updated. :class:`RetryPolicy` says how often and how long to wait before a request goes to
the next server. Every call goes through one pooled ``httpx.Client`` per pool (keep-alive
connections instead of a TCP handshake per request), closed by :meth:`ServerPool.close`.
"""
from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import httpx

from ophsd.rollout import protocol as P
from ophsd.rollout.base import EngineError, InvalidRequestError

log = logging.getLogger(__name__)


class TransientError(Exception):
    """Connection error, timeout or 5xx: worth retrying elsewhere. ``dead``: the server did not
    answer at all (take it out of rotation at once)."""

    def __init__(self, msg: str, dead: bool):
        super().__init__(msg)
        self.dead = dead


def http_json(client: httpx.Client, url: str, path: str, body=None, timeout: float = 60.0):
    """One HTTP call on ``client``, GET without a body, POST with one -> (status, parsed JSON or
    text). Raises :class:`TransientError` (no answer, 5xx) or :class:`InvalidRequestError` (4xx)."""
    method = "GET" if body is None else "POST"
    # json.dumps, not httpx's json=: NaN stays encodable and a weight bucket is encoded once
    data = None if body is None else json.dumps(body).encode()
    headers = None if data is None else {"Content-Type": "application/json"}
    try:
        r = client.request(method, url.rstrip("/") + path, content=data, headers=headers, timeout=timeout)
    except httpx.TransportError as e:  # refused, reset, timed out, a broken answer
        raise TransientError(f"{url}{path}: {type(e).__name__}: {e}", dead=True) from None
    raw, status = r.content, r.status_code
    try:
        payload = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        payload = raw.decode(errors="replace")
    if status >= 500:
        raise TransientError(f"{url}{path}: HTTP {status}: {error_message(payload)}", dead=False)
    if status >= 400:
        raise InvalidRequestError(f"{url}{path}: HTTP {status}: {error_message(payload)}")
    return status, payload


def new_client(max_idle: int) -> httpx.Client:
    """A pooled client: keep-alive connections are reused, at most ``max_idle`` kept open. The
    number in use is not capped (callers bound their own concurrency), so no call waits for one."""
    return httpx.Client(limits=httpx.Limits(max_connections=None, max_keepalive_connections=max_idle))


def error_message(payload) -> str:
    """The human part of an error answer (SGLang's ``ErrorResponse.message``, or what there is)."""
    if isinstance(payload, dict):
        return str(payload.get("message") or payload.get("error") or payload.get("detail") or payload)[:2000]
    return str(payload)[:2000]


@dataclass(frozen=True)
class RetryPolicy:
    """Transient failures (no answer, 5xx) are retried on another server with exponential backoff."""

    max_retries: int = 3
    """Further attempts after a transient failure (each on another server when there is one)."""
    backoff_s: float = 0.25
    """Delay before the first retry; doubles per attempt."""
    max_backoff_s: float = 8.0
    """Upper bound of one delay."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` >= 1 failures so far)."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)


@dataclass(eq=False)
class Server:
    """One worker server as the client sees it."""

    url: str
    alive: bool = True
    stale: bool = False
    failures: int = 0
    dead_since: float = 0.0
    last_error: str = ""
    version: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.alive and not self.stale


class ServerPool:
    """Worker servers (and an optional ``sglang-router`` in front of them) with their health and
    weight versions. ``version`` is the weight version every usable server must report."""

    def __init__(self, urls: Sequence[str], *, router_url: str | None = None, control_timeout: float = 600.0,
                 dead_cooldown_s: float = 15.0, retry: RetryPolicy = RetryPolicy(), max_idle: int = 64):
        if not urls:
            raise ValueError("SGLangEngine needs at least one server URL")
        self.servers = [Server(u.rstrip("/")) for u in urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self.control_timeout = control_timeout
        self.dead_cooldown_s = dead_cooldown_s
        self.retry = retry
        self.version = 0
        self._lock = threading.Lock()
        self._rr = itertools.count()
        self.client = new_client(max_idle)

    def request(self, url: str, path: str, body=None, timeout: float | None = None):
        """:func:`http_json` on this pool's client (``timeout``: the control timeout by default)."""
        return http_json(self.client, url, path, body, timeout=timeout or self.control_timeout)

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ versions
    def connect(self) -> None:
        """Ask every server for its model info and weight version; servers behind the newest
        version are stale. :class:`EngineError` when none answers."""
        errors = []
        for s in self.servers:
            try:
                _, info = self.request(s.url, "/get_model_info")
                s.info = info if isinstance(info, dict) else {}
                s.version = self.server_version(s)
            except (TransientError, InvalidRequestError) as e:
                self.mark_dead(s, str(e))
                errors.append(str(e))
        live = [s for s in self.servers if s.alive]
        if not live:
            self.close()
            raise EngineError("no SGLang server answers: " + "; ".join(errors))
        versions = {s.version for s in live}
        self.version = max((v for v in versions if v is not None), default=0)
        for s in live:
            if (s.version or 0) != self.version:
                s.stale = True
                log.warning("server %s has weight_version %s, others %s: out of rotation until updated",
                            s.url, s.version, self.version)

    def server_version(self, s: Server) -> int | None:
        try:
            _, body = self.request(s.url, "/get_weight_version")
            return P.parse_weight_version((body or {}).get("weight_version"))
        except InvalidRequestError:  # older SGLang without the route: fall back to model info
            return P.parse_weight_version(s.info.get("weight_version"))

    def set_version(self, version: int, updated: Sequence[Server]) -> None:
        """``updated`` now serve ``version``; every other server not on it is stale."""
        with self._lock:
            self.version = version
            for s in self.servers:
                if s in updated:
                    s.version, s.stale = version, False
                elif s.version != version:
                    s.stale = True

    # ------------------------------------------------------------------ rotation
    def target(self, tried: set) -> tuple[str | None, Server | None]:
        """Where the next request goes: the router, or the next usable server not in ``tried``
        (a dead one past its cooldown is probed first); ``(None, None)`` when none is left."""
        if self.router_url:
            return self.router_url, None
        s = self.pick(tried)
        return (s.url, s) if s else (None, None)

    def pick(self, exclude: set) -> Server | None:
        with self._lock:
            now = time.monotonic()
            order = list(self.servers)
            k = next(self._rr) % len(order)
            order = order[k:] + order[:k]
            for s in order:
                if s.usable and s.url not in exclude:
                    return s
            for s in order:  # re-probe dead servers after their cooldown
                if not s.alive and now - s.dead_since >= self.dead_cooldown_s and s.url not in exclude:
                    s.dead_since = now
                    probe = s
                    break
            else:
                return None
        return probe if self.revive(probe) else None

    def revive(self, s: Server) -> bool:
        try:
            self.request(s.url, "/health_generate", timeout=30)
            version = self.server_version(s)
        except (TransientError, InvalidRequestError):
            return False
        with self._lock:
            s.alive, s.failures = True, 0
            s.version = version
            s.stale = (version or 0) != self.version
        log.info("server %s is back (weight_version %s%s)", s.url, version, ", stale" if s.stale else "")
        return s.usable

    def mark_dead(self, s: Server, why: str) -> None:
        with self._lock:
            s.alive, s.dead_since, s.last_error = False, time.monotonic(), why
        log.warning("server %s out of rotation: %s", s.url, why)

    def mark_stale(self, s: Server) -> None:
        with self._lock:
            s.stale = True

    def record_failure(self, s: Server, e: TransientError) -> None:
        """A transient failure: out of rotation when it did not answer or failed twice in a row."""
        with self._lock:
            s.failures += 1
            s.last_error = str(e)
        if e.dead or s.failures >= 2:
            self.mark_dead(s, str(e))

    def record_success(self, s: Server) -> None:
        with self._lock:
            s.failures = 0

    def why_unavailable(self) -> str:
        return "; ".join(f"{s.url}: {'stale weights' if s.stale else s.last_error or 'down'}" for s in self.servers)

    # ------------------------------------------------------------------ control plane
    def call_all(self, path: str, body=None, servers=None, timeout=None) -> dict:
        """POST (with a body) or GET to every live worker in parallel -> {url: payload or exception}."""
        servers = [s for s in (servers or self.servers) if s.alive]

        def call(s):
            try:
                return self.request(s.url, path, body, timeout=timeout)[1]
            except Exception as e:  # noqa: BLE001 - reported per server
                return e

        with ThreadPoolExecutor(max_workers=max(1, len(servers))) as ex:
            return dict(zip([s.url for s in servers], ex.map(call, servers)))

    def call_every(self, path: str, body) -> None:
        """:meth:`call_all`; :class:`EngineError` naming the servers where it failed."""
        bad = {u: r for u, r in self.call_all(path, body).items() if isinstance(r, Exception)}
        if bad:
            raise EngineError(f"{path.lstrip('/')} failed on {sorted(bad)}: {next(iter(bad.values()))}")

    def health(self) -> bool:
        """True when the router, or any live server, answers ``/health_generate``."""
        urls = [self.router_url] if self.router_url else [s.url for s in self.servers if s.alive]
        for u in urls:
            try:
                self.request(u, "/health_generate", timeout=30)
                return True
            except (TransientError, InvalidRequestError):
                continue
        return False
