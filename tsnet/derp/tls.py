"""TLS helpers: a throwaway self-signed certificate for tests, the server SSL context, and the
batching TLS stream both DERP ends use (:class:`BatchTLSStream`)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
import trio

__all__ = ["BatchTLSStream", "SelfSignedCert", "generate_self_signed", "server_ssl_context"]


@dataclass(frozen=True, slots=True)
class SelfSignedCert:
    """PEM cert and key, plus the ``sha256-raw:`` CertName that pins it in a DERPMap."""

    cert_pem: bytes
    key_pem: bytes
    cert_der: bytes

    @property
    def cert_name(self) -> str:
        return "sha256-raw:" + hashlib.sha256(self.cert_der).hexdigest()


def generate_self_signed(hostname: str = "127.0.0.1", days: int = 30) -> SelfSignedCert:
    """An ECDSA P-256 leaf for ``hostname`` (DNS and, when it is an IP, IP SAN) valid ±``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    sans: list[x509.GeneralName] = [x509.DNSName(hostname)]
    try:
        sans.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return SelfSignedCert(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        cert_der=cert.public_bytes(serialization.Encoding.DER),
    )


def server_ssl_context(
    cert_file: str | None = None, key_file: str | None = None, self_signed: SelfSignedCert | None = None
) -> ssl.SSLContext:
    """A server context from files, or from an in-memory self-signed pair (written to a private temp dir)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    if self_signed is not None:
        # ssl can only load chains from files; the files live only as long as this call.
        with tempfile.TemporaryDirectory() as tmp:
            cert_path = os.path.join(tmp, "cert.pem")
            key_path = os.path.join(tmp, "key.pem")
            with open(cert_path, "wb") as f:
                f.write(self_signed.cert_pem)
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self_signed.key_pem)
            ctx.load_cert_chain(cert_path, key_path)
    elif cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    else:
        raise ValueError("server_ssl_context needs cert_file and key_file, or self_signed")
    return ctx


# --- a batching TLS client stream ------------------------------------------------------------------

#: Ciphertext taken from the socket per wake-up before decrypting (bounds memory per read).
TLS_RECV_CAP = 512 * 1024
_RECV_CHUNK = 64 * 1024
_DEFAULT_RECEIVE = 256 * 1024


class BatchTLSStream(trio.abc.Stream):
    """A TLS stream over a non-blocking socket, built for bulk frame streams (DERP).

    :class:`trio.SSLStream` returns at most one TLS record (16 KiB, a dozen DERP packets)
    per ``receive_some`` and yields to the scheduler for each. This stream instead drains
    every ciphertext byte the socket has (up to :data:`TLS_RECV_CAP`) and decrypts every
    complete record into one result, so a consumer that parses frames gets its whole
    backlog in one call. The TLS state machine is :class:`ssl.SSLObject` over memory BIOs
    (sans-IO); this class only moves bytes between it and the socket.

    One task may receive while another sends (as the DERP client and server do). TLS output
    that a receive produces (a TLS 1.3 KeyUpdate answer) is sent right away if the socket
    takes it; otherwise a ``send_all`` under way carries it, or else the waiting receive
    sends it as the socket drains (it never waits for a later ``send_all``).

    The client side calls :meth:`do_handshake` explicitly (to check a pinned certificate
    before using the stream); otherwise the first receive or send runs the handshake. Tasks
    that reach the handshake together run it once: the others wait for it (and get its error).

    Errors: ``ssl.SSLError`` for TLS failures (handshake, bad record), ``OSError`` for socket
    errors, ``trio.ClosedResourceError`` after :meth:`aclose`. A clean or abrupt EOF from
    the peer reads as ``b""``.
    """

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_hostname: str | None = None, *,
                 server_side: bool = False) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                 server_hostname=None if server_side else server_hostname)
        self._handshook = False
        self._send_buf = bytearray()  # ciphertext the socket has not taken yet, in order
        self._socket_eof = False
        self._closed = False
        self._sending = False  # a send_all is waiting for the socket: others only append
        # A receive waiting for input also pushes output nobody else is sending; send_all cancels
        # that side job (this scope) before it waits for the socket itself.
        self._receive_flush_scope: trio.CancelScope | None = None
        self._handshake_lock = trio.Lock()
        self._handshake_error: BaseException | None = None
        self._read_buf = memoryview(bytearray(0))  # plaintext lands here, then one copy out

    @classmethod
    def from_socket_stream(cls, stream: trio.SocketStream, ctx: ssl.SSLContext,
                           server_hostname: str | None = None, *, server_side: bool = False) -> BatchTLSStream:
        """Take over a connected :class:`trio.SocketStream`'s socket (the stream is unusable after)."""
        fd = stream.socket.detach()
        return cls(socket.socket(fileno=fd), ctx, server_hostname, server_side=server_side)

    # -- helpers (no awaits: they never interleave with the other task) --

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("TLS stream is closed")

    def _pull_socket(self) -> int:
        """Move what the socket has into the TLS input; returns bytes moved (EOF is noted)."""
        moved = 0
        sock, incoming = self._sock, self._incoming
        while moved < TLS_RECV_CAP and not self._socket_eof:
            try:
                data = sock.recv(_RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                break
            if not data:
                self._socket_eof = True
                incoming.write_eof()
                break
            incoming.write(data)
            moved += len(data)
            if len(data) < _RECV_CHUNK:
                break  # the socket is (almost certainly) empty: skip the EAGAIN syscall
        return moved

    def _push_socket(self) -> None:
        """Queue what the TLS object produced and send as much as the socket takes now."""
        if self._outgoing.pending:
            self._send_buf += self._outgoing.read()
        buf = self._send_buf
        while buf:
            try:
                n = self._sock.send(buf)
            except (BlockingIOError, InterruptedError):
                return
            del buf[:n]

    async def _flush(self) -> None:
        self._push_socket()
        while self._send_buf:
            await trio.lowlevel.wait_writable(self._sock)
            self._check_open()
            self._push_socket()

    def _stop_receive_flush(self) -> None:
        # Cancelling removes the receive's writability wait at once, so the caller may wait on it.
        if self._receive_flush_scope is not None:
            self._receive_flush_scope.cancel()
            self._receive_flush_scope = None

    async def _wait_readable_pushing_output(self) -> None:
        """Wait for input; meanwhile send buffered TLS output that no ``send_all`` is carrying."""
        sock = self._sock

        async def push_when_writable() -> None:
            with trio.CancelScope() as scope:
                self._receive_flush_scope = scope
                try:
                    while self._send_buf and not self._sending:
                        await trio.lowlevel.wait_writable(sock)
                        if self._closed or self._sending:
                            break
                        self._push_socket()
                except (OSError, trio.ClosedResourceError):
                    pass  # the receive side reports a broken or closed socket itself
                finally:
                    if self._receive_flush_scope is scope:
                        self._receive_flush_scope = None

        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(push_when_writable)
            try:
                await trio.lowlevel.wait_readable(sock)
            except Exception as exc:  # raised below, outside the nursery, so it is not wrapped in a group
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    # -- stream API --

    async def do_handshake(self) -> None:
        """Run the TLS handshake (certificate checks per the context); a no-op once done.

        Safe to call from several tasks at once: one runs the handshake, the others wait for it
        and then return, or raise the error it failed with.
        """
        self._check_open()
        if self._handshook:
            await trio.lowlevel.checkpoint()
            return
        async with self._handshake_lock:
            self._check_open()
            if self._handshake_error is not None:
                raise self._handshake_error
            if self._handshook:
                return
            try:
                await self._run_handshake()
            except (ssl.SSLError, OSError) as exc:
                self._handshake_error = exc
                raise

    async def _run_handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            await self._flush()
            if self._socket_eof:
                raise ssl.SSLEOFError("peer closed the connection during the TLS handshake")
            if not self._pull_socket():
                await trio.lowlevel.wait_readable(self._sock)
                self._check_open()
                self._pull_socket()
        self._handshook = True
        await self._flush()
        await trio.lowlevel.checkpoint()

    def getpeercert(self, binary_form: bool = False):  # type: ignore[no-untyped-def]
        """The peer's certificate (``ssl.SSLObject.getpeercert``)."""
        return self._tls.getpeercert(binary_form)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Every decrypted byte available now (at most ``max_bytes``), waiting only if none is."""
        self._check_open()
        if not self._handshook:
            await self.do_handshake()
        limit = max_bytes or _DEFAULT_RECEIVE
        tls, sock, incoming = self._tls, self._sock, self._incoming
        buf = self._read_buf
        if len(buf) < limit:
            buf = self._read_buf = memoryview(bytearray(limit))
        while True:
            got = pulled = 0
            eof = drained = False
            while True:
                try:
                    while got < limit:
                        # Decrypt straight into our buffer: read(n) alone would allocate n bytes per record.
                        n = tls.read(limit - got, buf[got:limit])
                        if not n:
                            eof = True
                            break
                        got += n
                except ssl.SSLWantReadError:
                    pass
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    eof = True  # close_notify, or the socket ended without one: both end the stream
                if got >= limit or eof or drained or self._socket_eof or pulled >= TLS_RECV_CAP:
                    break
                # Feed ciphertext a chunk at a time and decrypt in between: a memory BIO holding a
                # large backlog makes every write copy the whole backlog.
                try:
                    data = sock.recv(_RECV_CHUNK)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    self._socket_eof = True
                    incoming.write_eof()
                    continue
                incoming.write(data)
                pulled += len(data)
                drained = len(data) < _RECV_CHUNK  # a short read: the socket is (almost surely) empty
            if self._outgoing.pending and not self._sending:
                self._push_socket()  # e.g. a KeyUpdate answer; a waiting send_all carries it otherwise
            if got:
                await trio.lowlevel.checkpoint()
                return bytes(buf[:got])
            if eof or self._socket_eof:
                await trio.lowlevel.checkpoint()
                return b""
            if self._send_buf and not self._sending:
                await self._wait_readable_pushing_output()
            else:
                await trio.lowlevel.wait_readable(sock)
            self._check_open()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and send it all (waits while the socket buffer is full)."""
        self._check_open()
        if not self._handshook:
            await self.do_handshake()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if data:
            view = memoryview(data)
            while view:
                n = self._tls.write(view)  # memory BIOs take everything, in 16 KiB records
                view = view[n:]
        self._sending = True
        self._stop_receive_flush()
        try:
            await self._flush()
        finally:
            self._sending = False
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        if self._send_buf:
            if self._sending:
                raise trio.BusyResourceError("another task is already sending on this stream")
            self._stop_receive_flush()
            await trio.lowlevel.wait_writable(self._sock)
        else:
            await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        """Send close_notify if the socket takes it now, then close (never waits for the peer)."""
        if not self._closed:
            self._closed = True
            try:
                self._tls.unwrap()
            except ssl.SSLError:
                pass
            try:
                self._push_socket()
            except OSError:
                pass
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()
