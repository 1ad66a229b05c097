#!/usr/bin/env python3
"""Terminal client for the local-network chat: one file, standard library only.

Usage::

    python client.py                            # a server on this machine, port 5050
    python client.py 192.168.1.23               # a server on another machine
    python client.py 192.168.1.23 6000 --name alice
    printf 'hello\\n' | python client.py --name bot    # scripts: send lines, exit at EOF

Type a line and press Enter to send it to the room you are in (#lobby at
first). Commands start with "/" (or "\\"): /help lists them.

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
   threads share lives in the link, under one lock: among it, what the
   client knows of its rooms (:class:`RoomList`, sans-IO: which is current,
   who is in each, what is unread) and how each batch of history is
   labelled (:class:`HistoryBatches`).
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
import textwrap
import threading
import time
import unicodedata
import zlib
from collections import deque
from datetime import date, datetime
from typing import (Any, Callable, Deque, Dict, FrozenSet, Iterable, Iterator, List, Mapping,
                    NamedTuple, Optional, Set, TextIO, Tuple, Union)

try:
    import ssl
except ImportError:     # Python built without OpenSSL: everything but --tls still works
    ssl = None  # type: ignore

DEFAULT_HOST = "localhost"
CONNECT_TIMEOUT = 10.0      # seconds to reach the server
HANDSHAKE_TIMEOUT = 10.0    # seconds for the server to answer hello
PASSWORD_NOTE_AFTER = 0.5   # seconds of a password's check before the user is told of it
LEAVE_TIMEOUT = 5.0         # seconds to wait for the server to confirm we left
ANSWER_TIMEOUT = 5.0        # seconds to wait for the server to act on /join, /part, /nick
RECONNECT_TRIES = 6         # attempts after a dropped connection (--retries)
RECONNECT_FIRST_DELAY = 0.5     # seconds before the first attempt; doubled each time
RECONNECT_MAX_DELAY = 15.0
# A refused reconnect ends the session (its questions are asked only before the chat
# starts, with the terminal not yet the chat's); these say what to do next.
REJOIN_HINTS = {code: " Start the client again with the password (--password, or the "
                      "CHAT_PASSWORD environment variable)."
                for code in ("password_required", "bad_password")}
MAX_QUEUED_LINES = 100      # lines typed while disconnected, kept to send later
WAKE_RETRY = 0.1            # seconds between signals that wake the main thread (POSIX)
TRANSCRIPT_LINES = 100_000  # lines of this session kept for /save
INPUT_HISTORY = 500         # lines Up and Down can recall
RECV_SIZE = 64 * 1024
KNOWN_HOSTS = os.path.join(os.path.expanduser("~"), ".chat_known_hosts")
PROMPT = "> "               # after the current room's name: "#dev> "
LOBBY = "lobby"             # everyone's first room
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
RESERVED_NAMES = frozenset({"server", "system", "nickserv"})     # compared in lower case
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


def _json_writer() -> Callable[[Any], str]:
    """A function from a value to compact JSON text, made once.

    JSONEncoder.encode() sets up a new C encoder for every call, which costs
    more than encoding a chat message; this one is set up once. Without the C
    encoder (another Python than CPython) it is the plain encoder's encode().
    """
    plain = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
    make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if make_encoder is None:
        return plain.encode
    chunks = make_encoder(None, plain.default, json.encoder.encode_basestring, None,
                          ":", ",", False, False, True)
    return lambda value: "".join(chunks(value, 0))


to_json = _json_writer()


def _not_json(word: str) -> None:
    """Python's json reads NaN and Infinity, which JSON has not: refused as other bad JSON."""
    raise ValueError(f"{word} is not JSON")


# The decoder's scanner, called directly: raw_decode() is a Python wrapper around it
# that only turns its StopIteration (no value at all) into a ValueError.
_scan_json = json.JSONDecoder(parse_constant=_not_json).scan_once


def encode_frame(message: dict) -> bytes:
    """Return one frame: the length header, then the message as UTF-8 JSON.

    Raises ValueError when the payload would be over MAX_PAYLOAD or the
    message holds text that UTF-8 cannot carry (lone surrogates).
    """
    return frame_of(to_json(message).encode("utf-8"))


_HEADER_FORMAT = b"%%-%dd" % HEADER_LENGTH     # b"%-10d": made once, not for every frame
# The headers of payloads under 1 KiB (nearly every frame), made once: formatting one
# costs more than the rest of frame_of. They take 50 KiB.
_SHORT_PAYLOAD = 1024
_SHORT_HEADERS = [_HEADER_FORMAT % size for size in range(_SHORT_PAYLOAD)]
_SHORT_LENGTHS = {header: size for size, header in enumerate(_SHORT_HEADERS)}   # and back


def frame_of(payload: bytes) -> bytes:
    """A payload behind its length header (ValueError when over MAX_PAYLOAD)."""
    size = len(payload)
    if size < _SHORT_PAYLOAD:
        return _SHORT_HEADERS[size] + payload
    if size > MAX_PAYLOAD:
        raise ValueError(f"payload of {size} bytes is over the {MAX_PAYLOAD}-byte limit")
    return _HEADER_FORMAT % size + payload    # bytes %: 3x an f-string's speed


def buffer_with(buffer: Union[bytes, bytearray], start: int,
                data: bytes) -> Union[bytes, bytearray]:
    """What is left of a read buffer from start, with the bytes of the next read after it.

    While nothing waits, a read's bytes are kept as they came: cut from bytes,
    a frame (or a line) is bytes with no copy more, where from a bytearray each
    would be copied once more. What goes on into the next read is kept in a
    bytearray, appended to in place. A caller's bytearray (one it may read into
    again) is copied, never grown.
    """
    if not buffer:
        return data if type(data) is bytes else bytearray(data)
    if type(buffer) is bytes:
        buffer = bytearray(buffer[start:])
    elif start:
        del buffer[:start]
    buffer += data
    return buffer


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

    __slots__ = ("_buffer", "_start", "ended")
    max_payload = MAX_PAYLOAD   # a subclass may take less (in the class: 8 bytes less a client)

    def __init__(self) -> None:
        # What has arrived and is not yet returned, from _start on. b"" while nothing
        # waits, so that a quiet connection keeps no buffer at all (see buffer_with).
        self._buffer: Union[bytes, bytearray] = b""
        self._start = 0
        self.ended = False  # the stream has ended: no more bytes will come

    def feed(self, data: bytes) -> None:
        self._buffer = buffer_with(self._buffer, self._start, data)
        self._start = 0

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
        payload = self.next_payload()
        if payload is None:
            raise StopIteration
        return payload

    def next_payload(self) -> Optional[bytes]:
        """The next complete payload, or None until more bytes come. Iterating
        calls this; a server calls it directly, which costs less a frame."""
        buffer, start = self._buffer, self._start
        body = start + HEADER_LENGTH
        header = buffer[start:body]
        # Nearly every header is one that frame_of writes for a short payload: found in
        # a table, for a third of the general check (a bytearray's is unhashable).
        length = _SHORT_LENGTHS.get(header) if type(header) is bytes else None
        if length is None or length > self.max_payload:
            length = self._payload_length(header)
        end = body + (length or 0)
        if length is None or end > len(buffer):
            if self.ended and self.buffered:
                raise ProtocolError("truncated",
                                    "the connection closed in the middle of a message")
            return None
        payload = bytes(buffer[body:end])
        if end == len(buffer):      # all taken: let the buffer go
            self._buffer, self._start = b"", 0
        else:
            self._start = end
        return payload

    def _payload_length(self, header: Union[bytes, bytearray]) -> Optional[int]:
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


JSON_SPACE = " \t\n\r"     # the whitespace JSON allows around a value


def decode_payload(payload: bytes) -> dict:
    """Parse one payload: a UTF-8 JSON object with a string "type"."""
    try:
        text = payload.decode("utf-8").strip(JSON_SPACE)
        # The scanner reads one value from the start; loads() would also check
        # that nothing comes after it, as this does.
        message, end = _scan_json(text, 0)
        if end != len(text):
            raise ValueError("more after the JSON value")
    except UnicodeDecodeError:
        raise ProtocolError("bad_utf8", "payload is not valid UTF-8") from None
    except (ValueError, StopIteration, RecursionError):
        raise ProtocolError("bad_json", "payload is not valid JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("bad_message", 'payload is not a JSON object with a string "type"')
    return message


# The fields a message may carry, as check_fields reads them: (name, type, required)
# for each. Tables of them are written as {"name": type, "optional?": type} and read
# once by field_rules(), not again for every message.
FieldRules = Tuple[Tuple[str, type, bool], ...]


def field_rules(fields: Dict[str, type]) -> FieldRules:
    """A table of fields, optional names ending in '?', as check_fields takes it."""
    return tuple((field.rstrip("?"), kind, not field.endswith("?"))
                 for field, kind in fields.items())


def check_fields(message: dict, rules: FieldRules) -> Optional[str]:
    """What is wrong with a message's fields (see field_rules), or None."""
    for name, kind, required in rules:
        if name in message:
            if type(message[name]) is not kind and kind is not object:  # true is no number
                return f'"{name}" must be {JSON_KINDS.get(kind, kind.__name__)}'
        elif required:
            return f'"{message["type"]}" needs a "{name}" field'
    return None


# How check_fields names each type to someone writing JSON.
JSON_KINDS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false",
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
    return _DROPPED.sub("", _SPACES.sub(" ", text)).strip()


# What clean_text changes, as two character classes, so that cleaning costs the same
# few nanoseconds a character whatever the text holds. isspace() is true of no
# character above U+3000; the controls (category Cc) are U+0000-001F and U+007F-009F.
_SPACES = re.compile("[%s]" % re.escape("".join(chr(code) for code in range(0x3001)
                                                if chr(code).isspace())))
_DROPPED = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff"     # controls and lone surrogates
                      "\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")   # bidi controls

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
                  note: Callable[[str], None]) -> bool:
    """Record (or replace) the fingerprint for HOST:PORT in the known-hosts file;
    whether that could be done.

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
        return False
    return True


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
        if remember_host(tls.known_hosts, where, found, note):
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
         tls: Optional[TlsOptions] = None, rooms: Iterable[object] = (LOBBY,),
         on_slow: Optional[Callable[[], None]] = None) -> Tuple[ServerConnection, dict]:
    """Connect and say hello; return the connection and the welcome message.

    The hello names the rooms to be in (each a name, or {"room": NAME, "key":
    KEY}), so the welcome lists nobody: a `room` frame for each room follows it,
    with who is there. Raises JoinRefused when the server says no,
    CannotConnect otherwise. on_slow is called once if no answer came within
    PASSWORD_NOTE_AFTER seconds: a server answers a wrong password 1 to 5 s late.
    """
    connection = ServerConnection.open(host, port, tls)
    where = join_address(host, port)
    hello = hello_frame(name, credentials or Credentials(), rooms)
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    try:
        connection.sock.settimeout(HANDSHAKE_TIMEOUT if on_slow is None else PASSWORD_NOTE_AFTER)
        try:
            connection.send(hello)
        except ValueError:      # the frame would be over the protocol's limit
            raise JoinRefused("bad_name", "That name (or password) is far too long.") from None
        while True:
            try:
                reply = connection.receive()
            except socket.timeout:
                if on_slow is None:
                    raise
                on_slow()
                on_slow = None
                connection.sock.settimeout(max(0.01, deadline - time.monotonic()))
                continue
            if reply["type"] == "welcome":
                problem = check_fields(reply, SERVER_RULES["welcome"])
                if problem:
                    connection.close()
                    raise CannotConnect(f"{where} sent a welcome this client cannot read "
                                        f"({problem}): is it a chat server of another version?")
                connection.sock.settimeout(None)
                return connection, reply
            if reply["type"] == "error" and not check_fields(reply, SERVER_RULES["error"]):
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
        hint = "is it a chat server's port, and not its IRC port?" + \
            (" (Or does it need --tls?)" if tls is None else "")
        raise CannotConnect(f"{where} does not speak the chat protocol: {hint}") from None
    except (ConnectionClosed, OSError):
        connection.close()
        raise CannotConnect(f"{where} closed the connection before we could join") from None


def hello_frame(name: str, credentials: Credentials, rooms: Iterable[object]) -> dict:
    """The hello: who we are, what proves it, and where we go."""
    hello = {"type": "hello", "name": name, "rooms": list(rooms)}
    for field, value in (("password", credentials.password),
                         ("name_password", credentials.name_password),
                         ("resume", credentials.resume)):
        if value is not None:
            hello[field] = value
    return hello


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


# Connects and says hello again: (name, resume token, rooms as a hello names them).
Rejoin = Callable[[str, Optional[str], List[object]], Tuple[ServerConnection, dict]]

# How a message fared on its way out (Link._transmit).
SENT, TOO_LONG, LOST, QUEUED = "sent", "too long", "lost", "queued"


class Awaited:
    """A request whose outcome the main thread waits for (Link.round_trip)."""

    def __init__(self, request_id: str, ping_id: str, quiet: FrozenSet[str]) -> None:
        self.request_id, self.ping_id, self.quiet = request_id, ping_id, quiet
        self.error: Optional[dict] = None   # how the server refused it
        self.done = threading.Event()       # its ping came back, or the connection went


class HistoryBatches:
    """How each batch of history frames is labelled, and what of it is shown.

    Sans-IO; the Link keeps it under its lock. Every batch ends with a
    history_end, and the server answers requests in order, so the batches
    come in the order they were asked for: each /history or /search gets a
    header, and an error carrying its id drops it. A room frame is followed
    at once by that room's replay, whose header therefore goes first. The
    replay is chat, a batch asked for is an answer. After a reconnect, a
    replay repeats what was on screen: only what came after `seen_until` is
    shown. A replay of which nothing was shown shows nothing at all, not
    even its header; an answer that found anything always has its header.
    The marker of what a returning name missed (a `new_since` notice) is
    held, and shown only before a frame after it that is shown.
    """

    def __init__(self) -> None:
        # (the request's id, or None for a room's replay; its header), in arrival order.
        self.headers: Deque[Tuple[Optional[str], str]] = deque()
        self.in_batch = False               # between a first history frame and history_end
        self.replay_after: Optional[str] = None     # in a replay after a reconnect
        self.held: Optional[dict] = None    # a new_since notice, until a frame is shown

    def asked(self, request_id: str, header: str) -> None:
        self.headers.append((request_id, header))

    def refused(self, request_id: str) -> None:
        self.headers = deque(entry for entry in self.headers if entry[0] != request_id)

    def replay_coming(self, room: str, seen_until: Optional[str]) -> None:
        """A room frame came; seen_until: we are rejoining, and saw it up to then."""
        self.replay_after = seen_until
        self.headers.appendleft((None, f"--- earlier messages in #{room} ---"
                                 if seen_until is None else
                                 f"--- in #{room} while you were away ---"))

    def new_connection(self) -> None:
        """Requests in flight on an old connection get no answer."""
        self.headers, self.in_batch = deque(), False

    def frame(self, message: dict) -> Tuple[Optional[str], List[Line]]:
        """The role of a history frame's line (None: show nothing), and the lines to
        show before it: the header at a batch's first frame shown, a held marker."""
        # (the request's id, its header); a batch nobody asked for is shown as an answer
        request, header = self.headers[0] if self.headers else ("unasked", "--- history ---")
        role = CHAT if request is None else ANSWER      # the replay has no request id
        if message["type"] == "notice":     # new_since: what follows is what was missed
            self.held = message
            return None, []
        if message["type"] == "history_end":
            if self.headers:
                self.headers.popleft()
            shown_any, self.in_batch, self.held = self.in_batch, False, None
            if message["for"] == "join":
                self.replay_after = None
            if shown_any or "text" in message:  # (the text: no history is kept)
                return role, []
            if request is None:
                return None, []
            return role, ([plain_line(header, "marker", role)] if message["count"] else [])
        if self.replay_after is not None and message["ts"] <= self.replay_after:
            return None, []     # part of the replay after a reconnect, and already on screen
        before = [] if self.in_batch else [plain_line(header, "marker", role)]
        if self.held is not None and not self.in_batch:
            if self.replay_after is not None:
                self.held = None    # the header ("while you were away") says it already
            else:
                before = []         # all of it is new: "earlier messages" would head nothing
        self.in_batch = True
        if self.held is not None:
            before.append(_show_notice(self.held, "")._replace(role=role))
            self.held = None
        return role, before


class Link:
    """The connection to the server, as the two threads of a session use it.

    The receiver thread (start) reads every frame the moment it arrives,
    shows it, and reconnects with growing pauses when the connection drops:
    rejoin(name, resume_token, rooms) connects and says hello again, under
    our name of the moment and into the rooms we were in; without it, or with
    retries=0, a dropped connection ends the session and on_lost() is
    called. The main thread sends through send(), round_trip() and
    ask_history().

    Everything both threads touch is under `lock`: the connection, the lines
    waiting to be sent and those not yet confirmed, the labels of history
    answers to come, our rooms and whom we ignore (`rooms`, a RoomList: the
    main thread reads and changes it inside state()), our name, operator
    status and the password to rejoin with. Nothing is shown while the lock
    is held: the screen's lock may be taken before this one (the prompt
    reads the current room), never inside it.
    """

    def __init__(self, connection: ServerConnection, welcome: dict, server: str,
                 screen: "Screen", on_lost: Optional[Callable[[], None]] = None, rejoin: Optional[Rejoin] = None,
                 retries: int = RECONNECT_TRIES,
                 credentials: Optional[Credentials] = None) -> None:
        self._name = welcome["name"]
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
        self._nick_password: Optional[str] = None   # sent with /nick: ours once renamed
        self._ids = 0
        self._awaited: List[Awaited] = []   # requests the main thread waits on (round_trip)
        self.batches = HistoryBatches()     # how each batch of history is labelled
        self.rooms = RoomList()
        self._operator = False              # the server accepted our /op
        self.registered: Optional[bool] = None  # our name's, as last told (None: not known)
        self.away = False               # whether the server has us away (see said())
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
        self._rejoining = False             # the room frames after a reconnect's welcome
        self._rejoin_ping: Optional[str] = None     # its pong: every room is back, or not
        self._receiver = threading.Thread(target=self._receive_loop, name="receiver", daemon=True)
        self._joined(connection, welcome)

    # -- for the main thread -------------------------------------------------

    @property
    def name(self) -> str:
        """Our name of the moment: /nick changes it."""
        with self.lock:
            return self._name

    @contextlib.contextmanager
    def state(self) -> Iterator[RoomList]:
        """Our rooms, under the lock: show nothing inside (see the class)."""
        with self.lock:
            yield self.rooms

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
        """Who is in our rooms, as far as this client knows (for Tab completion)."""
        with self.lock:
            return self.rooms.names()

    def expect_password(self, password: str) -> None:
        """A new password is on its way: the one to rejoin with once it is confirmed."""
        with self.lock:
            self._new_password = password

    def expect_nick(self, password: Optional[str]) -> None:
        """A /nick is on its way: with a password, the one to rejoin with once renamed."""
        with self.lock:
            self._nick_password = password

    def round_trip(self, request: dict, quiet: FrozenSet[str] = frozenset()) -> Optional[dict]:
        """Send request and wait until the server has acted on it; the error it got.

        A ping sent behind it comes back once it has (the server answers in
        order), so its effects (a room frame, a leave, a rename) have been
        seen when this returns, and a script's next line goes to the right
        room. At most ANSWER_TIMEOUT; at once when the connection is down.
        An error with a code in `quiet` is not shown: the caller deals with it.
        """
        with self.lock:
            request["id"] = self.new_id()
            awaited = Awaited(request["id"], self.new_id(), quiet)
            self._awaited.append(awaited)
        try:
            if self.send(request) and self.send({"type": "ping", "id": awaited.ping_id}):
                awaited.done.wait(ANSWER_TIMEOUT)
        finally:
            with self.lock:
                self._awaited.remove(awaited)
        return awaited.error

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
            request["id"] = self.new_id()
            self.batches.asked(request["id"], header)   # before: the answer may be quick
        if not self.send(request):
            with self.lock:
                self.batches.refused(request["id"])

    def leave(self, parting_words: str = "") -> None:
        """Say goodbye (with parting words, shown to those who shared a room with us),
        once the server has everything we typed, and close."""
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
                    self.connection.send({"type": "bye", "text": parting_words}
                                         if parting_words else {"type": "bye"})
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
                message["id"] = self.new_id()
            # Before sending: the acknowledgement may be quick.
            self.unconfirmed[message["id"]] = unsent_text(message)
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

    def new_id(self) -> str:
        """An id for a message, which the server's answer to it carries back."""
        with self.lock:
            self._ids += 1
            return str(self._ids)

    # -- receiving and reconnecting (the receiver thread) ---------------------

    def start(self) -> None:
        self._receiver.start()

    def _joined(self, connection: ServerConnection, welcome: dict,
                rejoining: bool = False) -> None:
        """Take a fresh connection into use. The room frames that follow the welcome
        tell which rooms we are in; after a reconnect, a ping sent behind the hello
        comes back once they all have (see _ponged)."""
        limits = welcome.get("limits") or {}
        limit = limits.get("max_length")
        with self.lock:
            self.connection = connection
            self.resume_token = welcome.get("resume")
            self.pacer = Pacer(limits)
            self._max_length = limit if isinstance(limit, int) and limit > 0 else 0
            self._operator = False  # operator status does not survive a new connection,
            self.away = False       # nor being away
            self.registered = welcome.get("registered") is True
            self.no_operators = welcome.get("op_password") is False    # (absent: not said)
            self.batches.new_connection()
            self._rejoining = rejoining
            if rejoining:
                self.rooms.reconnecting()
                self._rejoin_ping = self.new_id()
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
                self.connection.close()         # dead; reconnecting makes a new one
                for awaited in self._awaited:   # no answer can come now
                    awaited.done.set()
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
                with self.lock:
                    hello = (self._name, self.resume_token, self.rooms.for_hello())
                connection, welcome = self.rejoin(*hello)
            except JoinRefused as refused:
                return f"cannot rejoin: {refused.text}{REJOIN_HINTS.get(refused.code, '')}"
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
                self._joined(connection, welcome, rejoining=True)
                queued, self.queued = self.queued, []
                outcomes = [self._transmit(message) for message in queued]
                self._send_quietly({"type": "ping", "id": self._rejoin_ping})
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
        rules = SERVER_RULES.get(kind)
        if rules is None:
            return      # from a newer server; nothing we know how to show
        problem = check_fields(message, rules)
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
            prompt = self.rooms.prompt()
            about = self.rooms.about(message, self._name)   # before the update: where they were
            hidden = self._quiet(message) or self.rooms.ignoring(message)
            notes = self._take_in(message)
            missed = kind == "history" and self.batches.replay_after is not None
        # What is hidden has no part in a batch of history: a replay of it shows nothing.
        in_batch = kind.startswith("history") or \
            kind == "notice" and message["code"] == "new_since"     # the marker of a replay
        batch_role = self._show_history_frame(message) if in_batch and not hidden else ""
        lines = [] if batch_role is None or hidden else format_message(message, self.name)
        with self.lock:
            lines = self.rooms.place(lines, message, about, missed)
            prompt_changed = self.rooms.prompt() != prompt
        for line in lines + notes:
            self.screen.show(line._replace(role=batch_role) if batch_role else line)
        if prompt_changed:
            self.screen.refresh()

    def _take_in(self, message: dict) -> List[Line]:
        """What a frame changes in what we know (lock held); notes to show after it."""
        settle = self.SETTLES.get(message["type"])
        notes = settle(self, message) if settle is not None else []
        note = self.rooms.update(message, self._name)
        return notes + ([notice_line(note)] if note else [])

    def _confirmed(self, message: dict) -> List[Line]:
        self.unconfirmed.pop(message.get("id", ""), None)
        return []

    def _refused(self, message: dict) -> List[Line]:
        if "id" in message:
            self.unconfirmed.pop(message["id"], None)
            self.batches.refused(message["id"])     # a refused /history or /search
            for awaited in self._awaited:
                if awaited.request_id == message["id"]:
                    awaited.error = message
        return []

    def _noticed(self, message: dict) -> List[Line]:
        effect = self.NOTICE_EFFECTS.get(message["code"])
        if effect is not None:
            effect(self)
        return []

    def _renamed(self, message: dict) -> List[Line]:
        """Someone's new name; when ours, everything follows: mentions, the name to
        reconnect under (with the password /nick gave, if any)."""
        old, new = message["name"].lower(), clean_text(message["new"])
        if old == self._name.lower():
            self._name = new
            if self._nick_password is not None:
                self.credentials.name_password = self._nick_password
            self.registered = True if self._nick_password is not None else None
            self._nick_password = None
        return []

    def _away_changed(self, message: dict) -> List[Line]:
        if message["name"].lower() == self._name.lower():
            self.away = isinstance(message.get("text"), str)
        return []

    def _ponged(self, message: dict) -> List[Line]:
        for awaited in self._awaited:
            if awaited.ping_id == message.get("id"):
                awaited.done.set()
        if self._rejoin_ping is None or message.get("id") != self._rejoin_ping:
            return []
        self._rejoin_ping, self._rejoining = None, False
        lost, note = self.rooms.drop_unconfirmed()  # the server said why, just before
        return [error_line(f"could not rejoin #{name}") for name in lost] + \
            ([notice_line(note)] if note else [])

    def _room_arrived(self, message: dict) -> List[Line]:
        """A room frame: its replay follows at once, labelled with its room; after a
        reconnect, only what came since we last saw it there is shown."""
        room = self.rooms.get(message["room"])
        seen_until = (room.seen_until if room is not None else "") if self._rejoining else None
        self.batches.replay_coming(clean_text(message["room"]), seen_until)
        return []

    #: What a frame settles among our requests and about ourselves (lock held); the
    #: rooms have their own table (RoomList.UPDATES).
    SETTLES: Dict[str, Callable[["Link", dict], List[Line]]] = {
        "sent": _confirmed,
        "error": _refused,
        "notice": _noticed,
        "nick": _renamed,
        "away": _away_changed,
        "pong": _ponged,
        "room": _room_arrived,
    }

    def _set_operator(self, operator: bool) -> None:
        self._operator = operator

    def _password_confirmed(self) -> None:
        self.credentials.name_password = self._new_password
        self.registered = True

    def _password_removed(self) -> None:
        self.credentials.name_password = None
        self.registered = False

    #: Notices that change what this client knows about itself (run with the lock held).
    NOTICE_EFFECTS: Dict[str, Callable[["Link"], None]] = {
        "op": lambda link: link._set_operator(True),
        "deop": lambda link: link._set_operator(False),
        "registered": _password_confirmed,
        "password_changed": _password_confirmed,
        "unregistered": _password_removed,
    }

    def _quiet(self, message: dict) -> bool:
        """Whether a frame is an error that whoever waits for it deals with (lock held)."""
        return message["type"] == "error" and any(
            awaited.request_id == message.get("id") and message["code"] in awaited.quiet
            for awaited in self._awaited)

    def _show_history_frame(self, message: dict) -> Optional[str]:
        """The role of a history frame's line, or None to show nothing; shows the
        header of its batch first (see HistoryBatches)."""
        with self.lock:
            role, before = self.batches.frame(message)
        for line in before:
            self.screen.show(line)
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
            self.screen.warn(f"not sent: {unsent_text(message)}")

    def _send_quietly(self, message: dict) -> None:
        try:
            self.connection.send(message)
        except OSError:
            pass    # the receiver will see the connection go and say so


def unsent_text(message: dict) -> str:
    """How a request that may be lost is named to its writer: a whisper with whom
    it was for, a command by its name."""
    if message["type"] == "whisper":
        return f"[whisper to {message['to']}] {message['text']}"
    return message.get("text", "/" + message["type"])


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
# What the client knows of its rooms
# ---------------------------------------------------------------------------

def now_in(room: str, unread: int) -> str:
    """What is said when the current room changes: from here on, lines without a
    room tag are of this one."""
    marked = "1 unread line above is" if unread == 1 else f"{unread} unread lines above are"
    return f"now in #{room}" + (f"; its {marked} marked #{room}" if unread else "")


@dataclasses.dataclass
class RoomView:
    """One room this client is in, as far as its frames tell."""

    name: str                       # as the server spells it
    key: str = ""                   # to rejoin it with after a reconnect
    topic: str = ""
    members: Dict[str, str] = dataclasses.field(default_factory=dict)    # lower -> name
    ops: Set[str] = dataclasses.field(default_factory=set)  # lower-case: its operators
    unread: int = 0                 # messages shown while another room was current
    seen_until: str = ""            # ts of the newest message shown from it
    confirmed: bool = True          # False while reconnecting, until its room frame


class RoomList:
    """The rooms this client is in, in the order it joined them; which one is
    current (where typed lines go); who is in each; and whom we ignore.

    Sans-IO like the decoder: frames go in through update(), which returns a
    note to show, if any, and place() says which rooms the lines shown for a
    frame belong to. The Link keeps it under its lock. A room asked for with
    /join becomes current when its `room` frame arrives, so that its replay
    is shown as the current room's; leaving (or being kicked from) the
    current room goes back to the room current before it.
    """

    def __init__(self) -> None:
        self.rooms: Dict[str, RoomView] = {}    # lower-case name -> room
        self.current: Optional[str] = None      # lower-case name
        self.previous: Optional[str] = None
        self.joining: Set[str] = set()          # asked for with /join: current on arrival
        self.listed: Dict[str, str] = {}        # rooms a /rooms answer named, for Tab
        # lower-case name -> name: their messages, actions and whispers are not shown.
        # Only here, for this session: the server never knows.
        self.ignored: Dict[str, str] = {}

    # -- questions ---------------------------------------------------------------

    def get(self, word: Optional[str]) -> Optional[RoomView]:
        """One of our rooms, by its name with or without "#", in any case."""
        return self.rooms.get((word or "").lstrip("#").lower())

    @property
    def here(self) -> Optional[RoomView]:
        return self.rooms.get(self.current or "")

    def prompt(self) -> str:
        """"#dev> ", with the messages waiting in the other rooms: "#dev (3 unread)> "."""
        here = self.here
        if here is None:
            return PROMPT
        unread = sum(room.unread for room in self.rooms.values() if room is not here)
        return f"#{here.name} ({unread} unread){PROMPT}" if unread else f"#{here.name}{PROMPT}"

    def for_hello(self) -> List[object]:
        """Our rooms as a hello names them, with their keys, to rejoin them."""
        return [{"room": room.name, "key": room.key} if room.key else room.name
                for room in self.rooms.values()]

    def shared_with(self, name: str) -> Tuple[str, ...]:
        """The names of our rooms that `name` is in."""
        return tuple(room.name for room in self.rooms.values() if name.lower() in room.members)

    def names(self) -> List[str]:
        """Everyone in any of our rooms."""
        people: Dict[str, str] = {}
        for room in self.rooms.values():
            people.update(room.members)
        return list(people.values())

    def room_names(self) -> List[str]:
        """Our rooms and those /rooms listed."""
        return list({**self.listed, **{key: room.name for key, room in self.rooms.items()}}
                    .values())

    def ignoring(self, message: dict) -> bool:
        """Whether a frame is what someone we ignore said."""
        sender = message.get("from") if message["type"] in ("message", "whisper", "history") \
            else None
        return isinstance(sender, str) and sender.lower() in self.ignored

    def about(self, message: dict, me: str) -> Tuple[str, ...]:
        """For news about a person (a name change, being away, leaving the chat): the
        rooms we share with them, where such news is shown once."""
        kind = message["type"]
        if kind in ("nick", "away") or (kind == "leave" and "room" not in message):
            if message["name"].lower() != me.lower():
                return self.shared_with(message["name"])
        return ()

    def place(self, lines: List[Line], message: dict, about: Tuple[str, ...],
              missed: bool = False) -> List[Line]:
        """Lines with the rooms they belong to (their own, or those of `about`),
        marked when of the current room; and what of each room is seen, or unread
        (a message, or one missed while the connection was down: `missed`)."""
        placed = []
        for line in lines:
            rooms = line.rooms or about
            placed.append(line._replace(rooms=rooms, in_current_room=any(
                room.lower() == self.current for room in rooms)))
        kind = message["type"]
        said_in = message.get("room") or (LOBBY if kind == "message" else None)
        everywhere = "announcement" in (kind, message.get("kind"))   # in every room's history
        if placed and (said_in or everywhere) and isinstance(message.get("ts"), str) and \
                kind in ("message", "sent", "history", "announcement"):
            self.heard(said_in, message["ts"], unread=kind == "message" or missed)
        return placed

    # -- changes the person typing makes -------------------------------------

    def ignore(self, name: str, hide: bool) -> bool:
        """Hide (or show again) what name says; False when nothing changed."""
        if hide == (name.lower() in self.ignored):
            return False
        if hide:
            self.ignored[name.lower()] = name
        else:
            del self.ignored[name.lower()]
        return True

    def switch(self, room: RoomView) -> int:
        """Make room current; how many unread messages it had."""
        if room.name.lower() != self.current:
            self.previous, self.current = self.current, room.name.lower()
        unread, room.unread = room.unread, 0
        return unread

    def cycle(self, step: int) -> Optional[RoomView]:
        """The next room (step 1) or the one before (-1) becomes current."""
        order = list(self.rooms)
        if not order:
            return None
        at = order.index(self.current) if self.current in self.rooms else -1 if step > 0 else 0
        return self.rooms[order[(at + step) % len(order)]]

    # -- what the server says -----------------------------------------------------

    def update(self, message: dict, me: str) -> Optional[str]:
        change = self.UPDATES.get(message["type"])
        return change(self, message, me) if change is not None else None

    def heard(self, word: Optional[str], timestamp: str, unread: bool) -> None:
        """A message of a room was shown (of every room for None: an announcement)."""
        rooms = list(self.rooms.values()) if word is None else [self.get(word)]
        for room in rooms:
            if room is not None:
                room.seen_until = max(room.seen_until, timestamp)
                if unread and room is not self.here:
                    room.unread += 1

    def _entered(self, message: dict, me: str) -> Optional[str]:
        name = clean_text(message["room"])
        room = self.get(name) or RoomView(name)     # after a reconnect: keeps what it saw
        room.name, room.confirmed = name, True
        room.topic, room.key = clean_text(message.get("topic", "")), message.get("key", "")
        room.members = {str(user).lower(): clean_text(str(user)) for user in message["users"]}
        room.ops = {str(user).lower() for user in message.get("ops", [])}
        self.rooms[name.lower()] = room
        if name.lower() in self.joining or self.here is None:
            self.joining.discard(name.lower())
            self.switch(room)
        return None

    def _member_joined(self, message: dict, me: str) -> Optional[str]:
        room = self.get(message.get("room", LOBBY))
        if room is not None:
            room.members[message["name"].lower()] = clean_text(message["name"])
            if message.get("op"):   # back in a room it runs
                room.ops.add(message["name"].lower())
        return None

    def _member_left(self, message: dict, me: str) -> Optional[str]:
        name = message["name"].lower()
        if "room" not in message:   # left the chat, and so every room
            for room in self.rooms.values():
                room.members.pop(name, None)
            return None
        room = self.get(message["room"])
        if room is None:
            return None
        if name == me.lower():
            return self._gone(room)
        room.members.pop(name, None)
        return None

    def _gone(self, room: RoomView) -> Optional[str]:
        """We are out of a room; if it was current, back to the one before, or any."""
        del self.rooms[room.name.lower()]
        if room.name.lower() != self.current:
            return None
        self.current = None
        back = self.get(self.previous) or next(iter(self.rooms.values()), None)
        if back is None:
            return f"you are in no room now: /join #{LOBBY} (or another) to talk"
        return now_in(back.name, self.switch(back))

    def _renamed(self, message: dict, me: str) -> Optional[str]:
        old, new = message["name"].lower(), clean_text(message["new"])
        if self.ignored.pop(old, None) is not None:     # an ignore follows its person
            self.ignored[new.lower()] = new
        for room in self.rooms.values():
            if room.members.pop(old, None) is not None:
                room.members[new.lower()] = new
            if old in room.ops:
                room.ops.discard(old)
                room.ops.add(new.lower())
        return None

    def _operator_changed(self, message: dict, me: str) -> Optional[str]:
        room = self.get(message["room"])
        if room is not None:
            (room.ops.add if message["op"] else room.ops.discard)(message["name"].lower())
        return None

    def _topic_changed(self, message: dict, me: str) -> Optional[str]:
        room = self.get(message["room"])
        if room is not None:
            room.topic = clean_text(message["topic"])
        return None

    def _key_changed(self, message: dict, me: str) -> Optional[str]:
        room = self.get(message["room"])
        if room is not None:
            room.key = message["key"]
        return None

    def _listed_rooms(self, message: dict, me: str) -> Optional[str]:
        for entry in message["rooms"]:
            if isinstance(entry, dict) and isinstance(entry.get("room"), str):
                self.listed[entry["room"].lower()] = clean_text(entry["room"])
        return None

    #: How each frame changes what we know; a frame not listed changes nothing.
    UPDATES: Dict[str, Callable[["RoomList", dict, str], Optional[str]]] = {
        "room": _entered,
        "join": _member_joined,
        "leave": _member_left,
        "nick": _renamed,
        "room_op": _operator_changed,
        "topic": _topic_changed,
        "key": _key_changed,
        "rooms": _listed_rooms,
    }

    # -- reconnecting ---------------------------------------------------------------

    def reconnecting(self) -> None:
        """A new connection: each room counts again once its room frame comes."""
        for room in self.rooms.values():
            room.confirmed = False

    def drop_unconfirmed(self) -> Tuple[List[str], Optional[str]]:
        """Forget the rooms the rejoin did not bring back: their names, and a note if
        that changed the current room."""
        lost = [room for room in self.rooms.values() if not room.confirmed]
        note = None
        for room in lost:
            note = self._gone(room) or note
        return [room.name for room in lost], note


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
    `rooms` are the rooms it belongs to (most lines of a room carry its name;
    news about a person, the rooms we share with them): tagged() puts them
    after the time, "[14:05] #ops bob: hi", always in transcripts and logs,
    and on the screen unless the line is of the current room.
    """

    head: Tuple[Segment, ...]
    body: Tuple[Segment, ...]
    dim: bool = False
    ring: bool = False
    role: str = CHAT
    rooms: Tuple[str, ...] = ()
    in_current_room: bool = False

    @property
    def plain(self) -> str:
        return "".join(text for text, _ in self.head + self.body)

    def tagged(self, on_screen: bool) -> "Line":
        """The line with its rooms in front (after the time), as it is shown."""
        if not self.rooms or (on_screen and self.in_current_room):
            return self
        tag = (" ".join(f"#{room}" for room in self.rooms), "room")
        at = 1 if self.head and self.head[0][1] == "time" else 0
        return self._replace(head=self.head[:at] + (tag, (" ", "")) + self.head[at:])


def plain_line(text: str, style: str = "", role: str = CHAT) -> Line:
    return Line((), ((text, style),), role=role)


#: Fields each server message must carry, read once into SERVER_RULES for
#: check_fields. Messages of a type not listed here come from a newer server and
#: are ignored.
SERVER_MESSAGES: Dict[str, Dict[str, type]] = {
    "welcome": {"name": str, "users?": list, "count?": int, "ops?": list, "registered?": bool,
                "limits?": dict, "resume?": str, "needs_password?": bool,
                "op_password?": bool},
    "room": {"room": str, "users": list, "topic?": str, "topic_by?": str, "count?": int,
             "ops?": list, "key?": str},
    "message": {"from": str, "text": str, "room?": str, "ts?": str, "action?": bool,
                "notice?": bool},
    "whisper": {"from": str, "to": str, "text": str, "ts?": str, "action?": bool,
                "notice?": bool},
    "sent": {"text": str, "room?": str, "to?": str, "ts?": str, "action?": bool, "id?": str},
    "join": {"name": str, "room?": str, "ts?": str, "op?": bool},
    "invite": {"room": str, "by": str, "ts?": str},
    "leave": {"name": str, "room?": str, "reason?": str, "text?": str, "comment?": str,
              "ts?": str},
    "rooms": {"rooms": list, "more?": bool},
    "topic": {"room": str, "topic": str, "by?": str, "ts?": str, "id?": str},
    "key": {"room": str, "key": str, "by?": str, "ts?": str},
    "room_op": {"room": str, "name": str, "op": bool, "by?": str, "ts?": str,
                "server_operator?": bool},
    "nick": {"name": str, "new": str, "ts?": str},
    "away": {"name": str, "text?": object, "ts?": str},     # text: a string, or null: back
    "users": {"users": list, "room?": str, "ops?": list, "away?": list, "count?": int},
    "whois": {"name": str, "rooms?": list, "room_operator?": list, "away?": object,
              "operator?": bool, "registered?": bool, "idle?": int, "since?": str,
              "realname?": str},
    "announcement": {"from": str, "text": str, "ts?": str},
    "history": {"kind": str, "from": str, "text": str, "ts": str, "room?": str, "to?": str,
                "action?": bool},
    "history_end": {"for": str, "count": int, "room?": str, "text?": str},
    "error": {"code": str, "text": str, "id?": str},
    "notice": {"code": str, "text": str, "ts?": str},
    "shutdown": {"text?": str},
    "ping": {},
    "pong": {"id?": str},
}
SERVER_RULES = {kind: field_rules(fields) for kind, fields in SERVER_MESSAGES.items()}


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


def names_list(users: list, ops: Optional[list] = None,
               away: Optional[list] = None) -> Tuple[Segment, ...]:
    """Names, each in its colour, separated by commas; operators marked with @,
    those away with "(away)"."""
    operators = {str(name).lower() for name in ops or []}
    absent = {str(name).lower() for name in away or []}
    segments: List[Segment] = []
    for index, user in enumerate(users):
        name = clean_text(str(user))
        if index:
            segments.append((", ", ""))
        if name.lower() in operators:
            segments.append(("@", ""))
        segments.append((name, "name"))
        if name.lower() in absent:
            segments.append((" (away)", "notice"))
    return tuple(segments)


def chat_line(stamp: str, sender: str, text: str, me: str, kind: str = "message",
              to: str = "", dim: bool = False, action: bool = False,
              notice: bool = False) -> Line:
    """A message, whisper, action, notice or announcement, as it is shown.

    `me` is the reader's name: mentions of it are highlighted, and whispers
    read "to bob" or "from bob" depending on who sent them; a whisper that is
    an action (/me in an IRC query) then "* bob winks". A notice (an IRC
    NOTICE, which bots send so that nobody answers) rings no bell.
    """
    time_part = (f"[{stamp}] ", "time")
    mine = sender.lower() == me.lower()
    if kind == "whisper":
        other = to if mine else sender
        word = "notice" if notice else "whisper"
        head = (time_part, (f"[{word} to " if mine else f"[{word} from ", "whisper"),
                (other, "name"), ("] ", "whisper"))
        if action:
            head += (("* ", "action"), (sender, "name"), (" ", ""))
        return Line(head, ((text, ""),), dim, ring=not (mine or notice))
    if kind == "notice":
        return Line((time_part, ("-", "notice"), (sender, "name"), ("- ", "notice")),
                    ((text, "notice"),), dim)
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
    role = NOTICE_ROLES.get(message["code"]) if message["type"] == "notice" else \
        MESSAGE_ROLES.get(message["type"])
    return [line._replace(role=role) if role else line for line in lines]


def of_room(line: Line, message: dict) -> Line:
    """The line, as one of the room the message names (if it names one)."""
    room = message.get("room")
    return line._replace(rooms=(clean_text(room),)) if isinstance(room, str) and room else line


#: What each message is to the reader when it is not chat (see CHAT); where a type
#: is not listed, its formatter says (a topic asked for is an answer, one set is
#: chat). A batch of history is an answer, but for the replay that follows a
#: room frame (see Link).
MESSAGE_ROLES: Dict[str, str] = {
    "users": ANSWER, "rooms": ANSWER, "whois": ANSWER, "history": ANSWER,
    "history_end": ANSWER, "error": ERROR, "shutdown": NOTE,
}
#: The notices that answer this client's own commands; the others are chat.
NOTICE_ROLES: Dict[str, str] = {
    "registered": ANSWER, "unregistered": ANSWER, "password_changed": ANSWER,
    "op": ANSWER, "deop": ANSWER, "moderation": ANSWER, "away": ANSWER,
}


def _show_message(message: dict, me: str) -> Line:
    kind = "action" if message.get("action") is True else \
        "notice" if message.get("notice") is True else "message"    # (an IRC NOTICE)
    return of_room(chat_line(local_time(message.get("ts")), clean_text(message["from"]),
                             clean_text(message["text"]), me, kind), message)


def _show_whisper(message: dict, me: str) -> Line:
    return chat_line(local_time(message.get("ts")), clean_text(message["from"]),
                     clean_text(message["text"]), me, "whisper", to=me,
                     action=message.get("action") is True, notice=message.get("notice") is True)


def _show_sent(message: dict, me: str) -> Line:
    kind = "whisper" if "to" in message else \
        "action" if message.get("action") is True else "message"
    return of_room(chat_line(local_time(message.get("ts")), me, clean_text(message["text"]), me,
                             kind, to=clean_text(message.get("to", "")),
                             action=message.get("action") is True), message)


def to_me(text: str, me: str) -> str:
    """"me was kicked by ..." as "you were kicked by ...": the server tells what
    happened to someone in the third person, as the others read it."""
    if text.lower().startswith(f"{me.lower()} was "):
        return "you were " + text[len(me) + len(" was "):]
    return text


def _show_leave(message: dict, me: str) -> Line:
    stamp = local_time(message.get("ts"))
    name, comment = clean_text(message["name"]), clean_text(message.get("comment", ""))
    said = f": {comment}" if comment else ""
    if "text" in message:       # kicked or banned: the server says how (and from where)
        text = clean_text(message["text"])
        return notice_line(to_me(text, me) if name.lower() == me.lower() else text, stamp)
    if "room" in message:       # a part
        if name.lower() == me.lower():
            return notice_line(f"you left #{clean_text(message['room'])}{said}", stamp)
        return of_room(notice_line(f"{name} left the room{said}", stamp), message)
    reason = clean_text(str(message.get("reason", "")))
    detail = "" if reason in ("", "quit") else f" ({reason})"
    return notice_line(f"{name} left{detail}{said}", stamp)


def _show_room(message: dict, me: str) -> List[Line]:
    """We are in a room now: who else is there, and its topic."""
    room = clean_text(message["room"])
    others = [user for user in message["users"] if str(user).lower() != me.lower()]
    count = message.get("count", len(message["users"])) - 1     # a big room lists the first
    more = ((f" and {count - len(others)} more", "notice"),) if count > len(others) else ()
    lines = [Line(((NOTICE_MARK, "notice"),), ((f"you are in #{room} with ", "notice"),) +
                  names_list(others, message.get("ops")) + more) if others else
             notice_line(f"you are in #{room}; nobody else is here yet" +
                         ("; you are its operator" if me.lower() in
                          {str(name).lower() for name in message.get("ops", [])} else ""))]
    topic, by = clean_text(message.get("topic", "")), clean_text(message.get("topic_by", ""))
    if topic:
        lines.append(notice_line(f"topic of #{room}: {topic}" + (f" (set by {by})" if by else "")))
    return lines


def _show_rooms(message: dict, me: str) -> List[Line]:
    """One line per room: "#dev (3 people): release on friday"; "#den (2 people, needs a
    key)"."""
    lines = []
    for entry in message["rooms"]:
        if not isinstance(entry, dict):
            continue
        count = entry.get("count")
        people = f"{count} {'person' if count == 1 else 'people'}" if isinstance(count, int) \
            else "?"
        if entry.get("keyed") is True:
            people += ", needs a key"
        topic = clean_text(str(entry.get("topic") or ""))
        lines.append(notice_line(f"#{clean_text(str(entry.get('room')))} ({people})" +
                                 (f": {topic}" if topic else "")))
    return lines


def _show_topic(message: dict, me: str) -> Line:
    room, topic = clean_text(message["room"]), clean_text(message["topic"])
    by = clean_text(message.get("by", ""))
    if "id" in message:         # the answer to asking (a change reaches members without one)
        if not topic:
            return notice_line(f"#{room} has no topic", role=ANSWER)
        return notice_line(f"topic of #{room}: {topic}" + (f" (set by {by})" if by else ""),
                           role=ANSWER)
    text = f"{by} set the topic: {topic}" if topic else f"{by} removed the topic"
    return of_room(notice_line(text, local_time(message.get("ts"))), message)


def _show_key(message: dict, me: str) -> Line:
    key, by = clean_text(message["key"]), clean_text(message.get("by", ""))
    text = f"{by} set the key: {key}" if key else f"{by} removed the key"
    return of_room(notice_line(text, local_time(message.get("ts"))), message)


def _show_room_op(message: dict, me: str) -> Optional[Line]:
    name, by = clean_text(message["name"]), clean_text(message.get("by", ""))
    if message.get("server_operator") is True:  # (runs every room while it is one)
        return None     # a notice to everyone says so, once, not one a room
    if message.get("heir") is True:     # no operator here: the longest here runs it
        text = ("you run" if name.lower() == me.lower() else f"{name} runs") + \
            " the room now, while here: none of its operators is here"
    elif message["op"]:
        text = f"{by} made {name} an operator of the room"
    else:
        text = f"{by} took operator status from {name}"
    return of_room(notice_line(text, local_time(message.get("ts"))), message)


def _show_nick(message: dict, me: str) -> Line:
    old, new = clean_text(message["name"]), clean_text(message["new"])
    if me.lower() in (old.lower(), new.lower()):    # ours (the link renamed us already)
        return notice_line(f"you are now known as {new}", local_time(message.get("ts")),
                           role=ANSWER)
    return notice_line(f"{old} is now known as {new}", local_time(message.get("ts")))


def _show_away(message: dict, me: str) -> Line:
    name, text = clean_text(message["name"]), message.get("text")
    away = clean_text(text) if isinstance(text, str) else ""
    if name.lower() == me.lower():
        return notice_line(f"you are away: {away} (/away alone when you are back)" if away
                           else "you are back", role=ANSWER)
    return notice_line(f"{name} is away: {away}" if away else f"{name} is back",
                       local_time(message.get("ts")))


def _show_whois(message: dict, me: str) -> List[Line]:
    """About someone, in a line (two when they are away)."""
    name, rooms = clean_text(message["name"]), message.get("rooms", [])
    runs = set(message.get("room_operator", ()))    # "@" for those, as in /names
    facts = ["in " + ", ".join(f"{'@' if room in runs else ''}#{clean_text(str(room))}"
                               for room in rooms) if rooms else "in no room"]
    facts += [fact for flag, fact in (("operator", "a server operator"),
                                      ("registered", "registered")) if message.get(flag) is True]
    idle = message.get("idle")
    if isinstance(idle, int):
        facts.append(f"idle {rough_time(idle)}" if idle >= 60 else "active in the last minute")
    if "since" in message:
        facts.append(f"here since {local_time(message['since'], with_date=True)}")
    realname = clean_text(message.get("realname", ""))     # an IRC user's, from its USER
    named = f"{name} ({realname})" if realname and realname != name else name
    lines = [notice_line(f"{named}: " + "; ".join(facts))]
    away = message.get("away")
    if isinstance(away, str) and away:
        lines.append(notice_line(f"{name} is away: {clean_text(away)}"))
    return lines


def _show_users(message: dict, me: str) -> Line:
    users = message["users"]
    count = message.get("count", len(users))    # a big room lists only the first names
    more = ((f" and {count - len(users)} more", "notice"),) if count > len(users) else ()
    where = f"in #{clean_text(message['room'])}" if "room" in message else "here"
    return Line(((NOTICE_MARK, "notice"),), ((f"{count} {where}: ", "notice"),) +
                names_list(users, message.get("ops"), message.get("away")) + more)


def _show_history(message: dict, me: str) -> Line:
    kind, notice = message["kind"], message.get("notice") is True   # (an IRC NOTICE)
    if kind not in ("message", "action", "whisper", "announcement"):
        kind = "message"
    if kind == "message" and notice:
        kind = "notice"                 # shown as it was live, not as speech
    return of_room(chat_line(local_time(message["ts"], with_date=True),
                             clean_text(message["from"]), clean_text(message["text"]), me, kind,
                             to=clean_text(str(message.get("to", ""))), dim=True,
                             action=message.get("action") is True, notice=notice)
                   ._replace(ring=False), message)


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
    "join": lambda m, me: of_room(notice_line(
        f"{clean_text(m['name'])} joined" + (f", an operator of #{clean_text(m['room'])}"
                                             if m.get("op") and "room" in m else ""),
        local_time(m.get("ts"))), m),
    "leave": _show_leave,
    "invite": lambda m, me: notice_line(f"{clean_text(m['by'])} invites you to "
                                        f"#{clean_text(m['room'])}: /join #{clean_text(m['room'])}",
                                        local_time(m.get("ts"))),
    "room": _show_room,
    "rooms": _show_rooms,
    "topic": _show_topic,
    "key": _show_key,
    "room_op": _show_room_op,
    "nick": _show_nick,
    "away": _show_away,
    "whois": _show_whois,
    "users": _show_users,
    "announcement": lambda m, me: chat_line(local_time(m.get("ts")), clean_text(m["from"]),
                                            clean_text(m["text"]), me, "announcement"),
    "error": lambda m, me: error_line(to_me(clean_text(m["text"]), me)),
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


# Styles as SGR codes. "name" and "room" are special: their colour comes from the name.
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
        codes = name_colour(text, name_colours) if style in ("name", "room") else \
            STYLES.get(style, "")
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
        with self.lock:
            if self._held is not None:
                self._held.append(line)
                return
            record, line = line.tagged(on_screen=False).plain, line.tagged(on_screen=True)
            self.transcript.append(record)  # every line of a room names it
            self._log(record)
            stream = self.routes.get(line.role, self.out)
            if stream is not self.out:
                if stream is not None:
                    stream.write(line.plain + "\n")
                    stream.flush()
                return
            rendered = self.render(line)
            if line.ring and self.bell and self.terminal:
                rendered += "\a"
            if self.editor is not None:
                self.editor.print_above(rendered)
            else:
                self._write(rendered + "\n")

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except BrokenPipeError:
            # The reader stopped early (--show-chat | head), as readers of pipes do: what
            # follows goes to the null device, quietly (else one warning a message, and
            # Python's own flush at exit failing on the pipe again).
            devnull = open(os.devnull, "w")
            if self.out is sys.stdout:
                os.dup2(devnull.fileno(), sys.stdout.fileno())
            self.out = devnull

    def note(self, text: str, role: str = NOTE) -> None:
        self.show(notice_line(text, role=role))

    def refresh(self) -> None:
        """Draw the prompt again: the current room, or the unread count, changed."""
        with self.lock:
            if self.editor is not None:
                self.editor.redraw()

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
            self._write(text)

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
    "\x01": "home", "\x05": "end", "\x02": "left", "\x06": "right",
    # Ctrl-N and Ctrl-P go to the next and previous room, as irssi's windows.
    "\x0e": "next-room", "\x10": "previous-room",
    "\x15": "kill-before", "\x0b": "kill-after", "\x17": "kill-word",
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
    earlier lines, Ctrl-N/Ctrl-P for the next and previous room, Tab to
    complete commands, names and rooms, Ctrl-D to leave.

    The prompt may be a function, asked at each redraw: it names the current
    room, which the other thread may change (see Screen.refresh).
    """

    def __init__(self, terminal: object, out: TextIO,
                 prompt: Union[str, Callable[[], str]] = PROMPT,
                 complete: Callable[[str, bool], List[str]] = lambda word, first: [],
                 private: Callable[[str], bool] = lambda line: False,
                 lock: Optional[threading.RLock] = None,
                 switch_room: Callable[[int], None] = lambda step: None) -> None:
        self.terminal = terminal
        self.out = out
        self.prompt: Callable[[], str] = prompt if callable(prompt) else lambda: prompt
        self.switch_room = switch_room  # 1: the next room, -1: the one before
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
        if len(candidates) == 1:     # a name that starts a line is spoken to: "bob: "
            ending = ": " if first and not word.startswith(("/", "\\", "#")) else " "
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
        "next-room": lambda self: self.switch_room(+1),
        "previous-room": lambda self: self.switch_room(-1),
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
        prompt = self.prompt()
        chars = list(prompt) + self.buffer
        cursor_index = len(prompt) + self.cursor
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

# Who may use a command, as /help groups them.
EVERYONE, ROOM_OPERATORS, OPERATORS = "everyone", "room operators", "operators"


class Command(NamedTuple):
    usage: str          # what follows the command; [brackets] mark what may be left out
    summary: str
    run: Callable[["ChatSession", str], None]
    audience: str = EVERYONE

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

    Lines and most commands are about the current room (the link's
    RoomList): what is said goes there, and /history, /names or /part
    without a room name mean it.

    rejoin(name, resume_token, rooms) connects and says hello again; without
    it (or with retries=0) a dropped connection ends the session.
    """

    def __init__(self, connection: ServerConnection, welcome: dict, server: str,
                 screen: Optional[Screen] = None, on_lost: Optional[Callable[[], None]] = None,
                 ask_secret: Optional[Callable[[str], str]] = None,
                 rejoin: Optional[Rejoin] = None, retries: int = RECONNECT_TRIES,
                 credentials: Optional[Credentials] = None) -> None:
        self.server = server                # HOST:PORT
        self.screen = screen or Screen(sys.stdout, terminal=False, colour=False)
        self.ask_secret = ask_secret        # prompts without echo; None when not on a terminal
        self.parting_words = ""             # from /quit MESSAGE, for the goodbye
        self.started = datetime.now()
        self.link = Link(connection, welcome, server, self.screen, on_lost, rejoin, retries,
                         credentials)
        self.screen.begin_log(self.header())

    @property
    def name(self) -> str:
        return self.link.name

    @property
    def credentials(self) -> Credentials:
        return self.link.credentials

    @property
    def lost_reason(self) -> Optional[str]:
        return self.link.lost_reason

    def start(self) -> None:
        self.link.start()

    def leave(self) -> None:
        self.link.leave(self.parting_words)

    def header(self, until: Optional[datetime] = None) -> str:
        """Who, where and when: the first line of a /save file and of a --log session."""
        span = f"{self.started:%Y-%m-%d %H:%M} to {until:%Y-%m-%d %H:%M}" if until else \
            f"from {self.started:%Y-%m-%d %H:%M}"
        return f"Chat on {self.server} as {self.name}, {span} (local time)"

    def send(self, message: dict) -> bool:
        return self.link.send(message)

    def said(self, message: dict) -> None:
        """Send something we say; if we were away, first that we are back. The server
        leaves that to its clients: an IRC user's away stays until asked to end."""
        if self.link.away and self.link.connected.is_set():    # (a new session is not away)
            self.link.away = False
            self.send({"type": "away"})
        self.send(message)

    def show_banner(self, welcome: dict) -> None:
        """Where we are; who else is there comes with each room (its room frame)."""
        self.screen.note(f"connected to {self.server} as {self.name}", CHAT)
        if self.link.connection.encryption:
            self.screen.note(self.link.connection.encryption, CHAT)
        if welcome.get("needs_password") is False and self.link.credentials.password:
            # (so that nobody believes the chat protected when it is not)
            self.screen.note("this chat has no password: anyone can join; the one you gave "
                             "was not needed", CHAT)
        self.screen.note("type /help for commands, /quit to leave", HINT)

    def prompt(self) -> str:
        with self.link.state() as rooms:
            return rooms.prompt()

    def handle_line(self, line: str) -> None:
        """Act on one line of input: a command, or text for the current room."""
        command, argument = parse_line(line.rstrip("\r\n"))
        if command == "say":
            if argument.strip() and self.fits(argument):
                self.said(self.in_current_room({"type": "say", "text": argument}))
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
        """Commands for "/..." at the start of a line, rooms after "#", names elsewhere."""
        if first and word[:1] in ("/", "\\"):
            names = sorted(set(COMMANDS) | set(ALIASES))
            return [word[0] + name for name in names if name.startswith(word[1:].lower())]
        if word.startswith("#"):
            with self.link.state() as rooms:
                known = rooms.room_names()
            return sorted((f"#{room}" for room in known
                           if room.lower().startswith(word[1:].lower())), key=str.lower)
        return sorted((name for name in self.link.names()
                       if name.lower().startswith(word.lower())
                       and name.lower() != self.name.lower()), key=str.lower)

    # -- commands (see COMMANDS) ----------------------------------------------

    def cmd_help(self, argument: str) -> None:
        """The commands this user has, in a screenful; the operators' in one line each
        until they are one (or ask for "/help all"); "/help kick", one command."""
        wanted = argument.strip().lstrip("/\\").lower()
        if wanted and wanted != "all":
            name = ALIASES.get(wanted, wanted)
            if name not in COMMANDS:
                self.screen.warn(f"no command /{wanted}: /help lists them")
                return
            lines = command_help_lines(only=name)
        elif wanted == "all" or self.link.operator:
            lines = command_help_lines()
        else:
            with self.link.lock:
                runs_a_room = any(self.name.lower() in room.ops
                                  for room in self.link.rooms.rooms.values())
            lines = command_help_lines(EVERYONE, *([ROOM_OPERATORS] if runs_a_room else []))
        for line in lines:
            self.screen.show(plain_line(line, role=ANSWER))

    def cmd_clients(self, argument: str) -> None:
        if self.link.operator:   # addresses, times and counts, as on the server console
            self.send({"type": "moderate", "command": "clients"})
        else:
            self.send({"type": "who"})

    def cmd_me(self, argument: str) -> None:
        if self.fits(argument):
            self.said(self.in_current_room({"type": "say", "text": argument, "action": True}))

    def cmd_whisper(self, argument: str) -> None:
        target, _, text = argument.partition(" ")
        if not target or not text.strip():
            self.screen.warn("usage: /w NAME TEXT")
            return
        if not NAME_PATTERN.fullmatch(target):     # nobody can be called that: do not ask
            self.screen.warn(f"not sent: {target!r} is not a name (names are {NAME_RULES})")
            return
        if self.fits(text):
            self.said({"type": "whisper", "to": target, "text": text.strip()})

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
        request = self.in_current_room({"type": "get_history"})
        if argument:
            request["limit"] = min(int(argument), HISTORY_MAX)     # capped, as the server does
        self.link.ask_history(request, "--- history ---")

    def cmd_search(self, argument: str) -> None:
        first, _, rest = argument.partition(" ")
        if first != "--all" and argument.strip():
            self.link.ask_history(self.in_current_room({"type": "search", "text": argument}),
                                  f"--- search: {argument.strip()} ---")
        elif first == "--all" and rest.strip():
            self.link.ask_history({"type": "search", "text": rest, "all": True},
                                  f"--- search in all your rooms: {rest.strip()} ---")
        else:
            self.screen.warn("usage: /search [--all] WORDS")


    # -- rooms ---------------------------------------------------------------------

    def in_current_room(self, message: dict) -> dict:
        """The message, for the current room (none named: the server takes the lobby)."""
        with self.link.state() as rooms:
            if rooms.here is not None:
                message["room"] = rooms.here.name
        return message

    def switch_room(self, step: int) -> None:
        """Ctrl-N (1) or Ctrl-P (-1): the next or previous of our rooms is current."""
        with self.link.state() as rooms:
            room = rooms.cycle(step)
            alone = room is not None and room is rooms.here
            unread = rooms.switch(room) if room is not None else 0
            name = room.name if room is not None else None
        if name is None or alone:
            self.screen.note(f"you are only in #{name}: /join another room to have more to "
                             "switch between" if alone else f"you are in no room: /join #{LOBBY}",
                             CHAT)
        else:
            self._now_in(name, unread)

    def _now_in(self, name: str, unread: int) -> None:
        self.screen.note(now_in(name, unread), CHAT)

    def _room(self, word: Optional[str]) -> Optional[str]:
        """The room a command is about: the one named ("#dev" or "dev"), or else the
        current one; None, after saying why, when there is none."""
        if word is None:
            with self.link.state() as rooms:
                name = rooms.here.name if rooms.here is not None else None
            if name is None:
                self.screen.warn(f"you are in no room: /join #{LOBBY} (or another) first")
            return name
        name = word[1:] if word.startswith("#") else word
        if not NAME_PATTERN.fullmatch(name):    # room names follow the rules of names
            self.screen.warn(f"{word!r} is not a room: room names are {NAME_RULES}")
            return None
        return name

    def _person(self, name: str, usage: str) -> bool:
        """Whether name can be someone's (nobody can be called "b@d": do not ask)."""
        if not name:
            self.screen.warn(f"usage: {usage}")
        elif not NAME_PATTERN.fullmatch(name):
            self.screen.warn(f"{name!r} is not a name (names are {NAME_RULES})")
        else:
            return True
        return False

    def cmd_join(self, argument: str) -> None:
        word, _, key = argument.partition(" ")
        name = self._room(word)
        if name is None:
            return
        with self.link.state() as rooms:
            room = rooms.get(name)
            already = room is not None and room is rooms.here
            if room is None:
                rooms.joining.add(name.lower())     # current once its room frame comes
            else:
                unread, name = rooms.switch(room), room.name
        if already:
            self.screen.note(f"you are in #{name} already", CHAT)
            return
        if room is not None:
            self._now_in(name, unread)
            return
        request = {"type": "join", "room": name}
        if key.strip():
            request["key"] = key.strip()
        refused = self.link.round_trip(request)
        with self.link.state() as rooms:
            rooms.joining.discard(name.lower())     # in, or refused
            joined = rooms.get(name)
        if "key" in request and refused is None and joined is not None and not joined.key:
            # As on IRC, a join's key opens a keyed room and never sets one: say so,
            # or a user who made a room "with a key" would believe it locked.
            self.screen.note(f"#{joined.name} has no key: a key given to /join only opens a "
                             f"room that has one (set one with /key #{joined.name} KEY)", CHAT)

    def cmd_part(self, argument: str) -> None:
        word, text = room_argument(argument)
        name = self._room(word)
        if name is None:
            return
        with self.link.state() as rooms:
            last = rooms.get(name) is not None and len(rooms.rooms) == 1
        if last:    # the server would allow it, but then nothing typed could go anywhere
            self.screen.warn(f"#{name} is your last room: /join another before you leave it")
            return
        request = {"type": "part", "room": name}
        if text:
            request["text"] = text
        self.link.round_trip(request)   # a script's next line goes to the room we are in then

    def cmd_rooms(self, argument: str) -> None:
        self.send({"type": "rooms"})

    def cmd_names(self, argument: str) -> None:
        name = self._room(argument.split()[0] if argument.strip() else None)
        if name is not None:
            self.send({"type": "who", "room": name})

    def cmd_topic(self, argument: str) -> None:
        word, text = room_argument(argument)
        name = self._room(word)
        if name is None:
            return
        if not text:    # the id marks the answer as one (a change that others make has none)
            self.send({"type": "topic", "room": name, "id": self.link.new_id()})
        else:
            self.send({"type": "topic", "room": name, "text": "" if text == "-delete" else text})

    def cmd_invite(self, argument: str) -> None:
        found = self._person_and_room(argument, f"/invite {COMMANDS['invite'].usage}")
        if found is not None:
            self.send({"type": "invite", "room": found[1], "name": found[0]})

    def _person_and_room(self, argument: str, usage: str) -> Optional[Tuple[str, str]]:
        """NAME [#room] (the current room when none is named), or None after saying
        what is wrong."""
        person, _, word = argument.partition(" ")
        if not self._person(person, usage):
            return None
        name = self._room(word.strip() or None)
        return (person, name) if name is not None else None

    def cmd_key(self, argument: str) -> None:
        word, key = room_argument(argument)
        name = self._room(word) if word is not None else None
        if word is None:
            self.screen.warn(f"usage: /key {COMMANDS['key'].usage}")
        elif name is not None:
            self.send({"type": "key", "room": name, "key": key})

    def cmd_kick(self, argument: str) -> None:
        word, rest = room_argument(argument)
        person, _, reason = rest.partition(" ")
        if not self._person(person, f"/kick {COMMANDS['kick'].usage}"):
            return
        name = self._room(word)
        if name is not None and person.lower() == self.name.lower():    # (even from the last)
            self.screen.warn(f"to leave #{name} yourself, /part it")
        elif name is not None:
            request = {"type": "kick", "room": name, "name": person}
            if reason.strip():
                request["text"] = reason.strip()
            self.send(request)

    # -- people ----------------------------------------------------------------------

    def cmd_nick(self, argument: str) -> None:
        """A new name; a registered one needs its password: given inline, or asked for
        (without echo) once the server says it needs one."""
        new, _, password = argument.partition(" ")
        if not self._person(new, "/nick NEW [PASSWORD]"):
            return
        request = {"type": "nick", "name": new}
        if password.strip() or self.ask_secret is None:
            if password.strip():
                request["name_password"] = password.strip()
            self.link.expect_nick(password.strip() or None)
            self.send(request)
            return
        self.link.expect_nick(None)
        refused = self.link.round_trip(request, quiet=frozenset({"name_protected"}))
        if refused is not None and refused["code"] == "name_protected":
            password = self._secret(f"{new} is registered; its password: ", "/nick NEW PASSWORD")
            if password:
                self.link.expect_nick(password)
                self.send({"type": "nick", "name": new, "name_password": password})

    def cmd_away(self, argument: str) -> None:
        if argument:    # (away once the server says so: it may refuse the text)
            self.send({"type": "away", "text": argument})
        elif self.link.away:
            self.send({"type": "away"})
        else:
            self.screen.note("you are not away: /away TEXT says you are, and why")

    def cmd_whois(self, argument: str) -> None:
        if self._person(argument, "/whois NAME"):
            self.send({"type": "whois", "name": argument})

    def cmd_ignore(self, argument: str) -> None:
        if not argument:
            with self.link.state() as rooms:
                ignored = sorted(rooms.ignored.values(), key=str.lower)
            self.screen.note(f"ignoring {', '.join(ignored)}" if ignored else "ignoring nobody",
                             ANSWER)
        elif argument.lower() == self.name.lower():
            self.screen.warn("you cannot ignore yourself")
        elif self._person(argument, "/ignore [NAME]"):
            with self.link.state() as rooms:
                changed = rooms.ignore(argument, True)
            self.screen.note(f"ignoring {argument}: their messages, actions and whispers are "
                             f"hidden here, until /unignore {argument}" if changed
                             else f"already ignoring {argument}", ANSWER)

    def cmd_unignore(self, argument: str) -> None:
        if self._person(argument, "/unignore NAME"):
            with self.link.state() as rooms:
                changed = rooms.ignore(argument, False)
            self.screen.note(f"showing {argument} again" if changed
                             else f"{argument} was not ignored", ANSWER)

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
        if self._not_registered():
            return
        password = argument or self._secret("your password: ", "/unregister PASSWORD")
        if password:
            self.send({"type": "unregister", "password": password})

    def _not_registered(self) -> bool:
        """Whether our name is known not to be registered (then said, before any password
        is asked for)."""
        if self.link.registered is False:
            self.screen.warn(f"{self.name} is not registered: /register PASSWORD first")
            return True
        return False

    def cmd_password(self, argument: str) -> None:
        if self._not_registered():
            return
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
        if self.link.no_operators:
            self.screen.warn("this server has no operator password: nobody can /op here")
            return
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
        self.parting_words = argument
        raise EOFError      # leaves exactly as the end of input does


def room_argument(argument: str) -> Tuple[Optional[str], str]:
    """A room named first, and the rest: "#dev the rest" -> ("#dev", "the rest");
    "the rest" -> (None, "the rest"), for the current room."""
    if not argument.startswith("#"):
        return None, argument
    word, _, rest = argument.partition(" ")
    return word, rest.strip()


def room_operator_command(op: bool) -> Callable[["ChatSession", str], None]:
    """/roomop (op) or /roomdeop: NAME [#room], the current room when none is named."""
    def run(session: "ChatSession", argument: str) -> None:
        found = session._person_and_room(argument, f"/room{'' if op else 'de'}op NAME [#room]")
        if found is not None:
            session.send({"type": "room_op", "room": found[1], "name": found[0], "op": op})
    return run


COMMANDS: Dict[str, Command] = {
    "help": Command("[all|COMMAND]", "the commands (all: the operators' too)",
                    ChatSession.cmd_help),
    "clients": Command("", "who is in the chat", ChatSession.cmd_clients),
    "names": Command("[#room]", "who is in a room (this one if none); @: operators",
                     ChatSession.cmd_names),
    "w": Command("NAME TEXT", "whisper: only NAME sees TEXT", ChatSession.cmd_whisper),
    "me": Command("ACTION", "say what you do: /me waves", ChatSession.cmd_me),
    "join": Command("#room [KEY]", "go into a room (made if new); yours: switch",
                    ChatSession.cmd_join),
    "part": Command("[#room] [MESSAGE]", "leave a room (this one if none)",
                    ChatSession.cmd_part),
    "rooms": Command("", "the rooms, their sizes and topics",
                     ChatSession.cmd_rooms),
    "topic": Command("[#room] [TEXT]", "show or set a room's topic (-delete removes it)",
                     ChatSession.cmd_topic),
    "nick": Command("NEW [PASSWORD]", "change your name (a registered one needs its "
                    "password)", ChatSession.cmd_nick),
    "away": Command("[TEXT]", "say you are away, and why; alone (or talking): back",
                    ChatSession.cmd_away),
    "whois": Command("NAME", "about someone: rooms, away, idle", ChatSession.cmd_whois),
    "ignore": Command("[NAME]", "hide someone's lines here (alone: the list)",
                      ChatSession.cmd_ignore),
    "unignore": Command("NAME", "show their lines again", ChatSession.cmd_unignore),
    "history": Command("[N]", "show this room's last N messages (20 if no N)",
                       ChatSession.cmd_history),
    "search": Command("[--all] WORDS", "messages with all the words (--all: in all your "
                      "rooms)", ChatSession.cmd_search),
    "save": Command("[FILE]", "save this session as text; -f overwrites",
                    ChatSession.cmd_save),
    # Password commands ask for what is left out, without echo; scripts give it inline.
    "register": Command("[PASSWORD]", "protect your name with a password (8 or more "
                        "characters)", ChatSession.cmd_register),
    "unregister": Command("[PASSWORD]", "remove your name's password",
                          ChatSession.cmd_unregister),
    "password": Command("[OLD NEW]", "change your name's password", ChatSession.cmd_password),
    "clear": Command("", "clear the screen", ChatSession.cmd_clear),
    "quit": Command("[MESSAGE]", "leave, with parting words; so does Ctrl-D",
                    ChatSession.cmd_quit),
    "invite": Command("NAME [#room]", "let someone into the room once, past its key",
                      ChatSession.cmd_invite),
    "op": Command("[PASSWORD]", "become an operator with the operator password",
                  ChatSession.cmd_op),
    # Room operators: whoever made the room, and whom they made operators (and every
    # server operator).
    "key": Command("#room [KEY]", "the key /join then needs (no KEY: none)",
                   ChatSession.cmd_key, ROOM_OPERATORS),
    "roomop": Command("NAME [#room]", "make someone an operator of the room",
                      room_operator_command(True), ROOM_OPERATORS),
    "roomdeop": Command("NAME [#room]", "take that away", room_operator_command(False),
                        ROOM_OPERATORS),
    "kick": Command("[#room] NAME [REASON]", "put someone out of the room",
                    ChatSession.cmd_kick, ROOM_OPERATORS),
    "deop": Command("", "stop being an operator", ChatSession.cmd_deop, OPERATORS),
    "kill": Command("NAME [REASON]", "disconnect someone from the chat",
                    moderation_command("kick"), OPERATORS),
    "ban": Command("NAME|ADDRESS [MINUTES] [REASON]", "keep someone out",
                   moderation_command("ban"), OPERATORS),
    "unban": Command("NAME|ADDRESS", "lift a ban", moderation_command("unban"), OPERATORS),
    "bans": Command("", "list the bans", moderation_command("bans"), OPERATORS),
    "unlock": Command("[ADDRESS]", "lift a lockout after wrong passwords",
                      moderation_command("unlock"), OPERATORS),
    "mute": Command("NAME [MINUTES] [REASON]", "let someone read but not send",
                    moderation_command("mute"), OPERATORS),
    "unmute": Command("NAME", "let them send again", moderation_command("unmute"),
                      OPERATORS),
    "announce": Command("TEXT", "an announcement to everyone", moderation_command("say"),
                        OPERATORS),
    "droproom": Command("#room", "remove a room and all it had; its members are put out",
                        moderation_command("droproom"), OPERATORS),
    "shutdown": Command("", "stop the server", moderation_command("shutdown"), OPERATORS),
}
ALIASES: Dict[str, str] = {"who": "clients", "msg": "w", "whisper": "w", "exit": "quit",
                           "j": "join", "leave": "part", "list": "rooms"}
# Commands that may carry a password, and after how many words it comes.
PASSWORD_COMMANDS: Dict[str, int] = {"op": 0, "register": 0, "unregister": 0, "password": 0,
                                     "nick": 1}
HELP_WIDTH = 79      # /help's lines fit an 80-column terminal
HELP_SECTIONS: Dict[str, Optional[str]] = {
    EVERYONE: None,
    ROOM_OPERATORS: "for room operators (@ in that room; server operators too):",
    OPERATORS: "for server operators (after /op):",
}


def command_help_lines(*detailed: str, only: Optional[str] = None) -> List[str]:
    """/help's lines: each command of the audiences detailed (all when none is
    named), the others' commands in a line each; or the one command named."""
    lines, summed_up = [], False
    for audience, title in HELP_SECTIONS.items():
        names = [name for name, command in COMMANDS.items() if command.audience == audience
                 and only in (None, name)]
        if not names:
            continue
        if detailed and audience not in detailed:
            lines += textwrap.wrap(f"{title} " + " ".join(f"/{name}" for name in names),
                                   width=HELP_WIDTH, subsequent_indent="  ")
            summed_up = True
            continue
        if title:       # (also for one command: who may use it)
            lines.append(title)
        for name in names:
            command = COMMANDS[name]
            aliases = [f"/{alias}" for alias, target in ALIASES.items() if target == name]
            label = f"/{name} {command.usage}".strip()
            also = f" (also {', '.join(aliases)})" if aliases else ""
            line = f"  {label:<20} {command.summary}{also}"
            if len(line) > HELP_WIDTH:   # a long usage gets a line of its own
                lines += [f"  {label}", f"  {'':<20} {command.summary}{also}"]
            else:
                lines.append(line)
        if audience == EVERYONE and only is None:
            lines += [
                f"  {'//text':<20} send a line that starts with /; \\\\text, one with \\",
                "  \\quit works as /quit: a backslash and a word is a command; \\o/ is chat.",
                "  Keys: Up/Down recall lines, Ctrl-N/Ctrl-P go to the next or previous",
                "  room, Tab completes names, #rooms and commands."]
    if summed_up:
        lines.append("  (/help all says what each of those does)")
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
    """Whether a typed line carries a password (/op PASSWORD, /nick NAME PASSWORD, ...)."""
    command, argument = parse_line(line)
    before = PASSWORD_COMMANDS.get(ALIASES.get(command, command))
    return before is not None and len(argument.split(None, before)) > before


# ---------------------------------------------------------------------------
# Start-up: the command line, and joining
# ---------------------------------------------------------------------------

def split_address(target: str, port: Optional[int]) -> Tuple[str, int, Optional[str]]:
    """HOST, HOST:PORT or [IPv6]:PORT, with an optional #FINGERPRINT, and maybe a PORT.

    The fingerprint is "" for a "#" with nothing after it (an error, not plain TCP).
    """
    target, hash_sign, fingerprint = target.partition("#")
    host = target
    given = port
    if target.startswith("[") and "]" in target:
        host, _, after = target[1:].partition("]")
        if after.startswith(":") and after[1:].isdigit():
            port = int(after[1:])
    elif target.count(":") == 1:
        name, _, maybe_port = target.partition(":")
        if maybe_port.isdigit():
            host, port = name, int(maybe_port)
    if given is not None and port != given:
        raise ValueError(f"the port is given twice ({target} and {given}): give it "
                         "once, as HOST:PORT or as the second argument")
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
            checking = self.credentials.password is not None or \
                self.credentials.name_password is not None
            # A wrong password is answered late, later each time: say why nothing comes.
            note = (lambda: print("  checking the password (a wrong one is answered more "
                                  "slowly each time)...", file=sys.stderr)) \
                if self.interactive and checking else None
            try:
                with typing_hidden(self.interactive and checking):
                    return join(self.host, self.port, self.name, self.credentials, self.tls,
                                on_slow=note)
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


@contextlib.contextmanager
def typing_hidden(hide: bool) -> Iterator[None]:
    """While the server checks a password (a second or more when it is wrong), what
    is typed is neither shown nor kept: a user who types the password again must not
    see it on the screen, nor have it sent as the first line of chat. POSIX only:
    elsewhere, and off a terminal, nothing changes."""
    try:
        import termios
    except ImportError:     # Windows
        termios = None
    if not hide or termios is None or not sys.stdin.isatty():
        yield
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)     # (the flush drops what was typed)


def name_argument(text: str) -> str:
    if not NAME_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a name: names are {NAME_RULES}")
    if text.lower() in RESERVED_NAMES:
        raise argparse.ArgumentTypeError(f"{text!r} is reserved: pick another name")
    return text


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return int(text)


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Terminal chat client. Type a line to send it to the room you are\n"
                    "in (#lobby at first); lines starting with / are commands. With\n"
                    "input piped in, it sends each line and exits once the server has\n"
                    "them all, printing only the answers to its commands (errors on\n"
                    "stderr) unless --show-chat.",
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
                screen.editor = LineEditor(terminal, sys.stdout, prompt=session.prompt,
                                           complete=session.complete, private=holds_password,
                                           lock=screen.lock, switch_room=session.switch_room)
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


def usage_problem(args: argparse.Namespace, fingerprint: Optional[str],
                  interactive: bool) -> Optional[str]:
    """What makes the options given unable to work, or None."""
    if not interactive and not args.name:   # the first line is chat, not a name
        return "with input piped in, give a name with --name (there is nobody to ask)"
    if fingerprint is not None and not is_fingerprint(fingerprint):
        return join_string_problem(args.host, fingerprint)
    if args.insecure and (args.cafile or fingerprint):
        return ("--insecure checks no certificate: leave it out to check the one of --cafile "
                "or the join string")
    if args.cafile and not os.path.isfile(os.path.expanduser(args.cafile)):
        return f"--cafile {args.cafile}: no such file"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    if args.retries < 0:
        parser.error("--retries must be 0 or more")
    configure_text_streams()
    try:
        host, port, fingerprint = split_address(args.host, args.port)
    except ValueError as exc:
        return usage_error(parser, str(exc))
    interactive = sys.stdin.isatty()
    problem = usage_problem(args, fingerprint, interactive)
    if problem:
        return usage_error(parser, problem)
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
            return usage_error(parser, f"cannot write the log {args.log}: "
                                       f"{exc.strerror or exc}")
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

    def rejoin(name: str, resume: Optional[str], rooms: List[object]
               ) -> Tuple[ServerConnection, dict]:
        # Under our name of the moment (/nick), into the rooms we were in, with their keys.
        again = dataclasses.replace(joiner.credentials, resume=resume)
        return join(host, port, name, again, tls, rooms)

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
