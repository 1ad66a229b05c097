#!/usr/bin/env python3
"""Terminal client for the local-network chat: one file, standard library only.

Usage::

    python client.py                            # a server on this machine, port 5050
    python client.py 192.168.1.23               # a server on another machine
    python client.py 192.168.1.23 6000 --name alice
    printf 'hello\\n' | python client.py --name bot    # scripts: send lines, exit at EOF

Type a line and press Enter to send it to everyone. Commands start with "/"
(or "\\"): /help lists them.

Design
------
Data flows through the file in this order:

1. **The connection** (:class:`ServerConnection`, :func:`join`): a TCP or
   TLS socket that carries frames (the shared protocol block).
2. **The link** (:class:`Link`): a receiver thread reads each frame the
   moment it arrives, shows it, and reconnects with backoff under the same
   name when the connection drops. Lines typed meanwhile wait and are sent
   once it is back, or you are told they were not; a line that was on its
   way and never confirmed is named. When it cannot reconnect, it wakes the
   main thread from its blocking read with a signal (on Windows, where that
   is impossible, it ends the process directly). Everything the two
   threads share lives in the link, under one lock.
3. **What is shown** is built as styled segments (:class:`Line`), so the
   same line becomes coloured, wrapped text on a terminal (:class:`Screen`)
   and plain text in pipes, transcripts and logs. Each line has a role
   (chat, an answer to a command, an error, a note, a hint), which decides
   where it goes when input is piped: a script sees only its answers, and
   its errors on stderr, unless --show-chat.
4. **The input line** (:class:`LineEditor`) keeps your prompt and half-typed
   text intact at the bottom while messages are printed above it, with
   history, Tab completion and the usual editing keys. Python's readline
   cannot do that from a second thread (it gives no way to restore the
   cursor inside the line), so the editor is our own: a raw-ish terminal on
   POSIX, msvcrt on Windows, and plain line input wherever neither works.
5. **The commands** (:class:`ChatSession`): what each typed line does, on
   the main thread; it sends through the link.
"""

from __future__ import annotations     # the parts read in the order data flows, not defined

import argparse
import codecs
import contextlib
import dataclasses
import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import unicodedata
import zlib
from collections import deque
from datetime import date, datetime
from typing import (Callable, Deque, Dict, Iterable, Iterator, List, Mapping, NamedTuple,
                    Optional, TextIO, Tuple, Union)

try:
    import ssl
except ImportError:     # Python built without OpenSSL: everything but --tls still works
    ssl = None  # type: ignore

DEFAULT_HOST = "localhost"
CONNECT_TIMEOUT = 10.0      # seconds to reach the server
HANDSHAKE_TIMEOUT = 10.0    # seconds for the server to answer hello
LEAVE_TIMEOUT = 5.0         # seconds to wait for the server to confirm we left
RECONNECT_TRIES = 6         # attempts after a dropped connection (--retries)
RECONNECT_FIRST_DELAY = 0.5     # seconds before the first attempt; doubled each time
RECONNECT_MAX_DELAY = 15.0
MAX_QUEUED_LINES = 100      # lines typed while disconnected, kept to send later
WAKE_RETRY = 0.1            # seconds between signals that wake the main thread (POSIX)
TRANSCRIPT_LINES = 100_000  # lines of this session kept for /save
INPUT_HISTORY = 500         # lines Up and Down can recall
RECV_SIZE = 64 * 1024
KNOWN_HOSTS = os.path.join(os.path.expanduser("~"), ".chat_known_hosts")
PROMPT = "> "
# What starts every notice (joins, leaves, kicks, the client's own notes), as in
# irssi: where a notice has it, an action has "* NAME", and names cannot hold "!",
# so no "/me left" can pass for a real departure, on screen or in a transcript.
NOTICE_MARK = "-!- "



# ---- begin shared protocol block: identical in socket_server.py and client.py ----
# test_chat.py fails when the two copies differ: change both or neither.

DEFAULT_PORT = 5050
HEADER_LENGTH = 10          # bytes of ASCII decimal length before every payload
MAX_PAYLOAD = 64 * 1024     # largest payload either side accepts, in bytes
HISTORY_MAX = 200           # most messages one get_history answers with

# Error codes a client acts on beyond showing their text (README.md lists every
# code). After one of these, reconnecting would only be refused again:
FINAL_ERRORS = frozenset({"kicked", "banned", "replaced", "flooding", "locked_out"})
# These a client answers by asking its user again, for what the value names:
ASK_AGAIN = {"bad_name": "name", "name_taken": "name", "name_reserved": "name",
             "password_required": "room password", "bad_password": "room password",
             "name_protected": "name password", "bad_name_password": "name password"}

# Names are ASCII, so that look-alike letters cannot impersonate anyone, and hold
# a letter or a digit: ".", ".." or "-" name nobody.
NAME_PATTERN = re.compile(r"(?=[_.-]*[A-Za-z0-9])[A-Za-z0-9_.-]{1,32}")     # fullmatch
NAME_RULES = ("1 to 32 characters: letters A-Z, digits, '_', '-' and '.', "
              "with a letter or digit")
MIN_PASSWORD_LENGTH = 8     # characters in a registered name's password
MAX_PASSWORD_LENGTH = 1024


def password_problem(password: str) -> Optional[str]:
    """Why a new password is not acceptable, or None (the client asks before sending)."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"Passwords need at least {MIN_PASSWORD_LENGTH} characters."
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"Passwords may have at most {MAX_PASSWORD_LENGTH} characters."
    return None


class ProtocolError(Exception):
    """The peer broke the wire format; the connection cannot continue."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def encode_frame(message: dict) -> bytes:
    """Return one frame: the length header, then the message as UTF-8 JSON.

    Raises ValueError when the payload would be over MAX_PAYLOAD or the
    message holds text that UTF-8 cannot carry (lone surrogates).
    """
    payload = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD}-byte limit")
    return f"{len(payload):<{HEADER_LENGTH}}".encode("ascii") + payload


class FrameDecoder:
    """Cut a byte stream into payloads. Sans-IO: bytes in, payloads out.

    ``feed()`` the bytes as they arrive, in chunks of any size, and call
    ``feed_eof()`` when the stream ends (end of file is an input, as in
    h11); then iterate to get each complete payload in order. Iteration stops when the next frame
    is incomplete, and raises ProtocolError when the next frame breaks the
    rules, so payloads before a bad frame are still delivered. A bad header
    is caught as soon as its first wrong byte arrives; a stream that ends
    in the middle of a frame is one more bad frame ("truncated"). Memory
    stays under HEADER_LENGTH + max_payload plus one chunk, whatever the
    peer sends.
    """

    __slots__ = ("max_payload", "_buffer", "_start", "ended")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        # What has arrived and is not yet returned, from _start on. b"" while nothing
        # waits, so that a quiet connection keeps no buffer at all.
        self._buffer: Union[bytes, bytearray] = b""
        self._start = 0
        self.ended = False  # the stream has ended: no more bytes will come

    def feed(self, data: bytes) -> None:
        if not self._buffer:
            self._buffer = bytearray(data)
            return
        if self._start:
            del self._buffer[:self._start]
            self._start = 0
        self._buffer += data

    def feed_eof(self) -> None:
        """No more bytes will come; a frame left incomplete is then an error."""
        self.ended = True

    @property
    def buffered(self) -> int:
        """Bytes of a frame that has begun to arrive but is not complete."""
        return len(self._buffer) - self._start

    def __iter__(self) -> "FrameDecoder":
        return self

    def __next__(self) -> bytes:
        buffer, start = self._buffer, self._start
        header = bytes(buffer[start:start + HEADER_LENGTH])
        length = self._payload_length(header)
        end = start + HEADER_LENGTH + (length or 0)
        if length is None or end > len(buffer):
            if self.ended and self.buffered:
                raise ProtocolError("truncated",
                                    "the connection closed in the middle of a message")
            raise StopIteration
        payload = bytes(buffer[start + HEADER_LENGTH:end])
        if end == len(buffer):      # all taken: let the buffer go
            self._buffer, self._start = b"", 0
        else:
            self._start = end
        return payload

    def _payload_length(self, header: bytes) -> Optional[int]:
        """The length a header announces; None while the header is incomplete."""
        digits = header.strip(b" ")
        if digits and not digits.isdigit():
            shown = "".join(chr(byte) if 32 <= byte < 127 else f"\\x{byte:02x}" for byte in header)
            raise ProtocolError("bad_header", f'frame header "{shown}" is not a decimal length')
        if len(header) < HEADER_LENGTH:
            return None
        if not digits:
            raise ProtocolError("bad_header", "frame header holds no length")
        length = int(digits)
        if length > self.max_payload:
            raise ProtocolError(
                "too_large", f"frame of {length} bytes is over the {self.max_payload}-byte limit")
        return length


def decode_payload(payload: bytes) -> dict:
    """Parse one payload: a UTF-8 JSON object with a string "type"."""
    try:
        message = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProtocolError("bad_utf8", "payload is not valid UTF-8") from None
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "payload is not valid JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("bad_message", 'payload is not a JSON object with a string "type"')
    return message


def check_fields(message: dict, fields: Dict[str, type]) -> Optional[str]:
    """What is wrong with a message's fields, or None. Optional names end in '?'."""
    for field, kind in fields.items():
        optional = field.endswith("?")
        field = field.rstrip("?")
        if field not in message:
            if optional:
                continue
            return f'"{message["type"]}" needs a "{field}" field'
        if not isinstance(message[field], kind):
            return f'"{field}" must be {JSON_KINDS.get(kind, kind.__name__)}'
    return None


# How check_fields names each type to someone writing JSON.
JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "true or false",
              list: "a list", dict: "an object"}


def clean_text(text: str) -> str:
    """Make text safe to show in a terminal, on one line.

    Whitespace controls (tab, newline, ...) become spaces; other control
    characters, lone surrogates and bidirectional overrides are removed, so
    no text can move a cursor, change colours or reorder a line.
    """
    # Fast path, same result: isprintable() is False for every character in
    # the categories Cc, Cf (the bidi controls among them), Cs, Zl, Zp and
    # Zs but the plain space, and those hold every character isspace() knows.
    # So a printable text has nothing to remove and no whitespace to change.
    if text.isprintable():
        return text.strip()
    kept = []
    for char in text:
        if char.isspace():
            kept.append(" ")
        elif unicodedata.category(char) in ("Cc", "Cs") or char in _BIDI_CONTROLS:
            continue
        else:
            kept.append(char)
    return "".join(kept).strip()


_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                           "\u2066\u2067\u2068\u2069")

# ---- end shared protocol block ----

# ---------------------------------------------------------------------------
# The connection to the server
# ---------------------------------------------------------------------------


class ConnectionClosed(Exception):
    """The server closed the connection."""


class JoinRefused(Exception):
    """The server answered hello with an error."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class CannotConnect(Exception):
    """The server could not be reached, or not safely; the text is for the user."""


class CertificateChanged(CannotConnect):
    """The server showed another certificate than expected: trying again cannot help."""


@dataclasses.dataclass
class TlsOptions:
    """How to check the server's certificate (see check_certificate)."""

    cafile: Optional[str] = None        # verify against these CAs, like a web browser
    insecure: bool = False              # check nothing (a warning says so)
    pinned: Optional[str] = None        # fingerprint from a HOST:PORT#FINGERPRINT join string
    known_hosts: str = KNOWN_HOSTS
    # Asked before a certificate seen for the first time is trusted; None trusts it
    # (input is piped: there is nobody to ask).
    confirm: Optional[Callable[[str], bool]] = None
    trusted: Optional[str] = None       # the fingerprint accepted earlier in this session


@dataclasses.dataclass
class Credentials:
    password: Optional[str] = dataclasses.field(default=None, repr=False)        # the room's
    name_password: Optional[str] = dataclasses.field(default=None, repr=False)   # a name's
    resume: Optional[str] = dataclasses.field(default=None, repr=False)  # from our welcome


def normalize_fingerprint(text: str) -> str:
    """Fingerprints compare in lower-case hex, with any colons or "sha256:" dropped."""
    text = text.strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:"):]
    return text.replace(":", "")


def is_fingerprint(text: str) -> bool:
    """Whether text can be a SHA-256 certificate fingerprint: 64 hex digits, as printed."""
    return re.fullmatch(r"[0-9a-f]{64}", normalize_fingerprint(text)) is not None


def certificate_fingerprint(sock: "ssl.SSLSocket") -> str:
    return hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()


def tls_summary(sock: "ssl.SSLSocket", tls: TlsOptions) -> str:
    """What the banner says about a TLS connection: encrypted, and to whom."""
    if tls.insecure:
        return "encrypted with TLS, but the server's identity is not checked (--insecure)"
    verified = f", verified with {tls.cafile}" if tls.cafile else ""
    return f"encrypted with TLS; certificate fingerprint: {certificate_fingerprint(sock)}{verified}"


def read_known_hosts(path: str) -> Dict[str, str]:
    """HOST:PORT -> fingerprint, from a file of "HOST:PORT FINGERPRINT" lines.

    A file that exists but cannot be read raises CannotConnect: without it,
    a changed certificate could not be told from a new one.
    """
    known = {}
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                fields = line.split()
                if len(fields) == 2 and not line.startswith("#"):
                    known[fields[0]] = normalize_fingerprint(fields[1])
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise CannotConnect(f"cannot read the known-hosts file {path}: "
                            f"{getattr(exc, 'strerror', None) or exc}\n"
                            "Fix or move it, or name another with --known-hosts.") from None
    return known


def remember_host(path: str, where: str, fingerprint: str,
                  note: Callable[[str], None]) -> None:
    """Record (or replace) the fingerprint for HOST:PORT in the known-hosts file.

    Written to a new file that then replaces the old one, so a crash or a full
    disk never leaves half a file. Failing to write costs only the memory.
    """
    known = read_known_hosts(path)
    known[where] = fingerprint
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as out:
            out.write("# Chat servers this client has met: HOST:PORT SHA256-FINGERPRINT\n")
            for host, value in sorted(known.items()):
                out.write(f"{host} {value}\n")
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        note(f"! cannot remember the fingerprint in {path}: {exc.strerror or exc}")


def changed_certificate_warning(where: str, found: str, expected: str, source: str) -> str:
    bar = "@" * 64
    return (f"{bar}\nWARNING: THE CHAT SERVER'S CERTIFICATE IS NOT THE ONE EXPECTED\n{bar}\n"
            f"{where} showed a certificate with fingerprint\n  {found}\n"
            f"but {source} says\n  {expected}\n"
            "Someone may be intercepting this connection, or the server has a new "
            "certificate.\nNot connecting. If the server's owner confirms the new "
            f"fingerprint, join with\n  python client.py \"{where}#{found}\" --tls")


def check_certificate(sock: "ssl.SSLSocket", where: str, tls: TlsOptions,
                      note: Callable[[str], None]) -> bool:
    """Trust on first use, like SSH, unless a CA file or a pinned fingerprint decides.

    Raises CannotConnect with a loud warning when the certificate is not
    the one this client expected. True when it asked the user, who may have
    taken longer to answer than the server waits for a hello.
    """
    if tls.insecure or tls.cafile:
        return False    # --insecure was warned about; with --cafile, ssl verified the chain
    found = certificate_fingerprint(sock)
    if tls.trusted is not None:     # reconnecting: the server must be the one we joined
        if found != tls.trusted:
            raise CertificateChanged(changed_certificate_warning(
                where, found, tls.trusted, "the server this session joined"))
        return False
    asked = False
    known = read_known_hosts(tls.known_hosts).get(where)
    if tls.pinned is not None:
        if normalize_fingerprint(tls.pinned) != found:
            raise CertificateChanged(changed_certificate_warning(
                where, found, normalize_fingerprint(tls.pinned), "the join string"))
        if known != found:
            remember_host(tls.known_hosts, where, found, note)
    elif known is None:
        note(f"{NOTICE_MARK}first TLS connection to {where}; its certificate fingerprint is"
             f"\n{NOTICE_MARK}  {found}\n"
             f"{NOTICE_MARK}check it against the one the server printed at start-up")
        if tls.confirm is not None:
            asked = True
            if not tls.confirm("trust this server and connect? [y/N] "):
                raise CannotConnect("not connecting: the certificate was not trusted")
        remember_host(tls.known_hosts, where, found, note)
        note(f"{NOTICE_MARK}remembered in {tls.known_hosts}")
    elif known != found:
        raise CertificateChanged(changed_certificate_warning(
            where, found, known, f"{tls.known_hosts} (from an earlier visit)"))
    tls.trusted = found
    return asked


def start_tls(sock: socket.socket, host: str, where: str, tls: TlsOptions,
              note: Callable[[str], None]) -> Tuple[socket.socket, bool]:
    """The TLS connection, and whether the user was asked to trust the certificate."""
    if ssl is None:
        raise CannotConnect("this Python has no ssl module, so it cannot use --tls")
    if tls.cafile:
        try:
            context = ssl.create_default_context(cafile=tls.cafile)
        except (OSError, ValueError) as exc:
            raise CannotConnect(f"cannot use the CA file {tls.cafile}: "
                                f"{getattr(exc, 'strerror', None) or exc}") from None
    else:   # the certificate is checked by fingerprint instead (check_certificate)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.insecure:
        note("! WARNING: --insecure: the server's identity is not checked; whoever can "
             "pretend to be it can read this chat")
    try:
        secure = context.wrap_socket(sock, server_hostname=host)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise CannotConnect(f"cannot verify {where}: {exc.verify_message}\n"
                            f"Check --cafile, and that the certificate names {host}.") from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        reason = getattr(exc, "reason", None) or exc
        if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError)):
            raise CannotConnect(f"{where} closed the connection during the TLS handshake\n"
                                "It may be full, or refusing this address (too many "
                                "connections, a ban), or not using TLS.") from None
        raise CannotConnect(f"{where} does not answer TLS ({reason})"
                            "\nIs the server running with --tls-cert?") from None
    try:
        asked = check_certificate(secure, where, tls, note)
    except CannotConnect:
        secure.close()
        raise
    return secure, asked


def connect_tcp(host: str, port: int, where: str) -> socket.socket:
    """A TCP connection to the server; CannotConnect names the likely causes."""
    causes = ("Is the server running? Check the address and port, and that no "
              "firewall blocks the port.")
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except socket.gaierror:
        raise CannotConnect(f"cannot connect to {where}: unknown host {host!r}\n"
                            "Check the spelling, or use the server's IP address.") from None
    except ConnectionRefusedError:
        raise CannotConnect(f"cannot connect to {where}: connection refused\n{causes}") from None
    except socket.timeout:
        raise CannotConnect(f"cannot connect to {where}: timed out\n{causes}") from None
    except OSError as exc:
        raise CannotConnect(f"cannot connect to {where}: {exc.strerror or exc}\n"
                            f"{causes}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class ServerConnection:
    """A socket that speaks the frame protocol.

    One thread may receive while others send: sends hold a lock so that
    frames from two threads never interleave.
    """

    def __init__(self, sock: socket.socket, encryption: Optional[str] = None) -> None:
        self.sock = sock
        self.encryption = encryption    # for the banner: how it is encrypted; None: not
        self.decoder = FrameDecoder()
        self._send_lock = threading.Lock()

    @classmethod
    def open(cls, host: str, port: int, tls: Optional[TlsOptions] = None,
             note: Callable[[str], None] = lambda text: print(text, file=sys.stderr)
             ) -> "ServerConnection":
        where = join_address(host, port)
        sock = connect_tcp(host, port, where)
        if tls is None:
            return cls(sock)
        sock, asked = start_tls(sock, host, where, tls, note)
        if asked:   # the server may have stopped waiting for our hello meanwhile
            sock.close()
            sock, _ = start_tls(connect_tcp(host, port, where), host, where, tls, note)
        return cls(sock, tls_summary(sock, tls))

    def send(self, message: dict) -> None:
        frame = encode_frame(message)
        with self._send_lock:
            self.sock.sendall(frame)

    def receive(self) -> dict:
        """Block until the next message arrives.

        Raises ConnectionClosed at EOF, ProtocolError on bad data (a stream
        that ends in the middle of a frame included), OSError on a broken
        connection or a timeout set on the socket.
        """
        while True:
            payload = next(self.decoder, None)
            if payload is not None:
                return decode_payload(payload)
            if self.decoder.ended:
                raise ConnectionClosed()
            data = self.sock.recv(RECV_SIZE)
            if data:
                self.decoder.feed(data)
            else:
                self.decoder.feed_eof()

    def finish_sending(self) -> None:
        """Tell the server we will send nothing more (TCP half-close).

        Not over TLS: Python's SSLSocket.shutdown() drops the TLS layer, and
        the server's last replies would arrive as undecodable bytes. The
        server closes after "bye" anyway.
        """
        if ssl is not None and isinstance(self.sock, ssl.SSLSocket):
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def join(host: str, port: int, name: str, credentials: Optional[Credentials] = None,
         tls: Optional[TlsOptions] = None) -> Tuple[ServerConnection, dict]:
    """Connect and say hello; return the connection and the welcome message.

    Raises JoinRefused when the server says no, CannotConnect otherwise.
    """
    connection = ServerConnection.open(host, port, tls)
    where = join_address(host, port)
    hello = {"type": "hello", "name": name}
    if credentials and credentials.password is not None:
        hello["password"] = credentials.password
    if credentials and credentials.name_password is not None:
        hello["name_password"] = credentials.name_password
    if credentials and credentials.resume is not None:
        hello["resume"] = credentials.resume
    try:
        connection.sock.settimeout(HANDSHAKE_TIMEOUT)
        try:
            connection.send(hello)
        except ValueError:      # the frame would be over the protocol's limit
            raise JoinRefused("bad_name", "That name (or password) is far too long.") from None
        while True:
            reply = connection.receive()
            if reply["type"] == "welcome" and not check_fields(reply, SERVER_MESSAGES["welcome"]):
                connection.sock.settimeout(None)
                return connection, reply
            if reply["type"] == "error" and not check_fields(reply, SERVER_MESSAGES["error"]):
                raise JoinRefused(reply["code"], clean_text(reply["text"]))
            if reply["type"] == "shutdown":
                raise JoinRefused("server_shutdown", "The server is shutting down.")
    except JoinRefused:
        connection.close()
        raise
    except socket.timeout:
        connection.close()
        raise CannotConnect(f"{where} did not answer: is it a chat server?") from None
    except ProtocolError:
        connection.close()
        raise CannotConnect(f"{where} does not speak the chat protocol: "
                            "is it a chat server? (Or does it need --tls?)") from None
    except (ConnectionClosed, OSError):
        connection.close()
        raise CannotConnect(f"{where} closed the connection before we could join") from None


def join_address(host: str, port: int) -> str:
    """HOST:PORT, with IPv6 addresses in brackets: the key for known hosts too."""
    return f"[{host}]:{port}" if ":" in host else f"{host.lower()}:{port}"



# ---------------------------------------------------------------------------
# The link: receiving, reconnecting, and what is in flight
# ---------------------------------------------------------------------------

class ConnectionLost(Exception):
    """Raised in the main thread when the receiver thread finds the connection gone."""


class Pacer:
    """Keeps this client under the rate the server announced in its welcome.

    Piped input can come faster than the server's flood control allows; the
    pacer waits instead of letting lines be refused. A person typing never
    notices it. It stays a little under the limit, for network jitter.
    """

    def __init__(self, limits: dict) -> None:
        rate, burst = limits.get("rate"), limits.get("burst")
        self.rate = float(rate) * 0.9 if isinstance(rate, (int, float)) and rate > 0 else 0.0
        self.burst = max(1.0, float(burst) - 1) if isinstance(burst, (int, float)) else 1.0
        self.tokens = self.burst
        self.updated = time.monotonic()

    def wait(self) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            time.sleep((1 - self.tokens) / self.rate)
            self.tokens, self.updated = 1.0, time.monotonic()
        self.tokens -= 1


def reconnect_delays(retries: int) -> Iterator[float]:
    """The pause before each reconnect attempt: 0.5 s, doubled each time, at most 15 s."""
    delay = RECONNECT_FIRST_DELAY
    for _ in range(retries):
        yield delay
        delay = min(delay * 2, RECONNECT_MAX_DELAY)


def reconnect_time(retries: int) -> float:
    """The pauses of all the attempts together (without adding up a huge --retries)."""
    total = 0.0
    for done, delay in enumerate(reconnect_delays(retries)):
        if delay >= RECONNECT_MAX_DELAY:
            return total + (retries - done) * RECONNECT_MAX_DELAY
        total += delay
    return total


def rough_time(seconds: float) -> str:
    return f"{max(1, round(seconds))} s" if seconds < 120 else f"{round(seconds / 60)} minutes"


Rejoin = Callable[[Optional[str]], Tuple[ServerConnection, dict]]

# How a message fared on its way out (Link._transmit).
SENT, TOO_LONG, LOST, QUEUED = "sent", "too long", "lost", "queued"


class Link:
    """The connection to the server, as the two threads of a session use it.

    The receiver thread (start) reads every frame the moment it arrives,
    shows it, and reconnects with growing pauses when the connection drops:
    rejoin(resume_token) connects and says hello again; without it, or with
    retries=0, a dropped connection ends the session and on_lost() is
    called. The main thread sends through send() and ask_history().

    Everything both threads touch is under `lock`: the connection, the lines
    waiting to be sent and those not yet confirmed, the labels of history
    answers to come, who is here, our operator status and the password to
    rejoin with. Nothing is shown while the lock is held, so the screen's
    own lock is never taken inside it.
    """

    def __init__(self, connection: ServerConnection, welcome: dict, server: str,
                 screen: "Screen", on_lost: Optional[Callable[[], None]] = None, rejoin: Optional[Rejoin] = None,
                 retries: int = RECONNECT_TRIES,
                 credentials: Optional[Credentials] = None) -> None:
        self.name = welcome["name"]
        self.server = server                # HOST:PORT
        self.screen = screen
        self.on_lost = on_lost or (lambda: None)    # called when the session ends by itself
        self.rejoin = rejoin
        self.retries = retries
        self.lock = threading.RLock()
        # Under the lock. The credentials are shared with rejoin: a password set with
        # /register or /password must be the one used when reconnecting.
        self.credentials = credentials or Credentials()
        self.lost_reason: Optional[str] = None
        self.queued: List[dict] = []        # typed while disconnected, sent on reconnecting
        self.unconfirmed: Dict[str, str] = {}   # id -> text sent but not yet acknowledged
        self._new_password: Optional[str] = None    # sent, not yet confirmed by the server
        self._ids = 0
        # For each batch of history frames still to come, in order, the id of the request
        # (None for the join replay) and its header: the server answers requests in order
        # and ends every batch with history_end, or refuses the request with an error
        # that carries its id.
        self._history_headers: Deque[Tuple[Optional[str], str]] = deque()
        self._users: Dict[str, str] = {}    # lower-case name -> name, for Tab completion
        self._operator = False              # the server accepted our /op
        self._max_length = 0
        # Thread-safe on their own.
        self.leaving = threading.Event()    # we asked to leave: EOF is expected
        self.connected = threading.Event()  # a live connection, ready to send on
        self.settled = threading.Event()    # not in the middle of reconnecting
        self.closed = threading.Event()     # the receiver thread has stopped
        # The receiver thread's own.
        self._told_why = False              # the last frame explains a close that follows
        self._final = False                 # ...and reconnecting would be refused again
        self._shut_down = False             # ...or it was the server's "shutting down"
        self._in_history = False            # between a first history frame and history_end
        self._replay_after: Optional[str] = None    # after reconnecting: skip what we saw
        self._last_seen = ""                # ts of the newest message shown
        self._receiver = threading.Thread(target=self._receive_loop, name="receiver", daemon=True)
        self._joined(connection, welcome)

    # -- for the main thread -------------------------------------------------

    @property
    def operator(self) -> bool:
        with self.lock:
            return self._operator

    @property
    def max_length(self) -> int:
        """The server's longest message, in characters; 0 when it did not say."""
        with self.lock:
            return self._max_length

    def names(self) -> List[str]:
        """Who is here, as far as this client knows (for Tab completion)."""
        with self.lock:
            return list(self._users.values())

    def expect_password(self, password: str) -> None:
        """A new password is on its way: the one to rejoin with once it is confirmed."""
        with self.lock:
            self._new_password = password

    def send(self, message: dict) -> bool:
        """Send now, within the server's rate; or keep a chat line until we are back.

        False when the message is not on its way (queued lines count as on it).
        """
        with self.lock:
            pacer = self.pacer
        pacer.wait()        # outside the lock: a reconnect must not wait on our pacing
        with self.lock:
            outcome = self._transmit(message) if self.connected.is_set() else LOST
            if outcome == LOST and message["type"] in ("say", "whisper") and \
                    len(self.queued) < MAX_QUEUED_LINES:
                if message not in self.queued:
                    self.queued.append(message)
                outcome = QUEUED
        if outcome == TOO_LONG:
            self.screen.warn("not sent: far too long")
        elif outcome == QUEUED:
            self.screen.note("not connected: this will be sent when the connection is back")
        elif outcome == LOST:
            self.screen.warn("not connected: not sent")
        return outcome != LOST

    def ask_history(self, request: dict, header: str) -> None:
        """Ask for history (or a search) whose answer is shown under `header`."""
        with self.lock:
            request["id"] = self._new_id()
            entry = (request["id"], header)
            self._history_headers.append(entry)     # before: the answer may be quick
        if not self.send(request):
            with self.lock:
                if entry in self._history_headers:
                    self._history_headers.remove(entry)

    def leave(self) -> None:
        """Say goodbye, once the server has everything we typed, and close."""
        if self.leaving.is_set():
            return
        with self.lock:
            waiting = bool(self.queued)
        if waiting and not self.settled.is_set():
            self.screen.note("waiting for the connection to come back, to send what you typed")
            self.settled.wait(RECONNECT_MAX_DELAY * self.retries + CONNECT_TIMEOUT)
        self.leaving.set()
        with self.lock:
            if self.connected.is_set():
                try:
                    self.connection.send({"type": "bye"})
                    self.connection.finish_sending()
                except OSError:
                    pass
        self.closed.wait(LEAVE_TIMEOUT)
        with self.lock:
            self.connection.close()
        self._report_queued()

    def _transmit(self, message: dict) -> str:
        """Write one message (lock held); chat lines get an id, to be confirmed."""
        if message["type"] in ("say", "whisper"):
            if "id" not in message:
                message["id"] = self._new_id()
            self.unconfirmed[message["id"]] = message["text"]   # before: the ack may be quick
        try:
            self.connection.send(message)
        except ValueError:  # over the protocol's frame size: nothing was sent
            self.unconfirmed.pop(message.get("id", ""), None)
            return TOO_LONG
        except OSError:     # the receiver thread notices too, and reconnects
            self.unconfirmed.pop(message.get("id", ""), None)
            self.connected.clear()
            return LOST
        return SENT

    def _new_id(self) -> str:
        """An id for a message, which the server's answer to it carries back."""
        with self.lock:
            self._ids += 1
            return str(self._ids)

    # -- receiving and reconnecting (the receiver thread) ---------------------

    def start(self) -> None:
        self._receiver.start()

    def _joined(self, connection: ServerConnection, welcome: dict,
                replay_header: str = "--- earlier messages ---") -> None:
        """Take a fresh connection into use."""
        limits = welcome.get("limits") or {}
        limit = limits.get("max_length")
        with self.lock:
            self.connection = connection
            self.resume_token = welcome.get("resume")
            self.pacer = Pacer(limits)
            self._max_length = limit if isinstance(limit, int) and limit > 0 else 0
            self._users = {str(user).lower(): clean_text(str(user)) for user in welcome["users"]}
            self._operator = False  # operator status does not survive a new connection
            # Requests in flight on an old connection get no answer: only the replay is due.
            self._history_headers = deque([(None, replay_header)])
        self._in_history = False
        self._told_why = self._final = self._shut_down = False
        self.connected.set()
        self.settled.set()

    def _receive_loop(self) -> None:
        try:
            reason = self._follow_connection()
            if reason is None:
                return
            self.lost_reason = reason
            self.screen.warn(reason)
            self._report_queued()
        except Exception as exc:    # a receiver must never end quietly: main would wait forever
            self.lost_reason = f"internal error: {type(exc).__name__}: {exc}"
            with contextlib.suppress(Exception):
                self.screen.warn(self.lost_reason)
        finally:
            self.settled.set()
            self.closed.set()
        if not self.leaving.is_set():
            self.on_lost()

    def _follow_connection(self) -> Optional[str]:
        """Receive, and reconnect when the link drops; why it ended, or None for a leave."""
        while True:
            reason = self._receive_until_closed()
            if self.leaving.is_set():
                return None
            with self.lock:
                self.connected.clear()
                self.settled.clear()
            self._report_unconfirmed()
            if self._final or self.rejoin is None or not self.retries:
                return reason
            trying = f"trying to reconnect for about {rough_time(reconnect_time(self.retries))}"
            if self._shut_down:     # said why: no alarm, but what happens now
                self.screen.note(f"the server shut down (it may be restarting); {trying}")
            else:
                self.screen.warn(f"{reason}; {trying}")
            why_not = self._reconnect()
            if why_not is None:
                continue
            if self.leaving.is_set():
                return None     # /quit or Ctrl-C while reconnecting: an ordinary exit
            return why_not

    def _receive_until_closed(self) -> str:
        """Handle messages until the connection ends; return why it ended."""
        try:
            while True:
                message = self.connection.receive()
                try:
                    self._handle_incoming(message)
                except Exception as exc:    # a bug must cost this message, not the session
                    self.screen.warn(f"could not show a {message['type']!r} message from the server "
                              f"({type(exc).__name__}: {exc})")
        except ConnectionClosed:
            return "disconnected" if self._told_why else "connection to the server lost"
        except ProtocolError as exc:
            if exc.code == "truncated":
                return "connection to the server lost in the middle of a message"
            return f"connection closed: the server sent bad data ({exc.text})"
        except OSError as exc:
            return f"connection to the server lost ({exc.strerror or exc})"

    def _reconnect(self) -> Optional[str]:
        """Try to join again, with growing pauses; None once back, else why not.

        A failed attempt is shown only when its reason is new: the same
        "connection refused" six times over tells nothing.
        """
        last_failure = None
        for attempt, delay in enumerate(reconnect_delays(self.retries), 1):
            if self.leaving.wait(delay):
                return "left while reconnecting"
            try:
                connection, welcome = self.rejoin(self.resume_token)
            except JoinRefused as refused:
                return f"cannot rejoin: {refused.text}"
            except CertificateChanged as exc:   # the whole warning, once: no retry can pass
                self.screen.warn(str(exc))
                return "not reconnecting: the server's certificate has changed"
            except CannotConnect as exc:
                failure = str(exc).splitlines()[0]
                if failure != last_failure:
                    self.screen.note(f"attempt {attempt} of {self.retries} failed: {failure}")
                last_failure = failure
                continue
            with self.lock:
                self._replay_after = self._last_seen
                self._joined(connection, welcome, "--- while you were away ---")
                queued, self.queued = self.queued, []
                outcomes = [self._transmit(message) for message in queued]
            self.screen.note(f"reconnected to {self.server} as {self.name}")
            if queued:
                self.screen.note(f"sent {len(queued)} line(s) typed while disconnected")
            for outcome in outcomes:
                if outcome == TOO_LONG:
                    self.screen.warn("not sent: far too long")
            return None
        attempts = f"{self.retries} attempt{'s' if self.retries > 1 else ''}"
        return f"could not reconnect ({attempts} over about " \
               f"{rough_time(reconnect_time(self.retries))})"

    def _handle_incoming(self, message: dict) -> None:
        kind = message["type"]
        fields = SERVER_MESSAGES.get(kind)
        if fields is None:
            return      # from a newer server; nothing we know how to show
        problem = check_fields(message, fields)
        if problem:
            self.screen.warn(f"the server sent a malformed {kind!r} message ({problem})")
            return
        if kind == "ping":
            self._send_quietly({"type": "pong"})
            return
        self._told_why = kind in ("shutdown", "error")  # in case the connection now closes
        self._final = kind == "error" and message["code"] in FINAL_ERRORS
        self._shut_down = kind == "shutdown"
        with self.lock:
            if kind in ("sent", "error") and "id" in message:
                self.unconfirmed.pop(message["id"], None)
                if kind == "error":     # a refused /history or /search: its header must go
                    self._history_headers = deque(
                        entry for entry in self._history_headers if entry[0] != message["id"])
            self._track_users(kind, message)
            if kind == "notice":
                effect = self.NOTICE_EFFECTS.get(message["code"])
                if effect is not None:
                    effect(self)
        batch_role = self._show_history_frame(message) if kind.startswith("history") else ""
        if batch_role is None:
            return
        if kind in ("message", "sent", "whisper", "announcement", "history"):
            self._last_seen = max(self._last_seen, str(message.get("ts", "")))
        for line in format_message(message, self.name):
            self.screen.show(line._replace(role=batch_role) if batch_role else line)

    def _set_operator(self, operator: bool) -> None:
        self._operator = operator

    def _password_confirmed(self) -> None:
        self.credentials.name_password = self._new_password

    def _password_removed(self) -> None:
        self.credentials.name_password = None

    #: Notices that change what this client knows about itself (run with the lock held).
    NOTICE_EFFECTS: Dict[str, Callable[["Link"], None]] = {
        "op": lambda link: link._set_operator(True),
        "deop": lambda link: link._set_operator(False),
        "registered": _password_confirmed,
        "password_changed": _password_confirmed,
        "unregistered": _password_removed,
    }

    def _track_users(self, kind: str, message: dict) -> None:
        """Keep the list of names that Tab completes (lock held)."""
        if kind == "join":
            self._users[message["name"].lower()] = clean_text(message["name"])
        elif kind == "leave":
            self._users.pop(message["name"].lower(), None)
        elif kind == "users":
            self._users = {str(user).lower(): clean_text(str(user)) for user in message["users"]}

    def _show_history_frame(self, message: dict) -> Optional[str]:
        """Headers around each batch of history; the role of this frame's line, or
        None to show nothing for it.

        The replay after a welcome is chat; a batch this client asked for is
        an answer. After a reconnect, the replay repeats what was already on
        screen: only what came while we were away is shown.
        """
        with self.lock:
            headers = self._history_headers
            # (the request's id, its header); a batch nobody asked for is shown as an answer
            request, header = headers[0] if headers else ("unasked", "--- history ---")
            if message["type"] == "history_end" and headers:
                headers.popleft()
        role = CHAT if request is None else ANSWER      # the replay has no request id
        if message["type"] == "history_end":
            shown_any, self._in_history = self._in_history, False
            if message["for"] == "join" and self._replay_after is not None:
                self._replay_after = None
                return role if shown_any else None
            return role
        if self._replay_after is not None and message["ts"] <= self._replay_after:
            return None     # part of the replay after a reconnect, and already on screen
        if not self._in_history:
            self._in_history = True
            self.screen.show(plain_line(header, "marker", role))
        return role

    def _report_unconfirmed(self) -> None:
        """Lines written to a connection that died before the server confirmed them."""
        with self.lock:
            lost, self.unconfirmed = list(self.unconfirmed.values()), {}
        for text in lost:
            self.screen.warn(f"may not have arrived (send it again if it matters): {text}")

    def _report_queued(self) -> None:
        with self.lock:
            queued, self.queued = self.queued, []
        for message in queued:
            self.screen.warn(f"not sent: {message.get('text', '/' + message['type'])}")

    def _send_quietly(self, message: dict) -> None:
        try:
            self.connection.send(message)
        except OSError:
            pass    # the receiver will see the connection go and say so


class MainThreadWaker:
    """Get the main thread out of its blocking read when the connection is lost.

    POSIX: a signal aimed at the main thread makes its read raise
    ConnectionLost. A signal that lands after the thread has let go of the
    interpreter but before its read has begun interrupts nothing, so it is
    repeated until the handler has run. Windows cannot interrupt a console
    read, so there the process ends at once, with everything printed.
    """

    def __init__(self) -> None:
        self._woken = threading.Event()
        self._can_signal = hasattr(signal, "pthread_kill") and hasattr(signal, "SIGUSR1")

    def install(self) -> None:
        """Set the signal handler; main thread only."""
        if self._can_signal:
            signal.signal(signal.SIGUSR1, self._handle)

    def wake(self) -> None:
        """From another thread: make the main thread raise ConnectionLost."""
        if not self._can_signal:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        main = threading.main_thread()
        while main.is_alive():
            try:
                signal.pthread_kill(main.ident, signal.SIGUSR1)
            except OSError:     # the main thread ended meanwhile
                return
            if self._woken.wait(WAKE_RETRY):
                return

    def _handle(self, signum: int, frame: object) -> None:
        if not self._woken.is_set():    # once: later signals must not break the exit
            self._woken.set()
            raise ConnectionLost()

# ---------------------------------------------------------------------------
# What the server sends, and how each message is shown
# ---------------------------------------------------------------------------

Segment = Tuple[str, str]   # (text, style): see STYLES

# What a line is to its reader, which decides where it goes (Screen.routes). On
# a terminal everything is shown. With input piped in, a script sees on stdout
# only the answers to its own commands, and on stderr its errors and the
# connection's notes; the chat itself (and the banner) only with --show-chat,
# and hints for people never.
CHAT = "chat"           # the conversation: messages, joins, the replay, the banner
ANSWER = "answer"       # the answer to a command: /who, /history, /search, /help, ...
ERROR = "error"         # "!" lines: what went wrong
NOTE = "note"           # the connection's own news: reconnecting, lines kept to send
HINT = "hint"           # advice for a person: "type /help for commands"


class Line(NamedTuple):
    """One line to show: a head (time, name) and a body that wraps under itself.

    `dim` greys the whole line out (history); `ring` asks for the bell
    (a whisper, a mention of your name); `role` is what the line is (CHAT, ...).
    """

    head: Tuple[Segment, ...]
    body: Tuple[Segment, ...]
    dim: bool = False
    ring: bool = False
    role: str = CHAT

    @property
    def plain(self) -> str:
        return "".join(text for text, _ in self.head + self.body)


def plain_line(text: str, style: str = "", role: str = CHAT) -> Line:
    return Line((), ((text, style),), role=role)


#: Fields each server message must carry (see check_fields). Messages of a
#: type not listed here come from a newer server and are ignored.
SERVER_MESSAGES: Dict[str, Dict[str, type]] = {
    "welcome": {"name": str, "users": list, "count?": int, "ops?": list, "registered?": bool,
                "limits?": dict, "resume?": str},
    "message": {"from": str, "text": str, "ts?": str, "action?": bool},
    "whisper": {"from": str, "to": str, "text": str, "ts?": str},
    "sent": {"text": str, "to?": str, "ts?": str, "action?": bool, "id?": str},
    "join": {"name": str, "ts?": str},
    "leave": {"name": str, "reason?": str, "text?": str, "ts?": str},
    "users": {"users": list, "ops?": list, "count?": int},
    "announcement": {"from": str, "text": str, "ts?": str},
    "history": {"kind": str, "from": str, "text": str, "ts": str, "to?": str},
    "history_end": {"for": str, "count": int, "text?": str},
    "error": {"code": str, "text": str, "id?": str},
    "notice": {"code": str, "text": str, "ts?": str},
    "shutdown": {"text?": str},
    "ping": {},
    "pong": {},
}


def local_time(timestamp: Optional[str], with_date: bool = False) -> str:
    """HH:MM in this machine's time zone, from the server's ISO-8601 UTC stamp.

    with_date: put the date in front when it is not today (for history).
    """
    try:
        moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).astimezone()
    except (AttributeError, ValueError, OverflowError):     # not a time, or not one we can show
        moment = datetime.now()
    if with_date and moment.date() != date.today():
        return moment.strftime("%b %d %H:%M")
    return moment.strftime("%H:%M")


def names_list(users: list, ops: Optional[list] = None) -> Tuple[Segment, ...]:
    """Names, each in its colour, separated by commas; operators marked with @."""
    operators = {str(name).lower() for name in ops or []}
    segments: List[Segment] = []
    for index, user in enumerate(users):
        name = clean_text(str(user))
        if index:
            segments.append((", ", ""))
        if name.lower() in operators:
            segments.append(("@", ""))
        segments.append((name, "name"))
    return tuple(segments)


def chat_line(stamp: str, sender: str, text: str, me: str, kind: str = "message",
              to: str = "", dim: bool = False) -> Line:
    """A message, whisper, action or announcement, as it is shown.

    `me` is the reader's name: mentions of it are highlighted, and whispers
    read "to bob" or "from bob" depending on who sent them.
    """
    time_part = (f"[{stamp}] ", "time")
    mine = sender.lower() == me.lower()
    if kind == "whisper":
        other = to if mine else sender
        head = (time_part, ("[whisper to " if mine else "[whisper from ", "whisper"),
                (other, "name"), ("] ", "whisper"))
        return Line(head, ((text, ""),), dim, ring=not mine)
    if kind == "action":
        body = mentions(text, "action", "" if mine else me)
        return Line((time_part, ("* ", "action"), (sender, "name"), (" ", "")), body, dim,
                    ring=any(style == "mention" for _, style in body))
    if kind == "announcement":
        return Line((time_part, ("*** ", "announcement"), (sender, "name"),
                     (": ", "announcement")), ((text, "announcement"),), dim)
    body = mentions(text, "", "" if mine else me)
    return Line((time_part, (sender, "name"), (": ", "")), body, dim,
                ring=any(style == "mention" for _, style in body))


def notice_line(text: str, stamp: Optional[str] = None, role: str = CHAT) -> Line:
    head = ((f"[{stamp}] ", "time"),) if stamp else ()
    return Line(head + ((NOTICE_MARK, "notice"),), ((text, "notice"),), role=role)


def error_line(text: str) -> Line:
    return Line((("! ", "error"),), ((text, "error"),), role=ERROR)


def error_lines(text: str) -> List[Line]:
    """An error of several lines: "!" on the first, the explanation indented under it."""
    first, *explanation = text.splitlines() or [""]
    return [error_line(first)] + [Line((("  ", ""),), ((line, "error"),), role=ERROR)
                                  for line in explanation]


def format_message(message: dict, me: str) -> List[Line]:
    """The lines to show for a message from the server: often one, maybe none
    (a pong), or several (a list of rooms).

    Every text from the server is cleaned again here: the server may be
    someone else's, and must not be able to send escape codes to this
    terminal.
    """
    formatter = FORMATTERS.get(message["type"])
    shown = formatter(message, me) if formatter else None
    lines = [] if shown is None else [shown] if isinstance(shown, Line) else shown
    role = NOTICE_ROLES.get(message["code"], CHAT) if message["type"] == "notice" else \
        MESSAGE_ROLES.get(message["type"], CHAT)
    return [line._replace(role=role) for line in lines]


#: What each message is to the reader when it is not chat (see CHAT). A batch of
#: history is an answer, but for the replay that follows a welcome (see Link).
MESSAGE_ROLES: Dict[str, str] = {
    "users": ANSWER, "history": ANSWER, "history_end": ANSWER, "error": ERROR,
    "shutdown": NOTE,
}
#: The notices that answer this client's own commands; the others are chat.
NOTICE_ROLES: Dict[str, str] = {
    "registered": ANSWER, "unregistered": ANSWER, "password_changed": ANSWER,
    "op": ANSWER, "deop": ANSWER, "moderation": ANSWER,
}


def _show_message(message: dict, me: str) -> Line:
    return chat_line(local_time(message.get("ts")), clean_text(message["from"]),
                     clean_text(message["text"]), me,
                     "action" if message.get("action") is True else "message")


def _show_whisper(message: dict, me: str) -> Line:
    return chat_line(local_time(message.get("ts")), clean_text(message["from"]),
                     clean_text(message["text"]), me, "whisper", to=me)


def _show_sent(message: dict, me: str) -> Line:
    kind = "whisper" if "to" in message else \
        "action" if message.get("action") is True else "message"
    return chat_line(local_time(message.get("ts")), me, clean_text(message["text"]), me, kind,
                     to=clean_text(message.get("to", "")))


def _show_leave(message: dict, me: str) -> Line:
    stamp = local_time(message.get("ts"))
    if "text" in message:       # kicked or banned: the server says how
        return notice_line(clean_text(message["text"]), stamp)
    reason = clean_text(str(message.get("reason", "")))
    detail = "" if reason in ("", "quit") else f" ({reason})"
    return notice_line(f"{clean_text(message['name'])} left{detail}", stamp)


def _show_users(message: dict, me: str) -> Line:
    users = message["users"]
    count = message.get("count", len(users))    # a big room lists only the first names
    more = ((f" and {count - len(users)} more", "notice"),) if count > len(users) else ()
    return Line(((NOTICE_MARK, "notice"),), ((f"{count} here: ", "notice"),) +
                names_list(users, message.get("ops")) + more)


def _show_history(message: dict, me: str) -> Line:
    kind = message["kind"]
    if kind not in ("message", "action", "whisper", "announcement"):
        kind = "message"
    return chat_line(local_time(message["ts"], with_date=True), clean_text(message["from"]),
                     clean_text(message["text"]), me, kind,
                     to=clean_text(str(message.get("to", ""))), dim=True)._replace(ring=False)


def _show_history_end(message: dict, me: str) -> Optional[Line]:
    if "text" in message:
        return notice_line(clean_text(str(message["text"])))
    purpose, count = message["for"], message["count"]
    if purpose == "search":
        return plain_line(f"--- {count} found ---", "marker") if count else \
            notice_line("no messages match")
    if not count:
        return None if purpose == "join" else notice_line("no messages yet")
    return plain_line("--- end of history ---", "marker")


def _show_notice(message: dict, me: str) -> Line:
    text = clean_text(message["text"])
    if message["code"] == "new_since":
        return plain_line(f"--- {text.lower()} ---", "marker")
    return notice_line(text, local_time(message["ts"]) if "ts" in message else None)


# Each gives a Line, a list of them, or None for nothing to show.
FORMATTERS: Dict[str, Callable[[dict, str], Union[Line, List[Line], None]]] = {
    "message": _show_message,
    "whisper": _show_whisper,
    "sent": _show_sent,
    "join": lambda m, me: notice_line(f"{clean_text(m['name'])} joined", local_time(m.get("ts"))),
    "leave": _show_leave,
    "users": _show_users,
    "announcement": lambda m, me: chat_line(local_time(m.get("ts")), clean_text(m["from"]),
                                            clean_text(m["text"]), me, "announcement"),
    "error": lambda m, me: error_line(clean_text(m["text"])),
    "shutdown": lambda m, me: notice_line(clean_text(m.get("text",
                                                           "The server is shutting down."))),
    "history": _show_history,
    "history_end": _show_history_end,
    "notice": _show_notice,
}

# ---------------------------------------------------------------------------
# Text on the terminal: widths, styles, colours, wrapping
# ---------------------------------------------------------------------------

# Characters that take no column: joiners and variation selectors glue
# emoji sequences; combining marks sit on the character before them.
ZERO_WIDTH = frozenset("\u200b\u200c\u200d\u2060\ufe0e\ufe0f")


def char_width(char: str) -> int:
    """Columns one character takes on a terminal: 0, 1, or 2 (CJK, most emoji)."""
    if char in ZERO_WIDTH or unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def text_width(text: str) -> int:
    if text.isascii():
        return len(text)
    return sum(map(char_width, text))


# Styles as SGR codes. "name" is special: its colour comes from the name.
STYLES = {
    "": "",
    "time": "2",                # dim
    "notice": "36",             # cyan: joins, leaves, information
    "error": "1;31",            # bold red
    "whisper": "1;35",          # bold magenta
    "announcement": "1;33",     # bold yellow
    "action": "3",              # italic
    "mention": "1;7",           # bold, reversed
    "marker": "2",              # dim separators
}
# Colours for names. None is the notices' cyan or the errors' red, or near them;
# they are spread round the colour wheel, each readable on a dark and on a light
# background. 256-colour codes where the terminal has them (colour_depth), eight
# of the basic ones elsewhere. The order is arbitrary but fixed: changing it
# would give everyone another colour.
NAME_COLOURS_256 = tuple(f"38;5;{code}" for code in (
    166,    # orange        #d75f00
    64,     # olive         #5f8700
    35,     # sea green     #00af5f
    63,     # blue          #5f5fff
    165,    # violet        #d700ff
    162,    # deep pink     #d70087
    136,    # dark gold     #af8700
    34,     # green         #00af00
    33,     # azure         #0087ff
    135,    # purple        #af5fff
    163,    # magenta       #d700af
))
NAME_COLOURS_16 = ("32", "95", "93", "34", "92", "35", "94", "33")   # no 31/91 red, 36/96 cyan


def name_colour(name: str, palette: Tuple[str, ...] = NAME_COLOURS_256) -> str:
    """A colour of its own for each name, the same on every machine and every run."""
    return palette[zlib.crc32(name.lower().encode("utf-8")) % len(palette)]


def colour_depth(environ: Mapping[str, str] = os.environ) -> int:
    """256 where the terminal says it has them (most do today), else the basic 16.

    Windows 10's console has 256 once its ANSI handling is on (terminal_is_capable).
    """
    if os.name == "nt":
        return 256
    if "256" in environ.get("TERM", "") or environ.get("COLORTERM") in ("truecolor", "24bit"):
        return 256
    return 16


def paint(segments: Iterable[Segment], dim: bool = False,
          name_colours: Tuple[str, ...] = NAME_COLOURS_256) -> str:
    """Segments as text with ANSI colour codes; names in colours from name_colours."""
    out = []
    for text, style in segments:
        codes = name_colour(text, name_colours) if style == "name" else STYLES.get(style, "")
        if dim:
            codes = "2;" + codes if codes else "2"
        out.append(f"\033[{codes}m{text}\033[0m" if codes and text.strip() else text)
    return "".join(out)


def split_words(segments: Iterable[Segment]) -> List[Segment]:
    """Segments cut into words and runs of spaces, each keeping its style."""
    pieces = []
    for text, style in segments:
        pieces.extend((piece, style) for piece in re.findall(r" +|[^ ]+", text))
    return pieces


def fit(text: str, columns: int) -> int:
    """How many leading characters of text fit in `columns` (at least one)."""
    used = 0
    for index, char in enumerate(text):
        used += char_width(char)
        if used > columns:
            return max(index, 1)
    return len(text)


def wrap(line: Line, width: int) -> List[List[Segment]]:
    """Rows of at most `width` columns; continuation rows keep the name column.

        [14:05] alice: a long message goes on and on and
                       carries on under the text, not the time
    """
    head = list(line.head)
    indent = text_width("".join(text for text, _ in head))
    if indent > width // 2:     # a very long name: a small indent reads better
        indent = 2
    rows: List[List[Segment]] = []
    row, used = head, text_width("".join(text for text, _ in head))
    for text, style in split_words(line.body):
        if text.startswith(" "):
            if used + len(text) <= width:
                row.append((text, style))
                used += len(text)
            continue        # spaces where a row breaks are dropped
        size = text_width(text)
        if used + size > width and used > indent:
            rows.append(row)
            row, used = [(" " * indent, "")], indent
        while used + size > width:      # a word longer than a whole row: cut it
            cut = fit(text, width - used)
            row.append((text[:cut], style))
            rows.append(row)
            row, used = [(" " * indent, "")], indent
            text = text[cut:]
            size = text_width(text)
        row.append((text, style))
        used += size
    rows.append(row)
    for each in rows:       # no trailing spaces
        while each and not each[-1][0].strip() and len(each) > 1:
            each.pop()
    return rows


def mentions(text: str, style: str, my_name: str) -> Tuple[Segment, ...]:
    """Text cut into segments, with each whole-word mention of my name highlighted."""
    if not my_name:
        return ((text, style),)
    pattern = re.compile(r"(?<![\w@])@?" + re.escape(my_name) + r"(?![\w])", re.IGNORECASE)
    segments, start = [], 0
    for match in pattern.finditer(text):
        if match.start() > start:
            segments.append((text[start:match.start()], style))
        segments.append((match.group(), "mention"))
        start = match.end()
    if start < len(text):
        segments.append((text[start:], style))
    return tuple(segments) or ((text, style),)


def enable_windows_colours() -> bool:
    """Windows 10+: turn on the console's ANSI escape handling. False if it will not."""
    try:
        import ctypes
        kernel32 = ctypes.windll.kernel32   # type: ignore[attr-defined]
        handle = kernel32.GetStdHandle(-11)  # STD_OUTPUT_HANDLE
        mode = ctypes.c_uint32()
        if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
            return False
        enable_virtual_terminal_processing = 0x0004
        return bool(kernel32.SetConsoleMode(handle, mode.value | enable_virtual_terminal_processing))
    except (AttributeError, OSError, ImportError):
        return False


def terminal_is_capable(stream: TextIO) -> bool:
    """Whether stream is a terminal that understands ANSI escape codes."""
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    if os.environ.get("TERM") == "dumb":
        return False
    return os.name != "nt" or enable_windows_colours()


# ---------------------------------------------------------------------------
# The screen: where shown lines go
# ---------------------------------------------------------------------------

class Screen:
    """Shows lines: coloured and wrapped on a terminal, plain elsewhere.

    Every line also goes, as plain text, to the transcript kept for /save
    and to the --log file. With a line editor, lines are printed above the
    input line.
    """

    def __init__(self, out: TextIO, terminal: bool, colour: bool, bell: bool = False,
                 log_file: Optional[TextIO] = None,
                 routes: Optional[Dict[str, Optional[TextIO]]] = None,
                 name_colours: Tuple[str, ...] = NAME_COLOURS_256) -> None:
        self.out = out
        self.name_colours = name_colours
        # Where each role of line goes (piped_routes); out when not listed, nowhere
        # when None. Lines for another stream (stderr) are written as plain text.
        self.routes = routes or {}
        self.terminal = terminal        # wrap to the terminal's width
        self.colour = colour            # ANSI colours
        self.bell = bell                # ring on whispers and mentions (--bell)
        self.log_file = log_file
        self.editor: Optional[LineEditor] = None
        self.transcript: Deque[str] = deque(maxlen=TRANSCRIPT_LINES)
        self.lock = threading.RLock()
        self._held: Optional[List[Line]] = None     # lines kept back during a prompt

    def show(self, line: Line) -> None:
        text = line.plain
        with self.lock:
            if self._held is not None:
                self._held.append(line)
                return
            self.transcript.append(text)
            self._log(text)
            stream = self.routes.get(line.role, self.out)
            if stream is not self.out:
                if stream is not None:
                    stream.write(text + "\n")
                    stream.flush()
                return
            rendered = self.render(line)
            if line.ring and self.bell and self.terminal:
                rendered += "\a"
            if self.editor is not None:
                self.editor.print_above(rendered)
            else:
                self.out.write(rendered + "\n")
                self.out.flush()

    def note(self, text: str, role: str = NOTE) -> None:
        self.show(notice_line(text, role=role))

    def warn(self, text: str) -> None:
        for line in error_lines(text):
            self.show(line)

    def render(self, line: Line) -> str:
        if not self.terminal:
            return line.plain
        width = max(20, shutil.get_terminal_size().columns - 1)
        rows = wrap(line, width)
        if self.colour:
            return "\n".join(paint(row, line.dim, self.name_colours) for row in rows)
        return "\n".join("".join(text for text, _ in row) for row in rows)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep lines back while a prompt has the terminal, then show them."""
        with self.lock:
            self._held = []
        try:
            yield
        finally:
            with self.lock:     # in order: nothing arriving now may overtake them
                held, self._held = self._held, None
                for line in held:
                    self.show(line)

    def write_raw(self, text: str) -> None:
        """Terminal control (clearing the screen), bypassing transcript and log."""
        with self.lock:
            self.out.write(text)
            self.out.flush()

    def begin_log(self, header: str) -> None:
        """Start this session in the --log file: a blank line after an earlier
        session, then who, where and when, as at the top of a /save file."""
        if self.log_file is None:
            return
        try:
            earlier = self.log_file.tell() > 0
        except (OSError, ValueError):   # a pipe or a device: nothing earlier to set apart
            earlier = False
        with self.lock:
            self._write_log(("\n" if earlier else "") + header + "\n")

    def _log(self, text: str) -> None:
        # Each line dated in full: a line found by grep says when it was shown.
        if self.log_file is not None:
            self._write_log(f"{datetime.now():%Y-%m-%d %H:%M:%S} {text}\n")

    def _write_log(self, text: str) -> None:
        try:
            self.log_file.write(text)
            self.log_file.flush()
        except OSError as exc:
            self.log_file = None
            stream = self.routes.get(ERROR, self.out) or self.out
            stream.write(f"! stopped writing the log: {exc.strerror or exc}\n")


# ---------------------------------------------------------------------------
# The input line: a small line editor that messages never break
# ---------------------------------------------------------------------------

# Keys as the editor sees them: a printable character, or one of these names.
CONTROL_KEYS = {
    "\r": "enter", "\n": "enter", "\x7f": "backspace", "\x08": "backspace", "\t": "tab",
    "\x01": "home", "\x05": "end", "\x02": "left", "\x06": "right", "\x10": "up",
    "\x0e": "down", "\x15": "kill-before", "\x0b": "kill-after", "\x17": "kill-word",
    "\x0c": "redraw", "\x04": "eof", "\x03": "interrupt",
}
ESCAPE_KEYS = {     # what follows ESC for the keys terminals send as sequences
    "[A": "up", "[B": "down", "[C": "right", "[D": "left", "[H": "home", "[F": "end",
    "OA": "up", "OB": "down", "OC": "right", "OD": "left", "OH": "home", "OF": "end",
    "[1~": "home", "[7~": "home", "[4~": "end", "[8~": "end", "[3~": "delete",
    "[1;5C": "word-right", "[1;5D": "word-left", "f": "word-right", "b": "word-left",
}
CSI_FINAL = re.compile(r"\[[0-9;]*[@-~]")


class KeyParser:
    """Turns the characters a terminal sends into keys; sans-IO, like the decoder.

    An escape sequence split across reads waits for its end.
    """

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str) -> List[str]:
        text, self._pending = self._pending + text, ""
        keys: List[str] = []
        index = 0
        while index < len(text):
            char = text[index]
            if char == "\x1b":
                sequence = self._escape(text[index + 1:])
                if sequence is None:        # incomplete: wait for the rest
                    self._pending = text[index:]
                    break
                keys.append(ESCAPE_KEYS.get(sequence, "ignore"))
                index += 1 + len(sequence)
                continue
            if char == "\n" and index and text[index - 1] == "\r":
                pass                        # CR LF is one Enter
            elif char in CONTROL_KEYS:
                keys.append(CONTROL_KEYS[char])
            elif unicodedata.category(char) not in ("Cc", "Cs"):
                keys.append(char)
            index += 1
        return keys

    @staticmethod
    def _escape(rest: str) -> Optional[str]:
        """The sequence after an ESC, or None if it has not fully arrived."""
        if not rest:
            return None
        if rest[0] == "[":
            match = CSI_FINAL.match(rest)
            if match:
                return match.group()
            return None if re.fullmatch(r"\[[0-9;]*", rest) else rest[0]
        if rest[0] == "O":
            return rest[:2] if len(rest) > 1 else None
        return rest[0]      # Alt and a key


class PosixTerminal:
    """The terminal in cbreak mode: keys arrive one by one, unechoed.

    Ctrl-C still sends SIGINT and Ctrl-Z still suspends; the original mode
    comes back on exit (also after an exception) and after a suspend.
    """

    def __init__(self, fd: int) -> None:
        import termios
        self._termios = termios
        self.fd = fd
        self._saved = termios.tcgetattr(fd)
        self._parser = KeyParser()
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self.on_resume: Callable[[], None] = lambda: None

    def __enter__(self) -> "PosixTerminal":
        self._cbreak()
        if hasattr(signal, "SIGCONT"):
            signal.signal(signal.SIGCONT, lambda signum, frame: (self._cbreak(), self.on_resume()))
        return self

    def __exit__(self, *exc_info: object) -> None:
        if hasattr(signal, "SIGCONT"):
            signal.signal(signal.SIGCONT, signal.SIG_DFL)
        self._termios.tcsetattr(self.fd, self._termios.TCSADRAIN, self._saved)

    @contextlib.contextmanager
    def normal_mode(self) -> Iterator[None]:
        """The terminal as it was, for a moment (getpass needs line editing)."""
        self._termios.tcsetattr(self.fd, self._termios.TCSADRAIN, self._saved)
        try:
            yield
        finally:
            self._cbreak()

    def _cbreak(self) -> None:
        termios = self._termios
        attributes = termios.tcgetattr(self.fd)
        attributes[3] &= ~(termios.ICANON | termios.ECHO)
        attributes[6][termios.VMIN] = 1
        attributes[6][termios.VTIME] = 0
        termios.tcsetattr(self.fd, termios.TCSADRAIN, attributes)

    def read_keys(self) -> List[str]:
        data = os.read(self.fd, 1024)
        return self._parser.feed(self._decode(data)) if data else ["eof"]


class WindowsTerminal:
    """Keys from the Windows console through msvcrt (no mode to change)."""

    SPECIAL = {"H": "up", "P": "down", "K": "left", "M": "right", "G": "home", "O": "end",
               "S": "delete", "s": "word-left", "t": "word-right"}

    def __init__(self) -> None:
        import msvcrt
        self._msvcrt = msvcrt
        self._parser = KeyParser()
        self.on_resume: Callable[[], None] = lambda: None

    def __enter__(self) -> "WindowsTerminal":
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    @contextlib.contextmanager
    def normal_mode(self) -> Iterator[None]:
        yield       # msvcrt changes no console mode

    def read_keys(self) -> List[str]:
        char = self._msvcrt.getwch()
        if char in ("\x00", "\xe0"):    # arrows and the like: a prefix, then a code
            return [self.SPECIAL.get(self._msvcrt.getwch(), "ignore")]
        if char == "\x1a":              # Ctrl-Z ends input on Windows
            return ["eof"]
        return self._parser.feed(char)


def open_terminal(stdin: TextIO) -> Optional[object]:
    """A terminal the line editor can drive, or None where only plain input works."""
    try:
        if os.name == "nt":
            return WindowsTerminal()
        return PosixTerminal(stdin.fileno())
    except (ImportError, OSError, ValueError, AttributeError):
        return None


class LineEditor:
    """An input line that stays intact at the bottom while messages print above it.

    One lock covers the screen, the Screen's own (`lock`): the main thread
    edits under it, the receiver thread calls print_above under it, which
    clears the input area, prints, and draws the prompt, the half-typed text
    and the cursor again. Because it is the Screen's, a line the receiver
    began to write before the editor took over is finished before the prompt
    is first drawn (else the prompt and that line share a row). Keys:
    arrows, Home/End, Backspace/Delete, Ctrl-A/E/U/K/W/L, Up/Down for
    earlier lines, Tab to complete commands and names, Ctrl-D to leave.
    """

    def __init__(self, terminal: object, out: TextIO, prompt: str = PROMPT,
                 complete: Callable[[str, bool], List[str]] = lambda word, first: [],
                 private: Callable[[str], bool] = lambda line: False,
                 lock: Optional[threading.RLock] = None) -> None:
        self.terminal = terminal
        self.out = out
        self.prompt = prompt
        self.complete = complete        # (word, is it the first word?) -> candidates
        self.private = private          # lines never to keep for Up/Down (passwords)
        self.lock = lock if lock is not None else threading.RLock()
        self.buffer: List[str] = []
        self.cursor = 0                 # index into buffer
        self.active = False             # reading a line now: the input area is on screen
        self.history: Deque[str] = deque(maxlen=INPUT_HISTORY)
        self._browsing: Optional[int] = None    # index into history while using Up/Down
        self._draft = ""                # what was typed before browsing began
        # What the input area shows now: its characters and where the cursor is among
        # them. Its rows are worked out again at each redraw, at the width of that
        # moment, because a terminal that is resized re-wraps what it shows.
        self._drawn: List[str] = []
        self._drawn_cursor = 0
        # Keys read but not yet handled: a paste brings many lines in one read, and
        # those after the first Enter belong to the lines that follow.
        self._pending: Deque[str] = deque()
        terminal.on_resume = self.redraw

    # -- for other threads ---------------------------------------------------

    def print_above(self, text: str) -> None:
        with self.lock:
            if self.active:
                self._clear()
            self.out.write(text + "\n")
            if self.active:
                self._render()
            self.out.flush()

    def redraw(self) -> None:
        with self.lock:
            if self.active:
                self._render()
                self.out.flush()

    # -- reading a line (main thread) ----------------------------------------

    def read_line(self) -> str:
        """The next line typed. EOFError on Ctrl-D (empty line), KeyboardInterrupt on Ctrl-C."""
        with self.lock:
            self.buffer, self.cursor, self._browsing = [], 0, None
            self.active = True
            self._render()
            self.out.flush()
        try:
            while True:
                if not self._pending:
                    self._pending.extend(self.terminal.read_keys())
                key = self._pending.popleft()
                with self.lock:
                    line = self._press(key)
                    if line is not None:
                        return line
                    if not self._pending:   # a paste is drawn once, when all of it is in
                        self._render()
                        self.out.flush()
        finally:
            with self.lock:     # the typed line goes: what was sent comes back from the server
                self._clear()
                self.active = False
                self.out.flush()

    def _press(self, key: str) -> Optional[str]:
        action = self.KEYS.get(key)
        if action is not None:
            return action(self)
        if len(key) == 1:
            self.buffer.insert(self.cursor, key)
            self.cursor += 1
        return None

    def _enter(self) -> Optional[str]:
        line = "".join(self.buffer)
        if line.strip() and not self.private(line) and (not self.history or
                                                        self.history[-1] != line):
            self.history.append(line)
        return line

    def _eof(self) -> None:
        if not self.buffer:
            raise EOFError
        return self._delete()

    def _interrupt(self) -> None:
        raise KeyboardInterrupt

    def _backspace(self) -> None:
        if self.cursor:
            self.cursor -= 1
            del self.buffer[self.cursor]

    def _delete(self) -> None:
        if self.cursor < len(self.buffer):
            del self.buffer[self.cursor]

    def _move(self, position: int) -> None:
        self.cursor = max(0, min(len(self.buffer), position))

    def _word_start(self) -> int:
        """Where the word before the cursor starts (skipping spaces first)."""
        position = self.cursor
        while position and self.buffer[position - 1] == " ":
            position -= 1
        while position and self.buffer[position - 1] != " ":
            position -= 1
        return position

    def _word_end(self) -> int:
        position = self.cursor
        while position < len(self.buffer) and self.buffer[position] == " ":
            position += 1
        while position < len(self.buffer) and self.buffer[position] != " ":
            position += 1
        return position

    def _kill_before(self) -> None:
        del self.buffer[:self.cursor]
        self.cursor = 0

    def _kill_after(self) -> None:
        del self.buffer[self.cursor:]

    def _kill_word(self) -> None:
        start = self._word_start()
        del self.buffer[start:self.cursor]
        self.cursor = start

    def _browse(self, step: int) -> None:
        """Up (-1) and Down (+1) through earlier lines; past the newest is the draft."""
        if not self.history:
            return
        if self._browsing is None:
            if step > 0:
                return
            self._draft = "".join(self.buffer)
            self._browsing = len(self.history)
        self._browsing = max(0, min(len(self.history), self._browsing + step))
        text = self._draft if self._browsing == len(self.history) else \
            self.history[self._browsing]
        self.buffer, self.cursor = list(text), len(text)

    def _tab(self) -> None:
        before = "".join(self.buffer[:self.cursor])
        start = before.rfind(" ") + 1
        word = before[start:]
        first = not before[:start].strip()
        candidates = self.complete(word, first)
        if not candidates:
            return
        if len(candidates) == 1:
            ending = ": " if first and not word.startswith(("/", "\\")) else " "
            completion = candidates[0] + ending
        else:
            completion = os.path.commonprefix([c.lower() for c in candidates])
            completion = candidates[0][:len(completion)]
            if len(completion) <= len(word):    # nothing more to add: show the choices
                self.print_above("  ".join(candidates))
                return
        self.buffer[start:self.cursor] = list(completion)
        self.cursor = start + len(completion)

    def _redraw_screen(self) -> None:
        self.out.write("\033[2J\033[H")
        self._drawn, self._drawn_cursor = [], 0

    KEYS: Dict[str, Callable[["LineEditor"], Optional[str]]] = {
        "enter": _enter,
        "eof": _eof,
        "interrupt": _interrupt,
        "backspace": _backspace,
        "delete": _delete,
        "left": lambda self: self._move(self.cursor - 1),
        "right": lambda self: self._move(self.cursor + 1),
        "home": lambda self: self._move(0),
        "end": lambda self: self._move(len(self.buffer)),
        "word-left": lambda self: self._move(self._word_start()),
        "word-right": lambda self: self._move(self._word_end()),
        "kill-before": _kill_before,
        "kill-after": _kill_after,
        "kill-word": _kill_word,
        "up": lambda self: self._browse(-1),
        "down": lambda self: self._browse(+1),
        "tab": _tab,
        "redraw": _redraw_screen,
        "ignore": lambda self: None,
    }

    # -- drawing ----------------------------------------------------------------

    def _clear(self) -> None:
        """Erase the input area; the cursor ends at its first column."""
        (cursor_row, _), _, _ = self._layout(self._drawn, self._drawn_cursor)
        up = f"\033[{cursor_row}A" if cursor_row else ""
        self.out.write("\r" + up + "\033[J")
        self._drawn, self._drawn_cursor = [], 0

    def _render(self) -> None:
        """Draw prompt and text, wrapped as the terminal wraps them, and place the cursor."""
        self._clear()
        chars = list(self.prompt) + self.buffer
        cursor_index = len(self.prompt) + self.cursor
        (cursor_row, cursor_column), end_row, full = self._layout(chars, cursor_index)
        self.out.write("".join(chars))
        if full:    # the last row is exactly full: step onto the next, as the cursor will
            self.out.write("\r\n")
        up = end_row - cursor_row
        self.out.write((f"\033[{up}A" if up else "") + "\r" +
                       (f"\033[{cursor_column}C" if cursor_column else ""))
        self._drawn, self._drawn_cursor = chars, cursor_index

    @staticmethod
    def _layout(chars: List[str], cursor_index: int) -> Tuple[Tuple[int, int], int, bool]:
        """Where the cursor goes, the row where writing the text leaves off, and whether
        the text exactly fills its last row; at the terminal's width now.

        A character too wide for what is left of a row goes to the next one, as
        terminals do.
        """
        width = max(10, shutil.get_terminal_size().columns)
        row = column = 0
        cursor_at = None
        for index, char in enumerate(chars):
            size = char_width(char)
            if column + size > width:
                row, column = row + 1, 0
            if index == cursor_index:
                cursor_at = (row, column)
            column += size
        full = column >= width
        if full:
            row, column = row + 1, 0
        return (cursor_at or (row, column)), row, full


# ---------------------------------------------------------------------------
# The commands: what a typed line does
# ---------------------------------------------------------------------------

class Command(NamedTuple):
    usage: str          # what follows the command; [brackets] mark what may be left out
    summary: str
    run: Callable[["ChatSession", str], None]
    for_operators: bool = False

    @property
    def needs_argument(self) -> bool:
        return bool(self.usage) and not self.usage.startswith("[")


def moderation_command(name: str) -> Callable[["ChatSession", str], None]:
    """A client command that asks the server to run moderation command `name`."""
    def run(session: "ChatSession", argument: str) -> None:
        session.send({"type": "moderate", "command": name, "args": argument})
    return run


# After a backslash, a word of letters is a command (\qiut is a typo to catch, not
# chat); anything else is chat (\o/, \(^_^)/).
BACKSLASH_COMMAND = re.compile(r"\\[A-Za-z]+(?: |$)")


def parse_line(line: str) -> Tuple[str, str]:
    """Split an input line into (command, argument); plain text is ("say", text).

    "/word args" is a command, whatever the word. "\\word args" is one too when
    the word is letters only, known or not, so that a mistyped "\\qiut" is
    caught instead of sent; anything else after a backslash ("\\o/",
    "\\(^_^)/") is chat. A doubled first character sends the rest as typed:
    "//etc" sends "/etc", "\\\\quit" sends "\\quit".
    """
    if line.startswith(("//", "\\\\")):
        return "say", line[1:]
    if line.startswith("/") or BACKSLASH_COMMAND.match(line):
        word, _, rest = line[1:].partition(" ")
        return word.lower(), rest.strip()
    return "say", line


class ChatSession:
    """A joined chat as the person typing sees it: each line they type becomes a
    command or a message, sent through the link, which also shows what arrives
    and reconnects (see Link).

    rejoin(resume_token) connects and says hello again; without it (or with
    retries=0) a dropped connection ends the session.
    """

    def __init__(self, connection: ServerConnection, welcome: dict, server: str,
                 screen: Optional[Screen] = None, on_lost: Optional[Callable[[], None]] = None,
                 ask_secret: Optional[Callable[[str], str]] = None,
                 rejoin: Optional[Rejoin] = None, retries: int = RECONNECT_TRIES,
                 credentials: Optional[Credentials] = None) -> None:
        self.name = welcome["name"]
        self.server = server                # HOST:PORT
        self.screen = screen or Screen(sys.stdout, terminal=False, colour=False)
        self.ask_secret = ask_secret        # prompts without echo; None when not on a terminal
        self.started = datetime.now()
        self.link = Link(connection, welcome, server, self.screen, on_lost, rejoin, retries,
                         credentials)
        self.screen.begin_log(self.header())

    @property
    def credentials(self) -> Credentials:
        return self.link.credentials

    @property
    def lost_reason(self) -> Optional[str]:
        return self.link.lost_reason

    def start(self) -> None:
        self.link.start()

    def leave(self) -> None:
        self.link.leave()

    def header(self, until: Optional[datetime] = None) -> str:
        """Who, where and when: the first line of a /save file and of a --log session."""
        span = f"{self.started:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M}" if until else \
            f"from {self.started:%Y-%m-%d %H:%M}"
        return f"Chat on {self.server} as {self.name}, {span} (local time)"

    def send(self, message: dict) -> bool:
        return self.link.send(message)

    def show_banner(self, welcome: dict) -> None:
        others = [user for user in welcome["users"] if str(user).lower() != self.name.lower()]
        self.screen.note(f"connected to {self.server} as {self.name}", CHAT)
        if self.link.connection.encryption:
            self.screen.note(self.link.connection.encryption, CHAT)
        if others:
            self.screen.show(Line(((NOTICE_MARK, "notice"),), (("here now: ", "notice"),) +
                                  names_list(others, welcome.get("ops"))))
        else:
            self.screen.note("nobody else is here yet", CHAT)
        self.screen.note("type /help for commands, /quit to leave", HINT)

    def handle_line(self, line: str) -> None:
        """Act on one line of input: a command, or text to send to everyone."""
        command, argument = parse_line(line.rstrip("\r\n"))
        if command == "say":
            if argument.strip() and self.fits(argument):
                self.send({"type": "say", "text": argument})
            return
        name = ALIASES.get(command, command)
        entry = COMMANDS.get(name)
        if entry is None:
            prefix = line[:1]   # "/" or "\\", as typed
            self.screen.warn(f"unknown command {prefix}{command}: type /help for the list, "
                             f"or start with {prefix * 2} to send a line beginning with {prefix}")
        elif entry.needs_argument and not argument.strip():
            self.screen.warn(f"usage: /{name} {entry.usage}")
        else:
            entry.run(self, argument)

    # -- Tab completion ---------------------------------------------------------

    def complete(self, word: str, first: bool) -> List[str]:
        """Commands for "/..." at the start of a line; names everywhere else."""
        if first and word[:1] in ("/", "\\"):
            names = sorted(set(COMMANDS) | set(ALIASES))
            return [word[0] + name for name in names if name.startswith(word[1:].lower())]
        return sorted((name for name in self.link.names()
                       if name.lower().startswith(word.lower())
                       and name.lower() != self.name.lower()), key=str.lower)

    # -- commands (see COMMANDS) ----------------------------------------------

    def cmd_help(self, argument: str) -> None:
        for line in command_help_lines():
            self.screen.show(plain_line(line, role=ANSWER))

    def cmd_clients(self, argument: str) -> None:
        if self.link.operator:   # addresses, times and counts, as on the server console
            self.send({"type": "moderate", "command": "clients"})
        else:
            self.send({"type": "who"})

    def cmd_me(self, argument: str) -> None:
        if self.fits(argument):
            self.send({"type": "say", "text": argument, "action": True})

    def cmd_whisper(self, argument: str) -> None:
        target, _, text = argument.partition(" ")
        if not target or not text.strip():
            self.screen.warn("usage: /w NAME TEXT")
            return
        if not NAME_PATTERN.fullmatch(target):     # nobody can be called that: do not ask
            self.screen.warn(f"not sent: {target!r} is not a name (names are {NAME_RULES})")
            return
        if self.fits(text):
            self.send({"type": "whisper", "to": target, "text": text.strip()})

    def fits(self, text: str) -> bool:
        """Whether text is within the server's length limit; says so if not."""
        limit = self.link.max_length
        if limit and len(text.strip()) > limit:
            self.screen.warn(f"not sent: {len(text.strip())} characters, and the limit here is {limit}")
            return False
        return True

    def cmd_history(self, argument: str) -> None:
        if argument and not (argument.isdecimal() and int(argument) >= 1):
            self.screen.warn(f"usage: /history [N], N from 1 (at most {HISTORY_MAX} are shown)")
            return
        request = {"type": "get_history"}
        if argument:
            request["limit"] = min(int(argument), HISTORY_MAX)     # capped, as the server does
        self.link.ask_history(request, "--- history ---")

    def cmd_search(self, argument: str) -> None:
        self.link.ask_history({"type": "search", "text": argument},
                          f"--- search: {argument.strip()} ---")


    def cmd_save(self, argument: str) -> None:
        overwrite = argument.startswith("-f ") or argument == "-f"
        path = argument[2:].strip() if overwrite else argument.strip()
        if overwrite and not path:
            self.screen.warn("usage: /save -f FILE (the file to overwrite); /save alone picks a new name")
            return
        if path and os.path.isdir(os.path.expanduser(path)):
            self.screen.warn(f"{path} is a folder: give a file name, as in /save {path.rstrip('/')}/chat.txt")
            return
        with self.screen.lock:
            lines = [self.header(until=datetime.now()), ""] + list(self.screen.transcript)
        try:
            saved_to = save_transcript(lines, path or None, overwrite)
        except FileExistsError:
            self.screen.warn(f"{path} exists: '/save -f {path}' overwrites it, or choose another name")
        except OSError as exc:
            self.screen.warn(f"cannot save to {path}: {exc.strerror or exc}")
        else:
            self.screen.note(f"saved {len(lines) - 2} lines to {saved_to}", ANSWER)

    def cmd_register(self, argument: str) -> None:
        password = self._new_password(argument, "/register PASSWORD")
        if password:
            self.link.expect_password(password)
            self.send({"type": "register", "password": password})

    def cmd_unregister(self, argument: str) -> None:
        password = argument or self._secret("your password: ", "/unregister PASSWORD")
        if password:
            self.send({"type": "unregister", "password": password})

    def cmd_password(self, argument: str) -> None:
        old, _, new = argument.partition(" ")
        if not argument:
            old = self._secret("current password: ", "/password OLD NEW")
            new = old and self._new_password("", "/password OLD NEW")
        elif not new:
            self.screen.warn("usage: /password OLD NEW, or /password alone to be asked")
            return
        else:
            new = self._new_password(new, "/password OLD NEW")
        if old and new:
            self.link.expect_password(new)
            self.send({"type": "change_password", "password": old, "new_password": new})

    def cmd_op(self, argument: str) -> None:
        password = argument or self._secret("operator password: ", "/op PASSWORD")
        if password:
            self.send({"type": "op", "password": password})

    def cmd_deop(self, argument: str) -> None:
        self.send({"type": "deop"})

    def _secret(self, prompt: str, usage: str) -> Optional[str]:
        """Ask for a password without echo; on a pipe, explain the usage instead."""
        if self.ask_secret is None:
            self.screen.warn(f"usage: {usage}")
            return None
        return self.ask_secret(prompt) or None

    def _new_password(self, given: str, usage: str) -> Optional[str]:
        """A new password: the one given on the command line, or asked for twice.

        None, after saying why, when it is missing, mistyped, or too short or
        long: that is checked before asking again (password_problem, the
        server's own rule, in the shared block).
        """
        password = given or self._secret("new password: ", usage)
        problem = password and password_problem(password)
        if problem:
            self.screen.warn(problem)
            return None
        if password and not given and self._secret("the same again: ", usage) != password:
            self.screen.warn("the two passwords differ; nothing changed")
            return None
        return password

    def cmd_clear(self, argument: str) -> None:
        if not self.screen.terminal:
            return
        if os.name == "nt" and not self.screen.colour:
            os.system("cls")
        else:
            self.screen.write_raw("\033[2J\033[3J\033[H")

    def cmd_quit(self, argument: str) -> None:
        raise EOFError      # leaves exactly as the end of input does


COMMANDS: Dict[str, Command] = {
    "help": Command("", "show this list", ChatSession.cmd_help),
    "clients": Command("", "who is here", ChatSession.cmd_clients),
    "w": Command("NAME TEXT", "whisper: only NAME sees TEXT", ChatSession.cmd_whisper),
    "me": Command("ACTION", "say what you do: /me waves", ChatSession.cmd_me),
    "history": Command("[N]", "show the last N messages (20 if no N)", ChatSession.cmd_history),
    "search": Command("WORDS", "find messages holding all the words", ChatSession.cmd_search),
    "save": Command("[FILE]", "save this session as text; -f overwrites",
                    ChatSession.cmd_save),
    # Password commands ask for what is left out, without echo; scripts give it inline.
    "register": Command("[PASSWORD]", "protect your name with a password (8 or more "
                        "characters)", ChatSession.cmd_register),
    "unregister": Command("[PASSWORD]", "remove your name's password",
                          ChatSession.cmd_unregister),
    "password": Command("[OLD NEW]", "change your name's password", ChatSession.cmd_password),
    "clear": Command("", "clear the screen", ChatSession.cmd_clear),
    "quit": Command("", "leave the chat; so does Ctrl-D", ChatSession.cmd_quit),
    "op": Command("[PASSWORD]", "become an operator with the operator password",
                  ChatSession.cmd_op),
    "deop": Command("", "stop being an operator", ChatSession.cmd_deop, True),
    "kick": Command("NAME [REASON]", "disconnect someone", moderation_command("kick"), True),
    "ban": Command("NAME|ADDRESS [MINUTES] [REASON]", "keep someone out",
                   moderation_command("ban"), True),
    "unban": Command("NAME|ADDRESS", "lift a ban", moderation_command("unban"), True),
    "bans": Command("", "list the bans", moderation_command("bans"), True),
    "mute": Command("NAME [MINUTES]", "let someone read but not send",
                    moderation_command("mute"), True),
    "unmute": Command("NAME", "let them send again", moderation_command("unmute"), True),
    "announce": Command("TEXT", "an announcement to everyone", moderation_command("say"), True),
    "shutdown": Command("", "stop the server", moderation_command("shutdown"), True),
}
ALIASES: Dict[str, str] = {"who": "clients", "msg": "w", "whisper": "w", "exit": "quit"}
PASSWORD_COMMANDS = frozenset({"op", "register", "unregister", "password"})


def command_help_lines() -> List[str]:
    lines = []
    for operators in (False, True):
        if operators:
            lines.append("for operators (after /op):")
        for name, command in COMMANDS.items():
            if command.for_operators != operators:
                continue
            aliases = [f"/{alias}" for alias, target in ALIASES.items() if target == name]
            label = f"/{name} {command.usage}".strip()
            also = f" (also {', '.join(aliases)})" if aliases else ""
            if len(label) > 20:     # a long usage gets a line of its own
                lines.append(f"  {label}")
                label = ""
            lines.append(f"  {label:<20} {command.summary}{also}")
        if not operators:
            lines += [
                f"  {'//text':<20} send a line that starts with /; \\\\text, one with \\",
                "  Backslash works as well as slash (\\quit, \\clients); after a backslash,",
                "  a word of letters is always a command, anything else (\\o/) is chat.",
                "  A password left out is asked for, and not shown; a new one twice."]
            lines.append("  Keys: Up/Down recall lines, Tab completes names and commands.")
    return lines


def save_transcript(lines: List[str], path: Optional[str], overwrite: bool) -> str:
    """Write lines to path, or to a new dated file here; return the absolute path.

    Never replaces an existing file unless overwrite is set: FileExistsError.
    """
    if path is None:
        base = f"chat-{datetime.now():%Y-%m-%d-%H%M}"
        candidates = [f"{base}.txt"] + [f"{base}-{number}.txt" for number in range(2, 1000)]
    else:
        candidates = [os.path.expanduser(path)]
    for candidate in candidates[:-1]:
        try:
            return write_new_file(candidate, lines, overwrite)
        except FileExistsError:
            continue        # that name is taken: try the next one
    return write_new_file(candidates[-1], lines, overwrite)


def write_new_file(path: str, lines: List[str], overwrite: bool) -> str:
    with open(path, "w" if overwrite else "x", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    return os.path.abspath(path)


def holds_password(line: str) -> bool:
    """Whether a typed line carries a password (/op PASSWORD, /register PASSWORD, ...)."""
    command, argument = parse_line(line)
    return bool(argument) and ALIASES.get(command, command) in PASSWORD_COMMANDS


# ---------------------------------------------------------------------------
# Start-up: the command line, and joining
# ---------------------------------------------------------------------------

def split_address(target: str, port: Optional[int]) -> Tuple[str, int, Optional[str]]:
    """HOST, HOST:PORT or [IPv6]:PORT, with an optional #FINGERPRINT, and maybe a PORT.

    The fingerprint is "" for a "#" with nothing after it (an error, not plain TCP).
    """
    target, hash_sign, fingerprint = target.partition("#")
    host = target
    if target.startswith("[") and "]" in target:
        host, _, after = target[1:].partition("]")
        if after.startswith(":") and after[1:].isdigit() and port is None:
            port = int(after[1:])
    elif target.count(":") == 1:
        name, _, maybe_port = target.partition(":")
        if maybe_port.isdigit() and port is None:
            host, port = name, int(maybe_port)
    return host, DEFAULT_PORT if port is None else port, fingerprint if hash_sign else None


def read_name() -> str:
    """Ask for a name on the terminal (piped input must give one with --name) until
    it follows the server's rules (NAME_PATTERN, in the shared block)."""
    while True:
        name = input("your name: ").strip()
        if NAME_PATTERN.fullmatch(name):
            return name
        if name:
            print(f"! Names are {NAME_RULES}.", file=sys.stderr)


class GiveUp(Exception):
    """Joining failed in a way asking again cannot fix."""


class Joiner:
    """Joins the chat, asking again for whatever the server refused.

    FIXES names the method that asks the user for a better name or a
    password, for each refusal the protocol says to ask again about (ASK_AGAIN);
    any other refusal ends the attempt.
    """

    def __init__(self, host: str, port: int, name: Optional[str], credentials: Credentials,
                 tls: Optional[TlsOptions], interactive: bool) -> None:
        self.host, self.port = host, port
        self.name_from_flag = name is not None
        self.name = name
        self.credentials = credentials
        self.tls = tls
        self.interactive = interactive

    def run(self) -> Tuple[ServerConnection, dict]:
        if not self.name:
            self.name = read_name()
        while True:
            try:
                return join(self.host, self.port, self.name, self.credentials, self.tls)
            except JoinRefused as refused:
                print(f"! {refused.text}", file=sys.stderr)
                fix = self.FIXES.get(ASK_AGAIN.get(refused.code, ""))
                if fix is None or not fix(self):
                    raise GiveUp() from None

    def ask_name(self) -> bool:
        if not self.interactive:    # the next input line is chat, not a better name
            return False
        self.name = read_name()
        self.credentials.name_password = os.environ.get("CHAT_NAME_PASSWORD")
        return True

    def ask_room_password(self) -> bool:
        if not self.interactive:
            print("  (give it with --password or the CHAT_PASSWORD environment variable)",
                  file=sys.stderr)
            return False
        self.credentials.password = getpass.getpass("room password: ")
        return True

    def ask_name_password(self) -> bool:
        if not self.interactive:
            print("  (give it in the CHAT_NAME_PASSWORD environment variable)", file=sys.stderr)
            return False
        password = getpass.getpass(f"password for {self.name} (Enter to pick another name): ")
        if not password:
            return self.ask_name()
        self.credentials.name_password = password
        return True

    #: What to ask again for, by what the server refused (ASK_AGAIN in the shared block).
    FIXES: Dict[str, Callable[["Joiner"], bool]] = {
        "name": ask_name,
        "room password": ask_room_password,
        "name password": ask_name_password,
    }


def name_argument(text: str) -> str:
    if not NAME_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a name: names are {NAME_RULES}")
    return text


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return int(text)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Terminal chat client. Type a line to send it to everyone; lines\n"
                    "starting with / are commands. With input piped in, it sends each\n"
                    "line and exits once the server has them all, printing only the\n"
                    "answers to its commands (errors on stderr) unless --show-chat.",
        epilog="commands in the chat:\n" + "\n".join(command_help_lines()) +
               "\n\nexit status: 0 after /quit or the end of input; 1 when the\n"
               "connection fails or is lost; 2 for a usage error (a bad option,\n"
               "piped input without --name, a join string without a fingerprint).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", nargs="?", default=DEFAULT_HOST,
                        help=f"server name or IP address; HOST:PORT works too, and so does "
                             f"the server's join string HOST:PORT#FINGERPRINT, which means "
                             f"--tls (default: {DEFAULT_HOST})")
    parser.add_argument("port", nargs="?", type=port_number, default=None,
                        help=f"server port (default: {DEFAULT_PORT})")
    parser.add_argument("--name", type=name_argument,
                        help=f"your name in the chat: {NAME_RULES} (asked for when not "
                             "given; required when input is piped)")
    parser.add_argument("--show-chat", action="store_true",
                        help="with input piped in, print the whole chat on stdout (the "
                             "history replay, messages, joins and leaves), not only the "
                             "answers to the commands piped in; errors go to stderr either way")
    parser.add_argument("--log", metavar="FILE",
                        help="append every line of the session to FILE as plain text, "
                             "each dated, under a header saying who, where and when")
    parser.add_argument("--no-color", action="store_true",
                        help="no colours (also when the NO_COLOR environment variable is set, "
                             "or output is not a terminal)")
    parser.add_argument("--bell", action="store_true",
                        help="ring the terminal bell on whispers and mentions of your name")
    parser.add_argument("--retries", type=int, default=RECONNECT_TRIES, metavar="N",
                        help="reconnect attempts after a dropped connection, with growing "
                             f"pauses; 0 exits instead (default: {RECONNECT_TRIES})")
    parser.add_argument("--password",
                        help="the room password, if the server has one (safer in the "
                             "CHAT_PASSWORD environment variable; asked for when needed). "
                             "A registered name's password comes from CHAT_NAME_PASSWORD, "
                             "or is asked for")
    security = parser.add_argument_group("TLS (for servers started with --tls-cert)")
    security.add_argument("--tls", action="store_true",
                          help="connect with TLS; the first time, the server's certificate "
                               "fingerprint is shown and remembered, and a later change is "
                               "refused")
    security.add_argument("--cafile", metavar="FILE",
                          help="verify the server's certificate against these CA "
                               "certificates instead (implies --tls)")
    security.add_argument("--insecure", action="store_true",
                          help="do not check the server's certificate at all (implies --tls; "
                               "warns)")
    security.add_argument("--known-hosts", metavar="FILE", default=KNOWN_HOSTS,
                          help="where remembered fingerprints are kept "
                               f"(default: {KNOWN_HOSTS})")
    return parser


def configure_text_streams() -> None:
    """Never die on text the terminal cannot encode or bytes that are not text."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass


def ask_yes_no(question: str) -> bool:
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        print()
        return False


def wants_colour(no_color_flag: bool) -> bool:
    """Colour unless --no-color or NO_COLOR (any non-empty value, see no-color.org)."""
    return not no_color_flag and not os.environ.get("NO_COLOR")


def secret_prompt(terminal: Optional[object], screen: Screen) -> Callable[[str], str]:
    """getpass, with the terminal in its normal mode and messages held back meanwhile.

    Ctrl-C or Ctrl-D at the prompt cancels the command that asked (an empty answer).
    """
    def ask(prompt: str) -> str:
        mode = terminal.normal_mode() if terminal is not None else contextlib.nullcontext()
        with screen.held():
            try:
                with mode:
                    return getpass.getpass(prompt)
            except (EOFError, KeyboardInterrupt):   # cancels the command, not the chat
                print()     # ends the prompt's line before the held-back lines come
        screen.show(notice_line("cancelled", role=ANSWER))
        return ""
    return ask


def tls_options(args: argparse.Namespace, fingerprint: Optional[str],
                interactive: bool) -> Optional[TlsOptions]:
    """How to check the server's certificate, or None for plain TCP."""
    if not (args.tls or args.cafile or args.insecure or fingerprint):
        return None
    return TlsOptions(cafile=args.cafile, insecure=args.insecure, pinned=fingerprint,
                      known_hosts=os.path.expanduser(args.known_hosts),
                      confirm=ask_yes_no if interactive else None)


def first_join(joiner: Joiner) -> Optional[Tuple[ServerConnection, dict]]:
    """Join, asking for whatever the server wants; None, after saying why, if that fails."""
    try:
        return joiner.run()
    except CannotConnect as exc:
        print("\n".join(line.plain for line in error_lines(str(exc))), file=sys.stderr)
    except GiveUp:
        pass
    except EOFError:    # Ctrl-D at a question (piped input is never asked anything)
        print("\ninput ended before joining; leaving", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
    return None


def read_lines(session: ChatSession, screen: Screen, terminal: Optional[object],
               interactive: bool) -> int:
    """Hand each typed (or piped) line to the session until input ends; the exit status."""
    try:
        if terminal is not None:
            with terminal:
                screen.editor = LineEditor(terminal, sys.stdout, complete=session.complete,
                                           private=holds_password, lock=screen.lock)
                try:
                    while True:
                        session.handle_line(screen.editor.read_line())
                finally:
                    screen.editor = None
        else:
            while True:
                session.handle_line(input())
    except (EOFError, KeyboardInterrupt):
        session.leave()
        if interactive:
            print(f"{NOTICE_MARK}you left the chat")
    except ConnectionLost:
        return 1
    return 1 if session.lost_reason else 0


def piped_routes(show_chat: bool) -> Dict[str, Optional[TextIO]]:
    """Where each role of line goes when a script pipes its input in (see CHAT)."""
    return {CHAT: sys.stdout if show_chat else None, ANSWER: sys.stdout,
            ERROR: sys.stderr, NOTE: sys.stderr, HINT: None}


def join_string_problem(target: str, fingerprint: str) -> str:
    """Why HOST:PORT#FINGERPRINT cannot be used: found before anything is sent."""
    what = f'"{fingerprint}" is not 64 hexadecimal digits' if fingerprint else \
        "nothing is there"
    return (f'the join string "{target}" has no certificate fingerprint after "#" ({what}); '
            "copy the whole join string the server printed")


def usage_error(parser: argparse.ArgumentParser, text: str) -> int:
    """A mistake in how the client was started: one line, and argparse's exit status."""
    print(f"{parser.prog}: error: {text}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error("--retries must be 0 or more")
    configure_text_streams()
    host, port, fingerprint = split_address(args.host, args.port)
    interactive = sys.stdin.isatty()
    if not interactive and not args.name:   # the first line is chat, not a name
        return usage_error(parser, "with input piped in, give a name with --name "
                                   "(there is nobody to ask)")
    if fingerprint is not None and not is_fingerprint(fingerprint):
        return usage_error(parser, join_string_problem(args.host, fingerprint))
    if interactive:
        # Ctrl-C must leave even when a launcher started us with SIGINT ignored (a shell
        # script's background job, some IDE consoles): Python raises KeyboardInterrupt
        # only for a SIGINT it inherited as default.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    tls = tls_options(args, fingerprint, interactive)
    credentials = Credentials(password=args.password or os.environ.get("CHAT_PASSWORD"),
                              name_password=os.environ.get("CHAT_NAME_PASSWORD"))
    log_file = None
    if args.log:
        try:
            log_file = open(os.path.expanduser(args.log), "a", encoding="utf-8")
        except OSError as exc:
            print(f"error: cannot write the log {args.log}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
    styled = terminal_is_capable(sys.stdout)
    screen = Screen(sys.stdout, terminal=styled, colour=styled and wants_colour(args.no_color),
                    bell=args.bell, log_file=log_file,
                    routes=None if interactive else piped_routes(args.show_chat),
                    name_colours=NAME_COLOURS_256 if colour_depth() >= 256 else NAME_COLOURS_16)
    joiner = Joiner(host, port, args.name, credentials, tls, interactive)
    joined = first_join(joiner)
    if joined is None:
        return 1
    connection, welcome = joined

    def rejoin(resume: Optional[str]) -> Tuple[ServerConnection, dict]:
        again = dataclasses.replace(joiner.credentials, resume=resume)
        return join(host, port, welcome["name"], again, tls)

    terminal = open_terminal(sys.stdin) if interactive and styled else None
    waker = MainThreadWaker()
    waker.install()
    session = ChatSession(connection, welcome, join_address(host, port), screen,
                          on_lost=waker.wake,
                          ask_secret=secret_prompt(terminal, screen) if interactive else None,
                          rejoin=rejoin, retries=args.retries, credentials=joiner.credentials)
    session.show_banner(welcome)
    session.start()
    return read_lines(session, screen, terminal, interactive)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConnectionLost:  # arrived after main() had already returned
        sys.exit(1)
    except KeyboardInterrupt:   # a second Ctrl-C while leaving
        sys.exit(130)
