"""The transport interface and the one retry policy every transport uses.

A transport implements five primitives, each one try with no retry (``exec_raw``,
``aexec_raw``, ``write_raw``, ``listdir_raw``, ``read_raw``) and says which errors mean
"the connection broke, reconnect" (:attr:`Transport.retry_errors`) and which mean "a
reconnect cannot help" (:attr:`Transport.fatal_errors`). This class turns them into the
interface a scheduler uses: :meth:`Transport.run` (idempotent command, retried),
:meth:`Transport.run_once` (exactly once: ``sbatch``), :meth:`Transport.arun` (on an event
loop, retried), :meth:`Transport.write_files`, :meth:`Transport.list_tree` and
:meth:`Transport.read`, all under one bounded, jittered back-off (:class:`Backoff`).
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import random
import socket
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from charllm.errors import TransportError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Bounded, jittered, exponential: ``tries`` attempts, waits of ``min_s`` doubling up to ``max_s``."""

    tries: int = 5
    min_s: float = 1.0
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """The wait after failed attempt ``attempt`` (1-based): ``min_s * 2**(attempt-1)`` times 0.5..1.5, capped."""
        base = min(self.max_s, self.min_s * 2 ** (attempt - 1))
        return float(min(self.max_s, base * random.uniform(0.5, 1.5)))


def is_socket_oserror(err: OSError) -> bool:
    """Socket trouble (refused, reset, timed out, DNS, no errno), not a file problem such as ENOENT."""
    return err.errno is None or isinstance(err, (ConnectionError, TimeoutError, socket.gaierror))


class Transport(ABC):
    """A shell and the files of a cluster's login node (see the module docstring)."""

    # errors that mean the connection itself broke: retried on a fresh connection
    retry_errors: tuple[type[BaseException], ...] = (EOFError, OSError)
    # errors a reconnect cannot fix (authentication, host keys): TransportError(retryable=False) at once
    fatal_errors: tuple[type[BaseException], ...] = ()
    where = "the cluster"  # for messages: "SSH to <conn_id>", "localhost"

    def __init__(
        self,
        backoff: Backoff | None = None,
        *,
        sleep: Callable[[float], None] | None = None,
        asleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.backoff = backoff or Backoff()
        self.sleep = sleep or time.sleep  # tests make the back-off instant
        self.asleep = asleep or asyncio.sleep
        self.round_trips = 0  # command lines run (each try counts)
        self._lock = threading.RLock()

    # -- what a transport implements: one try each ------------------------------------------

    @abstractmethod
    def exec_raw(self, line: str) -> tuple[int, str, str]:
        """Run a bash command line from the login home: (exit status, stdout, stderr)."""

    @abstractmethod
    async def aexec_raw(self, line: str) -> tuple[int, str, str]:
        """:meth:`exec_raw` without blocking the running event loop."""

    @abstractmethod
    def write_raw(self, path: str, data: bytes) -> None:
        """Write a file (its folder exists); a relative path is relative to the login home."""

    @abstractmethod
    def listdir_raw(self, path: str) -> list[tuple[str, int]]:
        """The entries of a folder: (name, ``st_mode`` without following links)."""

    @abstractmethod
    def read_raw(self, path: str, last_bytes: int | None = None) -> bytes:
        """A file's bytes, or its last ``last_bytes``; ``FileNotFoundError`` if there is none."""

    def reset(self) -> None:
        """Forget a broken connection (the next call opens a new one)."""
        return None  # nothing held by default

    async def areset(self) -> None:
        """Forget a broken async connection."""
        return None  # nothing held by default

    def close(self) -> None:
        """Close the synchronous connection."""
        return None  # nothing held by default

    async def aclose(self) -> None:
        """Close the async connection (call from the loop that uses it)."""
        return None  # nothing held by default

    # -- the interface -----------------------------------------------------------------

    def run(self, line: str, *, check: bool = False) -> tuple[int, str, str]:
        """Run an idempotent command line, reconnecting with back-off; ``check``: exit 0 or TransportError."""
        rc, out, err = self.retry(lambda: self._exec_counted(line), "remote command")
        if check and rc != 0:
            raise TransportError(f"remote command failed (exit {rc}): {err.strip()[:2000]}", retryable=False)
        return rc, out, err

    def run_once(self, line: str) -> tuple[int, str, str]:
        """Run a command line exactly once (``sbatch``): a broken connection is a TransportError."""
        try:
            with self._lock:
                return self._exec_counted(line)
        except Exception as err:
            self._absorb(err)
            raise TransportError(f"{self.where} failed: {err}") from err

    async def arun(self, line: str) -> tuple[int, str, str]:
        """:meth:`run` on the event loop (triggers): never blocks it; the same back-off."""
        last: BaseException | None = None
        tries = self.backoff.tries
        for attempt in range(1, tries + 1):
            try:
                self.round_trips += 1
                return await self.aexec_raw(line)
            except Exception as err:
                last = self._absorb(err)
                await self.areset()
            if attempt < tries:
                await self.asleep(self._delay(attempt, last))
        raise TransportError(f"remote command on {self.where} failed after {tries} tries: {last}") from last

    def write_files(self, files: Mapping[str, bytes]) -> None:
        """Write files (their folders exist), all again after a reconnect."""

        def put() -> None:
            for path, data in files.items():
                self.write_raw(path, data)

        self.retry(put, "writing files")

    def list_tree(self, root: str) -> list[str]:
        """Regular files under ``root``, relative and sorted (links and others skipped); retried."""
        return self.retry(lambda: self._walk(root), "listing files")

    def read(self, path: str, last_bytes: int | None = None, tries: int | None = None) -> bytes:
        """A file (or its tail), retried up to ``tries`` times (at most the back-off's)."""
        return self.retry(lambda: self.read_raw(path, last_bytes), "reading a file", tries)

    def retry(self, fn: Callable[[], T], what: str, tries: int | None = None) -> T:
        """Run an idempotent operation, reconnecting on transport errors (``tries``: fewer than the back-off's)."""
        last: BaseException | None = None
        tries = min(tries or self.backoff.tries, self.backoff.tries)
        for attempt in range(1, tries + 1):
            try:
                with self._lock:
                    return fn()
            except TransportError as err:
                if not err.retryable:
                    raise
                last = err
            except Exception as err:
                last = self._absorb(err)
                self.reset()
            if attempt < tries:
                self.wait_before_retry(attempt, last)
        raise TransportError(f"{what} on {self.where} failed after {tries} tries: {last}") from last

    def wait_before_retry(self, attempt: int, err: BaseException) -> None:
        """Sleep the back-off after failed attempt ``attempt`` (nothing after the last one)."""
        if attempt < self.backoff.tries:
            self.sleep(self._delay(attempt, err))

    # -- helpers -------------------------------------------------------------------------

    def _exec_counted(self, line: str) -> tuple[int, str, str]:
        self.round_trips += 1
        return self.exec_raw(line)

    def _absorb(self, err: Exception) -> Exception:
        """Return a retryable error; raise the others (fatal ones as a TransportError that is not retried)."""
        if isinstance(err, self.fatal_errors):
            raise TransportError(f"{self.where} refused, not retried: {err}", retryable=False) from err
        if not isinstance(err, self.retry_errors) or (isinstance(err, OSError) and not is_socket_oserror(err)):
            raise err
        return err

    def _delay(self, attempt: int, err: BaseException | None) -> float:
        delay = self.backoff.delay(attempt)
        log.warning(
            "%s failed (attempt %d/%d), retrying in %.1fs: %r", self.where, attempt, self.backoff.tries, delay, err
        )
        return delay

    def _walk(self, root: str) -> list[str]:
        found: list[str] = []
        stack = [""]
        while stack:
            rel = stack.pop()
            for name, mode in self.listdir_raw(posixpath.join(root, rel) if rel else root):
                if name in (".", "..") or "/" in name:
                    continue
                sub = posixpath.join(rel, name) if rel else name
                if stat.S_ISDIR(mode):
                    stack.append(sub)
                elif stat.S_ISREG(mode):
                    found.append(sub)
        return sorted(found)
