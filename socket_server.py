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
One thread runs one :mod:`selectors` loop (epoll on Linux, kqueue on macOS,
select on Windows). Every socket is non-blocking, so no client can make the
server wait. Each pass of the loop:

1. reads what the ready sockets sent and cuts it into frames
   (:class:`FrameDecoder`, which never touches a socket);
2. validates each message in one place (:meth:`ChatServer.dispatch`) and hands
   it to the handler named in :attr:`ChatServer.MESSAGES`;
3. handlers queue frames on the recipients' output buffers; a frame for many
   recipients is encoded once and the same bytes are shared;
4. at the end of the pass every connection with queued bytes is flushed with a
   single ``send`` call. Whatever the kernel does not take waits for the
   socket to become writable, up to a limit: a client that stops reading is
   disconnected instead of growing the server's memory.

Once a second the loop also runs its timers: new connections that never said
hello, quiet clients that need a ping, silent clients that are gone.

Wire protocol
-------------
Every frame is a 10-byte header, the payload length in ASCII decimal padded
with spaces (``f"{n:<10}"``), then the payload: one UTF-8 JSON object with a
string field ``"type"``. README.md documents every message type.
"""

import argparse
import dataclasses
import errno
import ipaddress
import json
import logging
import os
import re
import selectors
import signal
import socket
import sqlite3
import sys
import time
import unicodedata
from collections import deque
from datetime import datetime, timezone
from typing import Callable, Deque, Dict, Iterable, List, Optional, Set, TextIO, Tuple

log = logging.getLogger("chat")

# ---------------------------------------------------------------------------
# Limits and defaults. Each has a command-line flag (see build_arg_parser).
# ---------------------------------------------------------------------------

DEFAULT_PORT = 5050
DEFAULT_MAX_CLIENTS = 1000          # connections at once, joined or not
HELLO_TIMEOUT = 10.0                # seconds a new connection has to send hello
PING_AFTER = 60.0                   # seconds of silence before the server pings
DROP_AFTER = 120.0                  # seconds of silence before a client is dropped
MAX_BACKLOG = 512 * 1024            # bytes queued for one client before it is cut off
MAX_TEXT_LENGTH = 2000              # characters in one chat message
MAX_TEXT_LIMIT = 16000              # highest --max-length: 4 UTF-8 bytes each still fit a frame

DEFAULT_DB = "chat_history.sqlite3"  # in the directory the server starts in
HISTORY_REPLAY = 50                 # public messages sent to each newcomer
HISTORY_DEFAULT = 20                # messages /history returns when no number is given
HISTORY_MAX = 200                   # most messages one /history returns
SEARCH_RESULTS = 50                 # most messages one /search returns
SEARCH_MAX_WORDS = 10
SEARCH_WINDOW = 200_000             # /search looks through this many recent events

# Internal tuning, not worth a flag.
RECV_SIZE = 256 * 1024              # bytes read per socket per loop pass
ACCEPTS_PER_PASS = 64               # new connections taken per loop pass
TICK = 1.0                          # longest time between timer checks
LINGER_TIMEOUT = 2.0                # seconds to wait for a peer we closed on to hang up
SHUTDOWN_FLUSH_TIMEOUT = 2.0        # seconds to deliver the shutdown notice
ACCEPT_PAUSE = 1.0                  # seconds to stop accepting when out of file descriptors
STORE_BUSY_TIMEOUT = 0.05           # seconds sqlite may wait on a lock held by another process
STORE_MAX_PENDING = 100_000         # rows kept while the database is locked, then give up
ADDRESS_IN_USE = {errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)}

# ---- begin shared protocol block: identical in socket_server.py and client.py ----
# test_chat.py fails when the two copies differ: change both or neither.

HEADER_LENGTH = 10          # bytes of ASCII decimal length before every payload
MAX_PAYLOAD = 64 * 1024     # largest payload either side accepts, in bytes


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

    ``feed()`` the bytes as they arrive, in chunks of any size, then iterate
    to get each complete payload in order. Iteration stops when the next
    frame is incomplete, and raises ProtocolError when the next frame breaks
    the rules, so payloads before a bad frame are still delivered. A bad
    header is caught as soon as its first wrong byte arrives. Memory stays
    under HEADER_LENGTH + max_payload plus one chunk, whatever the peer sends.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._start = 0     # offset of the first byte not yet returned

    def feed(self, data: bytes) -> None:
        if self._start:
            del self._buffer[:self._start]
            self._start = 0
        self._buffer += data

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
        if length is None:
            raise StopIteration
        end = start + HEADER_LENGTH + length
        if end > len(buffer):
            raise StopIteration
        self._start = end
        return bytes(buffer[start + HEADER_LENGTH:end])

    def _payload_length(self, header: bytes) -> Optional[int]:
        """The length a header announces; None while the header is incomplete."""
        digits = header.strip(b" ")
        if digits and not digits.isdigit():
            raise ProtocolError("bad_header", f"frame header {header!r} is not a decimal length")
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
            return f'"{field}" must be a {kind.__name__}'
    return None


def clean_text(text: str) -> str:
    """Make text safe to show in a terminal, on one line.

    Whitespace controls (tab, newline, ...) become spaces; other control
    characters, lone surrogates and bidirectional overrides are removed, so
    no text can move a cursor, change colours or reorder a line.
    """
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
# Chat rules
# ---------------------------------------------------------------------------

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,32}")
NAME_RULES = "1 to 32 characters: letters A-Z, digits, '_', '-' and '.'"
RESERVED_NAMES = frozenset({"server", "system"})    # compared in lower case


def utc_timestamp() -> str:
    """The server's clock as ISO-8601 UTC, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_address(address: tuple) -> str:
    """HOST:PORT for logs; IPv4 clients of a dual-stack socket shown as plain IPv4."""
    host, port = address[0], address[1]
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:"):]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------

# Where a connection is in its life.
NEW = "new"             # connected, no hello yet
JOINED = "joined"       # in the chat under a name
CLOSING = "closing"     # we are closing it: flushing, then waiting for the peer to hang up
CLOSED = "closed"


class Connection:
    """One client socket and what the server keeps about it.

    Slotted and lazy so that thousands of idle clients cost little memory.
    """

    __slots__ = ("sock", "address", "decoder", "outbox", "state", "name",
                 "connected_at", "last_heard", "last_ping", "deadline",
                 "messages_sent", "wants_write", "peer_closed", "write_shut", "history_floor")

    def __init__(self, sock: socket.socket, address: tuple, now: float) -> None:
        self.sock = sock
        self.address = format_address(address)
        self.decoder = FrameDecoder()
        self.outbox: List[bytes] = []   # frames waiting to be sent, often shared with others
        self.state = NEW
        self.name: Optional[str] = None
        self.connected_at = now
        self.last_heard = now           # last time any bytes arrived
        self.last_ping = 0.0            # last time we pinged it
        self.deadline = 0.0             # when CLOSING gives up waiting
        self.messages_sent = 0
        self.wants_write = False        # registered for EVENT_WRITE
        self.peer_closed = False        # the peer sent EOF
        self.write_shut = False         # we sent EOF
        self.history_floor = 0          # whispers stored before it joined are not its own

    def __repr__(self) -> str:
        return self.name or self.address


@dataclasses.dataclass
class Settings:
    """Everything a user can set from the command line."""

    host: str = ""                  # "" means every interface
    port: int = DEFAULT_PORT
    max_clients: int = DEFAULT_MAX_CLIENTS
    hello_timeout: float = HELLO_TIMEOUT
    ping_after: float = PING_AFTER
    drop_after: float = DROP_AFTER
    max_backlog: int = MAX_BACKLOG
    max_length: int = MAX_TEXT_LENGTH
    db: str = ":memory:"            # the command line defaults to DEFAULT_DB
    keep_history: bool = True       # False: record no messages (--no-history)
    history: int = HISTORY_REPLAY


# ---------------------------------------------------------------------------
# The history store
# ---------------------------------------------------------------------------

class StoreError(Exception):
    """The database cannot be used; the text says why, for the user."""


class HistoryStore:
    """Chat history in sqlite3: messages, whispers, joins and leaves.

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
            kind TEXT NOT NULL,                 -- message, whisper, join, leave
            sender TEXT NOT NULL COLLATE NOCASE,
            recipient TEXT COLLATE NOCASE,      -- whispers only
            text TEXT NOT NULL DEFAULT ''       -- leave: the reason
        );
        """,
    ]

    def __init__(self, path: str, keep_messages: bool = True) -> None:
        self.path = path
        self.keep_messages = keep_messages
        self.working = True
        self.commits = 0
        self._pending: List[tuple] = []
        self._busy_since: Optional[float] = None
        self.db = self._open(path)

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
            if number:
                log.info("upgraded %s to schema version %d", self.path, number + 1)

    # -- writing ---------------------------------------------------------

    def record(self, ts: str, kind: str, sender: str, recipient: Optional[str] = None,
               text: str = "") -> None:
        """Queue an event; it is written at the next commit()."""
        if self.working and self.keep_messages:
            self._pending.append((ts, kind, sender, recipient, text))

    def commit(self) -> None:
        """Write everything recorded since the last commit in one transaction."""
        if not self._pending or not self.working:
            return
        try:
            self.db.execute("BEGIN")
            self.db.executemany(
                "INSERT INTO events (ts, kind, sender, recipient, text) VALUES (?, ?, ?, ?, ?)",
                self._pending)
            self.db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._rollback()
            self._write_failed(exc)
            return
        self._pending.clear()
        self._busy_since = None
        self.commits += 1

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
        self.db.close()

    # -- reading ---------------------------------------------------------

    def _query(self, sql: str, parameters: tuple) -> List[tuple]:
        """Rows for a read, oldest first; none when the store has failed."""
        if not self.working:
            return []
        self.commit()     # so a read sees everything already said
        try:
            rows = self.db.execute(sql, parameters).fetchall()
        except sqlite3.Error as exc:
            log.error("history query failed: %s", exc)
            return []
        rows.reverse()
        return rows

    _COLUMNS = "SELECT id, ts, kind, sender, recipient, text FROM events "

    def recent_public(self, limit: int) -> List[tuple]:
        """The last `limit` public messages."""
        return self._query(self._COLUMNS + "WHERE kind = 'message' ORDER BY id DESC LIMIT ?",
                           (limit,))

    def last_id(self) -> int:
        """The id of the newest event stored; later events have higher ids."""
        rows = self._query("SELECT IFNULL(MAX(id), 0) FROM events", ())
        return rows[0][0] if rows else 0

    # Public messages, and whispers to or from one name after a given event.
    _VISIBLE = ("(kind = 'message' OR (kind = 'whisper' AND (sender = ? OR recipient = ?) "
                "AND id > ?))")

    def recent_for(self, name: str, limit: int, whispers_after: int) -> List[tuple]:
        """The last `limit` messages `name` may see."""
        return self._query(self._COLUMNS + f"WHERE {self._VISIBLE} ORDER BY id DESC LIMIT ?",
                           (name, name, whispers_after, limit))

    def search_for(self, name: str, words: List[str], limit: int,
                   whispers_after: int) -> List[tuple]:
        """Recent messages `name` may see that hold every word, in any case.

        Only the last SEARCH_WINDOW events are searched, so that a search
        never holds up the loop for long, however big the history grows.
        """
        matches = " AND ".join(["text LIKE ? ESCAPE '!'"] * len(words))
        patterns = tuple("%" + re.sub(r"([!%_])", r"!\1", word) + "%" for word in words)
        return self._query(
            self._COLUMNS + "WHERE id > (SELECT IFNULL(MAX(id), 0) FROM events) - ? "
            f"AND {self._VISIBLE} AND {matches} ORDER BY id DESC LIMIT ?",
            (SEARCH_WINDOW, name, name, whispers_after) + patterns + (limit,))

    def export(self, out: TextIO) -> int:
        """Write the whole history as readable text; return the number of lines."""
        count = 0
        for row in self.db.execute(self._COLUMNS + "ORDER BY id"):
            out.write(format_event_line(row) + "\n")
            count += 1
        return count


def format_event_line(row: tuple) -> str:
    """One stored event as a line of text, for --export."""
    _, ts, kind, sender, recipient, text = row
    when = ts.replace("T", " ").split(".")[0].rstrip("Z") + " UTC"
    if kind == "whisper":
        return f"{when}  [whisper {sender} -> {recipient}] {text}"
    if kind == "join":
        return f"{when}  * {sender} joined"
    if kind == "leave":
        return f"{when}  * {sender} left ({text})" if text and text != "quit" else \
            f"{when}  * {sender} left"
    return f"{when}  {sender}: {text}"


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class ChatServer:
    """The select loop and the chat protocol on top of it.

    Call :meth:`listen`, then :meth:`serve_forever` (it returns after
    :meth:`stop`, which any thread or signal handler may call).
    """

    #: Every message a client may send: its fields (name -> type, a trailing
    #: "?" marks an optional one) and the method that handles it. Fields not
    #: listed are ignored, so newer clients can add some.
    MESSAGES: Dict[str, Tuple[Dict[str, type], str]] = {
        "hello": ({"name": str, "password?": str}, "on_hello"),
        "say": ({"text": str}, "on_say"),
        "whisper": ({"to": str, "text": str}, "on_whisper"),
        "who": ({}, "on_who"),
        "get_history": ({"limit?": int}, "on_get_history"),
        "search": ({"text": str}, "on_search"),
        "ping": ({}, "on_ping"),
        "pong": ({}, "on_pong"),
        "bye": ({}, "on_bye"),
    }

    def __init__(self, settings: Settings, store: Optional[HistoryStore] = None) -> None:
        self.settings = settings
        self.store = store or HistoryStore(settings.db, settings.keep_history)
        self.selector = selectors.DefaultSelector()
        self.listeners: List[socket.socket] = []
        self.connections: Set[Connection] = set()
        self.members: Dict[str, Connection] = {}    # lower-case name -> joined connection
        self.now = time.monotonic()
        self._to_flush: Set[Connection] = set()
        # Check timers often enough that no timeout overshoots by more than a quarter.
        self._tick = min(TICK, settings.hello_timeout / 4, settings.ping_after / 4)
        self._next_tick = self.now + self._tick
        self._accept_paused_until = 0.0
        self._stopping = False
        self._calls: Deque[Callable[[], None]] = deque()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.selector.register(self._wake_reader, selectors.EVENT_READ, self._on_wake)
        self._handlers = {kind: (fields, getattr(self, method))
                          for kind, (fields, method) in self.MESSAGES.items()}

    # -- starting and stopping -------------------------------------------

    def listen(self) -> Tuple[str, int]:
        """Bind and listen; return the address actually bound (the real port for port 0)."""
        host, port = self.settings.host, self.settings.port
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
        self.selector.register(sock, selectors.EVENT_READ, self._accept)
        self.listeners.append(sock)
        bound = sock.getsockname()
        return bound[0], bound[1]

    def stop(self) -> None:
        """Ask the loop to shut down. Safe from other threads and signal handlers."""
        self._stopping = True
        self._wake()

    def call_soon(self, function: Callable[[], None]) -> None:
        """Run function inside the loop. Safe from other threads."""
        self._calls.append(function)
        self._wake()

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
            self._calls.popleft()()

    def serve_forever(self) -> None:
        try:
            while not self._stopping:
                self._run_once()
        finally:
            self._shut_down()

    def _run_once(self) -> None:
        if self._to_flush:     # queued while flushing, e.g. the notice that someone was cut off
            timeout = 0.0
        else:
            timeout = max(0.0, self._next_tick - time.monotonic())
        events = self.selector.select(timeout)
        self.now = time.monotonic()
        for key, mask in events:
            target = key.data
            if isinstance(target, Connection):
                if mask & selectors.EVENT_READ:
                    self._read(target)
                if mask & selectors.EVENT_WRITE:
                    self._to_flush.add(target)
            else:
                target()
        self._end_pass()
        if self.now >= self._next_tick:
            self._next_tick = self.now + self._tick
            self._check_timers()

    def _shut_down(self) -> None:
        """Tell everyone we are going, give the notice a moment to leave, close all."""
        log.info("shutting down: %d connection(s)", len(self.connections))
        frame = encode_frame({"type": "shutdown", "text": "The server is shutting down."})
        deadline = time.monotonic() + SHUTDOWN_FLUSH_TIMEOUT
        for conn in list(self.connections):
            if conn.state in (NEW, JOINED):
                conn.outbox.append(frame)
            self._send_remaining(conn, deadline)
            self._close_socket(conn)
        for sock in self.listeners:
            self.selector.unregister(sock)
            sock.close()
        self.selector.unregister(self._wake_reader)
        self._wake_reader.close()
        self._wake_writer.close()
        self.selector.close()
        self.store.close()
        log.info("server stopped")

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
        if self.now < self._accept_paused_until:
            return
        for listener in self.listeners:
            for _ in range(ACCEPTS_PER_PASS):
                try:
                    sock, address = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:   # out of file descriptors, most likely
                    log.error("cannot accept connections: %s; pausing %.0f s", exc, ACCEPT_PAUSE)
                    self._accept_paused_until = self.now + ACCEPT_PAUSE
                    return
                self._add_connection(sock, address)

    def _add_connection(self, sock: socket.socket, address: tuple) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        conn = Connection(sock, address, self.now)
        self.connections.add(conn)
        self.selector.register(sock, selectors.EVENT_READ, conn)
        log.info("connection from %s", conn.address)
        if len(self.connections) > self.settings.max_clients:
            self.reject(conn, "server_full",
                        f"The server is full ({self.settings.max_clients} connections). "
                        "Try again later.")

    # -- reading ---------------------------------------------------------

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.disconnect(conn, f"connection lost ({exc.strerror or exc})", graceful=False)
            return
        if conn.state == CLOSING:
            if not data:
                self._close_socket(conn)
            return
        if not data:
            conn.peer_closed = True
            if conn.decoder.buffered:
                reason = "connection closed in the middle of a message"
            else:
                reason = "connection closed"
            self.disconnect(conn, reason)
            return
        conn.last_heard = self.now
        conn.decoder.feed(data)
        try:
            for payload in conn.decoder:
                self.dispatch(conn, decode_payload(payload))
                if conn.state != NEW and conn.state != JOINED:
                    break
        except ProtocolError as exc:
            self.reject(conn, exc.code, exc.text)

    def dispatch(self, conn: Connection, message: dict) -> None:
        """Validate one message from the wire and pass it to its handler."""
        kind = message["type"]
        if conn.state == NEW and kind != "hello":
            self.reject(conn, "hello_required", 'The first message must be "hello".')
            return
        entry = self._handlers.get(kind)
        if entry is None:
            self.send_error(conn, "unknown_type", f'Unknown message type "{kind}".')
            return
        fields, handler = entry
        problem = check_fields(message, fields)
        if problem:
            if conn.state == NEW:
                self.reject(conn, "bad_message", problem)
            else:
                self.send_error(conn, "bad_message", problem)
            return
        try:
            handler(conn, message)
        except Exception:   # a bug must cost one message, not the whole server
            log.exception("error while handling %r from %s", kind, conn)
            self.send_error(conn, "internal_error", "The server failed on that message.")

    # -- handlers: one per message type (see MESSAGES) ---------------------

    def on_hello(self, conn: Connection, message: dict) -> None:
        if conn.state == JOINED:
            self.send_error(conn, "already_joined", f"You are already here as {conn.name}.")
            return
        name = message["name"]
        if not NAME_PATTERN.fullmatch(name):
            self.reject(conn, "bad_name", f"Names are {NAME_RULES}.")
            return
        key = name.lower()
        if key in RESERVED_NAMES:
            self.reject(conn, "name_reserved", f'The name "{name}" is reserved. Pick another.')
            return
        if key in self.members:
            self.reject(conn, "name_taken", f'The name "{name}" is taken. Pick another.')
            return
        conn.state = JOINED
        conn.name = name
        self.members[key] = conn
        log.info("%s joined as %s", conn.address, name)
        self.send(conn, {"type": "welcome", "name": name, "users": self.user_names()})
        replay = self.store.recent_public(self.settings.history) if self.settings.history else []
        self.send_history(conn, "join", replay)
        conn.history_floor = self.store.last_id()
        timestamp = utc_timestamp()
        self.store.record(timestamp, "join", name)
        self.broadcast({"type": "join", "name": name, "ts": timestamp}, exclude=conn)

    def on_say(self, conn: Connection, message: dict) -> None:
        text = self.checked_text(conn, message["text"])
        if text is None:
            return
        timestamp = utc_timestamp()
        conn.messages_sent += 1
        self.store.record(timestamp, "message", conn.name, None, text)
        self.broadcast({"type": "message", "from": conn.name, "text": text, "ts": timestamp},
                       exclude=conn)
        self.send(conn, {"type": "sent", "text": text, "ts": timestamp})
        log.debug("%s says: %s", conn.name, text)

    def on_whisper(self, conn: Connection, message: dict) -> None:
        target = self.members.get(message["to"].lower())
        if target is None:
            self.send_error(conn, "unknown_user",
                            f'Nobody called "{clean_text(message["to"])[:40]}" is here.')
            return
        text = self.checked_text(conn, message["text"])
        if text is None:
            return
        timestamp = utc_timestamp()
        conn.messages_sent += 1
        self.store.record(timestamp, "whisper", conn.name, target.name, text)
        self.send(target, {"type": "whisper", "from": conn.name, "to": target.name,
                           "text": text, "ts": timestamp})
        self.send(conn, {"type": "sent", "to": target.name, "text": text, "ts": timestamp})
        log.debug("%s whispers to %s: %s", conn.name, target.name, text)

    def on_who(self, conn: Connection, message: dict) -> None:
        self.send(conn, {"type": "users", "users": self.user_names()})

    def on_get_history(self, conn: Connection, message: dict) -> None:
        limit = max(1, min(int(message.get("limit", HISTORY_DEFAULT)), HISTORY_MAX))
        rows = self.store.recent_for(conn.name, limit, self.whispers_after(conn))
        self.send_history(conn, "history", rows)

    def on_search(self, conn: Connection, message: dict) -> None:
        words = clean_text(message["text"]).split()[:SEARCH_MAX_WORDS]
        if not words:
            self.send_error(conn, "empty_search", "Search for at least one word.")
            return
        rows = self.store.search_for(conn.name, words, SEARCH_RESULTS, self.whispers_after(conn))
        self.send_history(conn, "search", rows)

    def on_ping(self, conn: Connection, message: dict) -> None:
        self.send(conn, {"type": "pong"})

    def on_pong(self, conn: Connection, message: dict) -> None:
        pass    # hearing anything at all already counts as a sign of life

    def on_bye(self, conn: Connection, message: dict) -> None:
        self.disconnect(conn, "quit")

    # -- helpers for handlers ----------------------------------------------

    def checked_text(self, conn: Connection, text: str) -> Optional[str]:
        """The text cleaned for display, or None after telling the sender what is wrong."""
        text = clean_text(text)
        if not text:
            self.send_error(conn, "empty_message", "Empty messages are not sent.")
            return None
        if len(text) > self.settings.max_length:
            self.send_error(conn, "too_long", f"Messages are limited to "
                            f"{self.settings.max_length} characters; yours had {len(text)}.")
            return None
        return text

    def send_history(self, conn: Connection, purpose: str, rows: List[tuple]) -> None:
        """Past messages as `history` frames, then a `history_end` saying why they came."""
        for _, ts, kind, sender, recipient, text in rows:
            entry = {"type": "history", "kind": kind, "from": sender, "text": text, "ts": ts}
            if recipient is not None:
                entry["to"] = recipient
            self.send(conn, entry)
        end = {"type": "history_end", "for": purpose, "count": len(rows)}
        if not self.store.working or not self.store.keep_messages:
            end["text"] = "The server keeps no history."
        self.send(conn, end)

    @staticmethod
    def whispers_after(conn: Connection) -> int:
        """The event after which a client may see its whispers in history.

        Names are not protected, so someone who takes a name later must not
        read the whispers of whoever had it before: only this visit's.
        """
        return conn.history_floor

    def user_names(self) -> List[str]:
        return sorted((conn.name for conn in self.members.values()), key=str.lower)

    # -- writing ---------------------------------------------------------

    def send(self, conn: Connection, message: dict) -> None:
        conn.outbox.append(encode_frame(message))
        self._to_flush.add(conn)

    def send_error(self, conn: Connection, code: str, text: str) -> None:
        self.send(conn, {"type": "error", "code": code, "text": text})

    def broadcast(self, message: dict, exclude: Optional[Connection] = None) -> None:
        """Queue one message for every joined client but `exclude`, encoded once."""
        frame = encode_frame(message)
        for conn in self.members.values():
            if conn is not exclude:
                conn.outbox.append(frame)
        self._to_flush.update(self.members.values())

    def _end_pass(self) -> None:
        """Store this pass's messages, then send them: nothing reaches anyone unstored."""
        self.store.commit()
        self._flush_all()

    def _flush_all(self) -> None:
        pending, self._to_flush = self._to_flush, set()
        for conn in pending:
            if conn.state != CLOSED:
                self._flush(conn)

    def _flush(self, conn: Connection) -> None:
        """Send what is queued with one call; keep the rest for when the socket is writable."""
        outbox = conn.outbox
        if outbox:
            data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.disconnect(conn, f"connection lost ({exc.strerror or exc})", graceful=False)
                return
            if sent == len(data):
                outbox.clear()
            else:
                rest = data[sent:]
                if len(rest) > self.settings.max_backlog and conn.state != CLOSING:
                    outbox.clear()
                    self.disconnect(conn, f"too slow: over {self.settings.max_backlog // 1024}"
                                    " KiB waiting to be read", graceful=False)
                    return
                conn.outbox = [rest]
        self._watch_writable(conn, bool(conn.outbox))
        if conn.state == CLOSING and not conn.outbox:
            self._finish_closing(conn)

    def _watch_writable(self, conn: Connection, wanted: bool) -> None:
        if conn.wants_write != wanted:
            conn.wants_write = wanted
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if wanted else 0)
            self.selector.modify(conn.sock, events, conn)

    # -- leaving ---------------------------------------------------------

    def reject(self, conn: Connection, code: str, text: str) -> None:
        """Send an error and close the connection once it has gone out."""
        self.send_error(conn, code, text)
        self.disconnect(conn, f"{code}: {text}")

    def disconnect(self, conn: Connection, reason: str, graceful: bool = True) -> None:
        """Take a client out of the chat, tell the others, and close its socket.

        graceful: deliver what is queued for it first, then wait briefly for
        the peer to hang up, so that a final error frame is not lost to a
        reset. Not graceful: the peer is gone or stuck; close at once.
        """
        if conn.state == CLOSING or conn.state == CLOSED:
            if not graceful:
                self._close_socket(conn)
            return
        if conn.state == JOINED:
            del self.members[conn.name.lower()]
            timestamp = utc_timestamp()
            self.store.record(timestamp, "leave", conn.name, None, reason)
            self.broadcast({"type": "leave", "name": conn.name, "reason": reason,
                            "ts": timestamp})
            log.info("%s left: %s", conn.name, reason)
        else:
            log.info("%s disconnected: %s", conn.address, reason)
        if graceful:
            conn.state = CLOSING
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
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._close_socket(conn)

    def _close_socket(self, conn: Connection) -> None:
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        self.connections.discard(conn)
        self._to_flush.discard(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.outbox = []

    # -- timers ----------------------------------------------------------

    def _check_timers(self) -> None:
        now, settings = self.now, self.settings
        for conn in list(self.connections):
            if conn.state == NEW:
                if now - conn.connected_at >= settings.hello_timeout:
                    self.reject(conn, "hello_timeout",
                                f"No hello within {settings.hello_timeout:g} seconds.")
            elif conn.state == JOINED:
                quiet = now - conn.last_heard
                if quiet >= settings.drop_after:
                    self.disconnect(conn, f"no sign of life for {settings.drop_after:g} seconds",
                                    graceful=False)
                elif quiet >= settings.ping_after and conn.last_ping < conn.last_heard:
                    conn.last_ping = now
                    self.send(conn, {"type": "ping"})
            elif conn.state == CLOSING and now >= conn.deadline:
                self._close_socket(conn)
        self._end_pass()


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


def describe_reach(host: str, port: int) -> List[str]:
    """Lines telling the user who can reach the server and how."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        ip = None
    if ip is not None and ip.is_loopback:
        return ["bound to loopback only: other machines cannot reach this server",
                "(leave out --host to accept connections from your network)"]
    if ip is not None and not ip.is_unspecified:
        return [f"clients connect with: python client.py {host} {port}",
                f"(allow incoming TCP port {port} in this machine's firewall)"]
    lines = []
    addresses = lan_addresses()
    if addresses:
        lines.append("other machines on your network connect with:")
        lines.extend(f"  python client.py {address} {port}" for address in addresses)
        lines.append(f"(allow incoming TCP port {port} in this machine's firewall)")
    else:
        lines.append("no network address found: find this machine's address with "
                     "'ipconfig' (Windows) or 'ip addr' (Linux, macOS)")
    lines.append(f"on this machine: python client.py localhost {port}")
    return lines


def describe_store(store: HistoryStore) -> str:
    if not store.keep_messages:
        return "history: not kept (--no-history)"
    if not store.on_disk:
        return "history: kept in memory until the server stops"
    return f"history: kept in {os.path.abspath(store.path)}"


def export_history(db_path: str, destination: str) -> int:
    """--export: write the stored history as text, then exit."""
    if db_path == ":memory:" or not os.path.exists(db_path):
        print(f"error: no history database at {db_path}; name it with --db", file=sys.stderr)
        return 1
    try:
        store = HistoryStore(db_path)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        if destination == "-":
            count = store.export(sys.stdout)
        else:
            with open(destination, "x", encoding="utf-8") as out:
                count = store.export(out)
            print(f"exported {count} lines to {os.path.abspath(destination)}")
    except FileExistsError:
        print(f"error: {destination} exists; choose a new file name", file=sys.stderr)
        return 1
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
        epilog="Ctrl-C (or SIGTERM) tells everyone the server is shutting down and exits 0.")
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
    parser.add_argument("--db", default=DEFAULT_DB, metavar="PATH",
                        help="sqlite file for history; ':memory:' keeps it only while the "
                             f"server runs (default: {DEFAULT_DB} in the current directory)")
    parser.add_argument("--no-history", action="store_true",
                        help="record no messages and write nothing to disk")
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


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings(host=args.host, port=args.port, max_clients=args.max_clients,
                    hello_timeout=args.hello_timeout, ping_after=args.ping_after,
                    drop_after=args.drop_after, max_backlog=args.max_backlog * 1024,
                    max_length=args.max_length,
                    db=":memory:" if args.no_history else args.db,
                    keep_history=not args.no_history, history=args.history)


def check_settings(parser: argparse.ArgumentParser, settings: Settings) -> None:
    if not 0 <= settings.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    for flag, value in (("--max-clients", settings.max_clients),
                        ("--max-length", settings.max_length),
                        ("--max-backlog", settings.max_backlog),
                        ("--hello-timeout", settings.hello_timeout),
                        ("--ping-after", settings.ping_after),
                        ("--drop-after", settings.drop_after)):
        if value <= 0:
            parser.error(f"{flag} must be more than 0")
    if settings.history < 0:
        parser.error("--history must be 0 or more")
    if settings.max_length > MAX_TEXT_LIMIT:
        parser.error(f"--max-length can be at most {MAX_TEXT_LIMIT}, so a message fits in a frame")
    if settings.drop_after <= settings.ping_after:
        parser.error("--drop-after must be longer than --ping-after")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_arg_parser()
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    check_settings(parser, settings)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(message)s")

    if args.export:
        return export_history(settings.db, args.export)
    try:
        store = HistoryStore(settings.db, settings.keep_history)
    except StoreError as exc:
        print(f"error: {exc}; choose another file with --db, or use --no-history",
              file=sys.stderr)
        return 1
    server = ChatServer(settings, store)
    try:
        host, port = server.listen()
    except OSError as exc:
        store.close()
        if exc.errno in ADDRESS_IN_USE:
            print(f"error: port {settings.port} is already in use (another server running?); "
                  "pick another with --port", file=sys.stderr)
        else:
            print(f"error: cannot listen on {settings.host or 'all interfaces'} port "
                  f"{settings.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    shown = f"[{host}]" if ":" in host else host
    print(f"listening on {shown}:{port}", flush=True)
    for line in describe_reach(host, port):
        print(line)
    print(describe_store(store))
    print("press Ctrl-C to stop", flush=True)

    for signal_name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, signal_name):
            signal.signal(getattr(signal, signal_name), lambda signum, frame: server.stop())
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
