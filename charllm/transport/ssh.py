"""The SSH transport: a cluster's login node through an Airflow SSH connection.

The connection (host, port, user, key, host keys) is looked up by id in Airflow's
connections (``AIRFLOW_CONN_*`` variables work too); that lookup is the only Airflow code
below the orchestration layer, imported when a connection is first opened. The synchronous
calls use paramiko with the connection parsed by Airflow's ``SSHHook``; :meth:`SSHTransport.arun`
(triggers, on the triggerer's event loop) uses asyncssh through ``SSHHookAsync`` and never
blocks the loop; both connections are kept open between calls. Host keys are checked: from
the connection's ``host_key`` extra or its ``known_hosts`` file, else the system's known_hosts;
``no_host_key_check: true`` must be asked for explicitly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import selectors
import time
from typing import Any

import asyncssh
import paramiko

from charllm.errors import ConfigError
from charllm.transport.base import Transport

log = logging.getLogger(__name__)


# -- what counts as "the connection broke" ------------------------------------------------
#
# These mean the SSH connection itself is broken, refused or wedged, so the operation is
# retried on a fresh connection with the bounded, jittered back-off (the SSH provider's
# remote-job trigger makes the same call):
#   * paramiko.SSHException: banner/handshake/protocol failures, "SSH session not active",
#     channel open failures (sshd MaxSessions/MaxStartups under load);
#   * asyncssh.Error: disconnects, lost connections, ChannelOpenError (async path);
#   * EOFError: the server closed the stream mid-read (sshd restarted, node rebooted), and
#     a channel that closed without an exit status;
#   * OSError from the socket: refused/reset (ConnectionError), timeouts (TimeoutError,
#     also a wedged command), DNS (socket.gaierror), paramiko's NoValidConnectionsError and
#     "Socket is closed" (no errno).
# Not retried, because a reconnect cannot fix them: authentication failures and unknown or
# changed host keys (configuration; raised at once as TransportError), and OSErrors with an
# errno from SFTP such as ENOENT or EACCES (a file problem, passed through as is).
class HostKeyUnknown(paramiko.SSHException):
    """The server's host key is not in the known_hosts we were given."""

    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(
            f"host key of {hostname} ({key.get_name()}) is not in the connection's known_hosts; "
            "add it (ssh-keyscan) or point the connection extra `known_hosts` at a file that has it"
        )


FATAL_SSH: tuple[type[BaseException], ...] = (
    HostKeyUnknown,
    paramiko.AuthenticationException,
    paramiko.BadHostKeyException,
    asyncssh.HostKeyNotVerifiable,
    asyncssh.PermissionDenied,
    asyncssh.IllegalUserName,
)
RETRY_SSH: tuple[type[BaseException], ...] = (paramiko.SSHException, asyncssh.Error, EOFError, OSError)


class RejectUnknownHosts(paramiko.MissingHostKeyPolicy):
    """paramiko's RejectPolicy, with an error we can tell apart from a dropped connection."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyUnknown(hostname, key)


class ChannelDied(EOFError):
    """The command's channel closed without an exit status (sshd or the session died)."""


def airflow_connection(conn_id: str) -> tuple[Any, dict[str, Any]]:
    """The Airflow connection ``conn_id`` parsed by ``SSHHook``, and its extras."""
    from airflow.exceptions import AirflowException
    from airflow.providers.ssh.hooks.ssh import SSHHook

    try:
        hook = SSHHook(ssh_conn_id=conn_id)
        extra = hook.get_connection(conn_id).extra_dejson
    except (AirflowException, ValueError) as err:  # missing connection, host, bad key
        raise ConfigError(f"<connection {conn_id}>", "conn_id", str(err)) from err
    return hook, extra


async def airflow_aconnect(conn_id: str, timeout_s: float) -> asyncssh.SSHClientConnection:
    """An asyncssh connection opened by Airflow's ``SSHHookAsync`` from connection ``conn_id``."""
    from airflow.exceptions import AirflowException
    from airflow.providers.ssh.hooks.ssh import SSHHookAsync

    hook = SSHHookAsync(ssh_conn_id=conn_id)
    try:
        conn: asyncssh.SSHClientConnection = await asyncio.wait_for(hook.get_conn(), timeout=timeout_s)
    except (AirflowException, ValueError) as err:  # missing connection, bad host_key extra
        raise ConfigError(f"<connection {conn_id}>", "conn_id", str(err)) from err
    return conn


class SSHTransport(Transport):
    """A login node over SSH: paramiko (+ SFTP) for synchronous calls, asyncssh for triggers."""

    retry_errors = RETRY_SSH
    fatal_errors = FATAL_SSH

    def __init__(
        self,
        conn_id: str,
        *,
        connect_timeout_s: float = 15.0,
        command_timeout_s: float = 120.0,
        **retry: Any,
    ) -> None:
        """``retry``: the :class:`Transport` options (``backoff``, ``sleep``, ``asleep``)."""
        super().__init__(**retry)
        self.conn_id = conn_id
        self.where = f"SSH to {conn_id}"
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._aconn: asyncssh.SSHClientConnection | None = None
        self._aconn_loop: asyncio.AbstractEventLoop | None = None
        self._alock: asyncio.Lock | None = None

    # -- primitives ----------------------------------------------------------------------

    def exec_raw(self, line: str) -> tuple[int, str, str]:
        """Run one command line on the cached client; read stdout and stderr until exit."""
        client = self._get_client()
        transport = client.get_transport()
        if transport is None or not transport.is_active():
            raise EOFError("SSH transport is not active")
        chan = transport.open_session(timeout=self.connect_timeout_s)
        out_b, err_b = bytearray(), bytearray()
        deadline = time.monotonic() + self.command_timeout_s
        try:
            chan.exec_command(line)
            chan.shutdown_write()
            with selectors.DefaultSelector() as sel:
                sel.register(chan, selectors.EVENT_READ)
                while True:
                    if chan.recv_ready():
                        out_b += chan.recv(65536)
                    elif chan.recv_stderr_ready():
                        err_b += chan.recv_stderr(65536)
                    elif (chan.eof_received and chan.exit_status_ready()) or chan.closed:
                        # both: sshd may send the exit status before the last output
                        break
                    elif time.monotonic() > deadline:
                        raise TimeoutError(f"remote command ran over {self.command_timeout_s}s")
                    else:
                        sel.select(min(1.0, max(0.0, deadline - time.monotonic())))
            rc = chan.exit_status if chan.exit_status_ready() else -1
        finally:
            chan.close()
        if rc < 0:
            raise ChannelDied(f"remote command ended without an exit status: {bytes(err_b)[:500]!r}")
        return rc, out_b.decode("utf-8", errors="replace"), err_b.decode("utf-8", errors="replace")

    async def aexec_raw(self, line: str) -> tuple[int, str, str]:
        conn = await self._aget_conn()
        res = await conn.run(line, check=False, timeout=self.command_timeout_s)
        if res.exit_status is None or res.exit_status < 0:
            raise ChannelDied(f"remote command ended without an exit status (signal {res.exit_signal})")
        out, err = res.stdout or "", res.stderr or ""
        if isinstance(out, bytes):
            out = out.decode("utf-8", errors="replace")
        if isinstance(err, bytes):
            err = err.decode("utf-8", errors="replace")
        return res.exit_status, str(out), str(err)

    def write_raw(self, path: str, data: bytes) -> None:
        with self._get_sftp().open(path, "wb") as fh:
            fh.write(data)

    def listdir_raw(self, path: str) -> list[tuple[str, int]]:
        return [(e.filename, e.st_mode or 0) for e in self._get_sftp().listdir_attr(path)]

    def read_raw(self, path: str, last_bytes: int | None = None) -> bytes:
        with self._get_sftp().open(path, "rb") as fh:
            if last_bytes is not None:
                size = fh.stat().st_size or 0
                fh.seek(max(0, size - last_bytes))
            data: bytes = fh.read()
            return data

    # -- the synchronous connection (paramiko) ------------------------------------------------

    def _get_client(self) -> paramiko.SSHClient:
        client = self._client
        if client is not None:
            transport = client.get_transport()
            if transport is not None and transport.is_active():
                return client
            self.reset()
        self._client = self._connect()
        return self._client

    def _get_sftp(self) -> paramiko.SFTPClient:
        client = self._get_client()
        if self._sftp is None or self._sftp.get_channel() is None or self._sftp.get_channel().closed:  # type: ignore[union-attr]
            self._sftp = client.open_sftp()
        return self._sftp

    def _connect(self) -> paramiko.SSHClient:
        """Open a paramiko client with host key checking from the connection.

        Not ``SSHHook.get_conn()``: it ignores the ``known_hosts`` extra (only the async
        hook reads it) and retries with its own fixed wait; we want the same known_hosts
        on both paths and one back-off policy.
        """
        hook, extra = airflow_connection(self.conn_id)
        client = paramiko.SSHClient()
        known_hosts = extra.get("known_hosts")
        if hook.no_host_key_check:
            log.warning("host key check disabled for %s (no_host_key_check)", self.conn_id)
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        else:
            client.set_missing_host_key_policy(RejectUnknownHosts())
            if hook.host_key is not None:
                name = hook.remote_host if hook.port == 22 else f"[{hook.remote_host}]:{hook.port}"
                client.get_host_keys().add(name, hook.host_key.get_name(), hook.host_key)
            elif known_hosts and str(known_hosts).lower() != "none":
                path = os.path.expanduser(str(known_hosts))
                if not os.path.isfile(path):
                    raise ConfigError(f"<connection {self.conn_id}>", "known_hosts", f"no file {path!r}")
                client.load_host_keys(path)
            else:
                client.load_system_host_keys()
        kwargs: dict[str, Any] = {
            "hostname": hook.remote_host,
            "port": hook.port,
            "username": hook.username,
            "timeout": hook.conn_timeout or self.connect_timeout_s,
            "banner_timeout": self.connect_timeout_s,
            "auth_timeout": self.connect_timeout_s,
            "look_for_keys": hook.look_for_keys,
            "allow_agent": False,
        }
        if hook.key_file:
            kwargs["key_filename"] = os.path.expanduser(hook.key_file)
        if hook.pkey is not None:
            kwargs["pkey"] = hook.pkey
        if hook.password:
            kwargs["password"] = hook.password
        try:
            client.connect(**kwargs)
        except BaseException:
            client.close()  # no half-open transport thread left behind
            raise
        transport = client.get_transport()
        if transport is not None and hook.keepalive_interval:
            transport.set_keepalive(hook.keepalive_interval)
        return client

    def reset(self) -> None:
        client, self._client, self._sftp = self._client, None, None
        if client is not None:
            try:
                client.close()
            except Exception:  # best-effort teardown of a connection that is already broken
                pass

    def close(self) -> None:
        with self._lock:
            self.reset()

    # -- the async connection (asyncssh) -------------------------------------------------

    async def _aget_conn(self) -> asyncssh.SSHClientConnection:
        loop = asyncio.get_running_loop()
        lock = self._alock
        if self._aconn_loop is not loop or lock is None:
            # a connection belongs to the loop that opened it (tests run several loops)
            self._aconn, self._aconn_loop = None, loop
            lock = self._alock = asyncio.Lock()
        async with lock:
            conn = self._aconn
            if conn is not None and not conn.is_closed():
                return conn
            self._aconn = await airflow_aconnect(self.conn_id, self.connect_timeout_s)
            return self._aconn

    async def areset(self) -> None:
        conn, self._aconn = self._aconn, None
        if conn is not None:
            try:
                conn.abort()
                await asyncio.wait_for(conn.wait_closed(), timeout=2)
            except Exception:  # best-effort teardown of a connection that is already broken
                pass

    async def aclose(self) -> None:
        if self._aconn_loop is asyncio.get_running_loop():
            await self.areset()
