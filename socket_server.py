#!/usr/bin/env python3
"""A terminal chat server for a local network: one file, standard library only.

Usage::

    python socket_server.py                    # all interfaces, port 5050
    python socket_server.py --port 6000        # another port
    python socket_server.py --host 127.0.0.1   # this machine only
    python socket_server.py --help             # every flag

Then run ``python client.py HOST`` on any machine that can reach this one.

Design
------
Bytes flow through three layers, the way h11 and :mod:`socketserver` split
the work. This file presents them in that order.

1. **The transport**, :class:`SelectServer`: one loop over non-blocking
   sockets (epoll, kqueue or select: see :class:`EpollPoller`). It accepts,
   runs TLS handshakes step by step, reads, queues bytes and sends each
   connection's queue with one call per loop pass (or sooner, once a pass has
   queued PASS_OUTPUT_LIMIT bytes), cuts off a peer that stops reading,
   closes politely, and runs timers. It knows no chat word, and it alone
   writes to sockets.
2. **A codec** per connection, :class:`JsonCodec`: bytes in, requests out;
   events in, bytes out. It never touches a socket. An event for many
   recipients is encoded once per codec, not once per recipient.
3. **The chat core**, :class:`ChatCore`: sans-IO, like h11. It holds the
   state (sessions, names, accounts, bans and mutes, history) and one
   handler per request type (the :data:`REQUESTS` table). A handler never
   writes anything: it records *actions* -- send this event to that session
   or to everyone, close that session, pause its reading while a password
   is checked, run this job on a thread, call me back later -- and
   :class:`ChatServer` carries them out, in order, once the handler has
   returned. So the core runs, and is tested, with a fake clock and no
   sockets. :class:`Accounts`, :class:`History` and :class:`Moderation` are
   its parts; :class:`ChatStore` keeps what must last, in sqlite.

:class:`ChatServer` joins the three. It gives every connection a codec and
a core session, hands the core one request at a time (none while a session
waits for a password check, so answers always come in the order of the
requests), and executes the actions. End of file is an input like any
other: the codec decides whether the peer stopped in the middle of a frame.

Slow work never runs in the loop: password hashes are computed on worker
threads, whose results come back through :meth:`SelectServer.call_soon`.
The messages of one loop pass are written to sqlite in one transaction,
before that pass's frames are sent.

Wire protocol
-------------
Every frame is a 10-byte header, the payload length in ASCII decimal padded
with spaces (``f"{n:<10}"``), then the payload: one UTF-8 JSON object with a
string field ``"type"``. README.md documents every message type and error.
"""

import argparse
import base64
import binascii
import bisect
import codecs
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import re
import secrets
import select
import selectors
import signal
import socket
import stat
import sqlite3
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from typing import (Any, Callable, Deque, Dict, FrozenSet, Iterable, List, NamedTuple, Optional,
                    Set, TextIO, Tuple, Union)

try:
    import ssl
except ImportError:     # Python built without OpenSSL: everything but TLS still works
    ssl = None  # type: ignore
try:
    import termios      # POSIX: the console puts its terminal back as it found it
except ImportError:
    termios = None  # type: ignore

log = logging.getLogger("chat")

# ---------------------------------------------------------------------------
# Limits and defaults. Those a user may want to change have a command-line
# flag (see build_arg_parser); README.md lists them all.
# ---------------------------------------------------------------------------

DEFAULT_MAX_CLIENTS = 1000          # connections at once, joined or not
MAX_PER_ADDRESS = 20                # connections at once from one IP address
MAX_SILENT = 100                    # connections that have not said hello, before the oldest goes
SILENT_GRACE = 2.0                  # seconds of silence before a connection may be dropped for that
HELLO_TIMEOUT = 10.0                # seconds a new connection has to send hello
PING_AFTER = 60.0                   # seconds of silence before the server pings
DROP_AFTER = 120.0                  # seconds of silence before a client is dropped
MAX_BACKLOG = 512 * 1024            # bytes queued for one client before it is cut off
MAX_TEXT_LENGTH = 2000              # characters in one chat message
MAX_TEXT_LIMIT = 16000              # highest --max-length: 4 UTF-8 bytes each still fit a frame
JOIN_NOTICES_UP_TO = 1000           # room size above which joins and leaves are not announced
DEFAULT_MAX_ROOMS = 1000            # rooms that may exist at once (--max-rooms)
MAX_ROOMS_PER_PERSON = 100          # rooms one person may be in at once
MAX_TOPIC_LENGTH = 300              # characters of a room's topic, a part or kick message
MAX_AWAY_LENGTH = 200               # characters of an away message
REALNAME_MAX = 64                   # characters of the real name a hello may carry (IRC's USER)
ROOMS_PER_FRAME = 100               # rooms listed in one `rooms` answer; more follow in others
MAX_LISTED_NAMES = 1000             # names in a welcome or users list; 1000 x 35 bytes fit a frame
LISTING_LEAVES_KEPT = 8             # leaves cut from a kept listing; after more, it is made again
RATE_LIMIT = 5.0                    # messages a second, on average, per client
RATE_BURST = 20                     # messages a client may send at once
FLOOD_STRIKES = 20                  # refused messages piled up before a flooder is cut off
MAX_FAILURES = 5                    # failed logins from one address before a lockout
LOCKOUT = 300.0                     # seconds an address stays locked out
FAILURE_DELAY = 1.0                 # seconds added to the answer per failed login, up to 5

DEFAULT_DB = "chat_history.sqlite3"  # in the directory the server starts in
HISTORY_REPLAY = 50                 # public messages sent to each newcomer
HISTORY_DEFAULT = 20                # messages /history returns when no number is given
MISSED_MAX = 200                    # most missed messages replayed to a returning name
PARTING_MEMORY = 60.0               # seconds a missed_only client's parting is remembered
PARTINGS_MAX = 10_000               # partings remembered at once (the oldest go first)
SEARCH_RESULTS = 50                 # most messages one /search returns
SEARCH_MAX_WORDS = 10               # words in one /search; more are refused
SEARCH_WINDOW = 200_000             # /search looks through this many recent events
QUERY_TIME_LIMIT = 0.1              # seconds one /search or /history may run in the loop
SEARCH_SHARE = 0.2                  # at most this share of the loop's time goes to searching

MAX_COMMAND_LENGTH = 500            # characters of one moderation command, reason included
MAX_MINUTES = 10 ** 7               # longest /ban or /mute with a length, in minutes (19 years)
MAX_ID_LENGTH = 64                  # characters of a message id echoed back (see request_id)
RESUME_TOKEN_BYTES = 16             # of a resume token's MAC: 128 bits nobody can guess
MAX_QUOTED_LENGTH = 40              # characters of a client's word quoted back (see quoted)
CLEANING_SLACK = 2                  # a text over twice its limit is cut (or refused) unseen
MAX_NAMED_IN_NOTE = 10              # names a console note lists before "and N more"

# Internal tuning, not worth a flag.
RECV_SIZE = 256 * 1024              # bytes read per socket per loop pass
ACCEPTS_PER_PASS = 64               # new connections taken per loop pass
PASS_OUTPUT_LIMIT = 256 * 1024      # bytes queued in one pass before they are sent, and the
                                    # pass reads on: what a burst of joins holds in memory
TICK = 1.0                          # longest time between timer checks
LOG_BURST = 20                      # lines of one noisy kind logged a minute; the rest counted
LOG_WINDOW = 60.0                   # seconds over which LOG_BURST counts
LINGER_TIMEOUT = 2.0                # seconds to wait for a peer we closed on to hang up
MAX_LINGERING = 1000                # closing sockets kept waiting at once; past that, close now
SHUTDOWN_FLUSH_TIMEOUT = 2.0        # seconds to deliver the shutdown notice
ACCEPT_PAUSE = 1.0                  # seconds to stop accepting when out of file descriptors
SELECT_SOCKET_LIMIT = 500           # sockets at once where select() is all there is (Windows)
CONSOLE_RETRY = 1.0                 # seconds between console reads in the background, or of
                                    # a FIFO nobody writes to
CONSOLE_PROMPT = "console> "
CONSOLE_ANSWER_WAIT = 5.0           # most seconds the prompt waits for a command's answer
PASSWORD_WORKERS = 2                # threads hashing passwords
MAX_PASSWORD_JOBS = 32              # password checks waiting at once; more get "busy"
SCRYPT_COST = (2 ** 14, 8, 1)       # scrypt n, r, p: about 50 ms and 16 MiB per hash
PBKDF2_ITERATIONS = 600_000         # where hashlib has no scrypt
STORE_BUSY_TIMEOUT = 0.05           # seconds sqlite may wait on a lock held by another process
STORE_MAX_PENDING = 100_000         # rows kept while the database is locked, then give up
STORE_ROWS_PER_INSERT = 32          # rows one INSERT statement writes (up to 6 values each;
                                    # sqlite before 3.32 takes at most 999 values a statement)
CHECKPOINT_EVERY = 500              # commits between write-ahead log checkpoints (a thread's)
CHECKPOINT_TRIES = 5                # checkpoints in a row while the loop keeps writing
WAL_BACKSTOP = 4000                 # log pages before the loop checkpoints the rest itself
ADDRESS_IN_USE = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)}

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
# Settings: everything a user can change from the command line
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Settings:
    """Everything a user can set from the command line (see build_arg_parser)."""

    host: str = ""                  # "" means every interface
    port: int = DEFAULT_PORT
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_per_address: int = MAX_PER_ADDRESS
    max_silent: int = MAX_SILENT
    hello_timeout: float = HELLO_TIMEOUT
    ping_after: float = PING_AFTER
    drop_after: float = DROP_AFTER
    max_backlog: int = MAX_BACKLOG
    max_length: int = MAX_TEXT_LENGTH
    rate_limit: float = RATE_LIMIT
    rate_burst: int = RATE_BURST
    password: Optional[str] = dataclasses.field(default=None, repr=False)   # the room
    max_failures: int = MAX_FAILURES
    lockout: float = LOCKOUT
    failure_delay: float = FAILURE_DELAY
    admin_password: Optional[str] = dataclasses.field(default=None, repr=False)
    blocked_words: List[str] = dataclasses.field(default_factory=list)
    filter_action: str = "mask"     # or "reject"
    no_links: bool = False
    no_whisper: bool = False
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    db: str = DEFAULT_DB
    keep_history: bool = True       # False: record no messages (--no-history)
    history: int = HISTORY_REPLAY
    join_notices_up_to: int = JOIN_NOTICES_UP_TO
    max_rooms: int = DEFAULT_MAX_ROOMS
    max_room_size: int = 0          # 0: as many as can join the server
    irc_port: Optional[int] = None  # None: no IRC listener
    server_name: str = "chat.lan"   # the server's name in IRC; no one may take it as a name


def client_host(address: tuple) -> str:
    """The peer's IP address; IPv4 clients of a dual-stack socket as plain IPv4.

    Interned: the many connections from one address (a NAT, one machine) share
    one string, as the per-address counts do.
    """
    host = address[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return sys.intern(host)


def format_address(address: tuple) -> str:
    """HOST:PORT for logs."""
    host, port = client_host(address), address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------
# The transport: sockets, TLS, buffers and timers, in one select loop
# ---------------------------------------------------------------------------

def make_tls_context(cert_file: str, key_file: Optional[str]) -> "ssl.SSLContext":
    """A server context: TLS 1.2 or newer, no renegotiation."""
    if ssl is None:
        raise ValueError("this Python has no ssl module, so it cannot serve TLS")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    context.load_cert_chain(cert_file, key_file)
    return context


def tls_problem(cert_file: str, key_file: Optional[str], error: Exception) -> str:
    """Why make_tls_context failed, in words that name the flag to change: OpenSSL's
    own reason ("PEM lib") says neither which file nor what is wrong with it."""
    texts = {}
    for flag, path in (("--tls-cert", cert_file), ("--tls-key", key_file)):
        if path is None:
            continue
        try:
            with open(path, encoding="ascii", errors="replace") as pem:
                texts[flag] = pem.read()
        except OSError as exc:
            return f"cannot read {flag} {path}: {exc.strerror or exc}"
    key_flag, key_path = ("--tls-key", key_file) if key_file else ("--tls-cert", cert_file)
    if "-----BEGIN CERTIFICATE-----" not in texts["--tls-cert"]:
        return f"--tls-cert {cert_file}: no PEM certificate in it"
    if "PRIVATE KEY-----" not in texts[key_flag]:
        hint = "give --tls-key" if key_file is None else "name the key's file"
        return f"{key_flag} {key_path}: no private key in it; {hint}"
    if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
        return f"{key_flag} {key_path} is not the key of that certificate"
    reason = getattr(error, "strerror", None) or error
    return f"cannot use the TLS certificate {cert_file}: {reason}"


def certificate_fingerprint(cert_file: str) -> str:
    """SHA-256 of the (first) certificate in a PEM file, as 64 hex digits."""
    with open(cert_file, encoding="ascii", errors="replace") as pem:
        match = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                          pem.read(), re.DOTALL)
    if match is None:
        raise ValueError(f"{cert_file} holds no PEM certificate")
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(match.group(0))).hexdigest()


def end_stream(sock: socket.socket) -> None:
    """Send the end of the stream: TLS's close_notify first, where there is TLS (a
    bare FIN reads as an attack to TLS: irssi says "unexpected eof"), then TCP's.
    Raises OSError."""
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        try:
            sock.unwrap()   # sends close_notify; the peer's own is not waited for
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass
    sock.shutdown(socket.SHUT_WR)


# Exceptions that only mean "try again when the socket is ready".
WOULD_BLOCK: Tuple[type, ...] = (BlockingIOError, InterruptedError)
if ssl is not None:
    WOULD_BLOCK += (ssl.SSLWantReadError, ssl.SSLWantWriteError)

# Where a TLS connection is before it can carry bytes of the application.
TLS_DETECT = "detect"           # waiting for the first byte: TLS, or plain text by mistake?
TLS_HANDSHAKE = "handshake"


class Connection:
    """One socket and what the transport keeps about it.

    `protocol` is the application's object for this connection; the
    transport only keeps it there for the application's hooks.
    Slotted so that thousands of idle connections cost little memory.
    """

    __slots__ = ("sock", "host", "port", "protocol", "outbox", "wants_write", "tls_phase",
                 "closing", "closed", "deadline", "peer_closed", "write_shut")

    def __init__(self, sock: socket.socket, address: tuple) -> None:
        self.sock = sock
        self.host = client_host(address)        # the IP, for per-address limits
        self.port: int = address[1]             # kept, not HOST:PORT: 36 bytes less a client
        self.protocol: Any = None
        self.outbox: Any = ()           # bytes waiting to be sent (a list), often shared
        self.wants_write = False        # registered for EVENT_WRITE
        self.tls_phase: Optional[str] = None
        self.closing = False            # flushing, then waiting for the peer to hang up
        self.closed = False
        self.deadline = 0.0             # when closing gives up waiting
        self.peer_closed = False        # the peer sent EOF
        self.write_shut = False         # we sent EOF

    @property
    def open(self) -> bool:
        return not (self.closing or self.closed)

    @property
    def address(self) -> str:
        """HOST:PORT, for logs."""
        return format_address((self.host, self.port))

    def __repr__(self) -> str:
        return self.address


class SelectorPoller:
    """Which of the sockets watched are ready, on any system: the selectors
    module's best selector (kqueue on macOS, select on Windows)."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        # Windows has only select(), which watches at most 512 sockets.
        self.limited = isinstance(self._selector, selectors.SelectSelector)

    def register(self, sock: socket.socket, events: int, data: Any) -> None:
        self._selector.register(sock, events, data)

    def modify(self, sock: socket.socket, events: int, data: Any) -> None:
        self._selector.modify(sock, events, data)

    def unregister(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)

    def select(self, timeout: float) -> List[Tuple[Any, int]]:
        """(data, events) for each socket ready, events of selectors.EVENT_*."""
        return [(key.data, events) for key, events in self._selector.select(timeout)]

    def watched(self) -> List[Any]:
        """The data of every socket watched."""
        return [key.data for key in self._selector.get_map().values()]

    def __len__(self) -> int:
        return len(self._selector.get_map())

    def close(self) -> None:
        self._selector.close()


class EpollPoller:
    """The same on Linux, where epoll is asked directly. The selectors module
    keeps a SelectorKey for every socket, 80 bytes; this keeps a dict from file
    descriptor to data, and nothing else."""

    limited = False

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._data: Dict[int, Any] = {}     # file descriptor -> what was registered with it
        read, write = select.EPOLLIN, select.EPOLLOUT
        self._flags = {selectors.EVENT_READ: read, selectors.EVENT_WRITE: write,
                       selectors.EVENT_READ | selectors.EVENT_WRITE: read | write}

    def register(self, sock: socket.socket, events: int, data: Any) -> None:
        fd = sock.fileno()
        self._epoll.register(fd, self._flags[events])
        self._data[fd] = data

    def modify(self, sock: socket.socket, events: int, data: Any) -> None:
        fd = sock.fileno()
        self._epoll.modify(fd, self._flags[events])
        self._data[fd] = data

    def unregister(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        del self._data[fd]      # KeyError when not watched, as selectors raises
        self._epoll.unregister(fd)

    def select(self, timeout: float) -> List[Tuple[Any, int]]:
        data, ready = self._data, []
        for fd, flags in self._epoll.poll(timeout, max(len(data), 1)):
            # An error or a hang-up counts as readable and writable, as in selectors.
            events = 0
            if flags & ~select.EPOLLIN:
                events |= selectors.EVENT_WRITE
            if flags & ~select.EPOLLOUT:
                events |= selectors.EVENT_READ
            ready.append((data[fd], events))
        return ready

    def watched(self) -> List[Any]:
        return list(self._data.values())

    def __len__(self) -> int:
        return len(self._data)

    def close(self) -> None:
        self._epoll.close()


Poller = EpollPoller if hasattr(select, "epoll") else SelectorPoller


class SelectServer:
    """A loop over non-blocking connections (epoll, kqueue or select: see Poller).

    It accepts, runs TLS handshakes without blocking, reads, sends each
    connection's queued bytes with one call per pass, and closes
    connections politely. It knows nothing of what the bytes mean:
    subclasses override the hooks below, and call write(), close(),
    pause_reading() and resume_reading(). Nothing else touches an output
    queue or a socket.

    Call :meth:`listen`, then :meth:`serve_forever`; it returns after
    :meth:`stop`, which any thread or signal handler may call.
    """

    #: Once this many bytes are queued in one pass, the pass sends them (after
    #: end_of_pass(), as at its end) before it reads on. A burst of requests,
    #: each with a long answer, then holds a quarter of a megabyte of answers at
    #: a time, not all of them: the C heap keeps what it once held. (The benchmark's
    #: 10,000 idle clients: 1.08 KiB each with it, 1.32-1.45 without.)
    output_limit = PASS_OUTPUT_LIMIT
    poller_class = Poller   # (the tests run the other one as well)

    def __init__(self, settings: Settings, tick: float = TICK) -> None:
        self.settings = settings
        self.tls_context = (make_tls_context(settings.tls_cert, settings.tls_key)
                            if settings.tls_cert else None)
        self.poller = self.poller_class()
        self.socket_limit = SELECT_SOCKET_LIMIT if self.poller.limited else 0
        self.listeners: List[socket.socket] = []
        self._factories: Dict[socket.socket, Callable[[], Any]] = {}  # listener -> protocol
        # Every connection is in the poller (see connections) but those paused;
        # no set of them all: at ten thousand clients, a set costs 40-65 bytes each.
        self._paused: Set[Connection] = set()       # not reading for now
        self._lingering: Set[Connection] = set()    # closing, waiting for the peer to hang up
        self.now = time.monotonic()
        self._to_flush: Set[Connection] = set()
        self._queued = 0        # bytes written this pass and not yet sent (see _run_once)
        self._tick = tick
        self._next_tick = self.now + self._tick
        self._timers: List[Tuple[float, int, Callable[[], None]]] = []     # a heap
        self._timer_order = itertools.count()
        self._accepting = True      # listeners watched; False while out of file descriptors
        self._stopping = False
        self._calls: Deque[Callable[[], None]] = deque()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.poller.register(self._wake_reader, selectors.EVENT_READ, self._on_wake)

    # -- hooks for subclasses --------------------------------------------

    def connection_made(self, conn: Connection) -> None:
        """A new connection is open (TLS not yet negotiated)."""

    def data_received(self, conn: Connection, data: bytes) -> None:
        """Bytes arrived (decrypted, for TLS)."""

    def eof_received(self, conn: Connection) -> None:
        """The peer will send nothing more; the default closes the connection."""
        self.close(conn, "connection closed")

    def connection_lost(self, conn: Connection, reason: str) -> None:
        """The connection is going, for `reason`; called once, by close()."""

    def wrong_protocol(self, conn: Connection) -> None:
        """A peer spoke plain text to a TLS listener; the default hangs up."""
        self.close(conn, "plain text on the TLS port")

    def end_of_pass(self) -> None:
        """Called once per loop pass, just before queued bytes are sent."""

    def more_to_do(self) -> bool:
        """Whether the next pass must not wait for the network (something is pending)."""
        return False

    def tick(self) -> None:
        """Called about once a second (more often with short timeouts)."""

    def shutting_down(self) -> None:
        """The loop is stopping; bytes written now are still delivered."""

    # -- starting, stopping, scheduling -------------------------------------

    def listen_on(self, port: int, factory: Callable[[], Any]) -> Tuple[str, int]:
        """Bind and listen on settings.host; each connection accepted there gets
        factory() as its protocol. Returns the address bound (the real port for 0)."""
        host = self.settings.host
        backlog = min(socket.SOMAXCONN, 1024)
        if host in ("", "*"):
            if socket.has_dualstack_ipv6():
                sock = socket.create_server(("::", port), family=socket.AF_INET6,
                                            backlog=backlog, dualstack_ipv6=True)
            else:
                sock = socket.create_server(("0.0.0.0", port), backlog=backlog)
        else:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            sock = socket.create_server((host, port), family=family, backlog=backlog)
        sock.setblocking(False)
        self.poller.register(sock, selectors.EVENT_READ, self._accept)
        self.listeners.append(sock)
        self._factories[sock] = factory
        bound = sock.getsockname()
        return bound[0], bound[1]

    def serve_forever(self) -> None:
        try:
            while not self._stopping:
                self._run_once()
        finally:
            self._shut_down()

    def stop(self) -> None:
        """Ask the loop to shut down. Safe from other threads and signal handlers."""
        self._stopping = True
        self._wake()

    def call_soon(self, function: Callable[[], None]) -> None:
        """Run function inside the loop. Safe from other threads."""
        self._calls.append(function)
        self._wake()

    def call_later(self, delay: float, function: Callable[[], None]) -> None:
        """Run function inside the loop after `delay` seconds. Loop thread only."""
        heapq.heappush(self._timers, (self.now + delay, next(self._timer_order), function))

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"\0")
        except OSError:     # buffer full: the loop is awake anyway; or closed
            pass

    def _on_wake(self) -> None:
        try:
            while self._wake_reader.recv(4096):
                pass
        except OSError:
            pass
        while self._calls:
            self._guarded(self._calls.popleft())

    @staticmethod
    def _guarded(function: Callable[[], None]) -> None:
        """Run a callback; a bug in it is logged and costs that callback only."""
        try:
            function()
        except Exception:
            log.exception("error in a scheduled call")

    def _run_once(self) -> None:
        if self._to_flush or self.more_to_do():    # e.g. written while flushing last time
            timeout = 0.0
        else:
            due = min(self._next_tick, self._timers[0][0]) if self._timers else self._next_tick
            timeout = max(0.0, due - time.monotonic())
        events = self.poller.select(timeout)
        self.now = time.monotonic()
        for target, mask in events:
            if not isinstance(target, Connection):
                target()        # a listening socket or the wake-up socket
            elif target.tls_phase:
                self._advance_tls(target)
            else:
                if mask & selectors.EVENT_READ:
                    self._read(target)
                    if self._queued > self.output_limit:
                        self._write_out()
                if mask & selectors.EVENT_WRITE:
                    self._to_flush.add(target)
        while self._timers and self._timers[0][0] <= self.now:
            self._guarded(heapq.heappop(self._timers)[2])
        if self.now >= self._next_tick:
            self._next_tick = self.now + self._tick
            self._check_closing()
            self._guarded(self.tick)
        self._write_out()

    def _write_out(self) -> None:
        """Send what this pass has queued: at its end, or once it has queued output_limit."""
        self.end_of_pass()
        self._flush_all()

    @property
    def connections(self) -> List[Connection]:
        """Every connection not yet closed: those the poller watches, and those paused."""
        watched = [data for data in self.poller.watched() if isinstance(data, Connection)]
        return watched + list(self._paused)

    def _shut_down(self) -> None:
        """Stop accepting, let the subclass say goodbye, give that a moment to leave, close all."""
        log.info("shutting down: %d connection(s)", len(self.connections))
        # Listeners go first: a client that reconnects as soon as it hears the goodbye
        # must be refused, not parked in the backlog of a server that is going away,
        # and a server restarted on the same port must find it free.
        self._watch_listeners(False)
        for sock in self.listeners:
            sock.close()
        self.shutting_down()
        self.end_of_pass()
        deadline = time.monotonic() + SHUTDOWN_FLUSH_TIMEOUT
        for conn in self.connections:
            if not conn.tls_phase:
                self._send_remaining(conn, deadline)
            self._close_socket(conn)
        self.poller.unregister(self._wake_reader)
        self._wake_reader.close()
        self._wake_writer.close()
        self.poller.close()

    @staticmethod
    def _send_remaining(conn: Connection, deadline: float) -> None:
        """Block until conn's queue is sent, the deadline passes, or the peer is gone."""
        try:
            conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
            conn.sock.sendall(b"".join(conn.outbox))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- accepting -------------------------------------------------------

    def _accept(self) -> None:
        for listener in self.listeners:
            for _ in range(ACCEPTS_PER_PASS):
                try:
                    sock, address = listener.accept()
                except WOULD_BLOCK:
                    break
                except OSError as exc:   # out of file descriptors, most likely
                    log.error("cannot accept connections: %s; pausing %.0f s", exc, ACCEPT_PAUSE)
                    self._pause_accepting()
                    return
                self._add_connection(sock, address, self._factories[listener])

    def _pause_accepting(self) -> None:
        """Stop watching the listeners for ACCEPT_PAUSE seconds.

        The connection that could not be accepted is still waiting in the
        backlog, so a listener left in the poller would be reported
        readable on every pass: the loop would spin at full speed, doing
        nothing, until the pause ended.
        """
        self._watch_listeners(False)
        self.call_later(ACCEPT_PAUSE, lambda: self._watch_listeners(True))

    def _watch_listeners(self, wanted: bool) -> None:
        if self._accepting == wanted:
            return
        self._accepting = wanted
        for sock in self.listeners:
            if wanted:
                self.poller.register(sock, selectors.EVENT_READ, self._accept)
            else:
                self.poller.unregister(sock)

    def _add_connection(self, sock: socket.socket, address: tuple,
                        factory: Callable[[], Any]) -> None:
        if self.socket_limit and len(self.poller) + len(self._paused) \
                >= self.socket_limit:   # (the listeners and the wake-up socket count)
            log.warning("refusing %s: this system's select() cannot watch more sockets",
                        format_address(address))
            sock.close()
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        conn = Connection(sock, address)
        conn.protocol = factory()
        if self.tls_context is not None:
            conn.tls_phase = TLS_DETECT
        self.poller.register(sock, selectors.EVENT_READ, conn)
        self._hook(conn, self.connection_made)

    def _hook(self, conn: Connection, hook: Callable[..., None], *args: Any) -> None:
        """Call a subclass hook for conn; a bug in it costs this connection, never the server."""
        try:
            hook(conn, *args)
        except Exception:
            log.exception("error in %s for %s", hook.__name__, conn.address)
            self.close(conn, "internal error", graceful=False)

    def _advance_tls(self, conn: Connection) -> None:
        """Take a TLS connection one step further, without ever waiting."""
        if conn.tls_phase == TLS_DETECT:
            try:
                first = conn.sock.recv(1, socket.MSG_PEEK)
            except WOULD_BLOCK:
                return
            except OSError as exc:
                self.close(conn, f"connection lost ({exc.strerror or exc})", graceful=False)
                return
            if not first:
                self.close(conn, "closed before TLS began", graceful=False)
                return
            if first != b"\x16":     # not a TLS handshake record: a plain-text client
                conn.tls_phase = None
                self._hook(conn, self.wrong_protocol)
                return
            self.poller.unregister(conn.sock)
            conn.sock = self.tls_context.wrap_socket(conn.sock, server_side=True,
                                                     do_handshake_on_connect=False)
            self.poller.register(conn.sock, selectors.EVENT_READ, conn)
            conn.wants_write = False
            conn.tls_phase = TLS_HANDSHAKE
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._watch_writable(conn, False)
            return
        except ssl.SSLWantWriteError:
            self._watch_writable(conn, True)
            return
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc.strerror or exc
            self.close(conn, f"TLS handshake failed ({reason})", graceful=False)
            return
        conn.tls_phase = None
        self._watch_writable(conn, bool(conn.outbox))
        if conn.outbox:     # written while the handshake ran (a refusal, say)
            self._to_flush.add(conn)
        self._read(conn)    # the first bytes may have come with the handshake

    # -- reading ---------------------------------------------------------

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
            pending = getattr(conn.sock, "pending", None)   # TLS: bytes already decrypted
            while data and pending is not None and pending():
                data += conn.sock.recv(RECV_SIZE)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self.close(conn, f"connection lost ({getattr(exc, 'strerror', None) or exc})",
                       graceful=False)
            return
        if not conn.open:
            if not data:
                self._close_socket(conn)
            return      # closing: whatever the peer still sends is dropped
        if not data:
            conn.peer_closed = True
            self._hook(conn, self.eof_received)
        else:
            self._hook(conn, self.data_received, data)

    def pause_reading(self, conn: Connection) -> None:
        """Stop reading from conn until resume_reading (while a password is checked)."""
        if conn not in self._paused and not conn.closed:
            self._paused.add(conn)
            self.poller.unregister(conn.sock)

    def resume_reading(self, conn: Connection) -> None:
        if conn in self._paused and not conn.closed:
            self._paused.discard(conn)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wants_write else 0)
            self.poller.register(conn.sock, events, conn)

    # -- writing ---------------------------------------------------------

    def write(self, conn: Connection, data: bytes) -> None:
        """Queue bytes for conn; they go out at the end of this loop pass.

        Bytes for a connection that is closing are dropped: it has been
        told everything it will be told.
        """
        if not (conn.closing or conn.closed):
            if conn.outbox:
                conn.outbox.append(data)
            else:           # () while nothing waits: a quiet connection keeps no list
                conn.outbox = [data]
            self._to_flush.add(conn)
            self._queued += len(data)

    def write_many(self, conns: Iterable[Connection], data: bytes) -> None:
        """The same bytes for many connections: one object, shared by their queues."""
        to_flush = self._to_flush
        for conn in conns:
            if not (conn.closing or conn.closed):
                if conn.outbox:
                    conn.outbox.append(data)
                else:
                    conn.outbox = [data]
                to_flush.add(conn)
        self._queued += len(data)

    def send_many(self, conns: Iterable[Connection], data: bytes) -> None:
        """The same bytes for many connections, sent now (one call each), not at the
        end of the pass: a third of write_many()'s Python a connection. What cannot
        go now (others queued first, a full socket) is queued; _flush() handles it."""
        for conn in conns:
            sent = 0
            if not (conn.outbox or conn.closing or conn.closed or conn.tls_phase):
                try:
                    sent = conn.sock.send(data)
                except OSError:     # full (or TLS wants another turn), or gone: _flush says which
                    pass
                if sent == len(data):
                    continue
            self.write(conn, data[sent:] if sent else data)

    def _flush_all(self) -> None:
        pending, self._to_flush = self._to_flush, set()
        self._queued = 0
        for conn in pending:
            if not conn.closed and not conn.tls_phase:
                self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        """Send what is queued with one call; keep the rest for when the socket is writable."""
        outbox = conn.outbox
        if outbox:
            data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
            try:
                sent = conn.sock.send(data)
            except WOULD_BLOCK:     # for TLS: retried later with the same bytes first
                sent = 0
            except OSError as exc:
                self.close(conn, f"connection lost ({getattr(exc, 'strerror', None) or exc})",
                           graceful=False)
                return
            if sent == len(data):
                conn.outbox = ()
            else:
                rest = data[sent:]
                if len(rest) > self.settings.max_backlog and conn.open:
                    conn.outbox = ()
                    self.close(conn, f"too slow: over {self.settings.max_backlog // 1024}"
                               " KiB waiting to be read", graceful=False)
                    return
                conn.outbox = [rest]
        if conn.wants_write != bool(conn.outbox):
            self._watch_writable(conn, bool(conn.outbox))
        if conn.closing and not conn.outbox:
            self._finish_closing(conn)

    def _watch_writable(self, conn: Connection, wanted: bool) -> None:
        if conn.wants_write != wanted:
            conn.wants_write = wanted
            if conn not in self._paused:
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
                self.poller.modify(conn.sock, events, conn)

    # -- closing ---------------------------------------------------------

    def close(self, conn: Connection, reason: str, graceful: bool = True) -> None:
        """Close a connection for `reason`, telling the subclass first.

        graceful: deliver what is queued first, then wait briefly for the
        peer to hang up, so that a last error is not lost to a TCP reset.
        Not graceful: the peer is gone or stuck; close at once.
        """
        if not conn.open:
            if not graceful:
                self._close_socket(conn)
            return
        conn.closing = True
        self.resume_reading(conn)   # to see the peer hang up while lingering
        self._hook(conn, self.connection_lost, reason)
        if conn.closed:     # the hook failed, and that closed it
            return
        if graceful and not conn.tls_phase and len(self._lingering) < MAX_LINGERING:
            self._lingering.add(conn)
            conn.deadline = self.now + LINGER_TIMEOUT
            self._to_flush.add(conn)
        else:
            self._close_socket(conn)

    def _finish_closing(self, conn: Connection) -> None:
        """Everything queued is sent: send EOF, and close once the peer does too."""
        if conn.peer_closed:
            self._close_socket(conn)
        elif not conn.write_shut:
            conn.write_shut = True
            try:
                end_stream(conn.sock)
            except OSError:
                self._close_socket(conn)

    def _close_socket(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._lingering.discard(conn)
        self._to_flush.discard(conn)
        if conn in self._paused:    # not in the poller while paused
            self._paused.discard(conn)
        else:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()
        conn.outbox = ()

    def _check_closing(self) -> None:
        for conn in list(self._lingering):
            if self.now >= conn.deadline:
                self._close_socket(conn)

# ---------------------------------------------------------------------------
# The codec: the chat's own wire format, per connection
# ---------------------------------------------------------------------------

class BadInput(ProtocolError):
    """What the peer sent cannot be used, but the stream is intact and goes on (an
    overlong IRC line, say): that piece is refused, and the connection stays."""


# How a TLS client begins: a handshake record (22) of TLS 1.x (3.x). No chat frame or IRC
# line begins so: a plain port that hears it says what went wrong, at once.
TLS_HANDSHAKE = b"\x16\x03"
TLS_NOT_OFFERED = ("This port does not use TLS, and a TLS handshake came: connect without "
                   "TLS, or to a TLS port.")
# How an IRC client begins. irssi shows the refusal's frame as a line: it says where to go.
IRC_OPENINGS = (b"CAP ", b"NICK ", b"PASS ", b"USER ")
IRC_ON_CHAT_PORT = ("This is the chat's own port, for client.py: IRC clients connect to the "
                    "server's IRC port (--irc-port; its start-up lines name it).")


class JsonCodec(FrameDecoder):
    """Bytes to requests and events to bytes for one connection, as frames of
    UTF-8 JSON (the shared block). Sans-IO, like the decoder it extends: feed
    it bytes, take requests out; hand it an event, get bytes back.

    `variant` says how an event meant for many is encoded: every codec of the
    same variant turns it into the same bytes, so it is encoded once for all
    of them (see ChatServer.deliver).
    """

    __slots__ = ("session",)
    variant = "json"
    metered = True      # every frame costs a flood-control token
    answered = 0        # frames answered here, without the core: none

    def __init__(self) -> None:
        super().__init__()
        self.session: Optional["Session"] = None    # the core's side of this connection

    @staticmethod
    def take_output() -> bytes:
        return b""      # the core answers everything: nothing is answered here

    @staticmethod
    def wants_turn() -> bool:
        return False

    def next_request(self) -> Optional[dict]:
        """The next complete request, or None until more bytes come.

        Raises ProtocolError for bytes that are no request (see decode_payload),
        and for a stream that ended in the middle of a frame; BadInput for JSON
        that is no request (not an object with a string "type"): the frames
        around it are whole, so the connection goes on.
        """
        try:
            payload = self.next_payload()
        except ProtocolError as error:
            start = self._buffer[self._start:self._start + 5]
            if error.code == "bad_header" and start[:2] == TLS_HANDSHAKE:
                raise ProtocolError("tls_not_offered", TLS_NOT_OFFERED) from None
            if error.code == "bad_header" and bytes(start).startswith(IRC_OPENINGS):
                raise ProtocolError("bad_header", IRC_ON_CHAT_PORT) from None
            raise
        if payload is None:
            return None
        try:
            return decode_payload(payload)
        except ProtocolError as error:
            if error.code == "bad_message":
                raise BadInput(error.code, error.text) from None
            raise

    def encode(self, event: dict) -> bytes:
        """An event for this connection alone.

        A Listing (the names of a room, in a welcome, a `room` or a `users`
        event) keeps its JSON: while the room does not change, it is written
        out as it is, not encoded for each newcomer again.
        """
        listing = event.get("users")
        if type(listing) is not Listing:
            return encode_event(event)
        others = dict(event)    # all but the listing, copied and cut in C: 0.2 us a welcome
        del others["users"]     # against a comprehension's 0.9
        rest = to_json(others)
        return frame_of(f'{rest[:-1]},"users":{listing.json()}}}'.encode("utf-8"))

    @staticmethod
    def encode_shared(event: dict) -> bytes:
        """An event for every codec of this variant."""
        return encode_event(event)


def encode_event(event: dict) -> bytes:
    """An event as a frame: a chat message or its `sent` answer by quick_json."""
    quick = quick_json(event)
    return encode_frame(event) if quick is None else frame_of(quick.encode("utf-8"))


# Every chat message is written as one `message` for the room and one `sent` for
# its sender: most of what a busy server writes. Written out directly they cost
# half of what the general encoder does (0.8 against 1.5 us). The same JSON, keys in
# the order the core builds them (a test compares); any other shape (an action, an
# id, a whisper's answer) takes the general path.
# An event of one of these sizes whose keys are all found has no other key: counting
# them costs a fifth of comparing its keys() with a set (and of allocating the view).
QUICK_SIZES = {"message": 5, "sent": 4}     # keys: type, room, (from,) text, ts
_quoted = json.encoder.encode_basestring    # a str as a JSON string, as to_json writes it

# A message's text is quoted twice: in the message for the room, then in its
# sender's `sent` (the same str). The second time it comes from this cache, in C,
# which saves 3.6% of a message's instructions. It holds the texts of a busy pass
# (the benchmark's room of 50 has 1,250 messages in one), and only short ones, so
# that it never holds more than 4.5 MiB, however wide their characters.
QUOTED_TEXTS = 2048             # texts whose JSON is kept
QUOTED_TEXT_LENGTH = 256        # characters of the longest
_quoted_text = functools.lru_cache(maxsize=QUOTED_TEXTS)(_quoted)


def quick_json(event: dict) -> Optional[str]:
    """A plain message or its `sent` answer as JSON text; None for any other event."""
    kind = event["type"]
    if len(event) != QUICK_SIZES.get(kind):
        return None
    try:
        room, text, stamp = event["room"], event["text"], event["ts"]
        sender = event["from"] if kind == "message" else ""
    except KeyError:    # as many keys, but another one (a whisper's answer has "to")
        return None
    text = _quoted_text(text) if len(text) <= QUOTED_TEXT_LENGTH else _quoted(text)
    if kind == "message":
        return (f'{{"type":"message","room":{_quoted(room)},"from":{_quoted(sender)},'
                f'"text":{text},"ts":{_quoted(stamp)}}}')
    return f'{{"type":"sent","room":{_quoted(room)},"text":{text},"ts":{_quoted(stamp)}}}'


# ---------------------------------------------------------------------------
# The IRC codec: the same chat for irssi, WeeChat, HexChat and bots
# ---------------------------------------------------------------------------

IRC_LINE_MAX = 512          # bytes of a line, CRLF included, not counting its tags (RFC 1459)
IRC_TAGS_MAX = 8191         # bytes of a line's tags, '@' and the space after them included
IRC_ASKED = 256             # requests remembered (up to twice as many), to know what an
                            # answer or error is about; one line makes at most 253 (JOIN #,#,...)
IRC_SASL_MAX = 8192         # bytes of base64 one SASL PLAIN login may take (the longest
                            # name and password need about 5,600); more fails it
IRC_ANSWERED_RUN = 16       # lines answered without the core before they are charged for
IRC_REGISTRATION_LINES = 100    # lines before registration is done; more close the link
IRC_MESSAGE_TARGETS = 4     # channels and nicks one PRIVMSG or NOTICE goes to (TARGMAX)
# Not message-tags: clients' own tags and TAGMSG (typing, reactions) are not passed
# on, and a server that offers it must.
IRC_CAPS = ("away-notify", "batch", "echo-message", "multi-prefix", "sasl", "server-time")
IRC_VERSION = "socket_server-irc-1"
IRC_REPLAY_BATCH = "history"    # the reference of a replay's batch (one runs at a time)
# Without batches, a replay ends in a NOTICE; it says "new" once its new lines were
# headed apart, "earlier" would say they had all been read.
IRC_REPLAY_END = "--- end of earlier messages ---"
IRC_REPLAY_NEW_END = "--- end of new messages ---"
IRC_FORMATTING = re.compile(r"\x03(?:\d{1,2}(?:,\d{1,2})?)?|\x04(?:[0-9a-fA-F]{6}"
                            r"(?:,[0-9a-fA-F]{6})?)?|[\x02\x0f\x11\x16\x1d\x1e\x1f]")
IRC_UNSAFE = re.compile(r"[\r\n\0]")    # never inside a parameter: a line must stay one line


# A line as (command, params): the command in upper case, the trailing parameter
# last with its ':' taken off. A plain tuple: a NamedTuple's __new__ is Python code,
# and would cost every line a quarter of a microsecond.
IrcMessage = Tuple[str, List[str]]


def parse_irc_line(line: Union[bytes, bytearray]) -> Optional[IrcMessage]:
    """One line as the client sent it (without its line end), None for a blank one.

    Raises BadInput for a line that cannot be used (too long, not UTF-8, a NUL):
    it is answered, and the connection goes on. Tags and a client's own prefix
    are read past: nothing here needs them.
    """
    if line.startswith(b"@"):
        tags, _, line = line.partition(b" ")
        if len(tags) + 1 > IRC_TAGS_MAX:
            raise BadInput("line_too_long", "Input line was too long (its tags)")
    if len(line) + 2 > IRC_LINE_MAX:
        raise BadInput("line_too_long", "Input line was too long")
    # The byte 0: `b"\0" in line` would first try b"\0" as an integer and drop the
    # TypeError, which costs ten times the search, on every line.
    if 0 in line:
        raise BadInput("bad_line", "A line may not hold a NUL byte; it was dropped")
    try:
        text = line.decode("utf-8").lstrip(" ")
    except UnicodeDecodeError:
        raise BadInput("bad_line", "Lines must be UTF-8; that one was dropped") from None
    if text.startswith(":"):
        text = text.partition(" ")[2]
    text, colon, trailing = text.partition(" :")
    words = text.split(" ")     # only at spaces: split() would split at tabs too
    if "" in words:     # two spaces in a row, or at an end: rare, so searched for first
        words = [word for word in words if word]
    if not words:
        return None
    return words[0].upper(), words[1:] + ([trailing] if colon else [])


def irc_text(text: str) -> str:
    """Text an IRC client sent, without its bold, colours and the like (the core
    cleans the rest: no control character reaches anyone's terminal)."""
    # Only the codes that clean_text would not remove as IRC means them are looked
    # for (five searches for one character cost a third of isprintable()): colours
    # take digits after them, and italic, strikethrough and underline are whitespace
    # to isspace(), which clean_text makes spaces; it drops the others, as it drops
    # every control character.
    if "\x03" in text or "\x04" in text or "\x1d" in text or "\x1e" in text \
            or "\x1f" in text:
        return IRC_FORMATTING.sub("", text)
    return text


def irc_time(timestamp: str) -> int:
    """A server timestamp (ISO-8601 UTC) as Unix seconds, as IRC numerics give them."""
    try:
        return int(datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


@dataclasses.dataclass
class IrcInfo:
    """What every IRC connection of one server says about it."""

    server_name: str
    network: str = "LANchat"
    started: str = ""                       # for 003, in words
    isupport: List[str] = dataclasses.field(default_factory=list)
    motd: List[str] = dataclasses.field(default_factory=list)

    @classmethod
    def for_settings(cls, settings: Settings) -> "IrcInfo":
        tokens = ["CASEMAPPING=ascii", "CHANTYPES=#", "PREFIX=(o)@", "CHANMODES=b,k,,t",
                  "MODES=4", "NETWORK=LANchat", "NICKLEN=32", "CHANNELLEN=33",
                  f"TOPICLEN={MAX_TOPIC_LENGTH}", f"KICKLEN={MAX_TOPIC_LENGTH}",
                  f"AWAYLEN={MAX_AWAY_LENGTH}", f"CHANLIMIT=#:{MAX_ROOMS_PER_PERSON}",
                  f"TARGMAX=PRIVMSG:{IRC_MESSAGE_TARGETS},NOTICE:{IRC_MESSAGE_TARGETS},"
                  "JOIN:,PART:,KICK:1,NAMES:1,WHOIS:1", "SAFELIST"]
        motd = [f"Welcome to the chat on {settings.server_name}.",
                "Its rooms are channels here: /join #lobby, where everyone starts;",
                "/list (irssi: /list -YES) shows the others. People using client.py are",
                "in the same rooms.",
                "Registered names log in with SASL PLAIN, or PASS " +
                ("CHATPASSWORD:name:password." if settings.password else "name:password."),
                "/msg NickServ HELP says how to register yours."]
        started = datetime.now(timezone.utc).strftime("%a %b %d %Y at %H:%M:%S UTC")
        return cls(settings.server_name, started=started, isupport=tokens, motd=motd)


class IrcInput:
    """The IRC codec's input half: lines in, requests out.

    Registration (CAP, PASS, NICK, USER, SASL) is assembled here into one
    hello; the commands after it become the core's requests, and the core's
    events become the replies, numerics and relayed lines an IRC client
    expects. Each request carries an id of ours, so that an error or an answer
    (a WHO or a NAMES are both the core's `who`) can be told apart. Replies the
    core has no part in (CAP, PING, MOTD, ...) are answered here, in order,
    through take_output().
    """

    __slots__ = ()

    # -- bytes in -------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._buffer = buffer_with(self._buffer, self._start, data)   # as FrameDecoder does
        self._start = 0

    def feed_eof(self) -> None:
        self.ended = True

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._start

    def wants_turn(self) -> bool:
        """Whether requests wait here that no new bytes would bring out (a hello that
        became possible when a SASL answer came)."""
        return bool(self._requests)

    def next_request(self) -> Optional[dict]:
        """The next request, or None until more lines come. Raises BadInput for a line
        that cannot be used, ProtocolError for a stream that cannot go on."""
        while not self._requests:
            buffer, start = self._buffer, self._start
            if not self.registered and buffer[start:start + 2] == TLS_HANDSHAKE:
                raise ProtocolError("tls_not_offered", TLS_NOT_OFFERED)
            end = buffer.find(b"\n", start)
            if end < 0:
                if len(buffer) - start > IRC_TAGS_MAX + IRC_LINE_MAX:
                    raise ProtocolError("too_large", "Input buffer exceeded: no line end")
                return None     # an unfinished line at the end of the stream is dropped
            line = buffer[start:end].rstrip(b"\r")
            if end + 1 == len(buffer):  # all taken: let the buffer go
                self._buffer, self._start = b"", 0
            else:
                self._start = end + 1
            message = parse_irc_line(line)
            if message is not None:
                self._command(message)
                if not self._requests:  # answered here: charged for in runs (see
                    self.answered += 1      # answered_by_codec), before more are read
                    if not self.registered:
                        if self.answered > IRC_REGISTRATION_LINES:
                            raise ProtocolError("flooding", "Too many lines before registering")
                    elif self.answered >= IRC_ANSWERED_RUN:
                        return None
        request, self.metered = self._requests.popleft()
        return request

    def take_output(self) -> bytes:
        """What was answered here, without the core, since the last call."""
        if not self._output:    # nearly always: a PRIVMSG is the core's to answer
            return b""
        output, self._output = b"".join(self._output), []
        return output

    def _command(self, message: IrcMessage) -> None:
        command, params = message
        table = self.COMMANDS if self.registered else self.REGISTERING
        entry = table.get(command)
        if entry is None:
            if self.registered or command in self.COMMANDS:
                self._reply("421" if self.registered else "451", command,
                            "Unknown command" if self.registered else "You have not registered")
            else:
                self._reply("451", "You have not registered")
            return
        method, least = entry
        if len(params) < least:
            self._reply("461", command, "Not enough parameters")
            return
        method(self, *params)

    def _ask(self, request: dict, command: str, *arguments: str, metered: bool = True) -> None:
        """Hand the core a request, remembering what it was for."""
        self._ids += 1
        request["id"] = request_key = f"i{self._ids}"
        self.asked[request_key] = (command, arguments)
        if len(self.asked) >= 2 * IRC_ASKED:
            # The older half goes at once: one at a time, finding the oldest cost 2,000
            # instructions a request.
            self.asked = dict(itertools.islice(self.asked.items(), IRC_ASKED, None))
        self._requests.append((request, metered))

    # -- registration ---------------------------------------------------------

    def _cap(self, subcommand: str, *rest: str) -> None:
        subcommand = subcommand.upper()
        if subcommand == "LS":
            self.negotiating = not self.registered
            offered = [("sasl=PLAIN" if cap == "sasl" and rest and rest[0] >= "302" else cap)
                       for cap in IRC_CAPS]
            self._raw("CAP", self.nick or "*", "LS", " ".join(offered))
        elif subcommand == "REQ":
            self.negotiating = not self.registered
            wanted = (rest[0] if rest else "").split()
            names = [cap.lstrip("-") for cap in wanted]
            if not wanted or any(name not in IRC_CAPS for name in names):
                self._raw("CAP", self.nick or "*", "NAK", " ".join(wanted))
                return
            for cap in wanted:
                (self.caps.discard if cap.startswith("-") else self.caps.add)(cap.lstrip("-"))
            self.variant = "irc" + "".join(f"+{cap}" for cap in ("server-time", "away-notify")
                                           if cap in self.caps)
            self.server_time = "server-time" in self.caps
            self._raw("CAP", self.nick or "*", "ACK", " ".join(wanted))
        elif subcommand == "LIST":
            self._raw("CAP", self.nick or "*", "LIST", " ".join(sorted(self.caps)))
        elif subcommand == "END":
            self.negotiating = False
            if self.sasl is not None and self.sasl != ["waiting"]:
                self.sasl = None    # a client that gives up on SASL goes on without it
                self._reply("906", "SASL authentication aborted")
            self._register()
        else:
            self._reply("410", subcommand, "Invalid CAP command")

    def _pass(self, password: str, *rest: str) -> None:
        self.password = password

    def _nick_before(self, nick: str, *rest: str) -> None:
        self.nick = nick
        self._register()

    def _user(self, user: str, mode: str, unused: str, realname: str, *rest: str) -> None:
        self.user, self.realname = user, realname
        self._register()

    def _authenticate(self, data: str, *rest: str) -> None:
        """SASL PLAIN: the mechanism, then the credentials in 400-byte base64 pieces."""
        if "sasl" not in self.caps:
            self._reply("904", "SASL authentication failed")
        elif data == "*":
            self.sasl = None
            self._reply("906", "SASL authentication aborted")
        elif self.sasl is None:
            if data.upper() == "PLAIN":
                self.sasl = []
                self._output.append(b"AUTHENTICATE +\r\n")
            else:
                self._reply("908", "PLAIN", "are available SASL mechanisms")
                self._reply("904", "SASL authentication failed")
        else:
            if data != "+":
                self.sasl.append(data)
            if len(self.sasl) * 400 > IRC_SASL_MAX:
                self.sasl = None
                self._reply("904", "SASL authentication failed")
                return
            if len(data) == 400:
                return      # more to come
            chunks, self.sasl = self.sasl, None
            try:
                _, name, password = binascii.a2b_base64("".join(chunks)).decode(
                    "utf-8").split("\0")
            except (ValueError, binascii.Error):
                self._reply("904", "SASL authentication failed")
                return
            self.sasl = ["waiting"]     # for the core's answer, before registering
            self._ask({"type": "authenticate", "name": name, "password": password},
                      "AUTHENTICATE", name)

    def _register(self) -> None:
        """Once NICK, USER and any CAP and SASL are done: say hello to the core."""
        if self.registered or self.hello_sent or not (self.nick and self.user) or \
                self.negotiating or self.sasl is not None:
            return
        # An IRC client keeps its windows, and has no way to say what they show: back
        # in a channel it just left, it gets only what came since.
        hello = {"type": "hello", "name": self.nick, "rooms": [], "retry": True,
                 "missed_only": True}
        if self.realname:
            hello["realname"] = self.realname
        password, name_password = self._passwords()
        if password is not None:
            hello["password"] = password
        if name_password is not None:
            hello["name_password"] = name_password
        self.hello_sent = True
        self._ask(hello, "NICK", self.nick)

    def _passwords(self) -> Tuple[Optional[str], Optional[str]]:
        """PASS as (the chat's password, the name's): "PASS secret", "PASS nick:its
        password", or both, "PASS secret:nick:its password"."""
        if self.password is None:
            return None, None
        head, _, tail = self.password.partition(":")
        if tail and head.lower() == self.nick.lower():
            return None, tail
        name, _, name_password = tail.partition(":")
        if name_password and name.lower() == self.nick.lower():
            return head, name_password
        return self.password, None

    def _quit(self, *reason: str) -> None:
        said = irc_text(reason[0]) if reason else ""
        self._output.append(self._line("", "ERROR", f"Closing Link: {self._peer()} "
                                                    f"(Quit{': ' + said if said else ''})"))
        self._ask({"type": "bye", "text": said}, "QUIT")

    def _ping(self, *tokens: str) -> None:
        if not tokens:
            self._reply("409", "No origin specified")
        else:
            self._raw("PONG", self.info.server_name, tokens[0], prefix=self.info.server_name)

    def _ignore(self, *params: str) -> None:
        pass

    # -- commands after registration ------------------------------------------

    def _privmsg(self, targets: str, text: str, *rest: str, command: str = "PRIVMSG") -> None:
        action = False
        if text.startswith("\x01"):     # CTCP: only ACTION (/me) means something here
            inner = text.strip("\x01")
            if not inner.upper().startswith("ACTION "):
                if command == "PRIVMSG" and inner:  # (a NOTICE is a CTCP reply: no answer)
                    self._raw("NOTICE", self.nick, f"CTCP {inner.split()[0].upper()} is not "
                              "passed on here: only ACTION (/me) is")
                return
            text, action = inner[len("ACTION "):], True
        text = irc_text(text)
        named = targets.split(",") if "," in targets else (targets,)    # nearly always one
        if "" in named:     # "a,,b": no name between the commas
            named = [target for target in named if target]
            if not named:
                if command == "PRIVMSG":
                    self._reply("411", "No recipient given (PRIVMSG)")
                return
        if len(named) > IRC_MESSAGE_TARGETS:    # TARGMAX: the rest get nothing
            if command == "PRIVMSG":    # (never an answer to a NOTICE)
                self._reply("407", named[IRC_MESSAGE_TARGETS] or "*",
                            f"Too many targets: {IRC_MESSAGE_TARGETS} at most")
            named = named[:IRC_MESSAGE_TARGETS]
        metered = True      # the first target costs a token; the others come with it
        for target in named:
            if target.startswith("#"):
                request = {"type": "say", "room": target, "text": text}
            elif target.lower() == IRC_NICKSERV_KEY:
                if command == "PRIVMSG" and not action:     # (a NOTICE wants no answer)
                    self._nickserv(text)
                continue
            else:
                request = {"type": "whisper", "to": target, "text": text}
            if action:
                request["action"] = True
            elif command == "NOTICE":
                request["notice"] = True
            if "echo-message" not in self.caps:
                request["ack"] = False      # its client shows the line itself
            self._ask(request, command, target, metered=metered)
            metered = False

    def _notice(self, targets: str, text: str, *rest: str) -> None:
        self._privmsg(targets, text, command="NOTICE")

    def _join(self, channels: str, keys: str = "", *rest: str) -> None:
        if channels == "0":     # leave every channel
            for number, room in enumerate(sorted(self.rooms)):
                self._ask({"type": "part", "room": room}, "PART", room, metered=number == 0)
            return
        keys_given = keys.split(",")    # each for the channel in its place (RFC 1459)
        for number, (place, channel) in enumerate(self._channels("JOIN", channels)):
            request = {"type": "join", "room": channel}
            if place < len(keys_given) and keys_given[place]:
                request["key"] = keys_given[place]
            self._ask(request, "JOIN", channel, metered=number == 0)

    def _part(self, channels: str, reason: str = "", *rest: str) -> None:
        for number, (_, channel) in enumerate(self._channels("PART", channels)):
            self._ask({"type": "part", "room": channel, "text": irc_text(reason)}, "PART",
                      channel, metered=number == 0)

    def _channels(self, command: str, channels: str) -> List[Tuple[int, str]]:
        """The channels a list names, each with its place in the list, the empty places
        between its commas skipped (an error about one could not say which it is);
        none: 461. A name without the # of a channel is no channel: 403."""
        named = [(place, name) for place, name in enumerate(channels.split(",")) if name]
        if not named:
            self._reply("461", command, "Not enough parameters")
        for _, name in named:
            if not name.startswith("#"):
                self._reply("403", name, "No such channel: channels begin with #")
        return [(place, name) for place, name in named if name.startswith("#")]

    def _topic(self, channel: str, *text: str) -> None:
        request = {"type": "topic", "room": channel}
        if text:
            request["text"] = irc_text(text[0])
        self._ask(request, "TOPIC", channel)

    def _names(self, *channels: str) -> None:
        if not channels:
            self._reply("366", "*", "End of /NAMES list")
        else:
            self._ask({"type": "who", "room": channels[0].split(",")[0]}, "NAMES", channels[0])

    def _list(self, *channels: str) -> None:
        self._ask({"type": "rooms"}, "LIST", *(channels[0].split(",") if channels else ()))

    def _who(self, *mask: str) -> None:
        target = mask[0] if mask and mask[0] else "*"
        if target.startswith("#"):
            self._ask({"type": "who", "room": target, "realnames": True}, "WHO", target)
        elif target in ("*", "0"):
            self._reply("315", target, "End of /WHO list")
        else:
            self._ask({"type": "whois", "name": target}, "WHO", target)

    def _whois(self, *names: str) -> None:
        name = names[-1].split(",")[0]
        if name.lower() == IRC_NICKSERV_KEY:    # answered here: it is this side itself
            server = self.info.server_name
            self._reply("311", IRC_NICKSERV, IRC_NICKSERV, server, "*",
                        "registers nicks: /msg NickServ HELP")
            self._reply("312", IRC_NICKSERV, server, "a LAN chat")
            self._reply("318", IRC_NICKSERV, "End of /WHOIS list")
            return
        self._ask({"type": "whois", "name": name}, "WHOIS", name)

    def _mode(self, target: str, *changes: str) -> None:
        if not target.startswith("#"):
            self._user_mode(target, *changes)
            return
        if not changes:
            self._ask({"type": "topic", "room": target}, "MODE", target)
            return
        modes, arguments, sign = changes[0], list(changes[1:]), "+"
        for letter in modes:
            if letter in "+-":
                sign = letter
            elif letter == "b" and (sign == "+" and not arguments):
                self._reply("368", target, "End of channel ban list")
            elif letter == "b":     # a mask to ban: bans here are for the whole chat
                if arguments:
                    arguments.pop(0)
                self._raw("NOTICE", self.nick, "Bans are for the whole chat here, not one "
                          "channel: the server's console or a client.py operator bans (/ban)")
            elif (letter == "o" or letter == "k" and sign == "+") and not arguments:
                self._reply("461", "MODE", "Not enough parameters")
            elif letter == "o":
                name = arguments.pop(0)
                self._ask({"type": "room_op", "room": target, "name": name, "op": sign == "+"},
                          "MODE", target, name)
            elif letter == "k":
                key = arguments.pop(0) if sign == "+" else ""
                if sign == "-" and arguments:
                    arguments.pop(0)
                self._ask({"type": "key", "room": target, "key": key}, "MODE", target)
            elif letter not in "t":     # +t always holds: only operators set topics
                self._reply("472", letter, "is unknown mode char to me")
                return      # one answer a line, not one a letter: 490 letters made 40 KiB

    def _user_mode(self, target: str, *changes: str) -> None:
        """Everyone is +i here (WHO lists only channels), and nothing else: no change
        is said to be made that is not (irssi showed a "+o" it had only asked for)."""
        if target.lower() != self.nick.lower():
            self._reply("502", "Can't change mode for other users")
        elif not changes:
            self._reply("221", "+i")
        elif changes[0] == "-o":     # an IRC operator gives it up (client.py's /deop)
            self._ask({"type": "deop"}, "MODE", target)
        elif "+o" in changes[0] or changes[0].startswith("o"):
            self._reply("481", "Permission Denied: use OPER")
        elif changes[0].strip("+i"):    # anything but +i, which holds already
            self._reply("501", "Unknown MODE flag: only +i, which always holds here")

    def _kick(self, channel: str, names: str, reason: str = "", *rest: str) -> None:
        self._ask({"type": "kick", "room": channel, "name": names.split(",")[0],
                   "text": irc_text(reason)}, "KICK", channel, names.split(",")[0])

    def _invite(self, nick: str, channel: str, *rest: str) -> None:
        self._ask({"type": "invite", "room": channel, "name": nick}, "INVITE", channel, nick)

    def _away(self, *text: str) -> None:
        self._ask({"type": "away", "text": irc_text(text[0]) if text else ""}, "AWAY")

    def _nick_after(self, nick: str, *rest: str) -> None:
        self._ask({"type": "nick", "name": nick}, "NICK", nick)

    def _oper(self, name: str, password: str, *rest: str) -> None:
        self._ask({"type": "op", "password": password}, "OPER")

    def _kill(self, name: str, reason: str = "", *rest: str) -> None:
        self._ask({"type": "moderate", "command": "kick", "args": f"{name} {irc_text(reason)}"},
                  "KILL", name)

    def _nickserv(self, *words: str) -> None:
        """What IRC users type to register a nick (/msg NickServ REGISTER PASSWORD), as
        the core's requests; the NICKSERV and NS commands come here too."""
        verb, *arguments = " ".join(words).split() or ["HELP"]
        verb, nick = verb.upper(), self.nick or "*"
        if verb == "SET" and arguments and arguments[0].upper() == "PASSWORD":
            verb, arguments = "SET PASSWORD", arguments[1:]
        if verb == "REGISTER" and arguments:        # (an e-mail address after it is unused)
            self._ask({"type": "register", "password": arguments[0]}, "NICKSERV")
        elif verb == "IDENTIFY" and arguments:      # IDENTIFY [NICK] PASSWORD
            name, password = arguments[:2] if len(arguments) > 1 else (nick, arguments[0])
            if name.lower() == nick.lower():
                self._from_nickserv(f"You are {nick} already: IDENTIFY NICK PASSWORD takes "
                                    "another registered nick.")
            else:
                self._ask({"type": "nick", "name": name, "name_password": password},
                          "NICKSERV", "IDENTIFY", name.lower())
        elif verb == "DROP" and arguments:          # DROP [NICK] PASSWORD: only one's own
            self._ask({"type": "unregister", "password": arguments[-1]}, "NICKSERV")
        elif verb == "SET PASSWORD" and len(arguments) == 2:
            self._ask({"type": "change_password", "password": arguments[0],
                       "new_password": arguments[1]}, "NICKSERV")
        elif verb in IRC_NICKSERV_USAGE:        # without what it takes
            self._from_nickserv("Usage: " + IRC_NICKSERV_USAGE[verb])
        else:
            for line in IRC_NICKSERV_HELP:
                self._from_nickserv(line)

    def _from_nickserv(self, text: str) -> None:
        self._output.append(self._nickserv_notice(text))

    def _online(self, *names: str) -> None:
        """ISON, USERHOST and LUSERS: answered from the list of who is here."""
        command = "ISON" if names and names[0] == "ISON" else names[0] if names else "LUSERS"
        self._ask({"type": "who"}, command, *" ".join(names[1:]).split())

    def _whowas(self, nick: str, *unused: str) -> None:
        """Nobody's past is kept under a nick here (irssi asks after a WHOIS of nobody)."""
        self._reply("406", nick, "There was no such nickname")
        self._reply("369", nick, "End of WHOWAS")

    def _motd(self, *unused: str) -> None:
        self._reply("375", f"- {self.info.server_name} Message of the day -")
        for line in self.info.motd:
            self._reply("372", f"- {line}")
        self._reply("376", "End of /MOTD command.")

    def _version(self, *unused: str) -> None:
        self._reply("351", IRC_VERSION, self.info.server_name, "a LAN chat, standard library only")
        self._isupport()

    def _time(self, *unused: str) -> None:
        self._reply("391", self.info.server_name,
                    datetime.now(timezone.utc).strftime("%A %B %d %Y -- %H:%M:%S +00:00"))

    def _again(self, *unused: str) -> None:
        self._reply("462", "You may not reregister")

    REGISTERING: Dict[str, Tuple[Callable[..., None], int]] = {
        "CAP": (_cap, 1), "PASS": (_pass, 1), "NICK": (_nick_before, 1), "USER": (_user, 4),
        "AUTHENTICATE": (_authenticate, 1), "PING": (_ping, 0), "PONG": (_ignore, 0),
        "QUIT": (_quit, 0),
    }
    COMMANDS: Dict[str, Tuple[Callable[..., None], int]] = {
        "PRIVMSG": (_privmsg, 2), "NOTICE": (_notice, 2), "JOIN": (_join, 1),
        "PART": (_part, 1), "TOPIC": (_topic, 1), "NAMES": (_names, 0), "LIST": (_list, 0),
        "WHO": (_who, 0), "WHOIS": (_whois, 1), "WHOWAS": (_whowas, 1), "MODE": (_mode, 1),
        "KICK": (_kick, 2), "INVITE": (_invite, 2),
        "AWAY": (_away, 0), "NICK": (_nick_after, 1), "OPER": (_oper, 2), "KILL": (_kill, 1),
        "ISON": (lambda self, *names: self._online("ISON", *names), 1),
        "USERHOST": (lambda self, *names: self._online("USERHOST", *names), 1),
        "LUSERS": (lambda self, *unused: self._online("LUSERS"), 0),
        "MOTD": (_motd, 0), "VERSION": (_version, 0), "TIME": (_time, 0),
        "PING": (_ping, 0), "PONG": (_ignore, 0), "QUIT": (_quit, 0), "CAP": (_cap, 1),
        "USER": (_again, 0), "PASS": (_again, 0), "AUTHENTICATE": (_again, 0),
        "TAGMSG": (_ignore, 0), "NICKSERV": (_nickserv, 0), "NS": (_nickserv, 0),
    }

    def _raw(self, command: str, *params: str, prefix: str = "") -> None:
        self._output.append(self._line(prefix or self.info.server_name, command, *params))

    def _reply(self, numeric: str, *params: str) -> None:
        """A numeric to this client, answered here (see take_output)."""
        self._output.append(self._numeric(numeric, *params))

    def _isupport(self) -> None:
        tokens = self.info.isupport
        for start in range(0, len(tokens), 12):
            self._reply("005", *tokens[start:start + 12], "are supported by this server")


#: The numeric for each error code, and what its parameter names: the target of
#: the request refused (a nick or a channel), or nothing. Any other code is a NOTICE.
IRC_ERRORS: Dict[str, Tuple[str, bool]] = {
    "unknown_user": ("401", True), "no_such_room": ("403", True), "bad_room": ("403", True),
    "not_in_room": ("442", True), "not_room_operator": ("482", True), "bad_key": ("475", True),
    "room_full": ("471", True), "too_many_rooms": ("405", True), "room_limit": ("405", True),
    "name_taken": ("433", True), "name_protected": ("433", True), "bad_name": ("432", True),
    "name_reserved": ("432", True), "name_banned": ("432", True),
    "password_required": ("464", False), "bad_password": ("464", False),
    "bad_name_password": ("464", False), "bad_admin_password": ("464", False),
    "no_operators": ("491", False), "not_operator": ("481", False), "banned": ("465", False),
    "empty_message": ("412", False), "already_joined": ("462", False),
    "line_too_long": ("417", False),
}
# Refusals that IRC clients show by their numeric alone, whatever its text: a server
# NOTICE says why first. By command, the codes (None: all of them).
IRC_SAID_WHY: Dict[str, Optional[FrozenSet[str]]] = {
    "AUTHENTICATE": None,                   # 904: "SASL failed"
    "JOIN": frozenset(IRC_ERRORS),          # 475 "Bad channel key", 471, 405, 403
    "NICK": frozenset({"name_protected", "bad_name_password"}),     # 433: "in use"
}
# Registering a nick, as IRC users know it: messages to a NickServ that is the IRC
# side itself (no user may take its name), each the core's request.
IRC_NICKSERV = "NickServ"
IRC_NICKSERV_KEY = IRC_NICKSERV.lower()     # a target's, compared in lower case
IRC_NICKSERV_USAGE = {      # verb -> what it takes and does
    "REGISTER": f"REGISTER PASSWORD - protect your nick with a password "
                f"({MIN_PASSWORD_LENGTH} characters or more)",
    "IDENTIFY": "IDENTIFY NICK PASSWORD - take a registered nick of yours",
    "SET PASSWORD": "SET PASSWORD OLD NEW - change its password",
    "DROP": "DROP PASSWORD - unregister your nick",
}
IRC_NICKSERV_HELP = (
    "Registered nicks here are client.py's registered names. Send me:",
    *IRC_NICKSERV_USAGE.values(),
    "Next time, log in as you connect: SASL PLAIN, or the server password NICK:PASSWORD.")
IRC_NICKSERV_SAYS = frozenset({"registered", "unregistered", "password_changed"})   # notices
# What an IRC user is told besides the core's text, by its code: how IRC clients do it.
IRC_HOW = {code: " Give it as the server's password: /connect HOST PORT PASSWORD in irssi, "
                 "-password=PASSWORD to WeeChat's /server add."
           for code in ("password_required", "bad_password")}
# The core's texts name client.py's commands; where an IRC client's differ, its own.
IRC_COMMAND_NAMES = {"/rooms": "/list", "/op": "/oper", "/register": "/msg NickServ REGISTER",
                     "/password": "/msg NickServ SET PASSWORD"}
IRC_COMMAND_NAMED = re.compile("|".join(rf"{re.escape(name)}\b" for name in IRC_COMMAND_NAMES))
# Refusals of a name: the client may try another.
IRC_NAME_ERRORS = frozenset({"name_taken", "name_protected", "bad_name", "name_reserved",
                             "name_banned", "bad_name_password"})
# Queries that list what they find: for a channel or nick that is not there, the
# end of the list alone (RFC 2812, 3.2.5 and 3.6.1).
IRC_LIST_ENDS = {"NAMES": ("366", "End of /NAMES list"), "WHO": ("315", "End of /WHO list")}
# Refusals of a message: 404, naming where it was going.
IRC_NOT_SENT = frozenset({"muted", "too_long", "blocked_word", "no_links", "whispers_off",
                          "rate_limited", "not_in_room"})


class IrcOutput:
    """The IRC codec's output half: each event as the lines an IRC client expects.

    SHARED renders what many connections get (a message in a channel, a join,
    a nick change): it depends only on the codec's variant (its caps), so it is
    rendered once for all of that variant. RENDER renders what one connection
    gets alone (numerics name their recipient first).
    """

    __slots__ = ()

    # -- pieces of lines -----------------------------------------------------------

    def _mask(self, nick: str) -> str:
        """How a person is named in a line's prefix: nick!user@host (the server's host)."""
        return f"{nick}!{nick}@{self.info.server_name}"

    def _setter(self, by: Optional[str]) -> str:
        """Who set a topic, as 333 gives it: a person's whole mask (irssi shows its
        host part), or the server's name for the console's."""
        return self._mask(by) if by and by != "server" else self.info.server_name

    def _line(self, prefix: str, command: str, *params: str, tags: str = "") -> bytes:
        """One line: every parameter kept to one line, the last one after ':'."""
        words = [":" + prefix, command] if prefix else [command]
        for param in params:    # isprintable(): a quick look, true of nearly all
            words.append(param if param.isprintable() else IRC_UNSAFE.sub(" ", param))
        if params:
            words[-1] = ":" + words[-1]
        line = " ".join(words).encode("utf-8")
        if len(line) > IRC_LINE_MAX - 2:    # cut between characters, never inside one
            line = line[:IRC_LINE_MAX - 2].decode("utf-8", "ignore").encode("utf-8")
        line += b"\r\n"
        return b"@" + tags.encode("utf-8") + b" " + line if tags else line

    def _numeric(self, numeric: str, *params: str) -> bytes:
        """A numeric for this client: its nick first, or '*' until it is registered."""
        return self._line(self.info.server_name, numeric,
                          self.nick if self.registered else "*", *params)

    def _server_notice(self, text: str) -> bytes:
        """A notice from the server to this client (its nick, or '*' before it has one)."""
        return self._line(self.info.server_name, "NOTICE", self.nick or "*", text)

    def _nickserv_notice(self, text: str) -> bytes:
        """A notice from NickServ (see IRC_NICKSERV): irssi shows it where it was asked."""
        return self._line(f"{IRC_NICKSERV}!{IRC_NICKSERV}@{self.info.server_name}", "NOTICE",
                          self.nick or "*", text)

    def _peer(self) -> str:
        return self.session.host if self.session is not None else "unknown"

    def _from(self, name: str) -> str:
        """The prefix for something a person, or the server, did."""
        return self.info.server_name if name == "server" else self._mask(name)

    @staticmethod
    def _command_of(event: dict) -> str:
        """How a person's text goes out: a NOTICE as one (no program may answer it)."""
        return "NOTICE" if event.get("notice") else "PRIVMSG"

    def _tags(self, event: dict) -> str:
        return f"time={event['ts']}" if self.server_time and event.get("ts") else ""

    def _in_replay(self, tags: str) -> str:
        """A replayed line's tags: in the replay's batch too, for a client that has
        batch (else bots would answer old commands as new)."""
        if not self._replay or "batch" not in self.caps:
            return tags
        return f"batch={IRC_REPLAY_BATCH};{tags}" if tags else f"batch={IRC_REPLAY_BATCH}"

    def _said(self, sender: str, target: str, text: str, action: bool, tags: str,
              command: str = "PRIVMSG", lead: str = "") -> List[bytes]:
        """A message as one or more lines: long ones (a client.py user may send 2000
        characters) are cut between words into pieces IRC can carry, each after
        `lead` (a replayed message's time, for a client without server-time)."""
        prefix = self._from(sender)
        # What the line holds besides the text: the room left is each piece's (a
        # line that _line had to cut would lose the end of its piece).
        marks = "\x01ACTION \x01" if action else ""
        around = len(f":{prefix} {command} {target} :{marks}{lead}\r\n".encode("utf-8"))
        lines = []
        for piece in split_utf8(text, IRC_LINE_MAX - around):
            body = f"\x01ACTION {lead}{piece}\x01" if action else lead + piece
            lines.append(self._line(prefix, command, target, body, tags=tags))
        return lines

    def _show_names(self, channel: str, users: List[str], ops: List[str]) -> List[bytes]:
        operators = {name.lower() for name in ops}
        names = [("@" if name.lower() in operators else "") + name for name in users]
        room = IRC_LINE_MAX - len(self._numeric("353", "=", channel, ""))  # for the names
        lines, row = [], []
        for name in names + [None]:
            if name is None or sum(len(each) + 1 for each in row) + len(name) > room:
                if row:
                    lines.append(self._numeric("353", "=", channel, " ".join(row)))
                row = []
            if name is not None:
                row.append(name)
        return lines + [self._numeric("366", channel, "End of /NAMES list")]

    def _asked(self, event: dict) -> Tuple[str, Tuple[str, ...]]:
        """What command the event answers, and its arguments (see IrcInput._ask)."""
        return self.asked.get(event.get("id", ""), ("", ()))

    # -- what many get (SHARED) -------------------------------------------------------

    def _show_message(self, event: dict) -> List[bytes]:
        text = event["text"]
        if "action" not in event and "notice" not in event and "\n" not in text \
                and "\r" not in text and "\0" not in text:
            # Nearly every message: text from a person that one line holds, with nothing
            # _line would make safe (IRC_UNSAFE: the core's clean_text leaves none of it,
            # and three searches for one character cost a tenth of isprintable()). What
            # _said makes of it, in one step (a name or a room never needs making safe).
            sender = event["from"]
            line = (f":{sender}!{sender}@{self.info.server_name} PRIVMSG #{event['room']} "
                    f":{text}\r\n").encode("utf-8")
            if len(line) <= IRC_LINE_MAX and sender != "server":
                tags = self._tags(event) if self.server_time else ""
                return [b"@" + tags.encode("utf-8") + b" " + line] if tags else [line]
        return self._said(event["from"], "#" + event["room"], text, event.get("action") is True,
                          self._tags(event), self._command_of(event))

    def _show_join(self, event: dict) -> List[bytes]:
        channel, tags = "#" + event["room"], self._tags(event)
        lines = [self._line(self._mask(event["name"]), "JOIN", channel, tags=tags)]
        if event.get("op"):     # else IRC clients would not know it runs the channel
            lines.append(self._line(self.info.server_name, "MODE", channel, "+o", event["name"],
                                    tags=tags))
        return lines

    def _show_leave(self, event: dict) -> List[bytes]:
        tags, name = self._tags(event), event["name"]
        if "room" not in event:     # out of the chat, and so of every channel
            if event.get("reason") == "quit":
                why = f"Quit: {event['comment']}" if event.get("comment") else "Quit"
            else:
                why = event.get("text") or event.get("reason", "")
            return [self._line(self._mask(name), "QUIT", why, tags=tags)]
        channel = "#" + event["room"]
        if event["reason"] == "kicked":
            return [self._line(self._from(event.get("by", "server")), "KICK", channel, name,
                               event.get("comment") or event.get("text", ""), tags=tags)]
        comment = event.get("comment")      # none: no empty parameter ("has left #a []")
        return [self._line(self._mask(name), "PART", channel, *([comment] if comment else []),
                           tags=tags)]

    def _show_topic_set(self, event: dict) -> List[bytes]:
        return [self._line(self._from(event["by"]), "TOPIC", "#" + event["room"], event["topic"],
                           tags=self._tags(event))]

    def _show_invite(self, event: dict) -> List[bytes]:
        return [self._line(self._mask(event["by"]), "INVITE", self.nick, "#" + event["room"],
                           tags=self._tags(event))]

    def _show_key(self, event: dict) -> List[bytes]:
        change = ("+k", event["key"]) if event["key"] else ("-k", "*")
        return [self._line(self._from(event["by"]), "MODE", "#" + event["room"], *change,
                           tags=self._tags(event))]

    def _show_room_op(self, event: dict) -> List[bytes]:
        channel = "#" + event["room"]
        lines = [self._line(self._from(event["by"]), "MODE", channel,
                            "+o" if event["op"] else "-o", event["name"], tags=self._tags(event))]
        if event.get("heir") is True:   # why the server did it: IRC clients show no reason
            lines.append(self._line(self.info.server_name, "NOTICE", channel,
                                    f"{event['name']} runs {channel} now, while there: none "
                                    "of its operators is in it", tags=self._tags(event)))
        return lines

    def _show_nick(self, event: dict) -> List[bytes]:
        return [self._line(self._mask(event["name"]), "NICK", event["new"],
                           tags=self._tags(event))]

    def _show_away_notify(self, event: dict) -> List[bytes]:
        if "away-notify" not in self.variant:
            return []
        text = event.get("text")
        params = (text,) if text else ()
        return [self._line(self._mask(event["name"]), "AWAY", *params, tags=self._tags(event))]

    def _show_server_notice(self, event: dict) -> List[bytes]:
        text = event["text"] if event["type"] != "announcement" else \
            f"[announcement from {event['from']}] {event['text']}"
        return self._said("server", "*", text, False, self._tags(event), "NOTICE")

    SHARED: Dict[str, Callable[["IrcOutput", dict], List[bytes]]] = {
        "message": _show_message, "join": _show_join, "leave": _show_leave,
        "topic": _show_topic_set, "key": _show_key, "room_op": _show_room_op,
        "invite": _show_invite,
        "nick": _show_nick, "away": _show_away_notify, "announcement": _show_server_notice,
        "notice": _show_server_notice,
    }

    # -- what one gets (RENDER) -------------------------------------------------------

    def _show_welcome(self, event: dict) -> List[bytes]:
        self.registered, self.nick = True, event["name"]
        self.answered = 0   # registering's lines are free: a client needs several
        info = self.info
        lines = [self._numeric("001", f"Welcome to the {info.network} IRC network, "
                                      f"{self._mask(self.nick)}"),
                 self._numeric("002", f"Your host is {info.server_name}, running version "
                                      f"{IRC_VERSION}"),
                 self._numeric("003", f"This server was started {info.started}"),
                 self._numeric("004", info.server_name, IRC_VERSION, "io", "bkot", "bko")]
        tokens = info.isupport
        for start in range(0, len(tokens), 12):
            lines.append(self._numeric("005", *tokens[start:start + 12],
                                       "are supported by this server"))
        lines.append(self._numeric("251", f"There are {event.get('count', 1)} users on 1 "
                                          "server"))
        lines.append(self._numeric("375", f"- {info.server_name} Message of the day -"))
        lines.extend(self._numeric("372", f"- {line}") for line in info.motd)
        lines.append(self._numeric("376", "End of /MOTD command."))
        return lines

    def _show_room(self, event: dict) -> List[bytes]:
        channel = "#" + event["room"]
        self.rooms.add(event["room"].lower())
        lines = [self._line(self._mask(self.nick), "JOIN", channel)]
        if event.get("topic"):
            lines.append(self._numeric("332", channel, event["topic"]))
            lines.append(self._numeric("333", channel, self._setter(event.get("topic_by")),
                                       str(irc_time(event.get("topic_ts", "")))))
        return lines + self._show_names(channel, event["users"], event.get("ops", []))

    def _show_history(self, event: dict) -> List[bytes]:
        """One message of a replay (the history of a channel just joined)."""
        channel = "#" + event["room"] if "room" in event else self._replay
        lines = self._open_replay(channel)
        text, tags = event["text"], self._tags(event)
        tags = self._in_replay(tags)
        # Without server-time, the time is not in a tag: in the text, of every piece.
        lead = "" if "server-time" in self.caps else \
            f"[{event['ts'][:16].replace('T', ' ')} UTC] "
        command = self._command_of(event)
        if event["kind"] == "whisper":     # one's own shown as sent to the other
            target = event["to"] if event["from"].lower() == self.nick.lower() else self.nick
            return lines + self._said(event["from"], target, text, event.get("action") is True,
                                      tags, command, lead)
        if event["kind"] == "announcement" or not channel:
            return lines + self._said("server", channel or self.nick, f"[announcement from "
                                      f"{event['from']}] {text}", False, tags, "NOTICE", lead)
        return lines + self._said(event["from"], channel, text, event["kind"] == "action",
                                  tags, command, lead)

    def _open_replay(self, channel: str, heading: str = "--- earlier messages ---"
                     ) -> List[bytes]:
        """The start of channel's replay, if this is its first line."""
        if not channel or self._replay:
            return []
        self._replay, self._replay_end = channel, IRC_REPLAY_END
        if "batch" in self.caps:    # a chathistory batch tells it from live lines
            return [self._line(self.info.server_name, "BATCH", f"+{IRC_REPLAY_BATCH}",
                               "chathistory", channel)]
        return [self._line(self.info.server_name, "NOTICE", channel, heading)]

    def _show_history_end(self, event: dict) -> List[bytes]:
        lines = []
        if self._replay and "batch" in self.caps:
            lines.append(self._line(self.info.server_name, "BATCH", f"-{IRC_REPLAY_BATCH}"))
        elif self._replay:
            lines.append(self._line(self.info.server_name, "NOTICE", self._replay,
                                    self._replay_end))
        self._replay = ""
        if "text" in event:
            lines.append(self._server_notice(event["text"]))
        return lines

    def _show_users(self, event: dict) -> List[bytes]:
        command, arguments = self._asked(event)
        users, away = event["users"], set(event.get("away", []))
        if command == "NAMES":
            return self._show_names("#" + event.get("room", ""), users, event.get("ops", []))
        if command == "WHO":
            channel, operators = "#" + event.get("room", ""), {n.lower() for n in event["ops"]}
            realnames = event.get("realnames", {})
            return [self._numeric("352", channel, name, self.info.server_name,
                                  self.info.server_name, name,
                                  ("G" if name in away else "H") +
                                  ("@" if name.lower() in operators else ""),
                                  f"0 {realnames.get(name) or name}")
                    for name in users] + [self._numeric("315", channel, "End of /WHO list")]
        here = {name.lower(): name for name in users}
        if command == "ISON":
            return [self._numeric("303", " ".join(here[name.lower()] for name in arguments
                                                   if name.lower() in here))]
        if command == "USERHOST":
            return [self._numeric("302", " ".join(
                f"{here[name.lower()]}={'-' if here[name.lower()] in away else '+'}"
                f"{here[name.lower()]}@{self.info.server_name}"
                for name in arguments if name.lower() in here))]
        return [self._numeric("251", f"There are {event['count']} users on 1 server"),
                self._numeric("255", f"I have {event['count']} clients and 0 servers")]

    def _show_rooms(self, event: dict) -> List[bytes]:
        command, wanted = self._asked(event)
        lines = [] if self._listing else [self._numeric("321", "Channel", "Users Name")]
        self._listing = bool(event.get("more"))
        wanted_rooms = {name.lstrip("#").lower() for name in wanted}
        for entry in event["rooms"]:
            if not wanted_rooms or entry["room"].lower() in wanted_rooms:
                modes = "[+tk]" if entry.get("keyed") else "[+t]"   # as many ircds show them
                lines.append(self._numeric("322", "#" + entry["room"], str(entry["count"]),
                                           f"{modes} {entry['topic']}".rstrip()))
        if event.get("more"):   # the next frame goes on with the list
            return lines
        return lines + [self._numeric("323", "End of /LIST")]

    def _show_topic(self, event: dict) -> List[bytes]:
        command, _ = self._asked(event)
        channel = "#" + event["room"]
        if command == "MODE":
            modes = "+tk" if event.get("key") or event.get("keyed") else "+t"
            return [self._numeric("324", channel, modes, *([event["key"]] if event.get("key")
                                                          else [])),
                    self._numeric("329", channel, str(irc_time(event.get("created", ""))))]
        if command == "TOPIC" and event["topic"]:
            return [self._numeric("332", channel, event["topic"]),
                    self._numeric("333", channel, self._setter(event["by"]),
                                  str(irc_time(event["ts"])))]
        if command == "TOPIC":
            return [self._numeric("331", channel, "No topic is set")]
        return self._show_topic_set(event)     # a change, delivered to this connection alone

    def _show_whois(self, event: dict) -> List[bytes]:
        command, _ = self._asked(event)
        name, server = event["name"], self.info.server_name
        realname = event.get("realname") or name
        if command == "WHO":
            return [self._numeric("352", "*", name, server, server, name,
                                  "G" if event.get("away") else "H", f"0 {realname}"),
                    self._numeric("315", name, "End of /WHO list")]
        lines = [self._numeric("311", name, name, server, "*", realname)]
        if event["rooms"]:
            runs = set(event.get("room_operator", ()))
            lines.append(self._numeric("319", name, " ".join(("@#" if room in runs else "#") +
                                                            room for room in event["rooms"])))
        lines.append(self._numeric("312", name, server, "a LAN chat"))
        if event.get("operator"):
            lines.append(self._numeric("313", name, "is a server operator"))
        if event.get("away"):
            lines.append(self._numeric("301", name, event["away"]))
        lines.append(self._numeric("317", name, str(event.get("idle", 0)),
                                   str(irc_time(event.get("since", ""))),
                                   "seconds idle, signon time"))
        if event.get("registered"):
            lines.append(self._numeric("330", name, name, "is logged in as"))
        return lines + [self._numeric("318", name, "End of /WHOIS list")]

    def _show_error(self, event: dict) -> List[bytes]:
        command, arguments = self._asked(event)
        code = event["code"]
        text = IRC_COMMAND_NAMED.sub(lambda named: IRC_COMMAND_NAMES[named[0]], event["text"])
        text += IRC_HOW.get(code, "")
        lines: List[bytes] = []
        if command == "AUTHENTICATE":
            self.sasl = None
            lines.append(self._numeric("904", "SASL authentication failed"))
        elif command == "NOTICE":
            pass    # never an error in answer to a NOTICE (RFC 2812, 3.3.2)
        elif command == "NICKSERV":     # (a registered nick in use: logging in takes it over)
            self.asked.pop(event.get("id", ""), None)   # an IDENTIFY refused is no longer asked
            lines.append(self._nickserv_notice(text + (
                " If it is a registered nick of yours, connect again with the server "
                "password NICK:PASSWORD, or SASL: that takes it over."
                if code == "name_taken" else "")))
        elif command == "NICK" and code in IRC_NAME_ERRORS:
            if not self.registered:     # a refused hello: the client tries another name,
                if code == "bad_name_password" and self.nick:
                    # PASS's name password was wrong: never sent again with a retried nick
                    # (each try counts toward the address's lockout); the chat's stays.
                    self.password = self._passwords()[0]
                self.hello_sent, self.nick = False, None    # and is "*" until then
            if code in ("name_protected", "bad_name_password"):   # the nick is not to be had
                text += " (/msg NickServ IDENTIFY NICK PASSWORD)" if self.registered else \
                    " (log in with SASL, or PASS name:password)"
            numeric = "433" if code == "bad_name_password" else IRC_ERRORS[code][0]
            lines.append(self._numeric(numeric, arguments[0] if arguments and arguments[0]
                                       else "*", text))
        elif command in IRC_LIST_ENDS and code in ("no_such_room", "bad_room", "unknown_user"):
            numeric, text = IRC_LIST_ENDS[command]    # nothing to list: the end alone
            lines.append(self._numeric(numeric, arguments[0] if arguments else "*", text))
        elif command == "WHOIS" and code == "unknown_user":
            lines += [self._numeric("401", arguments[0], text),
                      self._numeric("318", arguments[0], "End of /WHOIS list")]
        elif code in ("user_not_in_room", "already_in_room") and len(arguments) > 1:
            numeric = "441" if code == "user_not_in_room" else "443"  # (KICK, MODE +o; INVITE)
            lines.append(self._numeric(numeric, arguments[-1], arguments[0], text))
        elif code in IRC_NOT_SENT and command == "PRIVMSG":
            lines.append(self._numeric("404", arguments[0] if arguments else "*", text))
        elif code in IRC_ERRORS:
            numeric, names_target = IRC_ERRORS[code]
            target = (arguments[-1] if command in ("KICK", "MODE", "INVITE") and
                      code == "unknown_user"
                      else arguments[0]) if arguments and names_target else None
            lines.append(self._numeric(numeric, *([target] if target else []), text))
        else:
            lines.append(self._server_notice(text))
        said_why = IRC_SAID_WHY.get(command, frozenset())
        if said_why is None or code in said_why:    # (for a nick, irssi takes nick_ at once)
            lines.insert(0, self._server_notice(text))
        if event.get("closing"):
            lines.append(self._line("", "ERROR", f"Closing Link: {self._peer()} ({text})"))
        return lines

    def _show_notice(self, event: dict) -> List[bytes]:
        code = event["code"]
        if code == "authenticated":
            self.sasl = None
            name = event.get("name", self.nick)
            lines = [self._numeric("900", f"{name}!{name}@{self.info.server_name}", name,
                                   f"You are now logged in as {name}"),
                     self._numeric("903", "SASL authentication successful")]
            self._register()    # if the client finished CAP already, registration can go on
            return lines
        if code == "away":
            return [self._numeric("301", event["name"], event["away"])]
        if code in ("op", "deop"):     # and the user mode that says so
            sign = "+" if code == "op" else "-"
            said = [self._numeric("381", "You are now an IRC operator")] if code == "op" else \
                [self._server_notice(event["text"])]
            return said + [self._line(self.nick, "MODE", self.nick, f"{sign}o")]
        if code == "invited":
            return [self._numeric("341", event["name"], "#" + event["room"])]
        if code in IRC_NICKSERV_SAYS:
            return [self._nickserv_notice(event["text"])]
        if code == "new_since" and (self._replay or "room" in event):
            heading = "--- new since you were last here ---"
            lines = self._open_replay("#" + event["room"] if "room" in event else "", heading)
            self._replay_end = IRC_REPLAY_NEW_END
            if lines and "batch" not in self.caps:
                return lines    # all of the replay is new: that is its heading
            return lines + [self._line(self.info.server_name, "NOTICE", self._replay, heading,
                                       tags=self._in_replay(""))]
        return [self._server_notice(event["text"])]

    def _show_whisper(self, event: dict) -> List[bytes]:
        return self._said(event["from"], self.nick, event["text"], event.get("action") is True,
                          self._tags(event), self._command_of(event))

    def _show_sent(self, event: dict) -> List[bytes]:
        if "echo-message" not in self.caps:
            return []
        target = "#" + event["room"] if "room" in event else event["to"]
        return self._said(self.nick, target, event["text"], event.get("action") is True,
                          self._tags(event), self._command_of(event))

    def _show_leave_self(self, event: dict) -> List[bytes]:
        """Our own part or kick (the room's members get the same, shared)."""
        if "room" in event:
            self.rooms.discard(event["room"].lower())
        return self._show_leave(event)

    def _show_nick_self(self, event: dict) -> List[bytes]:
        """Our own change of name (those who share a room get the same, shared)."""
        lines = self._show_nick(event)
        self.nick = event["new"]
        # A rename answers no request by its id: one that NickServ's IDENTIFY asked for
        # is found by its name (rare: a scan of what is still asked costs nothing here).
        asked = ("NICKSERV", ("IDENTIFY", self.nick.lower()))
        for request_id in [key for key, value in self.asked.items() if value == asked]:
            del self.asked[request_id]
            lines.append(self._nickserv_notice(f"You are now identified as {self.nick}."))
        return lines

    def _show_away_self(self, event: dict) -> List[bytes]:
        if event.get("text"):
            return [self._numeric("306", "You have been marked as being away")]
        return [self._numeric("305", "You are no longer marked as being away")]

    def _show_shutdown(self, event: dict) -> List[bytes]:
        return [self._line("", "ERROR", f"Closing Link: {self._peer()} "
                                        f"({event.get('text', 'server shutting down')})")]

    RENDER: Dict[str, Callable[["IrcOutput", dict], List[bytes]]] = {
        "welcome": _show_welcome, "room": _show_room, "history": _show_history,
        "history_end": _show_history_end, "users": _show_users, "rooms": _show_rooms,
        "topic": _show_topic, "whois": _show_whois, "error": _show_error,
        "notice": _show_notice, "whisper": _show_whisper, "sent": _show_sent,
        "away": _show_away_self, "leave": _show_leave_self, "nick": _show_nick_self,
        "shutdown": _show_shutdown,
        "ping": lambda self, event: [self._line("", "PING", self.info.server_name)],
        "pong": lambda self, event: [],
    }

    def encode(self, event: dict) -> bytes:
        """An event for this connection alone."""
        render = self.RENDER.get(event["type"]) or self.SHARED.get(event["type"])
        return b"".join(render(self, event)) if render is not None else b""

    def encode_shared(self, event: dict) -> bytes:
        """An event for every IRC connection of this variant (see ChatServer.deliver)."""
        render = self.SHARED.get(event["type"])
        return b"".join(render(self, event)) if render is not None else b""


def split_utf8(text: str, most: int) -> List[str]:
    """text in pieces of at most `most` UTF-8 bytes, cut between words where it can be."""
    if len(text) * 4 <= most:   # no character takes more than 4 bytes: short enough
        return [text]
    pieces = []
    while len(text.encode("utf-8")) > most:
        cut = len(text.encode("utf-8")[:most].decode("utf-8", "ignore"))
        space = text.rfind(" ", 0, cut)
        cut = space if space > cut // 2 else cut
        pieces.append(text[:cut])
        text = text[cut:].lstrip(" ")
    return pieces + [text]


class IrcCodec(IrcInput, IrcOutput):
    """IRC for one connection, both ways (see IrcInput and IrcOutput)."""

    __slots__ = ("info", "session", "ended", "metered", "answered", "variant", "nick", "user",
                 "realname", "password", "registered", "hello_sent", "negotiating", "caps",
                 "sasl", "server_time", "asked", "rooms", "_buffer", "_start", "_output",
                 "_requests", "_ids", "_replay", "_replay_end", "_listing")

    def __init__(self, info: IrcInfo) -> None:
        self.info = info
        self.session: Optional["Session"] = None
        self.ended = False
        self.metered = True             # whether the request just handed over costs a token
        self.answered = 0               # lines answered here, not yet charged (registered), or
                                        # all so far (registering: nothing is charged yet)
        self.variant = "irc"            # how shared lines come out: depends on caps
        self.nick = ""                  # asked for, then given by the welcome
        self.user = ""
        self.realname = ""
        self.password: Optional[str] = None     # PASS
        self.registered = False
        self.hello_sent = False
        self.negotiating = False        # CAP LS or REQ seen: registration waits for CAP END
        self.caps: Set[str] = set()
        self.sasl: Optional[List[str]] = None   # AUTHENTICATE chunks while it runs
        self.server_time = False        # the server-time cap, kept with variant: asked per line
        self.asked: Dict[str, Tuple[str, Tuple[str, ...]]] = {}  # id -> (command, arguments)
        self.rooms: Set[str] = set()    # lower-case names of the channels we are in
        self._buffer: Union[bytes, bytearray] = b""     # what came and is not yet taken
        self._start = 0                 # where the lines not yet taken begin in _buffer
        self._output: List[bytes] = []
        self._requests: Deque[Tuple[dict, bool]] = deque()
        self._ids = 0
        self._replay = ""               # the channel whose history is being replayed
        self._replay_end = IRC_REPLAY_END   # its last line: it names what the replay held
        self._listing = False           # in the middle of a LIST answered in several frames


# ---------------------------------------------------------------------------
# The chat core: who is here and what each request does, sans-IO
# ---------------------------------------------------------------------------


def valid_name(name: str) -> bool:
    """Whether a name keeps the rules (the shared block's): no look-alike letters, no
    name of only dots."""
    return NAME_PATTERN.fullmatch(name) is not None


class Clock:
    """Time as the core sees it; tests give the core a clock they move by hand."""

    now = staticmethod(time.monotonic)      # for timeouts and rates
    wall = staticmethod(time.time)          # for timestamps, bans and mutes


def utc_timestamp(wall: float) -> str:
    """A Unix time as ISO-8601 UTC, to the millisecond: 2026-11-25T14:05:09.120Z."""
    moment = datetime.fromtimestamp(wall, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Timestamps:
    """A clock's wall time as events carry it (utc_timestamp), made once per
    millisecond however busy the chat is, and its date and time of day once per
    second: datetime takes 2 us to format them, more than the rest of the core's
    work for a lone message."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._millisecond: Tuple[int, str] = (-1, "")     # (ms since 1970, timestamp)
        self._second: Tuple[int, str] = (-1, "")      # (seconds, "2026-11-25T14:05:09.")

    def now(self) -> str:
        millisecond = int(self.clock.wall() * 1000)
        if millisecond != self._millisecond[0]:
            second, fraction = divmod(millisecond, 1000)
            if second != self._second[0]:
                self._second = (second, utc_timestamp(second)[:-len("000Z")])
            self._millisecond = (millisecond, f"{self._second[1]}{fraction:03d}Z")
        return self._millisecond[1]


def clean_cut(text: str, most: int) -> str:
    """text cleaned (see clean_text) and cut to `most` characters, cut before it is
    cleaned too, so that a huge text costs no more than a short one."""
    return clean_text(text[:most * CLEANING_SLACK])[:most]


def quoted(word: str) -> str:
    """A word a client sent, in quotes, as an error or the log repeats it: cleaned
    for the terminal and cut short, so a client cannot have a long text echoed.

    The quotes never clash with the word: "bob", but '"bob' for a word holding a
    double quote, and "\\"bob's" (escaped) for one holding both kinds.
    """
    word = clean_cut(word, MAX_QUOTED_LENGTH)
    if '"' not in word:
        return f'"{word}"'
    if "'" not in word:
        return f"'{word}'"
    return '"' + word.replace('"', '\\"') + '"'


def duration(seconds: float) -> str:
    """A length of time for people: in seconds under a minute ("try again in 20
    seconds", not "in 1 minute"), else in whole minutes."""
    if round(seconds) < 60:
        return count_of(max(1, round(seconds)), "second")
    return count_of(round(seconds / 60), "minute")


def count_of(number: int, unit: str) -> str:
    return f"{number} {unit}" if number == 1 else f"{number} {unit}s"


class ErrorCode(NamedTuple):
    closes: bool        # always ends the connection; any error in answer to a hello does too
    meaning: str        # for README.md, whose table of codes must say the same
    # When it ends a joined session: why the others are told it left, in plain words
    # (the code and its detail go to the log).
    others: str = "disconnected"


NOT_UNDERSTOOD = "sent something this server does not understand"


#: Every error code the server sends. README.md lists them with the same meaning.
ERRORS: Dict[str, ErrorCode] = {
    "bad_header": ErrorCode(True, "the frame header is not a decimal length", NOT_UNDERSTOOD),
    "too_large": ErrorCode(True, "the frame is over 64 KiB", NOT_UNDERSTOOD),
    "truncated": ErrorCode(True, "the connection closed in the middle of a frame",
                           "connection lost"),
    "bad_utf8": ErrorCode(True, "the payload is not UTF-8", NOT_UNDERSTOOD),
    "bad_json": ErrorCode(True, "the payload is not JSON", NOT_UNDERSTOOD),
    "bad_message": ErrorCode(False, 'not an object with a string "type", or a field is '
                                    "missing or of the wrong type"),
    "hello_required": ErrorCode(True, "something other than hello came first"),
    "hello_timeout": ErrorCode(True, "no hello in time"),
    "timed_out": ErrorCode(True, "nothing came, not even an answer to a ping, for --drop-after "
                                 "seconds", "no sign of life"),
    "password_required": ErrorCode(True, "the room has a password and hello had none"),
    "bad_password": ErrorCode(True, "wrong room password (answered after a delay)"),
    "locked_out": ErrorCode(False, "too many wrong passwords from this address: none is "
                                   "checked for a while (the text says how long); before "
                                   "joining, this ends the connection"),
    "name_protected": ErrorCode(False, "the name is registered and hello (or nick) had no "
                                       "name_password"),
    "bad_name_password": ErrorCode(False, "wrong password for the name"),
    "tls_required": ErrorCode(True, "plain text sent to a TLS-only server"),
    "tls_not_offered": ErrorCode(True, "a TLS handshake sent to a server (or port) without TLS",
                                 NOT_UNDERSTOOD),
    "too_many_connections": ErrorCode(True, "too many connections from this address"),
    "server_full": ErrorCode(True, "too many connections"),
    "crowded_out": ErrorCode(True, "no hello came for a while, and the server needed the room "
                                   "(see --max-silent)"),
    "banned": ErrorCode(True, "banned, when joining or by a moderator"),
    "line_too_long": ErrorCode(False, "an IRC line over 512 bytes (its tags over 8191); it was "
                                      "dropped"),
    "bad_line": ErrorCode(False, "an IRC line that is not UTF-8 or holds a NUL byte; it was "
                                 "dropped"),
    "bad_name": ErrorCode(False, "a name that breaks the rules, or a /ban of something that "
                                 "is neither a name nor an address"),
    "name_banned": ErrorCode(False, "nick to a name that is banned"),
    "bad_room": ErrorCode(False, "not a room's name"),
    "no_such_room": ErrorCode(False, "there is no room of that name"),
    "not_in_room": ErrorCode(False, "you are not in that room"),
    "already_in_room": ErrorCode(False, "an invite of someone who is in the room already"),
    "not_room_operator": ErrorCode(False, "only the room's operators (and server operators) "
                                          "can do that"),
    "bad_key": ErrorCode(False, "the room needs a key, the key is wrong (or too many were, "
                                "from this address), or a new key breaks the rules"),
    "room_full": ErrorCode(False, "the room has --max-room-size people"),
    "too_many_rooms": ErrorCode(False, "the server has --max-rooms rooms: no new one"),
    "room_limit": ErrorCode(False, "you are in as many rooms as one person may be"),
    "name_taken": ErrorCode(False, "someone here has that name (in any case)"),
    "name_reserved": ErrorCode(False, "the name is reserved"),
    "already_joined": ErrorCode(False, "a second hello"),
    "replaced": ErrorCode(True, "the owner of this registered name logged in elsewhere",
                          "logged in elsewhere"),
    "rate_limited": ErrorCode(False, "over the message rate; that message was dropped"),
    "flooding": ErrorCode(True, "kept sending far over the rate", "sent too fast"),
    "weak_password": ErrorCode(False, "a new password is too short or too long"),
    "already_registered": ErrorCode(False, "register on a registered name"),
    "not_registered": ErrorCode(False, "unregister or change_password on a name that is not"),
    "store_failed": ErrorCode(False, "the database could not save an account change"),
    "busy": ErrorCode(False, "too many password checks, or searches, at once"),
    "too_slow": ErrorCode(False, "a search or history request took too long and was stopped"),
    "kicked": ErrorCode(True, "removed by a moderator"),
    "muted": ErrorCode(False, "you are muted"),
    "blocked_word": ErrorCode(False, "a blocked word (with --filter-action reject)"),
    "no_links": ErrorCode(False, "a link (with --no-links)"),
    "whispers_off": ErrorCode(False, "a whisper (with --no-whisper)"),
    "no_operators": ErrorCode(False, "op on a server without an operator password"),
    "bad_admin_password": ErrorCode(False, "a wrong operator password"),
    "not_operator": ErrorCode(False, "a moderation command without op"),
    "unknown_command": ErrorCode(False, "a moderation command that does not exist"),
    "usage": ErrorCode(False, "a malformed moderation command"),
    "not_allowed": ErrorCode(False, "a moderation command aimed at another operator"),
    "not_banned": ErrorCode(False, "unban of something not banned"),
    "not_muted": ErrorCode(False, "unmute of someone not muted"),
    "unknown_type": ErrorCode(False, "a message type the server does not know"),
    "empty_message": ErrorCode(False, "the text was empty after cleaning"),
    "too_long": ErrorCode(False, "the text is over the length limit"),
    "unknown_user": ErrorCode(False, "nobody of that name is here"),
    "user_not_in_room": ErrorCode(False, "that person is not in the room (a kick or /roomop)"),
    "empty_search": ErrorCode(False, "a search with no words"),
    "too_many_words": ErrorCode(False, "a search with too many words"),
    "internal_error": ErrorCode(False, "the server failed on that message (a bug; it is "
                                       "logged)"),
}


#: Every notice code: information for the client, which may act on some.
NOTICES: Dict[str, str] = {
    "registered": "your name is registered now",
    "unregistered": "your name is no longer registered",
    "password_changed": "your name's password is changed",
    "op": "you are an operator now",
    "deop": "you are no longer an operator",
    "new_operator": "someone else became an operator",
    "former_operator": "someone else is no longer an operator",
    "muted": "someone was muted (or you were)",
    "unmuted": "someone was unmuted (or you were, or your mute ended)",
    "moderation": "one line of a moderation command's answer, for the operator who ran it",
    "new_since": "inside a replay: the messages a returning name missed begin here",
    "away": "the one you whispered to is away (name, away: why)",
    "authenticated": "answer to authenticate: you proved the name is yours",
    "invited": "answer to invite: they may come into the room once without its key",
    "masked": "your line went out with a blocked word masked (to a sender with no `sent`)",
}


class RequestType(NamedTuple):
    fields: Dict[str, type]     # field -> type; a trailing "?" marks an optional one
    handler: str                # what answers it: a ChatCore method, or "part.method"
    joined: Optional[bool] = True   # only in the chat; False: only before (hello); None: both
    metered: bool = True        # costs a flood-control token
    fatal: bool = False         # an error in answer to it closes the connection


#: Every request a client may send. Fields not listed are ignored, so newer
#: clients can add some.
REQUESTS: Dict[str, RequestType] = {
    "hello": RequestType({"name": str, "password?": str, "name_password?": str,
                          "resume?": str, "rooms?": list, "retry?": bool,
                          "realname?": str, "missed_only?": bool}, "on_hello",
                         joined=False, metered=False, fatal=True),
    "authenticate": RequestType({"name": str, "password": str}, "accounts.on_authenticate",
                                joined=False, metered=False),
    "say": RequestType({"text": str, "room?": str, "action?": bool, "notice?": bool,
                        "id?": str, "ack?": bool}, "on_say"),
    "whisper": RequestType({"to": str, "text": str, "action?": bool, "notice?": bool,
                            "id?": str, "ack?": bool}, "on_whisper"),
    "join": RequestType({"room": str, "key?": str}, "rooms.on_join"),
    "part": RequestType({"room": str, "text?": str}, "rooms.on_part"),
    "rooms": RequestType({}, "rooms.on_rooms"),
    "topic": RequestType({"room": str, "text?": str}, "rooms.on_topic"),
    "kick": RequestType({"room": str, "name": str, "text?": str}, "rooms.on_kick"),
    "key": RequestType({"room": str, "key": str}, "rooms.on_key"),
    "invite": RequestType({"room": str, "name": str}, "rooms.on_invite"),
    "room_op": RequestType({"room": str, "name": str, "op?": bool}, "rooms.on_room_op"),
    "who": RequestType({"room?": str, "realnames?": bool}, "people.on_who"),
    "whois": RequestType({"name": str}, "people.on_whois"),
    "nick": RequestType({"name": str, "name_password?": str}, "people.on_nick"),
    "away": RequestType({"text?": str}, "people.on_away"),
    "get_history": RequestType({"limit?": int, "room?": str}, "history.on_get_history"),
    "search": RequestType({"text": str, "room?": str, "all?": bool}, "history.on_search"),
    "register": RequestType({"password": str}, "accounts.on_register"),
    "unregister": RequestType({"password": str}, "accounts.on_unregister"),
    "change_password": RequestType({"password": str, "new_password": str},
                                   "accounts.on_change_password"),
    "op": RequestType({"password": str}, "moderation.on_op"),
    "deop": RequestType({}, "moderation.on_deop"),
    "moderate": RequestType({"command": str, "args?": str}, "moderation.on_moderate"),
    "ping": RequestType({}, "on_ping"),
    "pong": RequestType({}, "on_pong"),     # an answer to the server's ping (it costs a
                                            # token as all do: a flood of them is a flood)
    "bye": RequestType({"text?": str}, "on_bye", joined=None),
}

# Where a session is in the chat.
NEW = "new"                     # connected, no hello yet (or one being checked)
JOINED = "joined"               # in the chat under a name


class TokenBucket:
    """Flood control for one client: `rate` messages a second, `burst` at once.

    Each message takes a token; tokens come back at `rate` a second up to
    `burst`. A message without a token is refused and adds a strike;
    strikes drain at the same rate, so only a client that keeps sending
    much faster than allowed piles them up.
    """

    __slots__ = ("tokens", "strikes", "updated")

    def __init__(self, burst: float, now: float) -> None:
        self.tokens = burst
        self.strikes = 0.0
        self.updated = now

    def take(self, now: float, rate: float, burst: float) -> bool:
        refill = (now - self.updated) * rate
        self.updated = now
        tokens = self.tokens + refill   # (comparisons, not min() and max(): every message)
        tokens = burst if tokens > burst else tokens
        strikes = self.strikes - refill
        self.strikes = strikes if strikes > 0.0 else 0.0
        if tokens >= 1:
            self.tokens = tokens - 1
            return True
        self.tokens = tokens
        self.strikes += 1
        return False


class Session:
    """The chat's state for one connection; the transport keeps its own.

    `link` is whatever the caller uses to reach the connection (ChatServer:
    its transport Connection); the core only hands it back in actions.
    """

    # Slots, and nothing stored that can be derived (the address, the resume token):
    # ten thousand idle clients should cost the server about ten megabytes.
    __slots__ = ("link", "host", "connected_at", "last_heard", "last_ping",
                 "state", "name", "key", "registered", "operator", "bucket", "messages_sent",
                 "history_floor", "leave_text", "waiting", "gone",
                 "rooms", "away", "told_no_history", "account", "comment", "last_spoke",
                 "realname", "missed_only")

    def __init__(self, link: Any, host: str, now: float) -> None:
        self.link = link                # its str() is HOST:PORT, for logs
        self.host = host                # the IP, for bans and per-address limits
        self.connected_at = now
        self.last_heard = now           # set by the caller whenever bytes arrive
        self.last_ping = 0.0            # last time we pinged it
        self.state = NEW
        self.name: Optional[str] = None
        self.key = ""                   # the name in lower case: names match without case
        self.registered = False         # joined under a password-protected name
        self.operator = False           # gave the admin password: may moderate
        self.bucket: Optional[TokenBucket] = None
        self.messages_sent = 0
        self.history_floor = 0          # whispers stored before this id are not its own
        self.leave_text: Optional[str] = None   # what others see when it goes, if not "left"
        self.waiting = False            # a password check or delay runs: take no request now
        self.gone = False               # closed, or found closed: nothing more to do with it
        self.rooms: Tuple["Room", ...] = ()    # the rooms it is in
        self.away: Optional[str] = None     # why it is away, while it is
        self.told_no_history = False    # that the server keeps none (said once a visit;
                                        # one back after a lost connection heard it before)
        # The registered name it proved to be its own, and that name's password hash
        # then: it may take the name again without the password (IRC's SASL proves one
        # before hello; a /nick back to it after a /nick away), while the hash holds.
        self.account: Optional[Tuple[str, str]] = None
        self.comment = ""               # its last word, when it leaves the chat
        self.last_spoke = now           # for whois: how long it has been quiet
        self.realname = ""              # for whois, if its hello said (IRC's USER does)
        self.missed_only = False        # its window keeps what it saw (IRC): see Rooms.parted

    @property
    def address(self) -> str:
        return str(self.link)

    def __repr__(self) -> str:
        return self.name or self.address


class Listing(list):
    """The first names of an audience, alphabetically: the same object for as long
    as the audience does not change, so that a codec may keep its encoding with
    it (see JsonCodec.encode) and a burst of joins does not encode it each time.

    Its JSON is kept with it. While no name in it holds a comma or anything JSON
    escapes (none that NAME_PATTERN allows does), a comma followed by a quote
    begins an element and nothing else; so the listing made when a name comes or
    goes is written by cutting that text and putting the name's JSON string in or
    taking it out: 3 us for a thousand names, against 90 to encode them and 15
    to join their kept JSON strings. Any other listing is encoded when asked for."""

    __slots__ = ("encoded", "cuttable")

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__(names)
        self.encoded: Optional[str] = None
        self.cuttable = False       # encoded may be cut as above

    def json(self) -> str:
        if self.encoded is None:
            self.encoded = text = to_json(list(self))
            self.cuttable = "\\" not in text and text.count(",") == max(len(self) - 1, 0)
        return self.encoded

    def with_name(self, place: int, name: str) -> "Listing":
        """A new listing, name inserted at place and cut to MAX_LISTED_NAMES
        (events may still hold this one)."""
        names = self[:]     # a plain list: Listing(self) would copy it item by item
        names.insert(place, name)
        grown = Listing(names)
        quoted = _quoted(name)
        if self.cuttable and _cuttable(name, quoted):
            text = self.encoded
            if place < len(self):
                start = self._start(place)
                text = f"{text[:start]}{quoted},{text[start:]}"
            else:
                text = f"{text[:-1]},{quoted}]" if self else f"[{quoted}]"
            if len(grown) > MAX_LISTED_NAMES:
                text = text[:text.rindex(',"')] + "]"
            grown.encoded, grown.cuttable = text, True
        del grown[MAX_LISTED_NAMES:]
        return grown

    def without(self, place: int, coming: Optional[str] = None) -> "Listing":
        """A new listing, the name at place taken out, and `coming` (the name that
        is now among the first MAX_LISTED_NAMES, if any) put in at the end."""
        names = self[:]
        del names[place]
        if coming is not None:
            names.append(coming)
        kept = Listing(names)
        quoted = _quoted(coming) if coming is not None else ""
        if self.cuttable and (coming is None or _cuttable(coming, quoted)):
            text, start = self.encoded, self._start(place)
            stop = start + len(self[place]) + 2
            if len(self) == 1:
                text = "[]"
            elif place == 0:                        # the name and the comma after it
                text = text[:start] + text[stop + 1:]
            else:                                   # the comma before it and the name
                text = text[:start - 1] + text[stop:]
            if coming is not None:
                text = f"{text[:-1]},{quoted}]" if len(kept) > 1 else f"[{quoted}]"
            kept.encoded, kept.cuttable = text, True
        return kept

    def _start(self, place: int) -> int:
        """Where the name at place begins in `encoded` (its opening quote)."""
        return 1 if place == 0 else self.encoded.index(f',"{self[place]}"') + 1


def _cuttable(name: str, quoted: str) -> bool:
    """Whether a name's JSON string keeps a listing cuttable: nothing in it
    escaped (the name and two quotes), and no comma."""
    return len(quoted) == len(name) + 2 and "," not in name


class Audience:
    """The sessions one delivery reaches: everyone in the chat, or a room's members.

    `members` keeps them in the order they came. For the server batching
    deliveries (see Batch), three marks of who changed: `version` changes
    when a member leaves or is renamed, not when one comes, so that the
    batch takes nothing more for those gone. One exception: a closed
    session whose leave is told to these same members (keep_batch: to
    this audience, or to SharedRooms with it) gets nothing more anyway,
    and its leave is in the batch, in order. So when a room's people all
    drop at once (a network gone) their leaves share one batch, instead
    of one batch each, every one walking the room. `arrivals`, while a
    batch is open, lists who came since it began; `joins` counts every
    coming. The roster keeps the members' names sorted, as listed()
    gives them."""

    __slots__ = ("members", "version", "joins", "arrivals", "roster", "_listing", "_leaves")

    def __init__(self) -> None:
        self.members: Dict[str, Session] = {}   # lower-case name -> session
        self.version = 0
        self.joins = 0
        self.arrivals: Optional[List[Session]] = None   # set by the open batch (if any)
        self.roster: List[str] = []     # the members' lower-case names, kept sorted (bisect)
        self._listing: Optional[Listing] = None
        # Leaves among the listed names since _listing was made, as (place, the name
        # that came into the listing or None), taken out when a listing is next asked
        # for: when a room's people all drop at once, nobody asks between their leaves.
        self._leaves: List[Tuple[int, Optional[str]]] = []

    def add(self, session: Session) -> None:
        """A newcomer (never one already here: names are unique), last in `members`."""
        self.members[session.key] = session
        self.joins += 1
        if self.arrivals is not None:
            self.arrivals.append(session)
        place = bisect.bisect_left(self.roster, session.key)
        self.roster.insert(place, session.key)
        if place < MAX_LISTED_NAMES and self._listing is not None:  # the listing changes
            self._listing = self._caught_up().with_name(place, session.name)

    def discard(self, session: Session, keep_batch: bool = False) -> None:
        """A member leaves; keep_batch: it is closed, and its leave is told to
        these members (maybe with others: SharedRooms)."""
        if self.members.get(session.key) is session:
            del self.members[session.key]
            place = bisect.bisect_left(self.roster, session.key)
            del self.roster[place]
            if not (keep_batch and session.gone):
                self.version += 1
            if place < MAX_LISTED_NAMES and self._listing is not None:  # it changes
                if len(self._leaves) < LISTING_LEAVES_KEPT:
                    roster = self.roster
                    coming = self.members[roster[MAX_LISTED_NAMES - 1]].name \
                        if len(roster) >= MAX_LISTED_NAMES else None
                    self._leaves.append((place, coming))
                else:                   # made again when asked for: cheaper than so many cuts
                    self._listing = None
                    self._leaves.clear()

    def rename(self, old_key: str, session: Session) -> None:
        """A member's name changed from old_key (session.key is the new one)."""
        del self.members[old_key]
        del self.roster[bisect.bisect_left(self.roster, old_key)]
        self._listing = None
        self._leaves.clear()
        self.version += 1
        self.add(session)

    def listed(self) -> Listing:
        """The first MAX_LISTED_NAMES members' names, alphabetically (any case)."""
        if self._listing is None:
            members = self.members
            self._listing = Listing([members[key].name
                                     for key in self.roster[:MAX_LISTED_NAMES]])
        return self._caught_up()

    def _caught_up(self) -> Listing:
        """The listing with the leaves since it was made taken out (see _leaves)."""
        listing = self._listing
        if self._leaves:
            for place, coming in self._leaves:
                listing = listing.without(place, coming)
            self._listing = listing
            self._leaves.clear()
        return listing

    def __contains__(self, session: object) -> bool:
        return self.members.get(getattr(session, "key", None)) is session

    def __len__(self) -> int:
        return len(self.members)


class SharedRooms:
    """Everyone in some rooms, once each: whom the leave of someone who was in
    several is told.

    Like a room, it is who is there when the delivery is carried out, and
    its `key` names the rooms, not this object: so the server can tell the
    leaves of many who drop from the same rooms in one loop pass in one
    batch (see ChatServer.deliver), where a copy of the members for each
    leave would walk the rooms once a leave. Its `version` changes when any
    of the rooms gains a member or loses one it was not told of (see
    Audience)."""

    __slots__ = ("rooms", "key", "arrivals")

    def __init__(self, rooms: Iterable["Room"]) -> None:
        self.rooms = tuple(sorted(rooms, key=id))  # one order for the same rooms
        self.key = frozenset(map(id, self.rooms))
        self.arrivals: Optional[List[Session]] = None   # set by its batch; nobody comes

    @property
    def members(self) -> Dict[str, Session]:
        members: Dict[str, Session] = {}
        for room in self.rooms:
            members.update(room.members)
        return members

    @property
    def version(self) -> Tuple[Tuple[int, int], ...]:
        return tuple((room.version, room.joins) for room in self.rooms)

    def __contains__(self, session: object) -> bool:
        return any(session in room for room in self.rooms)

    def __bool__(self) -> bool:
        return any(room.members for room in self.rooms)


NOBODY = SharedRooms(())     # whom a leave is told that nobody hears of


class QuietLog:
    """Log lines anyone can cause as often as they like (a connection, a refusal, a
    wrong password), at most LOG_BURST of each kind a minute; past that they are
    counted, and one line says how many there were: "... and 4,812 more
    connections in the last minute". A flood must not fill a disk through the
    log. A person's join and leave never come through here: each has its line.

    It also knows whether what people say is logged (--log-level debug): asked
    of logging at each tick, about once a second, not for every message, where
    asking cost 2.5% of a message's instructions.
    """

    def __init__(self, clock: "Clock") -> None:
        self.clock = clock
        self.windows: Dict[str, List[float]] = {}   # kind -> [start, logged, counted]
        self.logs_texts = log.isEnabledFor(logging.DEBUG)

    def log(self, kind: str, level: int, message: str, *args: Any) -> None:
        now = self.clock.now()
        window = self.windows.get(kind)
        if window is None or now - window[0] >= LOG_WINDOW:
            self._summarize(kind)
            window = self.windows[kind] = [now, 0, 0]
        if window[1] < LOG_BURST:
            window[1] += 1
            log.log(level, message, *args)
        else:
            window[2] += 1

    def tick(self) -> None:
        """Say what was counted in the windows that have ended."""
        self.logs_texts = log.isEnabledFor(logging.DEBUG)
        now = self.clock.now()
        for kind in [kind for kind, window in self.windows.items()
                     if now - window[0] >= LOG_WINDOW]:
            self._summarize(kind)

    def _summarize(self, kind: str) -> None:
        window = self.windows.pop(kind, None)
        if window is not None and window[2]:
            log.info("... and %s more %s in the last minute", f"{int(window[2]):,}", kind)


def request_id(request: dict) -> Optional[str]:
    """The id a request carries, if it may be echoed back: a short printable string."""
    value = request.get("id")
    if isinstance(value, str) and len(value) <= MAX_ID_LENGTH and value.isprintable():
        return value
    return None


class ChatCore:
    """The chat itself, sans-IO: who is here, and what each request does.

    Inputs are method calls: connect, receive, protocol_error, peer_finished,
    disconnected, tick, shutdown, and the callbacks of the jobs and timers
    it asked for. Outputs are actions, appended to `actions` as tuples whose
    first item names them ("send", "deliver", "close", "pause", "resume",
    "job", "later", "stop"); whoever called carries them out in order (see
    ChatServer.execute) before the next input. A "deliver" goes to the
    members of its audience as they are when the handler returns.
    """

    def __init__(self, settings: Settings, store: "ChatStore",
                 clock: Optional[Clock] = None) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock or Clock()
        self.actions: List[tuple] = []
        self._timestamps = Timestamps(self.clock)
        self.quiet_log = QuietLog(self.clock)
        # Connected, not yet in the chat: oldest first (a dict keeps the order).
        self.arriving: Dict[Session, None] = {}
        self.per_address: Dict[str, int] = {}       # IP -> sessions from it
        self.everyone = Audience()                  # every session in the chat
        self.members = self.everyone.members        # lower-case name -> joined session
        self.operators: Set[Session] = set()        # members who are operators
        self.rules = MessageRules(settings.blocked_words, settings.filter_action,
                                  settings.no_links, settings.no_whisper)
        self.accounts = Accounts(self)
        self.history = History(self)
        self.moderation = Moderation(self)
        self.people = People(self)
        self.rooms = Rooms(self)
        self.shutdown_by: Optional[str] = None
        # The request being answered and its id: an error in answer to a fatal request
        # closes the connection, and the answer carries the id back.
        self.handling: Optional[RequestType] = None
        self.replying_to: Optional[str] = None
        self.handlers = {kind: (entry, self._handler(entry.handler), field_rules(entry.fields))
                         for kind, entry in REQUESTS.items()}

    def _handler(self, path: str) -> Callable[[Session, dict], None]:
        target: Any = self
        for part in path.split("."):
            target = getattr(target, part)
        return target

    # -- inputs: what happened ------------------------------------------------

    def connect(self, link: Any, host: str, address: str) -> Session:
        """A new connection; returns its session (which may be refused at once)."""
        session = Session(link, host, self.clock.now())
        self.arriving[session] = None
        from_here = self.per_address[host] = self.per_address.get(host, 0) + 1
        self.quiet_log.log("connections", logging.INFO, "connection from %s", address)
        ban = self.moderation.ban_for(None, host)
        settings = self.settings
        limit = settings.max_per_address
        if ban is not None:
            self.refuse(session, "banned", self.moderation.ban_text(ban))
        elif limit and from_here > limit:
            self.refuse(session, "too_many_connections",
                        f"Too many connections from your address (at most {limit}).")
        else:
            full = self.connected() > settings.max_clients
            over_seats = bool(settings.max_silent) and len(self.arriving) > settings.max_silent
            if (full or over_seats) and \
                    not self._drop_oldest_silent(session, at_once=full and over_seats):
                if full:
                    self.refuse(session, "server_full", f"The server is full "
                                f"({settings.max_clients} connections). Try again later.")
        return session

    def _drop_oldest_silent(self, newcomer: Session, at_once: bool) -> bool:
        """Make room: end the connection that has gone longest without a hello, if it
        has been silent for SILENT_GRACE seconds (a client says hello at once), or
        whatever its age when at_once (the server is full, and the silent are past
        their seats: an attacker that reconnects at once keeps them all young)."""
        now = self.clock.now()
        # The first is the oldest; one that is waiting said hello (its password is checked).
        oldest = next((silent for silent in self.arriving
                       if not silent.waiting and silent is not newcomer), None)
        if oldest is None or (now - oldest.connected_at < SILENT_GRACE and not at_once):
            return False
        self.refuse(oldest, "crowded_out", "Dropped to make room for others: no hello "
                    f"came in {duration(now - oldest.connected_at)}.")
        return True

    def receive(self, session: Session, request: dict, metered: bool = True) -> None:
        """One request from a session's codec: metered, checked, then handled.

        metered=False: the codec made it from the same line as the one before (an
        IRC JOIN of several channels), which already cost its token.
        """
        kind = request["type"]
        entry, handler, rules = self.handlers.get(kind, (None, None, ()))
        answer_id = request_id(request) if entry is not None else None
        if metered and (entry is None or entry.metered):    # before hello too: a flood of
            self.replying_to = answer_id                    # refusals holds the loop as long
            try:
                if not self.within_rate(session):
                    return
            finally:
                self.replying_to = None
        if session.state == JOINED:
            if entry is None:
                self.refuse(session, "unknown_type", f"Unknown message type {quoted(kind)}.")
                return
            if entry.joined is False:
                self.refuse(session, "already_joined", f"You are already here as {session.name}.")
                return
        elif entry is None or entry.joined is True:
            self.refuse(session, "hello_required", 'The first message must be "hello".')
            return
        self.handling = entry
        try:
            problem = check_fields(request, rules)
            if problem:
                self.refuse(session, "bad_message", problem)
                return
            self.replying_to = answer_id
            handler(session, request)
        except Exception:   # a bug must cost one message, not the whole server
            log.exception("error while handling %r from %s", kind, session)
            self.refuse(session, "internal_error", "The server failed on that message.")
        finally:
            self.handling = self.replying_to = None

    def protocol_error(self, session: Session, error: ProtocolError) -> None:
        """What arrived is no request at all. After BadInput the stream goes on: the
        piece costs a flood-control token, like any request; after any other
        ProtocolError the stream cannot be trusted further."""
        if not isinstance(error, BadInput):
            self.refuse(session, error.code, error.text, closes=True)
        elif session.state != JOINED:
            self.refuse(session, error.code, error.text)
        elif self.within_rate(session):
            self.refuse(session, error.code, error.text)

    def peer_finished(self, session: Session) -> None:
        """The peer will send nothing more, and everything it sent is handled."""
        self.close(session, "connection closed")

    def disconnected(self, session: Session, reason: str) -> None:
        """The connection went without the core closing it (lost, too slow)."""
        if not session.gone:
            self._forget(session, reason)

    def tick(self) -> None:
        """About once a second: hello timeouts, pings to quiet clients, dead ones dropped."""
        now, settings = self.clock.now(), self.settings
        for session in list(self.arriving):
            if not session.waiting and now - session.connected_at >= settings.hello_timeout:
                self.refuse(session, "hello_timeout",
                            f"No hello within {settings.hello_timeout:g} seconds.")
        for session in list(self.members.values()):
            quiet = now - session.last_heard
            if quiet >= settings.drop_after:    # said, in case it can still hear (IRC: ERROR)
                self.refuse(session, "timed_out",
                            f"No sign of life for {settings.drop_after:g} seconds.")
            elif quiet >= settings.ping_after and session.last_ping < session.last_heard:
                session.last_ping = now
                self.send(session, {"type": "ping"})
        self.accounts.guard.forget_old(now)
        self.accounts.key_guard.forget_old(now)
        self.quiet_log.tick()

    def shutdown(self) -> None:
        """The server stops: everyone is told, and their leaving recorded, not announced."""
        # Recorded, so that a returning registered name is told only what it really missed.
        timestamp = self.timestamp()
        for session in list(self.members.values()):
            self.store.record(timestamp, "leave", session.name, None, "server shut down")
            if session.registered:
                self.store.mark_left(session.name)
        by = f" ({self.shutdown_by})" if self.shutdown_by not in (None, "server") else ""
        notice = {"type": "shutdown", "text": f"The server is shutting down{by}."}
        for session in list(self.arriving) + list(self.members.values()):
            self.send(session, notice)

    def connected(self) -> int:
        """How many sessions there are, joined or not."""
        return len(self.arriving) + len(self.members)

    # -- outputs: what should happen (carried out by the caller, in order) ------

    def send(self, session: Session, event: dict) -> None:
        """One event for one session."""
        self.actions.append(("send", session, event))

    def deliver(self, audience: Union[Audience, SharedRooms], event: dict,
                sender: Optional[Session] = None, echo: Optional[dict] = None) -> None:
        """One event for every member of `audience` (as it is when the handler returns)
        but `sender`, who gets `echo` instead, if anything."""
        self.actions.append(("deliver", audience, event, sender, echo))

    def close(self, session: Session, reason: str, graceful: bool = True,
              detail: Optional[str] = None, replaced: bool = False) -> None:
        """End a session: it leaves the chat now; its connection closes once what it
        was sent is delivered (graceful), or at once. The others are told `reason`;
        the log has `detail` too, where there is one. `replaced`: a new session
        takes its name in this same step."""
        if not session.gone:
            self._forget(session, reason, detail, replaced)
            self.actions.append(("close", session, detail or reason, graceful))

    def wait(self, session: Session) -> None:
        """Take no more requests from session (and read nothing) until done_waiting."""
        session.waiting = True
        self.actions.append(("pause", session))

    def done_waiting(self, session: Session) -> None:
        session.waiting = False
        self.actions.append(("resume", session))

    def run_job(self, job: Callable[[], Any], then: Callable[[Callable[[], Any]], None]) -> None:
        """Run job() on a worker thread; then(outcome) runs here afterwards, where
        outcome() returns job's result or raises its exception."""
        self.actions.append(("job", job, self.answering(then)))

    def later(self, delay: float, function: Callable[[], None]) -> None:
        self.actions.append(("later", delay, self.answering(function)))

    def stop(self) -> None:
        self.actions.append(("stop",))

    def answering(self, function: Callable[..., None]) -> Callable[..., None]:
        """function, run later as an answer to the request handled now: an error it
        sends carries that request's id, and closes the connection if it was fatal."""
        handling, replying_to = self.handling, self.replying_to

        def run(*args: Any) -> None:
            self.handling, self.replying_to = handling, replying_to
            try:
                function(*args)
            finally:
                self.handling = self.replying_to = None
        return run

    def refuse(self, session: Session, code: str, text: str,
               closes: Optional[bool] = None) -> None:
        """Say no: an error for the session, which also ends it when the code always
        does, or when it answers a fatal request (a hello)."""
        if closes is None:
            closes = ERRORS[code].closes or (self.handling is not None and self.handling.fatal)
        error = {"type": "error", "code": code, "text": text}
        if self.replying_to is not None:
            error["id"] = self.replying_to
        if closes:
            error["closing"] = True     # the connection closes once this is delivered
        self.send(session, error)
        if closes:
            self.close(session, ERRORS[code].others, detail=f"{code}: {text}")

    def answer(self, session: Session, event: dict) -> None:
        """An answer to the request handled now: it carries the request's id back, so
        that a client can tell which of its requests it answers."""
        if self.replying_to is not None:
            event["id"] = self.replying_to
        self.send(session, event)

    def notify_all(self, code: str, text: str, exclude: Optional[Session] = None) -> None:
        """A notice for everyone in the chat (but `exclude`), kept in the history too."""
        timestamp = self.timestamp()
        self.store.record(timestamp, "notice", "server", None, text)
        self.deliver(self.everyone, {"type": "notice", "code": code, "text": text,
                                     "ts": timestamp}, exclude)

    def announce(self, by: str, text: str) -> None:
        """An announcement from the console or an operator, to everyone."""
        timestamp = self.timestamp()
        self.store.record(timestamp, "announcement", by, None, text, room=EVERY_ROOM)
        self.deliver(self.everyone, {"type": "announcement", "from": by, "text": text,
                                    "ts": timestamp})

    def timestamp(self) -> str:
        """Now, as events carry it."""
        return self._timestamps.now()

    # -- flood control -------------------------------------------------------

    def answered_by_codec(self, session: Session, lines: int) -> None:
        """Lines session's codec answered itself (IRC's PING, MOTD, an unknown command)
        cost tokens as requests do: a flood of them would hold the loop as long."""
        for _ in range(lines):
            if not self.within_rate(session) and session.gone:
                return

    def within_rate(self, session: Session, strike: bool = True) -> bool:
        """Flood control: False (after telling the client) when over the rate. A refusal
        is a strike towards being cut off (flooding), unless `strike` is False."""
        rate, burst = self.settings.rate_limit, self.settings.rate_burst
        if not rate:
            return True
        if session.bucket is None:      # made when first needed: an idle client has none
            session.bucket = TokenBucket(burst, self.clock.now())
        if session.bucket.take(self.clock.now(), rate, burst):
            return True
        if not strike:
            session.bucket.strikes -= 1
        if session.bucket.strikes > FLOOD_STRIKES:
            self.refuse(session, "flooding", "Disconnected for sending too fast.")
        else:
            self.refuse(session, "rate_limited", f"Slow down: at most {rate:g} messages a "
                        "second; that one was not sent.")
        return False

    # -- joining and leaving ---------------------------------------------------

    def on_hello(self, session: Session, message: dict) -> None:
        if self.settings.password is not None:
            given = message.get("password")
            if given is None:
                self.refuse(session, "password_required", "This chat needs a password.")
                return
            if self.accounts.refused_while_locked(session):
                return
            if not same_secret(given, self.settings.password):
                self.accounts.wrong_password(session, "bad_password",
                                             "Wrong password for this chat.")
                return
        name = message["name"]
        if message.get("retry") is True:    # another hello may follow a refused name (IRC)
            self.handling = self.handling._replace(fatal=False)
        if not self.people.name_allowed(session, name):
            return
        session.told_no_history = "resume" in message   # a token: back after a lost connection
        session.realname = clean_cut(message.get("realname", ""), REALNAME_MAX)
        session.missed_only = message.get("missed_only") is True
        rooms = message.get("rooms", None)
        if self.accounts.is_registered(name):
            self.accounts.log_in(session, name, message.get("name_password"), rooms)
            return
        earlier = self.members.get(name.lower())
        if earlier is not None and not self.accounts.resuming(earlier, message.get("resume")):
            self.refuse(session, "name_taken", f'The name "{name}" is taken. Pick another.')
            return
        if earlier is not None:     # our own dead connection, not yet noticed
            self.accounts.resume(earlier, session, rooms)
        else:
            self.admit(session, name, registered=False, rooms=rooms)

    def admit(self, session: Session, name: str, registered: bool,
              rooms: Optional[list]) -> None:
        """Let a client in: a welcome, then each room it asked for (None: the lobby):
        what the room is, and its history; the members are told.

        A client that names its rooms knows them: it finds who is there in each
        `room` event, and its welcome does not list everyone again.
        """
        session.state = JOINED
        self.arriving.pop(session, None)
        session.name = name
        session.key = name.lower()
        if session.key == name:
            session.key = name      # one string for both, when they are the same
        session.registered = registered
        self.everyone.add(session)
        self.history.whispers_from(session)
        log.info("%s joined as %s%s", session.address, name, " (registered)" if registered else "")
        limits = {"max_length": self.settings.max_length}
        if self.settings.rate_limit:
            limits.update(rate=self.settings.rate_limit, burst=self.settings.rate_burst)
        welcome = {"type": "welcome", "name": name, "count": len(self.members),
                   "ops": self.people.operator_names(), "registered": registered,
                   "limits": limits, "resume": self.accounts.resume_token(session),
                   # what a client need not ask for: it tells its user why not
                   "needs_password": self.settings.password is not None,
                   "op_password": self.settings.admin_password is not None}
        if rooms is None:
            welcome["users"] = self.people.listed()
        self.send(session, welcome)
        # A room the client cannot enter now (a key changed, say) costs that room only.
        self.handling = REQUESTS["join"]
        for wanted in [LOBBY] if rooms is None else rooms:
            if session.gone:    # closed meanwhile (flood control): in no more rooms
                break
            room, key = (wanted, None) if not isinstance(wanted, dict) else \
                (wanted.get("room"), wanted.get("key"))
            if isinstance(room, str) and (key is None or isinstance(key, str)):
                self.rooms.on_join(session, {"type": "join", "room": room, "key": key}
                                   if key is not None else {"type": "join", "room": room})
            else:
                self.refuse(session, "bad_message", 'each of "rooms" must be a room\'s name, '
                            'or {"room": NAME, "key": KEY}')

    def _forget(self, session: Session, reason: str, detail: Optional[str] = None,
                replaced: bool = False) -> None:
        """A session ends: out of the chat, and those who shared a room with it told
        (where the room is small enough for comings and goings to be announced)."""
        session.gone = True
        self.arriving.pop(session, None)
        remaining = self.per_address[session.host] - 1
        if remaining:
            self.per_address[session.host] = remaining
        else:
            del self.per_address[session.host]
        if session.state != JOINED:
            self.quiet_log.log("connections that ended before joining", logging.INFO,
                               "%s disconnected: %s", session.address, detail or reason)
            return
        told = self.rooms.leave_all(session, reason, replaced)
        self.everyone.discard(session)
        self.operators.discard(session)
        if session.registered:
            self.store.mark_left(session.name)
        if told:
            leave = {"type": "leave", "name": session.name, "reason": reason,
                     "ts": self.timestamp()}
            if session.leave_text:
                leave["text"] = session.leave_text
            if session.comment:
                leave["comment"] = session.comment
            self.deliver(told, leave)
        log.info("%s left: %s", session.name, detail or reason)

    def remove(self, session: Session, code: str, text: str) -> None:
        """A moderator removes someone: they are told why, and everyone else the same."""
        self.send(session, {"type": "error", "code": code, "text": text, "closing": True})
        session.leave_text = text
        self.close(session, text)

    # -- talking ---------------------------------------------------------------

    def _spoken(self, session: Session, message: dict) -> Optional[Tuple[str, str, Optional[str]]]:
        """A say's or whisper's text as it may go out (None: refused, and told why), its
        time, and its flag: "action" (/me), "notice" (IRC's: no bot may answer), or None."""
        text = self.moderation.checked_text(session, message["text"],
                                            acked=message.get("ack") is not False)
        if text is None:
            return None
        session.messages_sent += 1
        session.last_spoke = self.clock.now()
        flag = "action" if message.get("action") is True else \
            "notice" if message.get("notice") is True else None
        return text, self.timestamp(), flag

    def on_say(self, session: Session, message: dict) -> None:
        try:
            room = self.rooms.of(session, message.get("room", LOBBY))
        except ModerationError as exc:
            self.refuse(session, exc.code, exc.text)
            return
        spoken = self._spoken(session, message)
        if spoken is None:
            return
        text, timestamp, flag = spoken
        said = {"type": "message", "room": room.name, "from": session.name, "text": text,
                "ts": timestamp}
        ack = None      # (none for a client that asked for none: an IRC one shows its own)
        if message.get("ack") is not False:
            ack = {"type": "sent", "room": room.name, "text": text, "ts": timestamp}
            if self.replying_to is not None:
                ack["id"] = self.replying_to
        if flag:
            said[flag] = True
            if ack is not None:
                ack[flag] = True
        kind = "said_notice" if flag == "notice" else flag or "message"
        self.store.record(timestamp, kind, session.name, None, text, room=room.name)
        self.deliver(room, said, sender=session, echo=ack)
        if self.quiet_log.logs_texts:
            log.debug("%s says in #%s: %s", session.name, room.name, text)

    def on_whisper(self, session: Session, message: dict) -> None:
        if self.rules.no_whisper:
            self.refuse(session, "whispers_off", "Whispers are turned off on this server.")
            return
        target = self.members.get(message["to"].lower())
        if target is None:
            self.refuse(session, "unknown_user", f'Nobody called {quoted(message["to"])} is here.')
            return
        spoken = self._spoken(session, message)
        if spoken is None:
            return
        text, timestamp, flag = spoken
        self.store.record(timestamp, f"whisper_{flag}" if flag else "whisper", session.name,
                          target.name, text)
        whisper = {"type": "whisper", "from": session.name, "to": target.name, "text": text,
                   "ts": timestamp}
        sent = {"type": "sent", "to": target.name, "text": text, "ts": timestamp}
        if flag:
            whisper[flag] = sent[flag] = True
        if target is not session:   # to oneself, the `sent` below is the one copy to show
            self.send(target, whisper)
        if message.get("ack") is not False:
            self.answer(session, sent)
        self.people.tell_if_away(session, target, automatic=flag == "notice")
        if self.quiet_log.logs_texts:
            log.debug("%s whispers to %s: %s", session.name, target.name, text)

    def on_ping(self, session: Session, message: dict) -> None:
        self.answer(session, {"type": "pong"})

    def on_pong(self, session: Session, message: dict) -> None:
        pass    # hearing anything at all already counts as a sign of life

    def on_bye(self, session: Session, message: dict) -> None:
        session.comment = self.moderation.parting_words(session, message.get("text", ""))
        self.close(session, "quit")


# ---------------------------------------------------------------------------
# People: who is here, names and their changes, being away
# ---------------------------------------------------------------------------

class People:
    """Who is in the chat, and what people do about their own presence: their
    names (taken on hello, changed with nick) and being away."""

    def __init__(self, core: ChatCore) -> None:
        self.core = core

    def listed(self) -> Listing:
        """The first MAX_LISTED_NAMES names in the chat, alphabetically (any case)."""
        return self.core.everyone.listed()

    def operator_names(self) -> List[str]:
        operators = self.core.operators
        return sorted((session.name for session in operators), key=str.lower) \
            if operators else []    # (every welcome asks)

    def name_allowed(self, session: Session, name: str) -> bool:
        """Whether session may take this name (for hello or nick); refuses if not."""
        core = self.core
        if not valid_name(name):
            core.refuse(session, "bad_name", f"Names are {NAME_RULES}.")
        elif name.lower() in RESERVED_NAMES or name.lower() == core.settings.server_name.lower():
            core.refuse(session, "name_reserved", f'The name "{name}" is reserved. Pick another.')
        elif core.moderation.ban_for(name, session.host) is not None:
            ban = core.moderation.ban_for(name, session.host)
            code = "banned" if session.state != JOINED else "name_banned"
            core.refuse(session, code, core.moderation.ban_text(ban))
        else:
            return True
        return False

    def on_who(self, session: Session, message: dict) -> None:
        core = self.core
        if "room" not in message:
            listed, count, ops = self.listed(), len(core.members), self.operator_names()
            members, answer = core.members, {}
        else:
            room = core.rooms._or_refuse(session, lambda: core.rooms.existing(message["room"]))
            if room is None:
                return
            listed, count, ops = room.listed(), len(room), room.operators_here(core.operators)
            members, answer = room.members, {"room": room.name}
        away = [name for name in listed if members[name.lower()].away is not None]
        answer.update(type="users", users=listed, count=count, ops=ops, away=away)
        if message.get("realnames") is True:    # asked for: IRC's WHO shows them
            answer["realnames"] = {name: members[name.lower()].realname for name in listed
                                   if members[name.lower()].realname}
        core.answer(session, answer)

    def on_whois(self, session: Session, message: dict) -> None:
        core = self.core
        target = core.members.get(message["name"].lower())
        if target is None:
            core.refuse(session, "unknown_user", f'Nobody called {quoted(message["name"])} is '
                        "here.")
            return
        now, wall = core.clock.now(), core.clock.wall()
        rooms = sorted((room.name for room in target.rooms), key=str.lower)
        runs = [room.name for room in target.rooms if target.key in room.ops or target.operator]
        about = {"type": "whois", "name": target.name, "rooms": rooms,
                 "room_operator": sorted(runs, key=str.lower),
                 "away": target.away, "operator": target.operator,
                 "registered": target.registered, "idle": int(now - target.last_spoke),
                 "since": utc_timestamp(wall - (now - target.connected_at))}
        if target.realname:
            about["realname"] = target.realname
        core.answer(session, about)

    def on_nick(self, session: Session, message: dict) -> None:
        core, name = self.core, message["name"]
        if name == session.name or not self.name_allowed(session, name):
            return
        holder = core.members.get(name.lower())
        if holder is not None and holder is not session:
            core.refuse(session, "name_taken", f'The name "{name}" is taken. Pick another.')
        elif name.lower() != session.key and core.accounts.is_registered(name):
            core.accounts.check_name_password(session, name, message.get("name_password"),
                                              lambda: self.rename(session, name, True))
        elif "name_password" in message and not core.accounts.is_registered(name):
            # ("/nick bad name!" would have made "bad" of it, with "name!" dropped.)
            core.refuse(session, "not_registered", f"{quoted(name)} is not a registered name, "
                        "so a password makes no sense with it (names have no spaces).")
        else:   # a new name, or the same in other letter cases
            self.rename(session, name, session.registered and name.lower() == session.key)

    def rename(self, session: Session, name: str, registered: bool) -> None:
        """Session is called `name` from now on; whoever shares a room with it is told."""
        core = self.core
        holder = core.members.get(name.lower())
        if holder is not None and holder is not session:    # taken while a password was checked
            core.refuse(session, "name_taken", f'The name "{name}" is taken. Pick another.')
            return
        old, old_key, was_registered = session.name, session.key, session.registered
        if was_registered:
            core.store.mark_left(old)
        session.name, session.key, session.registered = name, name.lower(), registered
        core.everyone.rename(old_key, session)
        core.rooms.renamed(session, old_key, was_registered)
        core.moderation.renamed(old, name)
        if registered != was_registered or session.key != old_key:
            core.history.whispers_from(session)     # a new name's whispers are not its past
        timestamp = core.timestamp()
        core.store.record(timestamp, "nick", old, None, name)
        change = {"type": "nick", "name": old, "new": name, "ts": timestamp}
        core.deliver(core.rooms.shared_with(session), change, sender=session, echo=change)
        log.info("%s is now known as %s", old, name)

    def on_away(self, session: Session, message: dict) -> None:
        try:
            text = self.core.moderation.passed_text(session, message.get("text", ""),
                                                    MAX_AWAY_LENGTH)
        except ModerationError as exc:
            self.core.refuse(session, exc.code, exc.text)
            return
        self.set_away(session, text or None)

    def tell_if_away(self, session: Session, target: Session, automatic: bool) -> None:
        """Tell session, who whispered to target, that target is away, and why (not for
        an automatic line, an IRC NOTICE: it wants no answer)."""
        if target.away is not None and target is not session and not automatic:
            self.core.send(session, {"type": "notice", "code": "away", "name": target.name,
                                     "away": target.away,
                                     "text": f"{target.name} is away: {target.away}"})

    def set_away(self, session: Session, text: Optional[str]) -> None:
        """Mark session away (text) or back (None); it and those sharing a room are told
        (but of no change: the same away text again is told to session alone)."""
        unchanged = text == session.away
        session.away = text
        change = {"type": "away", "name": session.name, "text": text, "ts": self.core.timestamp()}
        if unchanged:
            self.core.send(session, change)
            return
        self.core.deliver(self.core.rooms.shared_with(session), change, sender=session,
                          echo=change)


# ---------------------------------------------------------------------------
# Rooms: where people talk, each with its members, topic, key and operators
# ---------------------------------------------------------------------------

LOBBY = "lobby"                     # everyone's first room
ROOM_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,32}")
ROOM_RULES = "1 to 32 characters of A-Z, a-z, 0-9, '_', '-' and '.', with a letter or a digit"
KEY_PATTERN = re.compile(r"[^\s,]{1,32}")   # printable, no spaces or commas, as IRC keys


def room_name(word: str) -> Optional[str]:
    """The room someone means ("#dev" or "dev"), or None if it cannot be a room's name."""
    name = word[1:] if word.startswith("#") else word
    if ROOM_PATTERN.fullmatch(name) and any(char.isalnum() for char in name):
        return name
    return None


class Room(Audience):
    """A room: its members (an Audience, so a message costs only them), what a
    newcomer is shown, and who runs it. Rooms last: one nobody is in stays,
    with its history, and rooms are kept in the store across restarts."""

    __slots__ = ("name", "ident", "topic", "topic_by", "topic_ts", "key", "ops", "passing",
                 "created", "created_by", "alone")

    def __init__(self, name: str, created: str, created_by: str) -> None:
        super().__init__()
        self.name = name                # as whoever made it spelled it
        self.ident = name.lower()       # rooms match without case
        self.topic = ""
        self.topic_by = ""
        self.topic_ts = ""
        self.key = ""                   # joining needs it, when set
        self.ops: Set[str] = set()      # lower-case names of its operators
        self.passing: Set[str] = set()  # those of them only while here (Rooms._hand_over)
        self.created = created
        self.created_by = created_by
        self.alone = (self,)            # the rooms of whoever is only here: one tuple for all

    def operators_here(self, server_operators: Iterable["Session"] = ()) -> List[str]:
        """Who runs the room among those in it: its operators, and the server's
        operators (who run every room) that are here."""
        names = [self.members[key].name for key in self.ops if key in self.members]
        names += [operator.name for operator in server_operators
                  if operator.key not in self.ops and self.members.get(operator.key) is operator]
        return sorted(names, key=str.lower)


class Rooms:
    """The rooms of the chat: joining and parting, topics, keys, room operators
    and kicks from a room.

    Whoever makes a room is its operator. An operator's status lasts, in the
    store, for a registered name; for a name anyone may take, only while its
    holder stays in the room. Server operators and the console may do
    everything in every room. Operations that a session and the console share
    raise ModerationError; the request handlers (on_*) turn that into an error.
    """

    def __init__(self, core: ChatCore) -> None:
        self.core = core
        self.all: Dict[str, Room] = {}      # lower-case name -> room
        # Who may come past a room's key once, without it: room ident -> sessions
        # invited (by a member, who knows the key), until they come or leave the chat.
        self.invited: Dict[str, Set[Session]] = {}
        # (name key, room ident) -> (when, newest event id, whether its client still
        # shows all it was sent there): see parted()
        self.partings: Dict[Tuple[str, str], Tuple[float, int, bool]] = {}
        store = core.store
        for name, topic, topic_by, topic_ts, key, created, created_by in store.rooms():
            room = self.all[name.lower()] = Room(name, created, created_by)
            room.topic, room.topic_by, room.topic_ts, room.key = topic, topic_by, topic_ts, key
        if LOBBY not in self.all:
            self._create(LOBBY, "server")
        for room_ident, name in store.room_ops():
            room = self.all.get(room_ident.lower())
            if room is not None and core.accounts.is_registered(name):
                room.ops.add(name.lower())
            else:   # it lasted while its holder was here; the server stopped first
                store.delete_room_op(room_ident, name)

    @property
    def lobby(self) -> Room:
        return self.all[LOBBY]

    def _forget_an_idle_room(self, wanted: str) -> bool:
        """With the room table full, forget the oldest room that nobody is in and no
        registered name runs (an empty room keeps only lasting operators), as
        /droproom would, to make way for `wanted`; False if there is none. Else
        anyone could fill the table for good with rooms made and left."""
        idle = [room for room in self.all.values()
                if not room.members and not room.ops and room is not self.lobby]
        if not idle:
            return False
        oldest = min(idle, key=lambda room: room.created)
        self.drop(oldest)
        log.info("forgot the idle room #%s to make #%s (--max-rooms %d)", oldest.name,
                 wanted, self.core.settings.max_rooms)
        return True

    def _create(self, name: str, by: str) -> Room:
        room = self.all[name.lower()] = Room(name, self.core.timestamp(), by)
        self.core.store.save_room(room)
        if by != "server":
            log.info("%s made the room #%s", by, name)
        return room

    # -- finding a room -------------------------------------------------------

    def existing(self, word: str) -> Room:
        """The room a word names. Raises ModerationError if there is none."""
        room = self.all.get((word[1:] if word.startswith("#") else word).lower())
        if room is not None:    # every room has a valid name: found, it needs no check
            return room
        name = room_name(word)
        if name is None:
            raise ModerationError("bad_room", f"Room names are {ROOM_RULES}.")
        raise ModerationError("no_such_room", f"There is no room #{name} (/rooms lists them).")

    def of(self, session: Session, word: str) -> Room:
        """A room the session is in. Raises ModerationError if it is not."""
        room = self.existing(word)
        if session.key not in room.members:
            raise self._not_in(room)
        return room

    @staticmethod
    def _not_in(room: Room) -> "ModerationError":
        return ModerationError("not_in_room", f"You are not in #{room.name}: /join "
                               f"#{room.name} first.")

    def may_run(self, actor: Optional[Session], room: Room) -> None:
        """Raises ModerationError unless actor may run the room: the console, a server
        operator, or one of the room's operators in it."""
        if actor is None or actor.operator or (actor.key in room.ops and actor in room):
            return
        if actor not in room:   # said first, as on IRC (442): even its operators must be in
            raise self._not_in(room)
        raise ModerationError("not_room_operator", f"Only the operators of #{room.name} can "
                              "do that.")

    def shared_with(self, session: Session, small_only: bool = False) -> Audience:
        """Everyone who shares a room with session, session included (small_only: only
        the rooms small enough for comings and goings to be announced)."""
        audience = Audience()
        audience.members[session.key] = session
        for room in session.rooms:
            if not small_only or len(room) <= self.core.settings.join_notices_up_to:
                audience.members.update(room.members)
        return audience

    # -- coming and going -------------------------------------------------------

    def enter(self, session: Session, word: str, key: Optional[str] = None) -> Optional[Room]:
        """Put session in a room (made on first use): it gets the room, its topic, who
        is there and its history; the members are told. Raises ModerationError; None
        when flood control refused to make the room (the refusal is said)."""
        core, settings = self.core, self.core.settings
        name = room_name(word)
        if name is None:
            raise ModerationError("bad_room", f"Room names are {ROOM_RULES}.")
        room = self.all.get(name.lower())
        if room is not None and session in room:
            return room     # nothing to do; a client switches rooms on its own
        if len(session.rooms) >= MAX_ROOMS_PER_PERSON:
            raise ModerationError("room_limit", f"You are in {MAX_ROOMS_PER_PERSON} rooms "
                                  "already: /part one first.")
        if room is None:
            if len(self.all) >= settings.max_rooms and not self._forget_an_idle_room(name):
                raise ModerationError("too_many_rooms", f"This server has {len(self.all)} "
                                      "rooms, its limit: join one of them (see /rooms).")
            # A room lasts until removed: making one costs a flood-control token of its
            # own, even where one line asked for many (an IRC JOIN, a hello's rooms).
            if not core.within_rate(session, strike=False):    # (one line may ask for many)
                return None
            room = self._create(name, session.name)
        else:
            self._check_entry(session, room, key)
        if not room.ops and not room.members and room is not self.lobby:
            # Whoever makes a room runs it, and (as on IRC) the first into a room that
            # nobody runs: else a room whose maker left would have no operator again.
            self._set_op(room, session.key, True, session.registered)
        room.add(session)
        session.rooms = room.alone if not session.rooms else session.rooms + (room,)
        core.send(session, self.described(room))
        core.history.replay(session, room)
        timestamp = core.timestamp()
        core.store.record(timestamp, "join", session.name, room=room.name)
        if len(room) <= settings.join_notices_up_to:
            join = {"type": "join", "room": room.name, "name": session.name, "ts": timestamp}
            if session.key in room.ops or session.operator:     # back to a room it runs (a
                join["op"] = True                               # registered name), or any
            core.deliver(room, join, sender=session)
        return room

    def _check_entry(self, session: Session, room: Room, key: Optional[str]) -> None:
        """Raise ModerationError unless session, with key, may come into room."""
        invited = bool(room.key) and session in self.invited.get(room.ident, ())
        if room.key and not invited:
            if key is None:
                how = "someone there to /invite you" if len(room) else \
                    "a server operator to remove the key (nobody is in it now)"
                raise ModerationError("bad_key", f"#{room.name} needs a key: /join "
                                      f"#{room.name} KEY, or {how}")
            locked = self.core.accounts.key_lockout(session, room)
            if locked is not None:
                raise locked
            if not same_secret(key, room.key):
                raise WrongKey(room, f"Wrong key for #{room.name}.")
        size_limit = self.core.settings.max_room_size
        if size_limit and len(room) >= size_limit and room is not self.lobby:
            raise ModerationError("room_full", f"#{room.name} is full ({len(room)} people).")
        if invited:
            self._uninvite(session, room)   # past the key once: used up

    def described(self, room: Room) -> dict:
        """The `room` event a newcomer gets: the room as it is now."""
        event = {"type": "room", "room": room.name, "topic": room.topic, "users": room.listed(),
                 "count": len(room), "ops": room.operators_here(self.core.operators)}
        if room.topic:
            event.update(topic_by=room.topic_by, topic_ts=room.topic_ts)
        if room.key:
            event["key"] = room.key     # its members may see it, as on IRC
        return event

    def leave(self, session: Session, room: Room, reason: str, **details: str) -> None:
        """Take session out of one room (a part, or a kick, with its details): it and
        the room's members are told."""
        # Kicked, its window stays; parted, irssi closes it: back, it gets all again.
        self._take_out(session, room, reason if reason != "part" else details.get("comment", ""),
                       saw_all=reason == "kicked")
        event = {"type": "leave", "room": room.name, "name": session.name, "reason": reason,
                 "ts": self.core.timestamp(), **details}
        self.core.send(session, event)
        if len(room) < self.core.settings.join_notices_up_to or reason == "kicked":
            self.core.deliver(room, event)

    def leave_all(self, session: Session, reason: str,
                  replaced: bool = False) -> Union[Audience, SharedRooms]:
        """Session leaves the chat: out of every room. Returns whom to tell: those who
        shared a room with it, if that room is small (any room, if it was made to
        go), once each, as they are when the handler returns: a room itself, or
        SharedRooms, not a copy, so that all who drop from the same rooms in a loop
        pass are told in one batch (see Audience). But not its successor
        (`replaced`), who comes in the same handler: then a copy of who is there now."""
        rooms = session.rooms
        told: Tuple[Room, ...] = ()
        audience: Union[Audience, SharedRooms]
        if replaced:
            audience = self.shared_with(session, small_only=not session.leave_text)
            audience.members.pop(session.key, None)
        else:
            limit = self.core.settings.join_notices_up_to
            if session.leave_text:
                told = rooms
            elif len(rooms) == 1:   # most people: nothing to make
                told = rooms if len(rooms[0]) <= limit else ()
            else:
                told = tuple(room for room in rooms if len(room) <= limit)
            audience = (told[0] if len(told) == 1 else SharedRooms(told)) if told else NOBODY
        why = session.comment if reason == "quit" and session.comment else reason   # (kept)
        if self.invited:    # (rarely any) an invitation ends with its session
            for ident in [ident for ident, invited in self.invited.items() if session in invited]:
                self._uninvite(session, self.all[ident])
        for room in rooms:
            self._take_out(session, room, why, keep_batch=room in told, replaced=replaced,
                           saw_all=reason == "quit")
        return audience

    def _take_out(self, session: Session, room: Room, why: str, keep_batch: bool = False,
                  replaced: bool = False, saw_all: bool = False) -> None:
        """saw_all: it left in good order (a kick, a quit), so that what was sent to it
        before reached it, and an IRC client still shows it; a lost connection may
        have lost the last of it."""
        room.discard(session, keep_batch)
        rest = tuple(other for other in session.rooms if other is not room)
        session.rooms = rest[0].alone if len(rest) == 1 else rest
        ran_it = session.key in room.ops
        if ran_it and (session.key in room.passing or not (session.registered or replaced)):
            room.passing.discard(session.key)
            self._set_op(room, session.key, False, False)   # lasted while it was here
        if ran_it and not replaced and len(room) and room is not self.lobby and \
                not room.operators_here():
            self.core.later(0, lambda: self._hand_over(room))   # once its leaving is told
        store = self.core.store
        store.record(self.core.timestamp(), "leave", session.name, None, why, room=room.name)
        if session.missed_only or session.registered:
            if len(self.partings) >= PARTINGS_MAX:
                del self.partings[next(iter(self.partings))]    # the oldest
            self.partings[(session.key, room.ident)] = (self.core.clock.now(), store.last_id(),
                                                        saw_all and session.missed_only)

    def _hand_over(self, room: Room) -> None:
        """A room that its last operator here left, with people still in it, is run by
        whoever has been there longest, while it is there: else nobody could set its
        topic or key, nor kick, until it emptied (IRC's rule, which chat users did not
        expect) or a registered operator came back (who still runs it then)."""
        if room.operators_here() or not len(room) or self.all.get(room.ident) is not room:
            return      # (one came, or all left, or the room went, meanwhile)
        # A server operator there runs it already, and needs no telling.
        heir = next((member for member in room.members.values() if not member.operator), None)
        if heir is None:
            return
        room.ops.add(heir.key)
        room.passing.add(heir.key)      # not in the store: it lasts while heir is here
        self.core.deliver(room, {"type": "room_op", "room": room.name, "name": heir.name,
                                 "op": True, "by": "server", "heir": True,
                                 "ts": self.core.timestamp()})

    def parted(self, session: Session, room: Room) -> Tuple[Optional[int], Optional[int]]:
        """Where session's name left room, as the newest event's id then: (for a client
        that keeps its windows, as IRC clients do, only when it was kicked or quit
        within PARTING_MEMORY seconds: all it saw is still shown, and a replay of it
        would be shown twice; for a registered name, its last time there, or None
        when not known here: the chat's restarted since, or forgot it)."""
        left = self.partings.pop((session.key, room.ident), None)
        if left is None:
            return None, None
        when, last_id, still_shown = left
        recent = still_shown and session.missed_only and \
            self.core.clock.now() - when <= PARTING_MEMORY
        return (last_id if recent else None), (last_id if session.registered else None)

    def taken_back(self, session: Session, rooms: Tuple[Room, ...]) -> None:
        """A resumed session's earlier rooms (see Accounts.resume): it stays an operator
        of those it is in again; of the others its name is not."""
        for room in rooms:
            if session.key in room.ops and (session not in room or session.gone) and \
                    not session.registered:
                self._set_op(room, session.key, False, False)

    def renamed(self, session: Session, old_key: str, was_registered: bool) -> None:
        """Session's name changed from old_key: its rooms and room operator status follow."""
        for room in session.rooms:
            room.rename(old_key, session)
            if old_key in room.ops and old_key != session.key:  # (not a change of letter case)
                self._set_op(room, session.key, True, session.registered)
                if not was_registered:
                    self._set_op(room, old_key, False, False)

    def made_lasting(self, session: Session) -> None:
        """Session's name was just registered: the rooms it runs remember it, as they
        remember a registered operator (else a restart gave them to whoever came first)."""
        for room in session.rooms:     # (not those it runs only while there: an heir's)
            if session.key in room.ops and session.key not in room.passing:
                self.core.store.save_room_op(room.name, session.key)

    def _set_op(self, room: Room, key: str, op: bool, lasting: bool) -> None:
        if op:
            room.ops.add(key)
            if lasting:
                self.core.store.save_room_op(room.name, key)
        else:
            room.ops.discard(key)
            self.core.store.delete_room_op(room.name, key)

    # -- requests (see REQUESTS) ------------------------------------------------

    def on_join(self, session: Session, message: dict) -> None:
        key = message.get("key")
        try:
            self.enter(session, message["room"], key)
        except WrongKey as exc:     # counted, as a wrong password is
            self.core.accounts.wrong_key(session, exc.room, exc.text)
        except ModerationError as exc:
            self.core.refuse(session, exc.code, exc.text)

    def on_part(self, session: Session, message: dict) -> None:
        room = self._or_refuse(session, lambda: self.of(session, message["room"]))
        if room is not None:
            comment = self.core.moderation.parting_words(session, message.get("text", ""))
            self.leave(session, room, "part", **({"comment": comment} if comment else {}))

    def on_rooms(self, session: Session, message: dict) -> None:
        rooms = sorted(self.all.values(), key=lambda room: room.ident)
        listed = [{"room": room.name, "count": len(room), "topic": room.topic,
                   **({"keyed": True} if room.key else {})} for room in rooms]
        for start in range(0, max(len(listed), 1), ROOMS_PER_FRAME):
            event = {"type": "rooms", "rooms": listed[start:start + ROOMS_PER_FRAME]}
            if start + ROOMS_PER_FRAME < len(listed):
                event["more"] = True    # the list goes on in the next one
            self.core.answer(session, event)

    def on_topic(self, session: Session, message: dict) -> None:
        room = self._or_refuse(session, lambda: self.existing(message["room"]))
        if room is None:
            return
        if "text" not in message:
            answer = {"type": "topic", "room": room.name, "topic": room.topic,
                      "by": room.topic_by, "ts": room.topic_ts, "created": room.created}
            if room.key and session in room:    # its members may see the key, as on IRC
                answer["key"] = room.key
            elif room.key:                          # others, that there is one
                answer["keyed"] = True
            self.core.answer(session, answer)
            return
        self._or_refuse(session, lambda: self.set_topic(session, room, message["text"]))

    def on_kick(self, session: Session, message: dict) -> None:
        self._or_refuse(session, lambda: self.kick(
            session, self.existing(message["room"]), message["name"], message.get("text", "")))

    def on_invite(self, session: Session, message: dict) -> None:
        self._or_refuse(session, lambda: self.invite(
            session, self.existing(message["room"]), message["name"]))

    def on_key(self, session: Session, message: dict) -> None:
        self._or_refuse(session, lambda: self.set_key(
            session, self.existing(message["room"]), message["key"]))

    def on_room_op(self, session: Session, message: dict) -> None:
        self._or_refuse(session, lambda: self.set_operator(
            session, self.existing(message["room"]), message["name"],
            message.get("op", True) is not False))

    def _or_refuse(self, session: Session, operation: Callable[[], Any]) -> Any:
        """operation's result, or None after refusing with its ModerationError."""
        try:
            return operation()
        except ModerationError as exc:
            self.core.refuse(session, exc.code, exc.text)
            return None

    # -- what room operators (and the console) do ----------------------------------

    def set_topic(self, actor: Optional[Session], room: Room, text: str) -> str:
        self.may_run(actor, room)
        topic = clean_cut(text, MAX_TOPIC_LENGTH + 1)     # one more: to see it is too long
        if len(topic) > MAX_TOPIC_LENGTH:
            raise ModerationError("too_long", f"Topics are limited to {MAX_TOPIC_LENGTH} "
                                  f"characters; that one had {len(text)}.")
        if actor is not None:       # the console's own words pass unchecked
            topic = self.core.moderation.passed_text(actor, topic, MAX_TOPIC_LENGTH)
        by = actor.name if actor is not None else "server"
        room.topic, room.topic_by, room.topic_ts = topic, by, self.core.timestamp()
        self.core.store.save_room(room)
        self.core.store.record(room.topic_ts, "topic", by, None, topic, room=room.name)
        self.core.deliver(room, {"type": "topic", "room": room.name, "topic": topic, "by": by,
                                 "ts": room.topic_ts})
        return f"#{room.name}: topic set" if topic else f"#{room.name}: topic removed"

    def _member_of(self, room: Room, name: str) -> Session:
        """The member of room called name; raises ModerationError if there is none."""
        target = room.members.get(name.lower())
        if target is not None:
            return target
        if name.lower() in self.core.members:
            raise ModerationError("user_not_in_room", f"{self.core.members[name.lower()].name} "
                                  f"is not in #{room.name}.")
        raise ModerationError("unknown_user", f"Nobody called {quoted(name)} is here.")

    def kick(self, actor: Optional[Session], room: Room, name: str, comment: str) -> str:
        self.may_run(actor, room)
        target = self._member_of(room, name)
        if actor is not None and target.operator and target is not actor:
            raise ModerationError("not_allowed", f"{target.name} is a server operator.")
        by = actor.name if actor is not None else "server"
        comment = clean_cut(comment, MAX_TOPIC_LENGTH) if actor is None else \
            self.core.moderation.parting_words(actor, comment)
        text = f"{target.name} was kicked from #{room.name} by {by}" + \
            (f": {comment}" if comment else "")
        self.leave(target, room, "kicked", by=by, text=text,
                   **({"comment": comment} if comment else {}))
        log.info("%s", text)    # as a kick from the chat is: who put whom out, and why
        return text

    def invite(self, actor: Session, room: Room, name: str) -> None:
        """A member of room invites someone here into it: they may come in once
        without its key (as IRC's INVITE)."""
        if actor not in room:
            raise ModerationError("not_in_room", f"You are not in #{room.name}.")
        target = self.core.members.get(name.lower())
        if target is None:
            raise ModerationError("unknown_user", f"Nobody called {quoted(name)} is here.")
        if target in room:
            raise ModerationError("already_in_room", f"{target.name} is in #{room.name} already.")
        self.invited.setdefault(room.ident, set()).add(target)
        self.core.send(target, {"type": "invite", "room": room.name, "by": actor.name,
                                "ts": self.core.timestamp()})
        self.core.answer(actor, {"type": "notice", "code": "invited", "name": target.name,
                                 "room": room.name,
                                 "text": f"{target.name} is invited to #{room.name}."})

    def _uninvite(self, session: Session, room: Room) -> None:
        invited = self.invited.get(room.ident)
        if invited is not None:
            invited.discard(session)
            if not invited:
                del self.invited[room.ident]

    def set_key(self, actor: Optional[Session], room: Room, key: str) -> str:
        if room is self.lobby:      # (said first: nobody may set one, so nobody need ask)
            raise ModerationError("not_allowed", "The lobby is for everyone: it takes no key.")
        self.may_run(actor, room)
        if key and not KEY_PATTERN.fullmatch(key):
            raise ModerationError("bad_key", "A key is 1 to 32 characters without spaces or "
                                  "commas.")
        by = actor.name if actor is not None else "server"
        room.key = key
        self.core.store.save_room(room)
        self.core.deliver(room, {"type": "key", "room": room.name, "key": key, "by": by,
                                 "ts": self.core.timestamp()})
        return f"#{room.name}: key set" if key else f"#{room.name}: key removed"

    def set_operator(self, actor: Optional[Session], room: Room, name: str, op: bool) -> str:
        self.may_run(actor, room)
        target = self._member_of(room, name)
        if target.key in room.passing:      # an heir, made an operator (or not) for good
            room.passing.discard(target.key)
            if op and target.registered:
                self.core.store.save_room_op(room.name, target.key)
        if (target.key in room.ops) == op:
            return f"{target.name} {'is' if op else 'is not'} an operator of #{room.name}"
        self._set_op(room, target.key, op, target.registered)
        by = actor.name if actor is not None else "server"
        self.core.deliver(room, {"type": "room_op", "room": room.name, "name": target.name,
                                 "op": op, "by": by, "ts": self.core.timestamp()})
        return f"{target.name} {'is now' if op else 'is no longer'} an operator of #{room.name}"

    def drop(self, room: Room, by: str = "server") -> str:
        """The console or a server operator (`by`) removes a room; its members are parted."""
        if room is self.lobby:
            raise ModerationError("not_allowed", "The lobby stays.")
        for member in list(room.members.values()):
            self.leave(member, room, "kicked", by=by, text=f"#{room.name} was removed by {by}")
        del self.all[room.ident]
        self.invited.pop(room.ident, None)
        self.core.store.delete_room(room.name)
        return f"#{room.name} removed"

# ---------------------------------------------------------------------------
# Accounts: registered names, their passwords, and failed logins
# ---------------------------------------------------------------------------

def hash_password(password: str) -> str:
    """A salted, deliberately slow hash for storage; never store the password.

    The result names its method and cost, so verify_password() keeps
    working if the defaults change: "scrypt$n$r$p$salt$hash" (hex), or
    "pbkdf2_sha256$iterations$salt$hash" where hashlib has no scrypt.
    """
    salt = os.urandom(16)
    secret = password.encode("utf-8", "surrogatepass")
    if hasattr(hashlib, "scrypt"):
        n, r, p = SCRYPT_COST
        digest = hashlib.scrypt(secret, salt=salt, n=n, r=r, p=p)
        return f"scrypt${n}${r}${p}${salt.hex()}${digest.hex()}"
    digest = hashlib.pbkdf2_hmac("sha256", secret, salt, PBKDF2_ITERATIONS)
    return f"pbkdf2_sha256${PBKDF2_ITERATIONS}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Whether password matches a hash_password() result; constant time."""
    secret = password.encode("utf-8", "surrogatepass")
    try:
        method, *fields = stored.split("$")
        if method == "scrypt":
            n, r, p, salt, digest = fields
            candidate = hashlib.scrypt(secret, salt=bytes.fromhex(salt), n=int(n), r=int(r),
                                       p=int(p), maxmem=64 * 1024 * 1024)
        elif method == "pbkdf2_sha256":
            iterations, salt, digest = fields
            candidate = hashlib.pbkdf2_hmac("sha256", secret, bytes.fromhex(salt), int(iterations))
        else:
            return False
        return hmac.compare_digest(candidate, bytes.fromhex(digest))
    except (ValueError, AttributeError):    # a damaged record, or scrypt missing here
        return False


def same_secret(given: str, expected: str) -> bool:
    """Compare two secrets in constant time, without revealing their lengths."""
    digest = lambda text: hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return hmac.compare_digest(digest(given), digest(expected))


class LoginGuard:
    """Failed guesses per address: answered ever more slowly, then locked out.

    Each failure adds `delay` seconds (up to five times that) before the
    answer goes out. After `max_failures` failures, each within `lockout`
    seconds of the one before, the address is refused for `lockout`
    seconds. Only a quiet `lockout` period clears the count: a success
    does not, or joining under a fresh name between guesses would reset
    it. max_failures 0 turns lockouts off. What is guessed is counted
    apart: passwords per address, each room's key per address and room
    (the "host" is then "10.0.0.7 for #den").
    """

    def __init__(self, max_failures: int, lockout: float, delay: float,
                 guesses: str = "wrong passwords") -> None:
        self.max_failures = max_failures
        self.lockout = lockout
        self.delay = delay
        self.guesses = guesses          # what is counted, for the log
        self._failures: Dict[str, Tuple[int, float]] = {}   # host -> (count, last failure)
        self._locked_until: Dict[str, float] = {}

    def locked_for(self, host: str, now: float) -> float:
        """Seconds this address remains locked out; 0 when it may try."""
        return max(0.0, self._locked_until.get(host, 0.0) - now)

    def failed(self, host: str, now: float) -> float:
        """Count a failure; return how long to wait before answering it."""
        count, last = self._failures.get(host, (0, now))
        if now - last > self.lockout:
            count = 0
        count += 1
        self._failures[host] = (count, now)
        if self.max_failures and count >= self.max_failures:
            self._locked_until[host] = now + self.lockout
            del self._failures[host]
            log.warning("%s locked out for %s after %d %s",
                        host, duration(self.lockout), count, self.guesses)
        return self.delay * min(count, 5)

    @staticmethod
    def for_room(host: str, room_ident: str) -> str:
        """What a room's keys are counted under: the address and the room."""
        return f"{host} for #{room_ident}"

    def forgive(self, host: Optional[str] = None) -> bool:
        """Forget host's failures and lockout (its keys' too; every address's when
        None), as /unlock does; whether a lockout was lifted."""
        def of_host(key: str) -> bool:
            return host is None or key == host or key.startswith(self.for_room(host, ""))
        lifted = [key for key in self._locked_until if of_host(key)]
        for key in lifted:
            del self._locked_until[key]
        for key in [key for key in self._failures if of_host(key)]:
            del self._failures[key]
        return bool(lifted)

    def forget_old(self, now: float) -> None:
        """Drop expired entries, so that memory stays bounded."""
        for host, until in list(self._locked_until.items()):
            if until <= now:
                del self._locked_until[host]
        for host, (_, last) in list(self._failures.items()):
            if now - last > self.lockout:
                del self._failures[host]


class Accounts:
    """Registered names: logging in with a password, registering, changing and
    removing it. Hashes are computed on worker threads (ChatCore.run_job); the
    session waits meanwhile, so its later requests are answered after this one."""

    def __init__(self, core: ChatCore) -> None:
        self.core = core
        self.hashes: Dict[str, str] = core.store.accounts()    # lower-case name -> hash
        settings = core.settings
        self.guard = LoginGuard(settings.max_failures, settings.lockout, settings.failure_delay)
        # Keys apart: a stale key, which each client behind one router gives again
        # when it rejoins, must not shut the whole office out of the chat.
        self.key_guard = LoginGuard(settings.max_failures, settings.lockout,
                                    settings.failure_delay, "wrong keys")
        self.jobs = 0                   # password checks running or waiting for a worker
        self._resume_key = secrets.token_bytes(32)      # see resume_token()

    def resuming(self, earlier: Session, token: Optional[str]) -> bool:
        """Whether a hello carries the resume token of the session holding its name.

        A client whose network dropped reconnects before the server notices
        that its old connection is dead; the token from its welcome proves
        that the name is its own.
        """
        return token is not None and earlier.state == JOINED and \
            same_secret(token, self.resume_token(earlier))

    def resume(self, earlier: Session, session: Session, rooms: Optional[list]) -> None:
        """session takes over its name from its own dead connection, earlier, and what
        the name was while it was here: a server operator, and an operator of each
        room it takes back (of the others no longer: another may take the name)."""
        core, was_in, operator = self.core, earlier.rooms, earlier.operator
        core.close(earlier, "reconnected", graceful=False, replaced=True)
        # Here since it first came (whois): before admit, whose token it signs.
        session.connected_at = earlier.connected_at
        core.admit(session, earlier.name, registered=False, rooms=rooms)
        core.rooms.taken_back(session, was_in)
        if operator and not session.gone:
            core.moderation.make_operator(session, "You are an operator again.")

    def resume_token(self, session: Session) -> str:
        """The token a session's welcome carries: a MAC of what tells this session
        from every other while it lives, made with a key nobody else has, so
        that it need not be stored."""
        tag = f"{id(session)}:{session.connected_at!r}".encode("ascii")
        # Keyed BLAKE2 is a MAC by design, and a third of HMAC-SHA256's cost (every hello)
        proof = hashlib.blake2b(tag, key=self._resume_key,
                                digest_size=RESUME_TOKEN_BYTES).digest()
        return base64.urlsafe_b64encode(proof).rstrip(b"=").decode("ascii")

    def is_registered(self, name: str) -> bool:
        return name.lower() in self.hashes

    def log_in(self, session: Session, name: str, given: Optional[str], rooms: list) -> None:
        """A hello for a registered name: let it in if the password matches."""
        self.check_name_password(session, name, given,
                                 lambda: self._logged_in(session, name, rooms))

    def _logged_in(self, session: Session, name: str, rooms: list) -> None:
        core = self.core
        earlier = core.members.get(name.lower())
        was_in: Tuple[Room, ...] = ()
        if earlier is not None:     # the owner is back, e.g. after a dropped connection
            was_in = earlier.rooms
            core.send(earlier, {"type": "error", "code": "replaced",
                                "text": "You logged in again elsewhere."})
            core.close(earlier, "logged in again elsewhere", replaced=True)
        core.admit(session, name, registered=self.is_registered(name), rooms=rooms)
        core.rooms.taken_back(session, was_in)  # (unregistered meanwhile: as for a resume)

    def check_name_password(self, session: Session, name: str, given: Optional[str],
                            then: Callable[[], None]) -> None:
        """then() once `given` proves to be the password of registered `name`."""
        stored = self.hashes[name.lower()]
        if session.account == (name.lower(), stored):   # proved already
            then()
            return
        if self.refused_while_locked(session):
            return
        if given is None:
            self.core.refuse(session, "name_protected", f'"{name}" is a registered name: give '
                             "its password, or pick another name.")
            return

        def checked(matched: bool) -> None:
            if matched:
                session.account = (name.lower(), stored)
                then()
            else:
                self.wrong_password(session, "bad_name_password", f'Wrong password for "{name}".')

        self.run_password_job(session, lambda: verify_password(given, stored), checked)

    # While an address is locked out, no password (or that room's key) from it is
    # checked at all: a lockout that still said when one was right would only slow
    # guessing down. Who is in stays in, and a hello that needs no password is let in.

    def refused_while_locked(self, session: Session) -> bool:
        """Refuse a password from session (ending it only before its hello is
        through) if its address is locked out."""
        locked = self.guard.locked_for(session.host, self.core.clock.now())
        if locked:
            self.core.refuse(session, "locked_out", self._locked_text(locked))
        return bool(locked)

    @staticmethod
    def _locked_text(locked: float, room: Optional["Room"] = None) -> str:
        guesses = f"wrong keys for #{room.name}" if room is not None else "wrong passwords"
        return f"Too many {guesses} from your address: try again in {duration(locked)}."

    def key_lockout(self, session: Session, room: "Room") -> Optional["ModerationError"]:
        """The refusal of every key for room from session's address while that is
        locked out, or None."""
        locked = self.key_guard.locked_for(self._key_guesser(session, room),
                                           self.core.clock.now())
        return ModerationError("bad_key", self._locked_text(locked, room)) if locked else None

    @staticmethod
    def _key_guesser(session: Session, room: "Room") -> str:
        return LoginGuard.for_room(session.host, room.ident)

    def on_authenticate(self, session: Session, message: dict) -> None:
        """Before hello: prove a registered name is yours (IRC's SASL), so that a hello
        under it needs no password."""
        name, core = message["name"], self.core
        if not self.is_registered(name):
            core.refuse(session, "not_registered", f"{quoted(name)} is not a registered name.")
            return

        def proved() -> None:
            core.answer(session, {"type": "notice", "code": "authenticated", "name": name,
                                  "text": f"You are logged in as {name}."})

        self.check_name_password(session, name, message["password"], proved)

    def on_register(self, session: Session, message: dict) -> None:
        if self.is_registered(session.name):
            self.core.refuse(session, "already_registered", f'"{session.name}" is already '
                             "registered; /password changes its password.")
            return
        password = message["password"]
        problem = password_problem(password)
        if problem:
            self.core.refuse(session, "weak_password", problem)
            return
        self.run_password_job(session, lambda: hash_password(password),
                              lambda hashed: self._save(session, hashed, "registered"))

    def on_unregister(self, session: Session, message: dict) -> None:
        stored = self.hashes.get(session.name.lower())
        if stored is None:
            self.core.refuse(session, "not_registered", f'"{session.name}" is not registered.')
            return
        if self.refused_while_locked(session):
            return
        password = message["password"]
        self.run_password_job(session, lambda: verify_password(password, stored),
                              lambda matched: self._remove(session, matched))

    def on_change_password(self, session: Session, message: dict) -> None:
        stored = self.hashes.get(session.name.lower())
        if stored is None:
            self.core.refuse(session, "not_registered", f'"{session.name}" is not '
                             "registered: /register protects it with a password.")
            return
        if self.refused_while_locked(session):
            return
        old, new = message["password"], message["new_password"]
        problem = password_problem(new)
        if problem:
            self.core.refuse(session, "weak_password", problem)
            return

        def check_and_hash() -> Optional[str]:
            return hash_password(new) if verify_password(old, stored) else None

        self.run_password_job(session, check_and_hash,
                              lambda hashed: self._save(session, hashed, "password_changed"))

    def run_password_job(self, session: Session, job: Callable[[], Any],
                         then: Callable[[Any], None]) -> None:
        """Run a slow password hash on a worker thread, then `then(result)` in the loop.

        The session waits meanwhile, so its messages keep their order; if it
        is gone by the time the result is in, the result is dropped.
        """
        core = self.core
        if self.jobs >= MAX_PASSWORD_JOBS:
            core.refuse(session, "busy", "The server is busy; try again in a moment.")
            return
        self.jobs += 1
        core.wait(session)

        def finished(outcome: Callable[[], Any]) -> None:
            self.jobs -= 1
            if session.gone:
                return
            core.done_waiting(session)
            try:
                result = outcome()
            except Exception:
                log.exception("password check for %s failed", session)
                core.refuse(session, "internal_error", "The server failed to check the password.")
                return
            then(result)

        core.run_job(job, finished)

    def wrong_password(self, session: Session, code: str, text: str) -> None:
        """A wrong password: counted per address, and answered after a growing delay,
        during which the session waits (its next requests are answered after this)."""
        self._wrong_guess(session, self.guard, session.host, code, text)

    def wrong_key(self, session: Session, room: "Room", text: str) -> None:
        """A wrong key for room: counted per address and room, as a password is."""
        self._wrong_guess(session, self.key_guard, self._key_guesser(session, room),
                          "bad_key", text, room)

    def _wrong_guess(self, session: Session, guard: LoginGuard, guesser: str, code: str,
                     text: str, room: Optional["Room"] = None) -> None:
        core = self.core
        now = core.clock.now()
        delay = guard.failed(guesser, now)
        what = "key" if room is not None else "password"
        core.quiet_log.log(f"failed {what}s", logging.WARNING, f"failed {what} from %s (%s)",
                           session.address, code)
        locked = guard.locked_for(guesser, now)
        if locked and session.state == JOINED:      # said at once: the next try is futile
            core.refuse(session, code if room is not None else "locked_out",
                        self._locked_text(locked, room))
            return
        core.wait(session)

        def answer() -> None:
            if not session.gone:
                core.done_waiting(session)
                core.refuse(session, code, text)

        core.later(delay, answer)

    def _save(self, session: Session, hashed: Optional[str], outcome: str) -> None:
        core = self.core
        if hashed is None:
            self.wrong_password(session, "bad_name_password", "Wrong password.")
            return
        try:
            core.store.save_account(session.name, hashed)
        except sqlite3.Error as exc:
            log.error("cannot save the account of %s: %s", session.name, exc)
            core.refuse(session, "store_failed", "The server could not save that: its "
                        "database is not working.")
            return
        self.hashes[session.name.lower()] = hashed
        session.registered = True
        session.account = (session.name.lower(), hashed)    # its own: proved by setting it
        if outcome == "registered":
            core.rooms.made_lasting(session)
            log.info("%s registered their name", session.name)
            text = (f'"{session.name}" is registered: from now on, joining under this name '
                    "needs your password.")
        else:
            log.info("%s changed their password", session.name)
            text = "Your password is changed."
        core.send(session, {"type": "notice", "code": outcome, "text": text})

    def _remove(self, session: Session, matched: bool) -> None:
        core = self.core
        if not matched:
            self.wrong_password(session, "bad_name_password", "Wrong password.")
            return
        try:
            core.store.delete_account(session.name)
        except sqlite3.Error as exc:
            log.error("cannot delete the account of %s: %s", session.name, exc)
            core.refuse(session, "store_failed", "The server could not do that: its "
                        "database is not working.")
            return
        self.hashes.pop(session.name.lower(), None)
        session.registered = False
        # Its room operator status lasts now only while it is in a room, as any name's.
        core.rooms.taken_back(session, tuple(core.rooms.all.values()))
        log.info("%s unregistered their name", session.name)
        core.send(session, {"type": "notice", "code": "unregistered", "text":
                            f'"{session.name}" is no longer registered; anyone may use it.'})

# ---------------------------------------------------------------------------
# History: the replay for newcomers, /history and /search
# ---------------------------------------------------------------------------

class TimeBudget:
    """A share of the loop's time for costly work, such as searching history.

    It fills at `share` seconds per second up to `most` seconds. Work may
    start while some is left; its real cost is then spent, so a long piece
    of work leaves the budget below zero and the next one waits longer.
    """

    def __init__(self, share: float, most: float, now: float) -> None:
        self.share = share
        self.most = most
        self.level = most
        self.updated = now

    def available(self, now: float) -> bool:
        self.level = min(self.most, self.level + (now - self.updated) * self.share)
        self.updated = now
        return self.level > 0

    def spend(self, seconds: float) -> None:
        self.level -= seconds


class History:
    """What was said, read back from the store: the replay a newcomer gets, and
    /history and /search, each within a time limit and all of them together
    within a share of the loop's time."""

    def __init__(self, core: ChatCore) -> None:
        self.core = core
        self.store = core.store
        self.reading_time = TimeBudget(SEARCH_SHARE, 2 * QUERY_TIME_LIMIT, core.clock.now())
        # A batch stays under half the backlog limit, or it could get its reader cut
        # off as too slow.
        self.batch_bytes = core.settings.max_backlog // 2

    def replay(self, session: Session, room: "Room") -> None:
        """A room's recent messages for a newcomer; a returning registered name gets
        what it missed there."""
        count = self.core.settings.history
        missed_after, left = self.core.rooms.parted(session, room)
        if missed_after is not None:    # only what came since: its window shows the rest
            count = min(self.store.count_public_after(room.name, missed_after), MISSED_MAX)
        elif session.registered:
            if left is None:    # not in it since it last left the chat
                left = self.store.account_marks(session.name)[1]
            missed = self.store.count_public_after(room.name, left) if left else 0
            if missed:
                missed_after = left
                count = max(count, min(missed, MISSED_MAX))
        rows = self.store.recent_public(room.name, count) if count else []
        say_if_none_kept = not session.told_no_history
        session.told_no_history = True
        self.send(session, "join", rows, missed_after, say_if_none_kept, room)

    def whispers_from(self, session: Session) -> None:
        """Which whispers session may read back: a registered name, those since it was
        registered; any other, only those of this visit (someone who takes a free name
        later must not read the previous owner's)."""
        session.history_floor = self.store.account_marks(session.name)[0] \
            if session.registered else self.store.last_id()

    def on_get_history(self, session: Session, message: dict) -> None:
        room = self.core.rooms._or_refuse(
            session, lambda: self.core.rooms.of(session, message.get("room", LOBBY)))
        if room is None:
            return
        limit = max(1, min(int(message.get("limit", HISTORY_DEFAULT)), HISTORY_MAX))
        self.read(session, "history", lambda: self.store.recent_for(
            session.name, room.name, limit, session.history_floor), room)

    def on_search(self, session: Session, message: dict) -> None:
        words = clean_cut(message["text"], self.core.settings.max_length).split()
        if not words:
            self.core.refuse(session, "empty_search", "Search for at least one word.")
            return
        if len(words) > SEARCH_MAX_WORDS:   # each is one more LIKE over the whole window
            self.core.refuse(session, "too_many_words", f"Search for at most {SEARCH_MAX_WORDS}"
                             f" words at once; that had {len(words)}.")
            return
        if message.get("all") is True:
            rooms, room = [room.name for room in session.rooms], None
        else:
            room = self.core.rooms._or_refuse(
                session, lambda: self.core.rooms.of(session, message.get("room", LOBBY)))
            if room is None:
                return
            rooms = [room.name]
        self.read(session, "search", lambda: self.store.search_for(
            session.name, rooms, words, SEARCH_RESULTS, session.history_floor), room)

    def read(self, session: Session, purpose: str, query: Callable[[], List[tuple]],
             room: Optional["Room"]) -> None:
        """Run a history read a client asked for, within the loop's reading budget.

        Each read may take QUERY_TIME_LIMIT seconds at most, and all of them
        together SEARCH_SHARE of the loop's time: so many clients searching
        a big history at once slow down their own answers, not the chat.
        """
        if not self.reading_time.available(self.core.clock.now()):
            self.core.refuse(session, "busy", "The server is busy searching; try again in a "
                             "moment.")
            return
        started = time.perf_counter()
        try:
            rows = query()
        except QueryTooSlow:
            self.core.refuse(session, "too_slow", "That took too long to look up: try rarer "
                             "words, or fewer messages.")
            return
        finally:
            self.reading_time.spend(time.perf_counter() - started)
        self.send(session, purpose, rows, room=room)

    def send(self, session: Session, purpose: str, rows: List[tuple],
             missed_after: Optional[int] = None, say_if_none_kept: bool = True,
             room: Optional["Room"] = None) -> None:
        """Past messages as `history` events, then a `history_end` saying why they came.

        A batch stays within batch_bytes (the oldest rows give way). With
        missed_after, a `notice` marks where the messages the reader missed
        begin. say_if_none_kept: the `history_end` says so when no history
        is kept (every answer to a request does; a replay after a reconnect
        does not repeat it).
        """
        budget = self.batch_bytes
        entries = []
        made = room.created if room is not None else ""
        for row_id, ts, kind, sender, recipient, text, in_room in reversed(rows):
            if in_room == EVERY_ROOM and ts < made:
                continue    # an announcement to every room, from before this one was made
            entry = {"type": "history", "kind": kind, "from": sender, "text": text, "ts": ts}
            if kind in FLAGGED_KINDS:   # as the events have it
                entry["kind"], flag = FLAGGED_KINDS[kind]
                entry[flag] = True
            if recipient is not None:
                entry["to"] = recipient
            if in_room:     # not for a whisper, nor an announcement (it was for every room)
                entry["room"] = in_room
            # About what a frame of it takes; JSON's escapes may add a little.
            budget -= 100 + len(text.encode("utf-8")) + len(sender) + len(recipient or "")
            if budget < 0:
                break
            entries.append((row_id, entry))
        entries.reverse()
        for row_id, entry in entries:
            if missed_after is not None and row_id > missed_after:
                since = {"type": "notice", "code": "new_since",
                         "text": "New since you were last here"}
                if room is not None:
                    since["room"] = room.name
                self.core.send(session, since)
                missed_after = None
            self.core.send(session, entry)
        end = {"type": "history_end", "for": purpose, "count": len(entries)}
        if room is not None:
            end["room"] = room.name
        if say_if_none_kept and not (self.store.working and self.store.keep_messages):
            end["text"] = "The server keeps no history."
        self.core.answer(session, end)


# ---------------------------------------------------------------------------
# Moderation: message rules, bans, mutes, and the commands that run them
# ---------------------------------------------------------------------------

class MessageRules:
    """What may be said, beyond length: blocked words, links, whispers.

    check() returns the text to send (masked, perhaps) or raises
    ModerationError naming the rule that refused it.
    """

    # A scheme (http://, ftp://, ...), "www.", or a bare domain with a common ending.
    LINK = re.compile(
        r"(?i)\b[a-z][a-z0-9+.-]*://\S|\bwww\.\S|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*"
        r"\.(?:com|net|org|io|dev|app|co|info|biz|me|ly|gg|tv|xyz|edu|gov|uk|de|fr|nl|ru|cn)"
        r"\b(?![.-]\w)")

    def __init__(self, blocked_words: List[str], action: str, no_links: bool,
                 no_whisper: bool) -> None:
        self.action = action            # "mask" or "reject"
        self.no_links = no_links
        self.no_whisper = no_whisper
        words = sorted({word.strip() for word in blocked_words if word.strip()},
                       key=len, reverse=True)
        # Whole words only: "ass" must not catch "class". Lookarounds instead of
        # \b, so that words starting or ending in punctuation work too.
        phrases = [r"\s+".join(map(re.escape, word.split())) for word in words]
        self.blocked = (re.compile(r"(?<!\w)(?:" + "|".join(phrases) + r")(?!\w)",
                                   re.IGNORECASE) if words else None)

    def check(self, text: str) -> str:
        if self.no_links and self.LINK.search(text):
            raise ModerationError("no_links", "Not sent: links are not allowed here.")
        if self.blocked is not None and self.blocked.search(text):
            if self.action == "reject":
                raise ModerationError("blocked_word", "Not sent: it contains a blocked word.")
            text = self.blocked.sub(lambda match: re.sub(r"\S", "*", match.group()), text)
        return text


def read_word_list(path: str) -> List[str]:
    """--blocked-words: one word or phrase a line; blank lines and #comments skipped."""
    with open(path, encoding="utf-8") as lines:
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


class Public(str):
    """A reply line that everyone in the chat has already seen as a notice.

    The console prints it; an operator, who saw the notice, is not sent it again.
    """


class ModerationError(Exception):
    """A moderation command or rule said no; code and text go to whoever asked."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class WrongKey(ModerationError):
    """A wrong key for a room: a guess, counted toward a lockout of that room's keys."""

    def __init__(self, room: "Room", text: str) -> None:
        super().__init__("bad_key", text)
        self.room = room


@dataclasses.dataclass
class Ban:
    kind: str                   # "name" or "address"
    target: str                 # a name, an IP address, or a network like 192.168.1.0/24
    until: Optional[float]      # Unix time it ends; None: until unbanned
    reason: str = ""
    by: str = "server"
    for_name: str = ""          # an address ban made by banning this name

    def matches(self, name: Optional[str], host: str) -> bool:
        if self.kind == "name":
            return name is not None and name.lower() == self.target.lower()
        try:
            return ipaddress.ip_address(host) in ipaddress.ip_network(self.target, strict=False)
        except ValueError:
            return False

    def describe(self, now: float) -> str:
        length = "until unbanned" if self.until is None else \
            f"for {duration(self.until - now)} more"
        return f"{self.target} ({self.kind}) {length}, by {self.by}" + \
            (f": {self.reason}" if self.reason else "")


def parse_minutes(word: str) -> Optional[float]:
    """A duration argument in minutes ("10", "0.5"), or None if the word is not one."""
    try:
        value = float(word)
    except ValueError:
        return None
    return value if 0 < value < MAX_MINUTES else None   # False for nan too


# A word meant as a number: it starts like one ("10", "-5", ".5", "10m") or is one of
# the words float() takes for one ("nan", "inf").
NUMBER_LIKE = re.compile(r"[-+]?(?:\.?\d.*|nan|inf|infinity)", re.IGNORECASE)


def looks_like_number(word: str) -> bool:
    """Whether a word is meant as a number, so that a bad one is an error, not a reason."""
    return NUMBER_LIKE.fullmatch(word) is not None


def looks_like_address(word: str) -> bool:
    try:
        ipaddress.ip_network(word, strict=False)
        return True
    except ValueError:
        return False


# Digits and dots (999.1.1.1, 10.0.0.0/8), or hex digits and colons (fe80::1): meant as
# an address, whether or not it is a valid one.
ADDRESS_LIKE = re.compile(r"[0-9.]+(/[0-9]+)?|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*(/[0-9]+)?")


class Moderation:
    """Bans, mutes and the moderation commands.

    The server console and operators in the chat run the same commands
    from the same table; `actor` is the operator's session, or None for
    the console. Each command returns lines to show whoever ran it, or
    raises ModerationError. Operators' requests (op, deop, moderate) are
    answered here too.
    """

    COMMANDS: Dict[str, Tuple[str, str, str]] = {
        "help": ("", "this list", "cmd_help"),
        "clients": ("", "who is connected: address, since when, messages sent", "cmd_clients"),
        "kick": ("[#ROOM] NAME [REASON]", "disconnect someone; with #ROOM, put them out of "
                 "that room", "cmd_kick"),
        "ban": ("NAME|ADDRESS [MINUTES] [REASON]", "keep a name or an address (or network) "
                "out, for good or for MINUTES", "cmd_ban"),
        "unban": ("NAME|ADDRESS", "lift a ban", "cmd_unban"),
        "bans": ("", "list the bans", "cmd_bans"),
        "unlock": ("[ADDRESS]", "lift a lockout after wrong passwords (no ADDRESS: all)",
                   "cmd_unlock"),
        "mute": ("NAME [MINUTES] [REASON]", "let someone read but not send", "cmd_mute"),
        "unmute": ("NAME", "let them send again", "cmd_unmute"),
        "say": ("TEXT", "an announcement to everyone", "cmd_say"),
        "rooms": ("", "the rooms, with how many are in each", "cmd_rooms"),
        "topic": ("#ROOM [TEXT]", "show or set a room's topic", "cmd_topic"),
        "key": ("#ROOM [KEY]", "give a room a key joining needs; no KEY: remove it", "cmd_key"),
        "roomop": ("#ROOM NAME", "make someone an operator of a room", "cmd_roomop"),
        "roomdeop": ("#ROOM NAME", "take that away", "cmd_roomdeop"),
        "droproom": ("#ROOM", "remove a room; its members are put out", "cmd_droproom"),
        "shutdown": ("", "stop the server", "cmd_shutdown"),
    }

    def __init__(self, core: ChatCore) -> None:
        self.core = core
        self.bans: List[Ban] = core.store.bans()
        self.mutes: Dict[str, Optional[float]] = {}    # lower-case name -> until (None: always)

    # -- what the rest of the server asks ------------------------------------

    def ban_for(self, name: Optional[str], host: str) -> Optional[Ban]:
        if not self.bans:   # as most of the time: every hello asks
            return None
        now = self.core.clock.wall()
        expired = [ban for ban in self.bans if ban.until is not None and ban.until <= now]
        for ban in expired:
            self._lift(ban)
        return next((ban for ban in self.bans if ban.matches(name, host)), None)

    def renamed(self, old: str, new: str) -> None:
        """A mute follows its person to a new name (or a /nick would end it)."""
        if old.lower() in self.mutes:
            self.mutes[new.lower()] = self.mutes.pop(old.lower())

    def mute_left(self, name: str) -> Optional[float]:
        """Seconds of mute left for a name (inf: until unmuted), or None."""
        if not self.mutes or name.lower() not in self.mutes:
            return None
        until = self.mutes[name.lower()]
        if until is None:
            return float("inf")
        left = until - self.core.clock.wall()
        if left <= 0:
            del self.mutes[name.lower()]
            return None
        return left

    def muted(self, session: Session) -> Optional["ModerationError"]:
        """Why session may not send now (it is muted), or None."""
        if session.name is None:    # (a bye before hello) no name: no mute
            return None
        muted = self.mute_left(session.name)
        if muted is None:
            return None
        left = "until unmuted" if muted == float("inf") else f"for {duration(muted)} more"
        return ModerationError("muted", f"You are muted {left}: you can read, but not send.")

    def checked_text(self, session: Session, text: str, acked: bool = True) -> Optional[str]:
        """A message's text as it may be sent, or None after telling the sender why not.

        Cleaned for display, within the length limit, through the message
        rules (masked or refused), and not from someone muted. A sender that
        gets no `sent` (not `acked`: an IRC client, which shows its line as
        typed) is told when its text went out masked.
        """
        core, most = self.core, self.core.settings.max_length
        muted = self.muted(session) if self.mutes else None    # (nearly always none)
        if muted is not None:
            core.refuse(session, muted.code, muted.text)
            return None
        if len(text) <= most * CLEANING_SLACK:      # far longer: refused unseen
            text = clean_text(text)
        if not text:
            core.refuse(session, "empty_message", "Empty messages are not sent.")
            return None
        if len(text) > most:
            core.refuse(session, "too_long", f"Not sent: messages are limited to {most} "
                        f"characters; yours had {len(text)}.")
            return None
        try:
            checked = core.rules.check(text)
        except ModerationError as exc:
            core.refuse(session, exc.code, exc.text)
            return None
        if checked is not text and not acked:   # (the same string unless masked)
            core.send(session, {"type": "notice", "code": "masked",
                                "text": f"Sent with a blocked word masked: {checked}"})
        return checked

    def passed_text(self, session: Session, text: str, most: int) -> str:
        """Words of session's that others see besides its messages (an away text, a
        topic, a part's or a quit's words): cleaned, cut to `most` characters and
        through the message rules (masked). Raises ModerationError when they may not
        go out: session is muted, or a rule refuses them."""
        text = clean_cut(text, most)
        if not text:
            return text
        muted = self.muted(session)
        if muted is not None:
            raise muted
        try:
            return self.core.rules.check(text)
        except ModerationError as exc:  # an away text or a topic is set, not sent
            raise ModerationError(exc.code, exc.text.replace("Not sent:", "Not set:", 1)) \
                from None

    def parting_words(self, session: Session, text: str) -> str:
        """A part's or quit's words as others see them; none when they may not go out
        (the leave itself does)."""
        try:
            return self.passed_text(session, text, MAX_TOPIC_LENGTH)
        except ModerationError:
            return ""

    def ban_text(self, ban: Ban) -> str:
        """What a banned person is told."""
        left = "" if ban.until is None else \
            f" for {duration(ban.until - self.core.clock.wall())} more"
        return f"You are banned from this chat{left}" + (f": {ban.reason}" if ban.reason else ".")

    # -- requests from operators (see REQUESTS) ----------------------------------

    def on_op(self, session: Session, message: dict) -> None:
        core = self.core
        if core.settings.admin_password is None:
            core.refuse(session, "no_operators", "This server has no operator password.")
        elif core.accounts.refused_while_locked(session):
            return
        elif not same_secret(message["password"], core.settings.admin_password):
            core.accounts.wrong_password(session, "bad_admin_password",
                                         "Wrong operator password.")
        elif not session.operator:
            self.make_operator(session, "You are an operator now: /help lists the moderation "
                                        "commands.")
            core.notify_all("new_operator", f"{session.name} is now an operator",
                            exclude=session)

    def make_operator(self, session: Session, text: str) -> None:
        session.operator = True
        self.core.operators.add(session)
        log.info("%s is now an operator", session.name)
        self.core.send(session, {"type": "notice", "code": "op", "text": text})
        self._runs_its_rooms(session, True)

    def _runs_its_rooms(self, session: Session, op: bool) -> None:
        """A server operator runs every room: those it is in, and does not run anyway,
        are told it now does (or no longer does)."""
        for room in session.rooms:
            if session.key not in room.ops:
                change = {"type": "room_op", "room": room.name, "name": session.name, "op": op,
                          "by": "server", "server_operator": True, "ts": self.core.timestamp()}
                self.core.deliver(room, change, sender=session, echo=change)

    def on_deop(self, session: Session, message: dict) -> None:
        if not session.operator:
            self.core.refuse(session, "not_operator", "You are not an operator.")
            return
        session.operator = False
        self.core.operators.discard(session)
        self.core.send(session, {"type": "notice", "code": "deop",
                                 "text": "You are no longer an operator."})
        self.core.notify_all("former_operator", f"{session.name} is no longer an operator",
                             exclude=session)
        self._runs_its_rooms(session, False)

    def on_moderate(self, session: Session, message: dict) -> None:
        if not session.operator:
            self.core.refuse(session, "not_operator", "Only operators can do that (see /op).")
            return
        line = f"{message['command']} {message.get('args', '')}"
        log.info("%s runs /%s", session.name, clean_cut(line.strip(), 80))   # with its target
        try:
            replies = self.run(session, line)
        except ModerationError as exc:
            self.core.refuse(session, exc.code, exc.text)
            return
        if not session.gone:
            for reply in replies:
                if not isinstance(reply, Public):
                    self.core.send(session, {"type": "notice", "code": "moderation",
                                             "text": reply})

    # -- the commands ----------------------------------------------------------

    def run(self, actor: Optional[Session], line: str) -> List[str]:
        """Run one command line ("/kick bob spam" or "kick bob spam").

        The line is cleaned like any chat text first: reasons and names end
        up in notices, the log and the history, for everyone's terminal.
        """
        line = clean_cut(line, MAX_COMMAND_LENGTH)
        word, _, args = line.lstrip("/\\").partition(" ")
        entry = self.COMMANDS.get(word.lower())
        if entry is None and actor is None and not line.startswith(("/", "\\")):
            raise ModerationError("unknown_command", "Console commands start with /: "
                                  "/say TEXT speaks to everyone, /help lists the rest.")
        if entry is None:
            raise ModerationError("unknown_command",
                                  f"Unknown command /{word}: /help lists the commands.")
        return getattr(self, entry[2])(actor, args.strip())

    def cmd_help(self, actor: Optional[Session], args: str) -> List[str]:
        lines = []
        for name, (usage, summary, _) in self.COMMANDS.items():
            label = f"/{name} {usage}".strip()
            if len(label) > 18:     # a long usage gets a line of its own
                lines.append(label)
                label = ""
            lines.append(f"{label:<19}{summary}")
        return lines

    def cmd_clients(self, actor: Optional[Session], args: str) -> List[str]:
        now, wall = self.core.clock.now(), self.core.clock.wall()
        lines = []
        for member in sorted(self.core.members.values(), key=lambda m: m.name.lower()):
            since = datetime.fromtimestamp(wall - (now - member.connected_at)).strftime("%H:%M")
            flags = [flag for flag, on in (("operator", member.operator),
                                           ("registered", member.registered),
                                           ("muted", self.mute_left(member.name) is not None))
                     if on]
            lines.append(f"{member.name:<20} {member.address:<28} since {since}  "
                         f"{member.messages_sent} sent  {' '.join(flags)}".rstrip())
        waiting = len(self.core.arriving)
        lines.append(f"{len(lines)} in the chat" + (f", {waiting} connecting" if waiting else ""))
        return lines

    def cmd_kick(self, actor: Optional[Session], args: str) -> List[str]:
        if args.startswith("#"):
            room, rest = self._room(args, "kick")
            name, _, reason = rest.partition(" ")
            if not name:
                raise ModerationError("usage", f"Usage: /kick {self.COMMANDS['kick'][0]}")
            return [self.core.rooms.kick(actor, room, name, reason)]
        name, _, reason = args.partition(" ")
        target = self._member(actor, name, f"/kick {self.COMMANDS['kick'][0]}")
        reason = reason.strip() if actor is None else self.parting_words(actor, reason)
        text = f"{target.name} was kicked by {self._name(actor)}" + \
            (f": {reason}" if reason else "")
        self.core.remove(target, "kicked", text)
        return [Public(text)]

    def cmd_ban(self, actor: Optional[Session], args: str) -> List[str]:
        words = args.split()
        if not words:
            raise ModerationError("usage", "Usage: /ban NAME|ADDRESS [MINUTES] [REASON]")
        target, rest = words[0], words[1:]
        length = None
        if rest and looks_like_number(rest[0]):     # "/ban bob 0 spam" is no permanent ban
            length = self._minutes(rest.pop(0), "ban")
        until = self.core.clock.wall() + length * 60 if length is not None else None
        reason, by = " ".join(rest), self._name(actor)
        if actor is not None:
            reason = self.parting_words(actor, reason)
        how_long = f" for {duration(length * 60)}" if length is not None else ""
        if looks_like_address(target):
            bans = [Ban("address", target, until, reason, by)]
            if actor is not None and bans[0].matches(None, actor.host):
                raise ModerationError("not_allowed", f"{target} is your own address "
                                      f"({actor.host}): it would ban you too.")
            victims = [member for member in self.core.members.values()
                       if bans[0].matches(None, member.host)]
        else:
            member = self._member(actor, target, "/ban NAME|ADDRESS [MINUTES] [REASON]",
                                  must_be_here=False)
            if member is None and ADDRESS_LIKE.fullmatch(target):
                raise ModerationError("bad_name", f"{quoted(target)} is not a valid address "
                                      "(an IPv4 or IPv6 address, or a network such as "
                                      "10.0.0.0/8).")
            name = member.name if member else target
            if not NAME_PATTERN.fullmatch(name):
                raise ModerationError("bad_name",
                                      f"{quoted(name)} is neither a name nor an address.")
            bans = [Ban("name", name, until, reason, by)]
            own = member is not None and actor is not None and member.host == actor.host
            if member and not own:
                bans.append(Ban("address", member.host, until, reason, by, for_name=name))
            victims = [member] if member else []
        for victim in victims:
            if actor is not None and victim.operator:
                raise ModerationError("not_allowed", f"{victim.name} is an operator too.")
        for ban in bans:
            self._add(ban)
        lines = [f"banned {ban.target} ({ban.kind}){how_long}" for ban in bans]
        sharing = sorted((other.name for other in self.core.members.values()
                          if other not in victims and other is not actor and any(
                              ban.matches(None, other.host) for ban in bans
                              if ban.kind == "address")), key=str.lower)
        if sharing:
            lines.append(f"note: {', '.join(sharing[:MAX_NAMED_IN_NOTE])}"
                         + (f" and {len(sharing) - MAX_NAMED_IN_NOTE} more"
                            if len(sharing) > MAX_NAMED_IN_NOTE else "")
                         + f" {'is' if len(sharing) == 1 else 'are'} on that address too: "
                         "they stay for now, but cannot come back once they leave")
        if not looks_like_address(target) and own:     # (own: set for a name's ban)
            lines.append(f"note: {name}'s address, {actor.host}, is yours too, so it is not "
                         "banned: they can come back under another name")
        for victim in victims:
            text = f"{victim.name} was banned by {by}{how_long}" + (f": {reason}" if reason else "")
            self.core.remove(victim, "banned", text)
            lines.append(Public(text))
        return lines

    def cmd_unban(self, actor: Optional[Session], args: str) -> List[str]:
        target = args.strip()
        if not target:
            raise ModerationError("usage", "Usage: /unban NAME|ADDRESS")
        lifted = [ban for ban in self.bans
                  if target.lower() in (ban.target.lower(), ban.for_name.lower())]
        if not lifted:
            raise ModerationError("not_banned", f"{target} is not banned. /bans lists the bans.")
        for ban in lifted:
            self._lift(ban)
        self.core.store.record(self.core.timestamp(), "notice", self._name(actor), None,
                               f"{target} was unbanned by {self._name(actor)}")
        return [f"unbanned {ban.target} ({ban.kind})" for ban in lifted]

    def cmd_bans(self, actor: Optional[Session], args: str) -> List[str]:
        self.ban_for(None, "")      # drops the expired ones
        now = self.core.clock.wall()
        return [ban.describe(now) for ban in self.bans] or ["nobody is banned"]

    def cmd_unlock(self, actor: Optional[Session], args: str) -> List[str]:
        host, accounts = args.strip() or None, self.core.accounts
        lifted = [guard.forgive(host) for guard in (accounts.guard, accounts.key_guard)]
        if not any(lifted):
            return [f"{host} is not locked out" if host else "nobody is locked out"]
        log.info("%s lifted %s", self._name(actor),
                 f"{host}'s lockout" if host else "every lockout")
        return [f"lifted {host}'s lockout: its passwords and keys are checked again" if host
                else "lifted every lockout"]

    def cmd_mute(self, actor: Optional[Session], args: str) -> List[str]:
        name, *rest = args.split() or [""]
        target = self._member(actor, name, "/mute NAME [MINUTES] [REASON]")
        length = None
        if rest and looks_like_number(rest[0]):     # as /ban's: the rest is the reason
            length = self._minutes(rest.pop(0), "mute")
        reason = " ".join(rest)
        if actor is not None:
            reason = self.parting_words(actor, reason)
        until = self.core.clock.wall() + length * 60 if length is not None else None
        self.mutes[target.name.lower()] = until
        how_long = f" for {duration(length * 60)}" if length is not None else ""
        text = f"{target.name} was muted by {self._name(actor)}{how_long}" + \
            (f": {reason}" if reason else "")
        self.core.notify_all("muted", text, exclude=target)
        self.core.send(target, {"type": "notice", "code": "muted", "text": f"You were muted by "
                                  f"{self._name(actor)}{how_long}" +
                                  (f" ({reason})" if reason else "") +
                                  ": you can read, but not send.",
                                "ts": self.core.timestamp()})
        if length is not None:
            self.core.later(length * 60, lambda: self._mute_over(until))
        return [Public(text)]

    def cmd_unmute(self, actor: Optional[Session], args: str) -> List[str]:
        name = args.strip()
        if not name or name.lower() not in self.mutes:
            raise ModerationError("not_muted", f"{name or 'Nobody'} is not muted.")
        if actor is not None and actor.key == name.lower():
            raise ModerationError("not_allowed", "Another operator, or the console, can unmute "
                                  "you; you cannot.")
        del self.mutes[name.lower()]
        member = self.core.members.get(name.lower())
        shown = member.name if member else name
        text = f"{shown} was unmuted by {self._name(actor)}"
        self.core.notify_all("unmuted", text, exclude=member)
        if member is not None:
            self.core.send(member, {"type": "notice", "code": "unmuted",
                                      "text": f"You were unmuted by {self._name(actor)}.",
                                      "ts": self.core.timestamp()})
        return [Public(text)]

    def cmd_say(self, actor: Optional[Session], args: str) -> List[str]:
        most = self.core.settings.max_length
        text = clean_cut(args, most) if actor is None else self.passed_text(actor, args, most)
        if not text:
            raise ModerationError("usage", "Usage: /say TEXT")
        self.core.announce(self._name(actor), text)
        return [Public(f"announced: {text}")]

    def cmd_rooms(self, actor: Optional[Session], args: str) -> List[str]:
        rooms = sorted(self.core.rooms.all.values(), key=lambda room: room.ident)
        return [f"#{room.name:<33} {len(room):>5} here" + (f"  {room.topic}" if room.topic else "")
                for room in rooms]

    def cmd_topic(self, actor: Optional[Session], args: str) -> List[str]:
        room, text = self._room(args, "topic")
        if not text:
            return [f"#{room.name}: {room.topic} (set by {room.topic_by})" if room.topic
                    else f"#{room.name} has no topic"]
        return [self.core.rooms.set_topic(actor, room, text)]

    def cmd_key(self, actor: Optional[Session], args: str) -> List[str]:
        room, key = self._room(args, "key")
        return [self.core.rooms.set_key(actor, room, key)]

    def cmd_roomop(self, actor: Optional[Session], args: str) -> List[str]:
        room, name = self._room(args, "roomop", needs_more=True)
        return [self.core.rooms.set_operator(actor, room, name, True)]

    def cmd_roomdeop(self, actor: Optional[Session], args: str) -> List[str]:
        room, name = self._room(args, "roomdeop", needs_more=True)
        return [self.core.rooms.set_operator(actor, room, name, False)]

    def cmd_droproom(self, actor: Optional[Session], args: str) -> List[str]:
        room, _ = self._room(args, "droproom")
        return [self.core.rooms.drop(room, self._name(actor))]

    def _room(self, args: str, command: str, needs_more: bool = False) -> Tuple["Room", str]:
        """A command's #ROOM, which must exist, and the rest of its arguments."""
        word, _, rest = args.partition(" ")
        if not word or (needs_more and not rest.strip()):
            raise ModerationError("usage", f"Usage: /{command} {self.COMMANDS[command][0]}")
        return self.core.rooms.existing(word), rest.strip()

    def cmd_shutdown(self, actor: Optional[Session], args: str) -> List[str]:
        self.core.shutdown_by = self._name(actor)
        self.core.stop()
        return ["shutting down"]

    # -- helpers ----------------------------------------------------------------

    @staticmethod
    def _name(actor: Optional[Session]) -> str:
        return actor.name if actor is not None else "server"

    def _minutes(self, word: str, command: str) -> float:
        """A command's MINUTES argument; a usage error unless it is a good length."""
        length = parse_minutes(word)
        if length is None:
            raise ModerationError("usage", f"Usage: /{command} {self.COMMANDS[command][0]} "
                                  f"(MINUTES: more than 0 and less than {MAX_MINUTES}, "
                                  "such as 10 or 0.5)")
        return length

    def _member(self, actor: Optional[Session], name: str, usage: str,
                must_be_here: bool = True) -> Optional[Session]:
        if not name:
            raise ModerationError("usage", f"Usage: {usage}")
        member = self.core.members.get(name.lower())
        if member is None and must_be_here:
            raise ModerationError("unknown_user", f"Nobody called {quoted(name)} is here.")
        if member is not None and member is actor:  # (a muted operator could not unmute)
            raise ModerationError("not_allowed", "Not on yourself: another operator, or the "
                                  "console, can do that.")
        if member is not None and actor is not None and member.operator:
            raise ModerationError("not_allowed", f"{member.name} is an operator too.")
        return member

    def _add(self, ban: Ban) -> None:
        self.bans = [old for old in self.bans
                     if (old.kind, old.target.lower()) != (ban.kind, ban.target.lower())]
        self.bans.append(ban)
        self.core.store.save_ban(ban)

    def _lift(self, ban: Ban) -> None:
        self.bans.remove(ban)
        self.core.store.delete_ban(ban)

    def _mute_over(self, until: float) -> None:
        """End the mutes due at `until`. Found by their end, not by a name: a mute follows
        its name's renames, even those of a later visit; one unmuted, or muted again
        since, ends later or never."""
        for key in [key for key, ends in self.mutes.items() if ends == until]:
            del self.mutes[key]
            member = self.core.members.get(key)
            if member is not None:
                self.core.send(member, {"type": "notice", "code": "unmuted",
                                        "text": "Your mute is over: you can send again.",
                                        "ts": self.core.timestamp()})


# ---------------------------------------------------------------------------
# The store: history, accounts and bans, in sqlite
# ---------------------------------------------------------------------------

PUBLIC_KINDS = ("message", "action", "announcement")     # events everyone could see
SAID_KINDS = ("message", "action", "said_notice")   # said in one room (its room column)
WHISPER_KINDS = ("whisper", "whisper_action", "whisper_notice")     # from one name to another
# Kinds stored for a message with a flag: the kind its events have, and the flag.
FLAGGED_KINDS = {"whisper_action": ("whisper", "action"), "whisper_notice": ("whisper", "notice"),
                 "said_notice": ("message", "notice")}
EVERY_ROOM = ""     # the room of an announcement: it was for every room


class StoreError(Exception):
    """The database cannot be used; the text says why, for the user."""


class QueryTooSlow(Exception):
    """A read a client asked for ran past its time limit and was stopped."""


class ChatStore:
    """The server's memory in sqlite3: the event log (messages, whispers,
    announcements, joins, leaves, moderation notices), registered names and
    bans.

    The loop records rows as it goes and calls :meth:`commit` once per pass,
    before it sends that pass's frames: one transaction per pass (group
    commit) keeps up with any message rate, and a message that reached
    anyone is already in the database, even if the server is then killed.
    WAL mode and ``synchronous=NORMAL`` mean a commit appends to the log
    without waiting for the disk.

    If the database fails while the server runs (disk full, file damaged),
    the error is logged once and the chat carries on without history.
    """

    #: MIGRATIONS[n] takes a database from schema version n to n + 1.
    #: Never edit one that has shipped: add a new one at the end.
    MIGRATIONS: List[str] = [
        # 1: the event log.
        """
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,                   -- server time, ISO-8601 UTC
            kind TEXT NOT NULL,     -- message, whisper, join, leave; later action, announcement,
                                    -- notice
            sender TEXT NOT NULL COLLATE NOCASE,
            recipient TEXT COLLATE NOCASE,      -- whispers only
            text TEXT NOT NULL DEFAULT ''       -- leave: the reason
        );
        """,
        # 2: registered (password-protected) names.
        """
        CREATE TABLE accounts (
            name TEXT PRIMARY KEY COLLATE NOCASE,
            password_hash TEXT NOT NULL,        -- see hash_password(); never the password
            created TEXT NOT NULL,
            created_id INTEGER NOT NULL DEFAULT 0,      -- events.id when it was registered
            last_left_id INTEGER NOT NULL DEFAULT 0     -- events.id when it last left
        );
        """,
        # 3: bans, kept across restarts.
        """
        CREATE TABLE bans (
            kind TEXT NOT NULL,                 -- name or address
            target TEXT NOT NULL COLLATE NOCASE,    -- a name, an IP address or a network
            until REAL,                         -- Unix time it ends; NULL: until unbanned
            reason TEXT NOT NULL DEFAULT '',
            banned_by TEXT NOT NULL,
            PRIMARY KEY (kind, target)
        );
        """,
        # 4: an address ban made together with a name ban remembers the name, so
        # that lifting the name's ban lifts both.
        """
        ALTER TABLE bans ADD COLUMN for_name TEXT NOT NULL DEFAULT '';
        """,
        # 5: rooms. Each event says where it happened: a room's name, '' for an
        # announcement (every room), NULL for whispers and notices. Everything before
        # rooms happened in the lobby.
        """
        ALTER TABLE events ADD COLUMN room TEXT COLLATE NOCASE;
        UPDATE events SET room = CASE WHEN kind = 'announcement' THEN ''
                                      WHEN kind IN ('message', 'action', 'join', 'leave')
                                      THEN 'lobby' END;
        CREATE INDEX events_by_room ON events (room, id);
        CREATE TABLE rooms (
            name TEXT PRIMARY KEY COLLATE NOCASE,   -- as whoever made it spelled it
            topic TEXT NOT NULL DEFAULT '',
            topic_by TEXT NOT NULL DEFAULT '',
            topic_ts TEXT NOT NULL DEFAULT '',
            key TEXT NOT NULL DEFAULT '',           -- '' when joining needs no key
            created TEXT NOT NULL,
            created_by TEXT NOT NULL DEFAULT ''
        );
        CREATE TABLE room_ops (
            room TEXT NOT NULL COLLATE NOCASE,
            name TEXT NOT NULL COLLATE NOCASE,
            PRIMARY KEY (room, name)
        );
        """,
    ]

    def __init__(self, path: str, keep_messages: bool = True) -> None:
        self.path = path
        self.keep_messages = keep_messages
        self.working = True
        self.commits = 0
        self._pending: List[tuple] = []
        self._committed_id: Optional[int] = None    # the newest id written (see last_id)
        self._busy_since: Optional[float] = None
        # recent_public() answers by room and limit, until that room's next public
        # event: a burst of joins replays the same history without asking sqlite.
        # room -> (the largest limit asked, its rows): one answer a room, whatever the
        # limits asked (a client names them: one each would be 20,100 rows for 1 to 200)
        self._recent_public: Dict[str, Tuple[int, List[tuple]]] = {}
        self.db = self._open(path)
        self._checkpointer = Checkpointer(path) if self.on_disk else None

    @property
    def on_disk(self) -> bool:
        return self.path != ":memory:"

    def _open(self, path: str) -> sqlite3.Connection:
        where = "the in-memory database" if path == ":memory:" else path
        try:
            db = sqlite3.connect(path, timeout=STORE_BUSY_TIMEOUT, isolation_level=None,
                                 check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {where}: {exc}") from None
        try:
            if path != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP}")     # see Checkpointer
            self._migrate(db)
        except sqlite3.Error as exc:
            db.close()
            hint = "; is another server using it?" if "locked" in str(exc) else ""
            raise StoreError(f"cannot use {where}: {exc}{hint}") from None
        except StoreError:
            db.close()
            raise
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        latest = len(self.MIGRATIONS)
        if version > latest:
            raise StoreError(f"{self.path} was written by a newer server (schema {version}, "
                             f"this server knows up to {latest})")
        for number in range(version, latest):
            try:
                db.executescript(f"BEGIN IMMEDIATE; {self.MIGRATIONS[number]}; "
                                 f"PRAGMA user_version = {number + 1}; COMMIT;")
            except sqlite3.Error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if 0 < version < latest:
            log.info("upgraded %s from schema version %d to %d", self.path, version, latest)

    # -- writing ---------------------------------------------------------

    def record(self, ts: str, kind: str, sender: str, recipient: Optional[str] = None,
               text: str = "", room: Optional[str] = None) -> None:
        """Queue an event; it is written at the next commit(). `room`: where it
        happened (EVERY_ROOM for an announcement, None for a whisper or a notice)."""
        if self.working and self.keep_messages:
            if kind == "message" and recipient is None:
                # Most rows: a plain message in a room, whose kind and missing
                # recipient the INSERT writes itself (_ROW_SQL): each value bound
                # costs sqlite a tenth of the row.
                self._pending.append((ts, sender, text, room))
            else:
                # No recipient goes in as '' and is stored as NULL (see _ROW_SQL): for
                # a None, the sqlite3 module looks for an adapter and raises and
                # clears an AttributeError on the way, which costs a tenth of the row.
                self._pending.append((ts, kind, sender, recipient or "", text, room))
            if kind == "announcement":
                self._recent_public.clear()
            elif kind in SAID_KINDS and room:
                self._recent_public.pop(room.lower(), None)

    # A pending row's values, by how many there are, as an INSERT takes them.
    _ROW_SQL = {4: "(?, 'message', ?, NULL, ?, ?)",     # ts, sender, text, room
                6: "(?, ?, ?, NULLIF(?, ''), ?, ?)"}    # ts, kind, sender, recipient, text, room

    @staticmethod
    @functools.lru_cache(maxsize=None)
    def _insert(values: int, rows: int) -> str:
        """The INSERT of `rows` events of `values` values each: one statement for many
        rows costs sqlite a third less a row than executemany, which runs a
        statement for each."""
        row_values = ", ".join([ChatStore._ROW_SQL[values]] * rows)
        return f"INSERT INTO events (ts, kind, sender, recipient, text, room) VALUES {row_values}"

    def commit(self) -> None:
        """Write everything recorded since the last commit in one transaction."""
        if not self._pending or not self.working:
            return
        pending, size = self._pending, STORE_ROWS_PER_INSERT
        # The rows in runs of one shape, in order: ids follow the order of events.
        runs = [list(run) for _, run in itertools.groupby(pending, len)]
        try:
            if len(runs) > 1 or len(pending) > size:    # else one statement: a transaction
                self.db.execute("BEGIN")
            for run in runs:
                for start in range(0, len(run), size):
                    rows = run[start:start + size]
                    # chain() flattens the rows in C: a comprehension costs 6 steps a value.
                    self.db.execute(self._insert(len(rows[0]), len(rows)),
                                    list(itertools.chain.from_iterable(rows)))
            if self.db.in_transaction:
                self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._write_failed(exc)
            return
        if self._committed_id is not None:
            self._committed_id += len(self._pending)
        self._pending.clear()
        self._busy_since = None
        self.commits += 1
        if self._checkpointer is not None and self.commits % CHECKPOINT_EVERY == 0:
            self._checkpointer.request()

    def _rollback(self) -> None:
        try:
            self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _write_failed(self, exc: sqlite3.Error) -> None:
        """A lock held elsewhere is retried for a while; anything else ends history."""
        busy = "locked" in str(exc) or "busy" in str(exc)
        if busy and len(self._pending) < STORE_MAX_PENDING:
            if self._busy_since is None:
                self._busy_since = time.monotonic()
                log.warning("history database is locked by another process; retrying")
            if time.monotonic() - self._busy_since < 10:
                return
        self.working = False
        self._pending.clear()
        log.error("history store failed (%s): the chat goes on without history", exc)

    def close(self) -> None:
        self.commit()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self.db.close()     # the last connection to close checkpoints what is left

    # -- reading ---------------------------------------------------------

    def _query(self, sql: str, parameters: tuple,
               time_limit: Optional[float] = None) -> List[tuple]:
        """Rows for a read, oldest first; none when the store has failed.

        With a time limit (for reads a client asks for), a query that runs
        longer is stopped and QueryTooSlow raised: the loop must not stall.
        """
        if not self.working:
            return []
        self.commit()     # so a read sees everything already said
        if time_limit is not None:
            deadline = time.perf_counter() + time_limit
            self.db.set_progress_handler(lambda: time.perf_counter() > deadline, 1000)
        try:
            rows = self.db.execute(sql, parameters).fetchall()
        except sqlite3.OperationalError as exc:
            if time_limit is not None and "interrupt" in str(exc):
                raise QueryTooSlow() from None
            log.error("history query failed: %s", exc)
            return []
        except sqlite3.Error as exc:
            log.error("history query failed: %s", exc)
            return []
        finally:
            if time_limit is not None:
                self.db.set_progress_handler(None, 0)
        rows.reverse()
        return rows

    _COLUMNS = "SELECT id, ts, kind, sender, recipient, text, room FROM events "

    # What was said in room ?, and the announcements (which were for every room).
    _PUBLIC = f"((room = ? AND kind IN {SAID_KINDS}) OR room = '{EVERY_ROOM}')"

    def recent_public(self, room: str, limit: int) -> List[tuple]:
        """The last `limit` messages of a room, announcements included.

        Two index scans, merged here: one query with an OR would make sqlite
        walk the whole log back for a quiet room.
        """
        if not self.working:
            return []
        if limit < 1:
            return []       # (rows[-0:] would be all of them)
        cached_limit, rows = self._recent_public.get(room.lower(), (0, []))
        if limit > cached_limit:
            said = self._query(self._COLUMNS + f"WHERE room = ? AND kind IN {SAID_KINDS} "
                               "ORDER BY id DESC LIMIT ?", (room, limit))
            announced = self._query(self._COLUMNS + f"WHERE room = '{EVERY_ROOM}' "
                                    "ORDER BY id DESC LIMIT ?", (limit,))
            rows = sorted(said + announced)[-limit:]
            self._recent_public[room.lower()] = (limit, rows)
            return rows
        return rows if limit == cached_limit else rows[-limit:]

    def last_id(self) -> int:
        """The id of the newest event stored, or recorded to be (those get the next
        ids at the commit); later events have higher ids. Asked once, then counted:
        every join asks, and a query each time would cost more than the join."""
        if self._committed_id is None:
            rows = self._query("SELECT IFNULL(MAX(id), 0) FROM events", ())  # commits first
            self._committed_id = rows[0][0] if rows else 0
        return self._committed_id + len(self._pending)

    # Whispers to or from one name after a given event.
    _WHISPERS = f"(kind IN {WHISPER_KINDS} AND (sender = ? OR recipient = ?) AND id > ?)"

    def recent_for(self, name: str, room: str, limit: int,
                   whispers_after: int) -> List[tuple]:
        """The last `limit` messages of a room that `name` may see, its own whispers
        among them. Raises QueryTooSlow."""
        whispers = self._query(self._COLUMNS + f"WHERE {self._WHISPERS} ORDER BY id DESC "
                               "LIMIT ?", (name, name, whispers_after, limit), QUERY_TIME_LIMIT)
        return sorted(self.recent_public(room, limit) + whispers)[-limit:]

    def search_for(self, name: str, rooms: List[str], words: List[str], limit: int,
                   whispers_after: int) -> List[tuple]:
        """Recent messages of these rooms, and whispers, that `name` may see and that
        hold every word, in any case.

        Only the last SEARCH_WINDOW events are searched, and for at most
        QUERY_TIME_LIMIT seconds (then QueryTooSlow), so that a search never
        holds up the loop for long, however big the history grows.
        """
        matches = " AND ".join(["text LIKE ? ESCAPE '!'"] * len(words))
        patterns = tuple("%" + re.sub(r"([!%_])", r"!\1", word) + "%" for word in words)
        in_rooms = ", ".join("?" * len(rooms))
        visible = (f"((room IN ({in_rooms}) AND kind IN {SAID_KINDS}) "
                   f"OR room = '{EVERY_ROOM}' OR {self._WHISPERS})")
        return self._query(
            self._COLUMNS + "WHERE id > (SELECT IFNULL(MAX(id), 0) FROM events) - ? "
            f"AND {visible} AND {matches} ORDER BY id DESC LIMIT ?",
            (SEARCH_WINDOW, *rooms, name, name, whispers_after) + patterns + (limit,),
            QUERY_TIME_LIMIT)

    def count_public_after(self, room: str, event_id: int) -> int:
        """How many messages of a room (announcements included) came after an event."""
        rows = self._query(f"SELECT COUNT(*) FROM events WHERE {self._PUBLIC} AND id > ?",
                           (room, event_id))
        return rows[0][0] if rows else 0

    # -- accounts: written at once, they are rare and must not be lost ----

    def accounts(self) -> Dict[str, str]:
        """Every registered name (lower case) and its password hash."""
        rows = self.db.execute("SELECT name, password_hash FROM accounts").fetchall()
        return {name.lower(): password_hash for name, password_hash in rows}

    def save_account(self, name: str, password_hash: str) -> None:
        """Register a name or change its password. Raises sqlite3.Error."""
        changed = self.db.execute("UPDATE accounts SET password_hash = ? WHERE name = ?",
                                  (password_hash, name)).rowcount
        if not changed:
            self.db.execute("INSERT INTO accounts (name, password_hash, created, created_id) "
                            "VALUES (?, ?, ?, ?)",
                            (name, password_hash, utc_timestamp(time.time()), self.last_id()))

    def delete_account(self, name: str) -> None:
        self.db.execute("DELETE FROM accounts WHERE name = ?", (name,))

    def account_marks(self, name: str) -> Tuple[int, int]:
        """For a registered name: the newest event ids when it registered and last left."""
        try:
            row = self.db.execute("SELECT created_id, last_left_id FROM accounts WHERE name = ?",
                                  (name,)).fetchone()
        except sqlite3.Error:
            return 0, 0
        return (row[0], row[1]) if row else (0, 0)

    def mark_left(self, name: str) -> None:
        if not self.working:
            return
        try:
            self.db.execute("UPDATE accounts SET last_left_id = ? WHERE name = ?",
                            (self.last_id(), name))
        except sqlite3.Error as exc:
            log.error("cannot record when %s left: %s", name, exc)

    # -- bans: written at once, like accounts ------------------------------

    def bans(self) -> List["Ban"]:
        now = time.time()
        rows = self.db.execute(
            "SELECT kind, target, until, reason, banned_by, for_name FROM bans").fetchall()
        return [Ban(*row) for row in rows if row[2] is None or row[2] > now]

    def save_ban(self, ban: "Ban") -> None:
        self._write("INSERT OR REPLACE INTO bans (kind, target, until, reason, banned_by, "
                    "for_name) VALUES (?, ?, ?, ?, ?, ?)",
                    (ban.kind, ban.target, ban.until, ban.reason, ban.by, ban.for_name),
                    f"the ban of {ban.target}")

    def delete_ban(self, ban: "Ban") -> None:
        self._write("DELETE FROM bans WHERE kind = ? AND target = ?", (ban.kind, ban.target),
                    f"the lifting of the ban of {ban.target}")

    # -- rooms: written at once, like bans ---------------------------------

    def rooms(self) -> List[tuple]:
        """Every room: (name, topic, topic_by, topic_ts, key, created, created_by)."""
        return self.db.execute("SELECT name, topic, topic_by, topic_ts, key, created, "
                               "created_by FROM rooms").fetchall()

    def room_ops(self) -> List[Tuple[str, str]]:
        """(room, name) for every room operator."""
        return self.db.execute("SELECT room, name FROM room_ops").fetchall()

    def save_room(self, room: "Room") -> None:
        self._write("INSERT OR REPLACE INTO rooms (name, topic, topic_by, topic_ts, key, "
                    "created, created_by) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (room.name, room.topic, room.topic_by, room.topic_ts, room.key,
                     room.created, room.created_by), f"the room #{room.name}")

    def delete_room(self, name: str) -> None:
        """Forget a room, its history too: whoever makes one of that name later must not
        read the old one's (it may have had a key)."""
        self.commit()       # its last rows (the members parted) go with it
        self._recent_public.pop(name.lower(), None)
        self._write("DELETE FROM rooms WHERE name = ?", (name,), f"the room #{name}")
        self._write("DELETE FROM room_ops WHERE room = ?", (name,), f"the room #{name}")
        self._write("DELETE FROM events WHERE room = ?", (name,), f"the history of #{name}")

    def save_room_op(self, room: str, name: str) -> None:
        self._write("INSERT OR IGNORE INTO room_ops (room, name) VALUES (?, ?)", (room, name),
                    f"{name} as operator of #{room}")

    def delete_room_op(self, room: str, name: str) -> None:
        self._write("DELETE FROM room_ops WHERE room = ? AND name = ?", (room, name),
                    f"{name} as operator of #{room}")

    def _write(self, sql: str, parameters: tuple, what: str) -> None:
        """A change that must last (rooms, bans); a failure costs only its lasting."""
        try:
            self.db.execute(sql, parameters)
        except sqlite3.Error as exc:
            log.error("cannot store %s: %s; it lasts until the server stops", what, exc)

    def export(self, out: TextIO) -> int:
        """Write the whole history as readable text; return the number of lines."""
        count = 0
        for row in self.db.execute(self._COLUMNS + "ORDER BY id"):
            out.write(format_event_line(row) + "\n")
            count += 1
        return count


class Checkpointer:
    """Copies the write-ahead log into the database file, on a thread of its own.

    sqlite would do it inside every thousandth commit, with an fsync: a
    stall of 3 to 6 ms in the loop, which bench_chat.py saw as the 99th
    percentile of broadcast latency. So the loop's connection has automatic
    checkpoints off, and ChatStore.commit() asks this thread for one every
    CHECKPOINT_EVERY commits. A PASSIVE checkpoint never blocks the writer;
    whatever it cannot copy yet is copied the next time.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._wanted = threading.Event()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None     # started on the first request
        self.checkpointed = threading.Event()   # set after each checkpoint, for tests

    def request(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
            self._thread.start()
        self._wanted.set()

    def stop(self) -> None:
        if self._thread is not None:
            self._stopping = True
            self._wanted.set()
            self._thread.join()

    def _run(self) -> None:
        db = sqlite3.connect(self.path, timeout=STORE_BUSY_TIMEOUT, isolation_level=None)
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._stopping:
                    return
                try:
                    for _ in range(CHECKPOINT_TRIES):
                        _, in_log, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        if copied == in_log:
                            break   # all copied: the next commit starts the log afresh
                    self.checkpointed.set()
                except sqlite3.Error as exc:
                    log.warning("history checkpoint failed (retried later): %s", exc)
        finally:
            db.close()


def format_event_line(row: tuple) -> str:
    """One stored event as a line of text, for --export."""
    _, ts, kind, sender, recipient, text, room = row
    when = ts.replace("T", " ").split(".")[0].rstrip("Z") + " UTC"
    if room:
        when += f"  #{room}"
    if kind in WHISPER_KINDS:
        action = f"* {sender} " if kind == "whisper_action" else ""
        return f"{when}  [whisper {sender} -> {recipient}] {action}{text}"
    if kind == "said_notice":
        return f"{when}  -{sender}- {text}"
    if kind == "topic":
        return f"{when}  * {sender} set the topic: {text}" if text else \
            f"{when}  * {sender} removed the topic"
    if kind == "nick":
        return f"{when}  * {sender} is now known as {text}"
    if kind == "join":
        return f"{when}  * {sender} joined"
    if kind == "leave":
        return f"{when}  * {sender} left ({text})" if text and text != "quit" else \
            f"{when}  * {sender} left"
    if kind == "announcement":
        return f"{when}  *** {sender}: {text}"
    if kind == "action":
        return f"{when}  * {sender} {text}"
    if kind == "notice":
        return f"{when}  * {text}"
    return f"{when}  {sender}: {text}"


# ---------------------------------------------------------------------------
# The server: the core, served over the transport through codecs
# ---------------------------------------------------------------------------

class Batch:
    """The events for one audience in one loop pass, written together at its end.

    Each event is encoded once per codec variant. Every recipient that sent
    none of them gets the same joined bytes; each sender gets its own view,
    with its echo (if any) where its own events are. `recipients` are the
    audience's members when the batch began, then those who came since
    (see grow): an event is for the first `reach` of them, the members when
    it was delivered, so nobody gets what was said before they came. A
    closed session whose leave is in the batch stays a recipient, skipped
    as closed; any other leave, or a rename, changes the audience's
    version (see Audience) and begins a new batch. So does an event for a
    room that has just been told a leave to SharedRooms (see
    ChatServer.deliver), and the other way round: each room's events go
    out in the order they happened.
    """

    __slots__ = ("audience", "version", "recipients", "arrivals", "taken", "entries", "reach")

    def __init__(self, audience: Union[Audience, SharedRooms]) -> None:
        self.audience = audience
        self.version = audience.version
        self.recipients = list(audience.members.values())
        self.arrivals: List[Session] = []   # the audience adds who comes, while this is open
        audience.arrivals = self.arrivals
        self.taken = 0                      # of the arrivals, how many are recipients
        self.entries: List[Tuple[dict, Optional[Session], Optional[dict]]] = []
        self.reach: List[int] = []      # for each entry, how many recipients it is for

    def grow(self) -> List[Session]:
        """Take in the members who came since the batch began (or since the last
        grow); they get its events from now on."""
        newcomers = self.arrivals[self.taken:]
        self.taken = len(self.arrivals)
        self.recipients += newcomers
        return newcomers

    def close(self) -> None:
        """The batch is written: the audience stops noting who comes."""
        if self.audience.arrivals is self.arrivals:
            self.audience.arrivals = None

    def segments(self) -> List[Tuple[int, int, int]]:
        """(first entry, recipients from, to) for each group of recipients that came
        at the same point: each gets the events from its first entry on. One group
        unless people came while the batch took events."""
        reach = self.reach
        if reach[0] == reach[-1]:
            return [(0, 0, reach[0])]
        segments, reached = [], 0
        for position, count in enumerate(reach):
            if count > reached:
                segments.append((position, reached, count))
                reached = count
        return segments


class ChatServer(SelectServer):
    """Joins the layers: each connection gets a codec and a core session; the
    codec's requests go to the core one at a time; the core's actions are
    carried out here, in order, as soon as each input has been handled.

    Deliveries to an audience are batched for the loop pass (see Batch), so
    a message costs the same however many receive it; what one session is
    sent alone first waits for the batches it is in, so that every session
    gets its events in the order the core made them.
    """

    core_class = ChatCore

    def __init__(self, settings: Settings, store: Optional[ChatStore] = None,
                 clock: Optional[Clock] = None) -> None:
        # Tick often enough that no timeout overshoots by more than a quarter.
        super().__init__(settings, tick=min(TICK, settings.hello_timeout / 4,
                                            settings.ping_after / 4))
        store = store or ChatStore(settings.db, settings.keep_history)
        self.core = self.core_class(settings, store, clock)
        self._workers = concurrent.futures.ThreadPoolExecutor(
            PASSWORD_WORKERS, thread_name_prefix="password")
        self._executing = False
        self._draining: Optional[Connection] = None     # whose requests are being taken
        self._to_drain: List[Connection] = []   # requests waiting: their turn after that
        self.irc_address: Optional[Tuple[str, int]] = None     # where IRC listens, if it does
        self._batches: List[Batch] = []         # this pass's, in the order they began
        self._open: Dict[int, Batch] = {}       # id(audience) -> its batch taking events
        self._shared: Optional[Batch] = None    # the open batch of leaves told to SharedRooms
        self._in_batches: Set[Session] = set()  # the recipients of this pass's batches
        self._carry_out: Dict[str, Callable[..., None]] = {
            "send": self.send, "deliver": self.deliver, "close": self._close,
            "pause": lambda session: self.pause_reading(session.link),
            "resume": self._resume, "job": self._run_job, "later": self._later,
            "stop": self.stop,
        }

    # -- from the transport, to the core --------------------------------------

    def listen(self) -> Tuple[str, int]:
        """Listen on the chat's port, and on the IRC port if there is one; the chat
        port's address (irc_address has the other)."""
        address = self.listen_on(self.settings.port, JsonCodec)
        if self.settings.irc_port is not None:
            info = IrcInfo.for_settings(self.settings)
            self.irc_address = self.listen_on(self.settings.irc_port, lambda: IrcCodec(info))
        return address

    def connection_made(self, conn: Connection) -> None:
        codec = conn.protocol
        codec.session = self.core.connect(conn, conn.host, conn.address)
        self.execute()

    def data_received(self, conn: Connection, data: bytes) -> None:
        codec = conn.protocol
        codec.session.last_heard = self.now
        codec.feed(data)
        self.drain(conn)

    def eof_received(self, conn: Connection) -> None:
        conn.protocol.feed_eof()
        self.drain(conn)

    def drain(self, conn: Connection) -> None:
        """Give the core the requests that have arrived, one at a time, while it takes them;
        then those of any connection that was given a turn meanwhile (_turn_later).

        A session that waits (for a password check) takes none: its requests
        stay in the codec, and its reading is paused, until the wait is over.
        Turns never nest (see execute), however many requests one read holds.
        """
        first = conn
        while True:
            self._draining = conn
            try:
                self._take_requests(conn)
            except Exception:
                if conn is first:
                    raise   # the caller's: see _hook
                log.exception("error while taking the requests of %s", conn.address)
                self.close(conn, "internal error", graceful=False)     # that one alone
            finally:
                self._draining = None
            if not self._to_drain:
                return
            conn = self._to_drain.pop()

    def _turn_later(self, conn: Connection) -> None:
        """conn has requests that no new bytes would bring out: its turn comes once what
        runs now is done (the connection taking its turn finds them itself)."""
        if conn is not self._draining and conn not in self._to_drain:
            self._to_drain.append(conn)

    def _take_requests(self, conn: Connection) -> None:
        codec, core = conn.protocol, self.core
        session = codec.session
        while not (session.waiting or session.gone):
            try:
                request = codec.next_request()
            except ProtocolError as error:
                self.write_alone(session, codec.take_output())
                core.protocol_error(session, error)
                self.execute()
                continue
            output = codec.take_output()    # what the codec answered itself
            if output:
                self.write_alone(session, output)
            if codec.answered and codec.registered:     # lines it answered cost tokens too
                lines, codec.answered = codec.answered, 0
                core.answered_by_codec(session, lines)
                self.execute()
                if session.gone:
                    return
                if request is None:
                    continue    # it stopped to have them charged: more lines may wait
            if request is None:
                if codec.ended:     # everything the peer sent before it hung up is handled
                    core.peer_finished(session)
                    self.execute()
                return
            core.receive(session, request, codec.metered)
            self.execute()

    def connection_lost(self, conn: Connection, reason: str) -> None:
        self.core.disconnected(conn.protocol.session, reason)
        self.execute()

    def wrong_protocol(self, conn: Connection) -> None:
        how = ("connect with TLS (irssi: /connect -tls; WeeChat: /server add ... -tls, "
               "or -ssl before WeeChat 4.0)"
               if isinstance(conn.protocol, IrcCodec) else "run the client with --tls")
        self.core.refuse(conn.protocol.session, "tls_required",
                         f"This server only accepts TLS: {how}.")
        self.execute()

    def tick(self) -> None:
        self.core.tick()
        self.execute()

    def end_of_pass(self) -> None:
        self.core.store.commit()    # before the bytes go out: nothing reaches anyone unstored
        self.deliver_batches(at_once=True)

    def more_to_do(self) -> bool:
        return bool(self._batches)

    def shutting_down(self) -> None:
        self.core.shutdown()
        self.execute()
        self._workers.shutdown(wait=False)

    def serve_forever(self) -> None:
        try:
            super().serve_forever()
        finally:
            self.core.store.close()
            log.info("server stopped")

    def run_command(self, line: str) -> List[str]:
        """A console command line, run by the core; the lines to show."""
        try:
            replies = self.core.moderation.run(None, line)
        except ModerationError as exc:
            replies = [f"! {exc.text}"]
        self.execute()
        return replies

    # -- from the core, to the transport --------------------------------------

    def execute(self) -> None:
        """Carry out the core's actions, in order; a failing one costs only itself."""
        if self._executing:     # an action led back here: the loop below takes the rest
            return
        self._executing = True
        actions = self.core.actions
        try:
            for action in actions:      # a list's iterator also takes what is added meanwhile
                try:
                    self._carry_out[action[0]](*action[1:])
                except Exception:
                    log.exception("error while carrying out %r", action[0])
            actions.clear()
        finally:
            self._executing = False
        if self._draining is None:      # else the turn under way gives them theirs after it
            while self._to_drain:
                self.drain(self._to_drain.pop())

    def send(self, session: Session, event: dict) -> None:
        codec = session.link.protocol
        self.write_alone(session, codec.encode(event))
        if codec.wants_turn():      # the answer let the codec make a request (IRC's SASL)
            self._turn_later(session.link)

    def write_alone(self, session: Session, data: bytes) -> None:
        """Bytes for one session: what it has coming in this pass's batches goes first."""
        if not data:
            return
        if session in self._in_batches:
            self.deliver_batches()
        self.write(session.link, data)

    def deliver(self, audience: Union[Audience, SharedRooms], event: dict,
                sender: Optional[Session], echo: Optional[dict]) -> None:
        shared = self._shared
        if shared is not None and id(audience) in shared.audience.key:
            self._shared = None     # what one of its rooms is told now comes after it
        batch = self._open.get(id(audience))
        if batch is None or batch.version != audience.version:
            batch = self._batch_for(audience)
        elif len(batch.arrivals) != batch.taken:    # some came since it began
            self._in_batches.update(batch.grow())
        batch.entries.append((event, sender, echo))
        batch.reach.append(len(batch.recipients))

    def _batch_for(self, audience: Union[Audience, SharedRooms]) -> Batch:
        """A new batch for audience, which takes its next events. For SharedRooms,
        the open one of the same rooms, if they are as they were: the leaves of
        all who drop from the same rooms together share it."""
        if isinstance(audience, SharedRooms):
            shared = self._shared
            if shared is not None and shared.audience.key == audience.key and \
                    shared.version == audience.version:
                return shared
            for room in audience.rooms:     # what they are told next comes after it
                self._open.pop(id(room), None)
            batch = self._shared = Batch(audience)
        else:
            batch = self._open[id(audience)] = Batch(audience)
        self._batches.append(batch)
        self._in_batches.update(batch.recipients)
        return batch

    def deliver_batches(self, at_once: bool = False) -> None:
        """Write every batch of this pass, in order, queued for the end of the pass.

        Once the pass's rows are committed (`at_once`), the last batch is sent
        now to every listener with nothing queued: one call each, and no queue
        (see send_many). The others' bytes, earlier batches' among them, wait
        for _flush_all(), to go out with one call for all a connection has.
        """
        batches, self._batches = self._batches, []
        self._open.clear()
        self._shared = None
        self._in_batches.clear()
        for batch in batches:
            batch.close()
        for batch in batches:
            write_many = self.send_many if at_once and batch is batches[-1] else self.write_many
            try:
                self._write_batch(batch, write_many)
            except Exception:
                log.exception("error while delivering %d events", len(batch.entries))

    #: A recipient's codec variant, and its connection: read in C, for sort() and groupby().
    _variant_of = operator.attrgetter("link.protocol.variant")
    _link_of = operator.attrgetter("link")

    def _write_batch(self, batch: Batch,
                     write_many: Callable[[Iterable[Connection], bytes], None]) -> None:
        own: Dict[Session, List[int]] = {}      # sender -> the positions of its events
        for position, (_, sender, _) in enumerate(batch.entries):
            if sender is not None:
                own.setdefault(sender, []).append(position)
        encoded: Dict[str, List[bytes]] = {}        # variant -> each event's bytes
        segments = batch.segments()
        for first, begin, end in segments:
            # The listeners (recipients who sent nothing) share one bytes object per
            # codec variant. Grouped by sort() and groupby(): a loop in C, not in Python.
            listeners = [session for session in batch.recipients[begin:end]
                         if not (session.gone or session in own)]
            listeners.sort(key=self._variant_of)
            for variant, group in itertools.groupby(listeners, self._variant_of):
                conns = list(map(self._link_of, group))
                if variant not in encoded:
                    encoded[variant] = self._encode_batch(conns[0].protocol, batch)
                write_many(conns, b"".join(encoded[variant][first:]))
        present = set(batch.recipients) if own else set()
        for session, positions in own.items():      # the batch with its echoes in place
            if session.gone:
                continue
            codec = session.link.protocol
            # Not among the recipients (it left, or never was): its echoes only. Else the
            # events from where it came, with its echoes; before that, its echoes only.
            first = len(batch.entries)
            if session in present:
                index = batch.recipients.index(session) if len(segments) > 1 else 0
                first = next(start for start, _, end in segments if index < end)
                if codec.variant not in encoded:
                    encoded[codec.variant] = self._encode_batch(codec, batch)
            view = [b""] * first
            if first < len(batch.entries):
                view += encoded[codec.variant][first:]
            for position in positions:
                echo = batch.entries[position][2]
                view[position] = b"" if echo is None else codec.encode(echo)
            data = b"".join(view)
            if data:
                self.write(session.link, data)

    @staticmethod
    def _encode_batch(codec: Any, batch: Batch) -> List[bytes]:
        """Each event of the batch, as every codec of this one's variant encodes it."""
        encode = codec.encode_shared
        try:    # one comprehension: 12 bytecode steps an event, where a try and an append took 17
            return [encode(event) for event, _, _ in batch.entries]
        except ValueError:
            return [ChatServer._encoded_or_nothing(encode, event) for event, _, _ in batch.entries]

    @staticmethod
    def _encoded_or_nothing(encode: Callable[[dict], bytes], event: dict) -> bytes:
        """An event's bytes, or none for one that cannot be encoded (over the frame
        limit, a lone surrogate): a bug upstream, which costs that event alone."""
        try:
            return encode(event)
        except ValueError:
            log.exception("cannot encode a %r event", event.get("type"))
            return b""

    def _close(self, session: Session, reason: str, graceful: bool) -> None:
        # The batches need not go first: a closed session gets nothing of them.
        self.close(session.link, reason, graceful)

    def _resume(self, session: Session) -> None:
        self.resume_reading(session.link)
        self._turn_later(session.link)      # what arrived meanwhile waits in its codec

    def _run_job(self, job: Callable[[], Any], then: Callable[[Callable[[], Any]], None]) -> None:
        def finished(future: "concurrent.futures.Future") -> None:
            self.call_soon(lambda: self._core_callback(then, future.result))
        self._workers.submit(job).add_done_callback(finished)

    def _later(self, delay: float, function: Callable[[], None]) -> None:
        self.call_later(delay, lambda: self._core_callback(function))

    def _core_callback(self, function: Callable[..., None], *args: Any) -> None:
        """A job or timer the core asked for is due: run it, then what it says."""
        try:
            function(*args)
        finally:
            self.execute()

# ---------------------------------------------------------------------------
# The server console
# ---------------------------------------------------------------------------

class Console:
    """The server's standard input as a moderation console.

    A thread reads command lines and hands each to the loop with call_soon
    (whose wake-up socket works on Windows too); the loop runs it and prints
    the reply on standard output. What it reads from (see kind()):

    - a terminal: a prompt, with line editing where Python has readline. A log
      line or a reply that comes while a command is half typed is printed
      above it, and the prompt is drawn again with what was typed so far.
    - a pipe, a FIFO or a file: a command a line, no prompt, so that a
      script or a service manager can moderate. A FIFO is read again after
      each writer closes it (`echo "/kick bob" > ctl`); the end of anything
      else leaves the server running without a console.
    - nothing, /dev/null, or a terminal this process may not read (started
      with '&': reading it would stop the server): no console at all.
    """

    def __init__(self, server: "ChatServer", fd: int, out: TextIO,
                 terminal: bool = False) -> None:
        self.server = server
        self.fd = fd
        self.out = out
        self.readline = None
        if terminal:
            try:    # imported only for a terminal: it may write to one when loaded
                import readline     # line editing for input(), and what was typed so far
                self.readline = readline
            except ImportError:     # Windows: a prompt, but no line editing
                pass
        self.terminal = terminal
        self.prompting = False      # inside input(): the prompt is on the screen
        self._lock = threading.Lock()   # one line on the screen at a time
        self._modes: Optional[list] = None  # the terminal's settings, for restore()
        reader = self._read_terminal if self.terminal else self._read_lines
        self._thread = threading.Thread(target=reader, name="console", daemon=True)
        self._stopped = threading.Event()

    @staticmethod
    def kind(stream: TextIO) -> Optional[str]:
        """How stream can serve as a console: "terminal", "stream", or None."""
        try:
            fd = stream.fileno()
            if stream.isatty():
                if hasattr(os, "tcgetpgrp"):    # Windows has no job control
                    try:
                        if os.tcgetpgrp(fd) != os.getpgrp():
                            return None     # started with '&'
                    except OSError:     # not our controlling terminal: it cannot stop us
                        pass
                return "terminal"
            mode = os.fstat(fd).st_mode
        except (OSError, ValueError, AttributeError):
            return None
        return "stream" if stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or \
            stat.S_ISSOCK(mode) else None

    def start(self) -> None:
        # Sent to a process that reads its terminal, or sets its modes, from the
        # background (where Ctrl-Z and bg put it): a read fails instead, and the line
        # editor's putting the modes back as it gives up is let be; then the console
        # waits to be in the foreground again (see _read_terminal).
        for name in ("SIGTTIN", "SIGTTOU"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), signal.SIG_IGN)
        if self.terminal and termios is not None:
            try:
                self._modes = termios.tcgetattr(self.fd)
            except termios.error:
                self._modes = None
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop reading, and wait up to `timeout` seconds for the thread to end (at its
        next end of input or wait). For a caller that closes the console's input while
        the server runs on (a test): a thread left reading a closed descriptor would
        read whatever is given its number next, a pipe or a socket."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def restore(self) -> None:
        """Leave the terminal as it was found (readline changes it while it reads)."""
        if self._modes is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._modes)
            if self.prompting:      # the server stops: the prompt goes, the shell's comes
                self.prompting = False
                self.out.write("\r\x1b[K")
                self.out.flush()

    def _read_terminal(self) -> None:
        if self.readline is not None:
            # The prompt is on the screen only once the line editor has drawn it: a
            # line shown a moment before would draw one that the editor then draws again.
            self.readline.set_pre_input_hook(self._prompt_drawn)
        while True:
            if self._in_background():   # (Ctrl-Z, then bg): the shell has the terminal
                if self._stopped.wait(CONSOLE_RETRY):
                    return
                continue
            self.prompting = self.readline is None
            try:
                line = input(CONSOLE_PROMPT)
            except (EOFError, OSError):
                self.prompting = False
                if self._in_background():   # moved away while reading: wait to come back
                    continue
                self.show("the console is closed; Ctrl-C stops the server", self.out)
                return
            self.prompting = False
            if line.strip():
                answered = threading.Event()
                self.server.call_soon(lambda line=line: self.run(line, answered))
                # The answer comes before the next prompt, as in a shell (a loop too busy
                # to answer in CONSOLE_ANSWER_WAIT gets the prompt back anyway).
                answered.wait(CONSOLE_ANSWER_WAIT)

    def _in_background(self) -> bool:
        try:
            return hasattr(os, "tcgetpgrp") and os.tcgetpgrp(self.fd) != os.getpgrp()
        except OSError:     # not our controlling terminal: it cannot stop us
            return False

    def _prompt_drawn(self) -> None:
        self.prompting = True

    def _read_lines(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except OSError as exc:
                if exc.errno == errno.EIO:      # a terminal we were moved away from
                    if self._stopped.wait(CONSOLE_RETRY):
                        return
                    continue
                chunk = b""
            if self._stopped.is_set():
                return
            if not chunk:
                if self._may_come_back() and not self._stopped.wait(CONSOLE_RETRY):
                    continue    # a FIFO: the next writer may come
                return      # input ended: the server runs on without a console
            pending += decoder.decode(chunk)
            *lines, pending = pending.split("\n")
            for line in lines:
                if line.strip():
                    self.server.call_soon(lambda line=line: self.run(line))

    def _may_come_back(self) -> bool:
        """Whether more may come after the end: a FIFO gets new writers (a pipe does
        not, but cannot be told from one: a read every CONSOLE_RETRY costs nothing)."""
        try:
            return stat.S_ISFIFO(os.fstat(self.fd).st_mode)
        except OSError:
            return False

    def run(self, line: str, answered: Optional[threading.Event] = None) -> None:
        """Run one console line, in the loop, and print what it says."""
        try:
            replies = self.server.run_command(line)
        except Exception:   # a bug: the console says so, the server goes on
            log.exception("error in console command %s", quoted(line))
            replies = ["! that command failed (a bug: the log has the details)"]
        try:
            for reply in replies:
                self.show(reply, self.out)
        finally:
            if answered is not None:
                answered.set()

    def show(self, text: str, stream: TextIO) -> None:
        """A line for the screen: above the prompt, which is drawn again with what was
        typed, when a command is being typed at the terminal."""
        with self._lock:
            if self.prompting and self.readline is not None:
                typed = self.readline.get_line_buffer()
                stream.write(f"\r\x1b[K{text}\n{CONSOLE_PROMPT}{typed}")
            else:
                stream.write(text + "\n")
            stream.flush()


class ConsoleLogHandler(logging.StreamHandler):
    """The log, on standard error; while a console command is being typed on the same
    terminal, each line goes above it (see Console.show)."""

    console: Optional[Console] = None

    def emit(self, record: logging.LogRecord) -> None:
        console = self.console
        if console is None or not console.prompting:
            super().emit(record)
            return
        try:
            console.show(self.format(record), self.stream)
        except Exception:
            self.handleError(record)


# ---------------------------------------------------------------------------
# Start-up: telling the user where the server can be reached
# ---------------------------------------------------------------------------

def lan_addresses() -> List[str]:
    """This machine's addresses on its networks, found without sending a packet.

    Connecting a UDP socket sends nothing; it only asks the routing table
    which local address would be used to reach the (documentation-only)
    target, which is the address of the default network interface.
    """
    found = []
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe_socket:
                probe_socket.connect((probe, 9))
                address = probe_socket.getsockname()[0].split("%")[0]
        except OSError:
            continue
        ip = ipaddress.ip_address(address)
        if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local):
            found.append(address)
    return found


def client_command(host: str, port: int, fingerprint: Optional[str]) -> str:
    """The command a user runs to join: with TLS, a join string that pins the certificate."""
    if fingerprint is None:
        return f"python client.py {host} {port}"
    shown = f"[{host}]" if ":" in host else host
    # Double quotes: the same in sh, cmd.exe and PowerShell (cmd.exe keeps single ones),
    # and they keep IPv6 brackets from being taken as a file pattern.
    return f'python client.py "{shown}:{port}#{fingerprint}" --tls'


def irc_commands(host: str, port: int, fingerprint: Optional[str] = None) -> List[str]:
    """How to join with irssi and with WeeChat. With TLS, both pin the certificate
    (which they would refuse as self-signed), each in its own spelling of it; WeeChat
    before 4.0 (Debian 12's) ignores -tls and needs -ssl. Without TLS, WeeChat 4.0 and
    later need -notls (they use TLS unless told not to), which older ones ignore."""
    shown = f"[{host}]" if ":" in host else host
    weechat = f"/server add lan {shown}/{port}"
    if fingerprint is None:
        return [f"IRC: /connect {host} {port} (irssi), {weechat} -notls then /connect lan "
                "(WeeChat)"]
    pairs = ":".join(fingerprint[at:at + 2] for at in range(0, len(fingerprint), 2)).upper()
    return [f"IRC, irssi: /connect -tls -tls_pinned_cert {pairs} {host} {port}",
            f"IRC, WeeChat: {weechat} -tls -tls_fingerprint={fingerprint} then /connect lan",
            f"  (WeeChat before 4.0: {weechat} -ssl -ssl_fingerprint={fingerprint})"]


def describe_reach(host: str, port: int, fingerprint: Optional[str] = None,
                   irc_port: Optional[int] = None) -> List[str]:
    """Lines telling the user who can reach the server and how (with irc_port: with an
    IRC client, too)."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        ip = None
    ports = f"ports {port} and {irc_port}" if irc_port else f"port {port}"
    firewall = f"(allow incoming TCP {ports} in this machine's firewall)"

    def ways(address: str, indent: str = "  ") -> List[str]:
        lines = [f"{indent}{client_command(address, port, fingerprint)}"]
        if irc_port:
            lines += [indent + line for line in irc_commands(address, irc_port, fingerprint)]
        return lines

    def join_with(heading: str, address: str) -> List[str]:
        if not irc_port:
            return [f"{heading} {client_command(address, port, fingerprint)}"]
        return [heading] + ways(address)

    if ip is not None and ip.is_loopback:
        return ["bound to loopback only: other machines cannot reach this server",
                "(leave out --host to accept connections from your network)"] + \
            join_with("join with:", host)
    if ip is not None and not ip.is_unspecified:
        return join_with("clients join with:", host) + [firewall]
    lines = []
    addresses = lan_addresses()
    if addresses:
        lines.append("other machines on your network join with:")
        for address in addresses:
            lines.extend(ways(address))
        lines.append(firewall)
    else:
        lines.append("no network address found: find this machine's address with "
                     "'ipconfig' (Windows), 'ip addr' (Linux) or 'ipconfig getifaddr en0' (macOS)")
    return lines + join_with("on this machine:", "localhost")


def describe_rules(settings: Settings) -> Optional[str]:
    """The message rules in force, in a line for the start-up banner; None for none."""
    rules = []
    if settings.blocked_words:
        count = len(settings.blocked_words)
        rules.append(f"{count} blocked {'word or phrase' if count == 1 else 'words or phrases'}"
                     f" ({'refused' if settings.filter_action == 'reject' else 'masked'})")
    rules += [rule for rule, on in (("no links", settings.no_links),
                                    ("no whispers", settings.no_whisper)) if on]
    return "message rules: " + ", ".join(rules) if rules else None


def describe_store(store: ChatStore) -> str:
    if not store.keep_messages:
        return "history: not kept; registered names last until the server stops (--no-history)"
    if not store.on_disk:
        return "history and registered names: kept in memory until the server stops"
    return f"history and registered names: kept in {os.path.abspath(store.path)}"


def export_history(db_path: str, destination: str) -> int:
    """--export: write the stored history as text, then exit."""
    if db_path == ":memory:" or not os.path.exists(db_path):
        print(f"error: no history database at {db_path}; name it with --db", file=sys.stderr)
        return 1
    try:
        store = ChatStore(db_path)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if destination == "-":
            # Text for a file or a pipe is UTF-8, as the --export FILE is (Windows would
            # take its ANSI code page, which has no emoji); a terminal's own, where a
            # character it lacks becomes '?', not a traceback.
            try:
                sys.stdout.reconfigure(**({"errors": "replace"} if sys.stdout.isatty()
                                          else {"encoding": "utf-8"}))
            except (AttributeError, ValueError):    # not a text stream of io's
                pass
            count = store.export(sys.stdout)
            sys.stdout.flush()      # here, where a closed pipe is caught, not at exit
        else:
            with open(destination, "x", encoding="utf-8") as out:
                count = store.export(out)
            print(f"exported {count} lines to {os.path.abspath(destination)}")
    except FileExistsError:
        print(f"error: {destination} exists; choose a new file name", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader stopped early ("--export - | head"), as readers of pipes do: it
        # has what it wanted, so that is no error. Status 0, not 141: Python ignores
        # SIGPIPE, so nothing killed us, and 141 would fail a script's pipeline under
        # "set -o pipefail". Unread output goes to the null device, or Python's own
        # flush at exit would fail on the pipe again and print a warning.
        if destination == "-":
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        return 0
    except OSError as exc:
        print(f"error: cannot write {destination}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Terminal chat server for a local network. Start it, then run "
                    "'python client.py HOST PORT' on each machine that should join.",
        epilog="Run in a terminal's foreground, the server reads moderation commands from "
               "it (/help lists them: /kick, /ban, /say, ...). Ctrl-C (or SIGTERM) tells "
               "everyone the server is shutting down and exits 0.")
    parser.add_argument("--host", default="",
                        help="address to listen on (default: every interface, IPv4 and IPv6); "
                             "127.0.0.1 keeps the chat to this machine")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"TCP port to listen on; 0 picks a free one (default: {DEFAULT_PORT})")
    parser.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS, metavar="N",
                        help="connections allowed at once; more are refused with 'server_full' "
                             f"(default: {DEFAULT_MAX_CLIENTS})")
    parser.add_argument("--max-length", type=int, default=MAX_TEXT_LENGTH, metavar="CHARS",
                        help=f"longest chat message in characters, up to {MAX_TEXT_LIMIT} "
                             f"(default: {MAX_TEXT_LENGTH})")
    parser.add_argument("--max-backlog", type=int, default=MAX_BACKLOG // 1024, metavar="KIB",
                        help="KiB of unread messages a client may have waiting before it is "
                             f"disconnected as too slow (default: {MAX_BACKLOG // 1024})")
    parser.add_argument("--hello-timeout", type=float, default=HELLO_TIMEOUT, metavar="SECONDS",
                        help=f"time a new connection has to say hello (default: {HELLO_TIMEOUT:g})")
    parser.add_argument("--ping-after", type=float, default=PING_AFTER, metavar="SECONDS",
                        help=f"silence after which the server pings a client "
                             f"(default: {PING_AFTER:g})")
    parser.add_argument("--drop-after", type=float, default=DROP_AFTER, metavar="SECONDS",
                        help=f"silence after which a client is dropped as gone "
                             f"(default: {DROP_AFTER:g})")
    security = parser.add_argument_group("security")
    security.add_argument("--password",
                          help="room password every client must give; safer in the "
                               "CHAT_PASSWORD environment variable, which ps does not show")
    security.add_argument("--tls-cert", metavar="FILE",
                          help="serve TLS only, with this PEM certificate (README: how to make "
                               "one with openssl)")
    security.add_argument("--tls-key", metavar="FILE",
                          help="the certificate's private key (default: in the --tls-cert file)")
    security.add_argument("--rate-limit", type=float, default=RATE_LIMIT, metavar="N",
                          help=f"messages a second per client, on average; 0 turns flood "
                               f"control off (default: {RATE_LIMIT:g})")
    security.add_argument("--rate-burst", type=int, default=RATE_BURST, metavar="N",
                          help=f"messages a client may send at once (default: {RATE_BURST})")
    security.add_argument("--max-per-address", type=int, default=MAX_PER_ADDRESS, metavar="N",
                          help=f"connections at once from one IP address; 0 for no limit "
                               f"(default: {MAX_PER_ADDRESS})")
    security.add_argument("--max-silent", type=int, default=MAX_SILENT, metavar="N",
                          help="connections that have not said hello (or finished IRC "
                               "registration) at once; past that, or when the server is "
                               "full, the oldest one silent for over "
                               f"{SILENT_GRACE:g} s is dropped to make room, so that silent "
                               f"connections cannot keep people out; 0: no limit but "
                               f"--max-clients (default: {MAX_SILENT})")
    security.add_argument("--max-failures", type=int, default=MAX_FAILURES, metavar="N",
                          help="failed logins from one address before it is locked out; "
                               f"0 never locks out (default: {MAX_FAILURES})")
    security.add_argument("--lockout", type=float, default=LOCKOUT, metavar="SECONDS",
                          help=f"how long a lockout lasts (default: {LOCKOUT:g})")
    moderation = parser.add_argument_group("moderation")
    moderation.add_argument("--admin-password", metavar="PASSWORD",
                            help="lets a user become an operator: the client's /op asks for "
                                 "this password (/op PASSWORD works too); safer in the "
                                 "CHAT_ADMIN_PASSWORD environment variable")
    moderation.add_argument("--blocked-words", metavar="FILE",
                            help="words or phrases (one a line, any case, whole words) that "
                                 "messages may not contain")
    moderation.add_argument("--filter-action", choices=["mask", "reject"], default="mask",
                            help="what happens to a message with a blocked word: its letters "
                                 "become * (mask), or it is refused (default: mask)")
    moderation.add_argument("--no-links", action="store_true",
                            help="refuse messages that contain links")
    moderation.add_argument("--no-whisper", action="store_true",
                            help="turn whispers (direct messages) off")
    irc = parser.add_argument_group("IRC (irssi, WeeChat, HexChat and bots join the same rooms)")
    irc.add_argument("--irc-port", type=int, metavar="PORT",
                     help="also listen for IRC clients on this port, on the same addresses "
                          "(6667 is usual; 6697 with TLS: with --tls-cert it speaks TLS too); "
                          "off by default")
    irc.add_argument("--server-name", metavar="NAME",
                     help="the server's name in IRC (prefixes, numerics, PONG), with a dot in "
                          "it; nobody may take it as a name (default: this machine's host "
                          "name, with .lan added when it has no dot)")
    parser.add_argument("--db", default=DEFAULT_DB, metavar="PATH",
                        help="sqlite file for history; ':memory:' keeps it only while the "
                             f"server runs (default: {DEFAULT_DB} in the current directory)")
    parser.add_argument("--no-history", action="store_true",
                        help="record no messages and write nothing to disk")
    parser.add_argument("--join-notices-up-to", type=int, default=JOIN_NOTICES_UP_TO,
                        metavar="N",
                        help="announce joins and leaves of a room only while at most N people "
                             f"are in it; 0 never announces them (default: {JOIN_NOTICES_UP_TO})")
    parser.add_argument("--max-rooms", type=int, default=DEFAULT_MAX_ROOMS, metavar="N",
                        help="rooms that may exist at once; rooms last until removed with "
                             "/droproom, or, with the table full, until a new room takes the "
                             "place of the oldest that nobody is in and no registered name "
                             f"runs (default: {DEFAULT_MAX_ROOMS})")
    parser.add_argument("--max-room-size", type=int, default=0, metavar="N",
                        help="people in one room at once, the lobby aside; 0 for no limit "
                             "(default: 0)")
    parser.add_argument("--history", type=int, default=HISTORY_REPLAY, metavar="N",
                        help="public messages replayed to each newcomer; 0 for none "
                             f"(default: {HISTORY_REPLAY})")
    parser.add_argument("--export", metavar="FILE",
                        help="write the stored history to FILE as text ('-' for stdout) "
                             "and exit; never overwrites a file")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"],
                        help="how much to log on stderr; only 'debug' shows message text "
                             "(default: info)")
    return parser


SERVER_NAME = re.compile(r"(?=.{3,63}$)[A-Za-z0-9][A-Za-z0-9-]*(?:\.[A-Za-z0-9-]+)+")


def default_server_name() -> str:
    """This machine's host name as an IRC server's name (no DNS query: gethostname)."""
    name = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname()).strip(".-")[:59] or "chat"
    name = re.sub(r"\.{2,}", ".", name)
    return name if "." in name else f"{name}.lan"


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(host=args.host, port=args.port, max_clients=args.max_clients,
                    hello_timeout=args.hello_timeout, ping_after=args.ping_after,
                    drop_after=args.drop_after, max_backlog=args.max_backlog * 1024,
                    max_length=args.max_length,
                    db=":memory:" if args.no_history else args.db,
                    keep_history=not args.no_history, history=args.history,
                    join_notices_up_to=args.join_notices_up_to,
                    max_rooms=args.max_rooms, max_room_size=args.max_room_size,
                    irc_port=args.irc_port, server_name=args.server_name or default_server_name(),
                    password=args.password or os.environ.get("CHAT_PASSWORD") or None,
                    tls_cert=args.tls_cert, tls_key=args.tls_key,
                    rate_limit=args.rate_limit, rate_burst=args.rate_burst,
                    max_per_address=args.max_per_address, max_silent=args.max_silent,
                    max_failures=args.max_failures,
                    lockout=args.lockout,
                    admin_password=(args.admin_password or os.environ.get("CHAT_ADMIN_PASSWORD")
                                    or None),
                    filter_action=args.filter_action, no_links=args.no_links,
                    no_whisper=args.no_whisper)


def check_settings(parser: argparse.ArgumentParser, settings: Settings) -> None:
    """Refuse, with argparse's usage error, any setting outside its documented range."""
    if not 0 <= settings.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    more_than_zero = (("--max-clients", settings.max_clients),
                      ("--max-length", settings.max_length),
                      ("--max-backlog", settings.max_backlog),
                      ("--hello-timeout", settings.hello_timeout),
                      ("--ping-after", settings.ping_after),
                      ("--drop-after", settings.drop_after),
                      ("--lockout", settings.lockout),
                      ("--max-rooms", settings.max_rooms))
    zero_or_more = (("--history", settings.history), ("--rate-limit", settings.rate_limit),
                    ("--join-notices-up-to", settings.join_notices_up_to),
                    ("--max-per-address", settings.max_per_address),
                    ("--max-silent", settings.max_silent),
                    ("--max-failures", settings.max_failures),
                    ("--max-room-size", settings.max_room_size))
    for flag, value in more_than_zero + zero_or_more:
        # float() takes "nan" and "inf": nan passes every comparison below (and would
        # turn a timeout off), inf most of them. Compared, not math.isfinite(): an int
        # flag may be too big to convert to a float.
        if not -math.inf < value < math.inf:
            parser.error(f"{flag} must be a finite number, not {value}")
    for flag, value in more_than_zero:
        if value <= 0:
            parser.error(f"{flag} must be more than 0")
    for flag, value in zero_or_more:
        if value < 0:
            parser.error(f"{flag} must be 0 or more")
    if settings.rate_limit and settings.rate_burst < 1:
        parser.error("--rate-burst must be at least 1")
    if settings.tls_key and not settings.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    if settings.max_length > MAX_TEXT_LIMIT:
        parser.error(f"--max-length can be at most {MAX_TEXT_LIMIT}, so a message fits in a frame")
    if settings.drop_after <= settings.ping_after:
        parser.error("--drop-after must be longer than --ping-after")
    if settings.irc_port is not None and not 0 <= settings.irc_port <= 65535:
        parser.error("--irc-port must be between 0 and 65535")
    if settings.irc_port is not None and settings.irc_port == settings.port != 0:
        parser.error("--irc-port must differ from --port")
    if not SERVER_NAME.fullmatch(settings.server_name):
        parser.error("--server-name must be letters, digits, '-' and '.', with a dot in it, "
                     "up to 63 characters")


class CannotStart(Exception):
    """The server cannot start; the text says why, in one line."""


def open_server(settings: Settings) -> Tuple[ChatServer, str, int, Optional[str]]:
    """The server, listening: itself, the host and port bound, and its certificate's
    fingerprint (None without TLS). Raises CannotStart."""
    try:
        store = ChatStore(settings.db, settings.keep_history)
    except StoreError as exc:
        raise CannotStart(f"{exc}; choose another file with --db, or use --no-history") from None
    try:
        server = ChatServer(settings, store)
        fingerprint = certificate_fingerprint(settings.tls_cert) if settings.tls_cert else None
    except (OSError, ValueError) as exc:    # ssl.SSLError is an OSError
        store.close()
        raise CannotStart(tls_problem(settings.tls_cert, settings.tls_key, exc)) from None
    try:
        host, port = server.listen()
    except OSError as exc:
        # The chat's port is bound first: with it bound, the IRC port was the one.
        port, flag = (settings.irc_port, "--irc-port") if server.listeners else \
            (settings.port, "--port")
        for sock in server.listeners:
            sock.close()
        store.close()
        if exc.errno in ADDRESS_IN_USE:
            raise CannotStart(f"port {port} is already in use (another server "
                              f"running?); pick another with {flag}") from None
        raise CannotStart(f"cannot listen on {settings.host or 'all interfaces'} port "
                          f"{port} ({flag}): {exc.strerror or exc}") from None
    return server, host, port, fingerprint


def print_start(server: ChatServer, host: str, port: int, fingerprint: Optional[str]) -> None:
    """What a user needs to know once the server listens; the first line is always
    'listening on HOST:PORT', for scripts."""
    settings = server.settings
    shown = f"[{host}]" if ":" in host else host
    print(f"listening on {shown}:{port}", flush=True)
    irc_port = server.irc_address[1] if settings.irc_port is not None else None
    if irc_port is not None:
        print(f"IRC listening on {shown}:{irc_port}, as the server {settings.server_name}",
              flush=True)
    for line in describe_reach(host, port, fingerprint, irc_port):
        print(line)
    if fingerprint:
        print(f"TLS only; certificate fingerprint: {fingerprint}")
    if server.socket_limit and settings.max_clients > server.socket_limit:
        print(f"note: on this system the server can hold about {server.socket_limit} "
              "connections at once, whatever --max-clients says")
    if settings.password is not None:
        print("a room password is required to join")
        if irc_port is not None:
            print("  IRC clients give it as the server password: irssi /connect HOST PORT "
                  "PASSWORD, WeeChat -password=PASSWORD")
    rules = describe_rules(settings)
    if rules:
        print(rules)
    print(describe_store(server.core.store))


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    check_settings(parser, settings)
    for stream in (sys.stdout, sys.stderr):     # a name the console cannot show: '?'
        try:                                    # (a Windows code page lacks most)
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass
    if args.export and args.no_history:
        parser.error("--no-history keeps no history to export; name the file with --db")
    if args.blocked_words:
        try:
            settings.blocked_words = read_word_list(args.blocked_words)
        except (OSError, UnicodeDecodeError) as exc:
            print(f"error: cannot read --blocked-words {args.blocked_words}: "
                  f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return 1
        if not settings.blocked_words:
            print(f"note: --blocked-words {args.blocked_words} holds no words (only blank "
                  "lines and #comments): nothing is blocked", file=sys.stderr)
    log_handler = ConsoleLogHandler(sys.stderr)
    logging.basicConfig(level=args.log_level.upper(), handlers=[log_handler],
                        format="%(asctime)s %(levelname)-7s %(message)s")
    if args.export:
        return export_history(settings.db, args.export)
    try:
        server, host, port, fingerprint = open_server(settings)
    except CannotStart as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_start(server, host, port, fingerprint)
    console = start_console(server, log_handler)
    for signal_name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, signal_name):
            signal.signal(getattr(signal, signal_name), lambda signum, frame: server.stop())
    try:
        server.serve_forever()
    finally:
        if console is not None:
            console.restore()
    return 0


def start_console(server: ChatServer, log_handler: ConsoleLogHandler) -> Optional[Console]:
    """The moderation console on standard input, if it can be one (see Console)."""
    kind = Console.kind(sys.stdin)
    if kind is None:
        print("press Ctrl-C to stop", flush=True)
        return None
    # A prompt and line editing need the screen too; input() without both would read
    # through sys.stdin, whose lock a reading thread would hold when the process exits.
    prompting = kind == "terminal" and sys.stdout.isatty()
    console = Console(server, sys.stdin.fileno(), sys.stdout, terminal=prompting)
    if kind == "terminal":
        print("type /help here for the moderation console; Ctrl-C stops the server", flush=True)
        if prompting and sys.stderr.isatty():   # the log shares the screen: it keeps the
            log_handler.console = console       # prompt and a half-typed command whole
    else:
        print("reading console commands from standard input, one a line "
              "(/help lists them); /shutdown, Ctrl-C or a SIGTERM stops the server",
              flush=True)
    console.start()
    return console


if __name__ == "__main__":
    sys.exit(main())
