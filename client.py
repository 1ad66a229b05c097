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
The main thread reads your lines and sends them; a second thread receives
frames from the server and prints them the moment they arrive, so you never
have to press Enter to see new messages. Both threads share one socket: the
receiver only reads, sends are serialised by a lock. When the connection
drops, the receiver wakes the main thread from its blocking read with a
signal (on Windows, where that is impossible, it ends the process directly).
"""

import argparse
import dataclasses
import getpass
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import unicodedata
from datetime import date, datetime
from collections import deque
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, TextIO, Tuple

try:
    import ssl
except ImportError:     # Python built without OpenSSL: everything but --tls still works
    ssl = None  # type: ignore

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 5050
CONNECT_TIMEOUT = 10.0      # seconds to reach the server
HANDSHAKE_TIMEOUT = 10.0    # seconds for the server to answer hello
LEAVE_TIMEOUT = 5.0         # seconds to wait for the server to confirm we left
TRANSCRIPT_LINES = 100_000  # lines of this session kept for /save
HISTORY_MAX = 200           # the most /history asks for (the server's limit too)
RECV_SIZE = 64 * 1024
KNOWN_HOSTS = os.path.join(os.path.expanduser("~"), ".chat_known_hosts")

# Errors from the server that mean "choose another name", not "give up".
NAME_PROBLEMS = frozenset({"bad_name", "name_taken", "name_reserved"})

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
# What the server may send, and how each message is shown
# ---------------------------------------------------------------------------

#: Fields each server message must carry (see check_fields). Messages of a
#: type not listed here come from a newer server and are ignored.
SERVER_MESSAGES: Dict[str, Dict[str, type]] = {
    "welcome": {"name": str, "users": list, "ops?": list, "registered?": bool, "limits?": dict},
    "message": {"from": str, "text": str, "ts?": str},
    "whisper": {"from": str, "to": str, "text": str, "ts?": str},
    "sent": {"text": str, "to?": str, "ts?": str},
    "join": {"name": str, "ts?": str},
    "leave": {"name": str, "reason?": str, "text?": str, "ts?": str},
    "users": {"users": list, "ops?": list},
    "announcement": {"from": str, "text": str, "ts?": str},
    "history": {"kind": str, "from": str, "text": str, "ts": str, "to?": str},
    "history_end": {"for": str, "count": int, "text?": str},
    "error": {"code": str, "text": str},
    "notice": {"code": str, "text": str},
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
    except (AttributeError, ValueError):
        moment = datetime.now()
    if with_date and moment.date() != date.today():
        return moment.strftime("%b %d %H:%M")
    return moment.strftime("%H:%M")


def names_list(users: list, ops: Optional[list] = None) -> str:
    """Names separated by commas; operators marked with @."""
    operators = {str(name).lower() for name in ops or []}
    return ", ".join(("@" if str(user).lower() in operators else "") + clean_text(str(user))
                     for user in users)


def format_message(message: dict, my_name: str) -> Optional[str]:
    """The line to show for a message from the server, or None to show nothing."""
    formatter = FORMATTERS.get(message["type"])
    return formatter(message, my_name) if formatter else None


def _show_sent(message: dict, my_name: str) -> str:
    text = clean_text(message["text"])
    if "to" in message:
        return f"[{local_time(message.get('ts'))}] [whisper to {clean_text(message['to'])}] {text}"
    return f"[{local_time(message.get('ts'))}] {my_name}: {text}"


def _show_leave(message: dict, my_name: str) -> str:
    if "text" in message:       # kicked or banned: the server says how
        return f"[{local_time(message.get('ts'))}] * {clean_text(message['text'])}"
    reason = clean_text(str(message.get("reason", "")))
    detail = "" if reason in ("", "quit") else f" ({reason})"
    return f"[{local_time(message.get('ts'))}] * {clean_text(message['name'])} left{detail}"


def _show_history(message: dict, my_name: str) -> str:
    stamp = local_time(message["ts"], with_date=True)
    sender, text = clean_text(message["from"]), clean_text(message["text"])
    if message["kind"] == "whisper":
        if sender.lower() == my_name.lower():
            return f"[{stamp}] [whisper to {clean_text(message.get('to', '?'))}] {text}"
        return f"[{stamp}] [whisper from {sender}] {text}"
    if message["kind"] == "announcement":
        return f"[{stamp}] *** {sender}: {text}"
    return f"[{stamp}] {sender}: {text}"


def _show_history_end(message: dict, my_name: str) -> Optional[str]:
    if "text" in message:
        return f"* {clean_text(str(message['text']))}"
    purpose, count = message["for"], message["count"]
    if purpose == "search":
        return f"--- {count} found ---" if count else "* no messages match"
    if not count:
        return None if purpose == "join" else "* no messages yet"
    return "--- end of history ---"


FORMATTERS: Dict[str, Callable[[dict, str], Optional[str]]] = {
    "message": lambda m, me: (f"[{local_time(m.get('ts'))}] "
                              f"{clean_text(m['from'])}: {clean_text(m['text'])}"),
    "whisper": lambda m, me: (f"[{local_time(m.get('ts'))}] "
                              f"[whisper from {clean_text(m['from'])}] {clean_text(m['text'])}"),
    "sent": _show_sent,
    "join": lambda m, me: f"[{local_time(m.get('ts'))}] * {clean_text(m['name'])} joined",
    "leave": _show_leave,
    "users": lambda m, me: f"* {len(m['users'])} here: {names_list(m['users'], m.get('ops'))}",
    "announcement": lambda m, me: (f"[{local_time(m.get('ts'))}] *** "
                                   f"{clean_text(m['from'])}: {clean_text(m['text'])}"),
    "error": lambda m, me: f"! {clean_text(m['text'])}",
    "shutdown": lambda m, me: f"* {clean_text(m.get('text', 'The server is shutting down.'))}",
    "history": _show_history,
    "history_end": _show_history_end,
    "notice": lambda m, me: (f"--- {clean_text(m['text']).lower()} ---" if m["code"] == "new_since"
                             else f"* {clean_text(m['text'])}"),
}

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


@dataclasses.dataclass
class TlsOptions:
    """How to check the server's certificate (see check_certificate)."""

    cafile: Optional[str] = None        # verify against these CAs, like a web browser
    insecure: bool = False              # check nothing (a warning says so)
    pinned: Optional[str] = None        # fingerprint from a HOST:PORT#FINGERPRINT join string
    known_hosts: str = KNOWN_HOSTS


@dataclasses.dataclass
class Credentials:
    password: Optional[str] = dataclasses.field(default=None, repr=False)        # the room's
    name_password: Optional[str] = dataclasses.field(default=None, repr=False)   # a name's


def normalize_fingerprint(text: str) -> str:
    """Fingerprints compare in lower-case hex, with any colons or "sha256:" dropped."""
    text = text.strip().lower()
    if text.startswith("sha256:"):
        text = text[len("sha256:"):]
    return text.replace(":", "")


def read_known_hosts(path: str) -> Dict[str, str]:
    """HOST:PORT -> fingerprint, from a file of "HOST:PORT FINGERPRINT" lines."""
    known = {}
    try:
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                fields = line.split()
                if len(fields) == 2 and not line.startswith("#"):
                    known[fields[0]] = normalize_fingerprint(fields[1])
    except FileNotFoundError:
        pass
    return known


def remember_host(path: str, where: str, fingerprint: str) -> None:
    """Record (or replace) the fingerprint for HOST:PORT in the known-hosts file."""
    known = read_known_hosts(path)
    known[where] = fingerprint
    with open(path, "w", encoding="utf-8") as out:
        out.write("# Chat servers this client has met: HOST:PORT SHA256-FINGERPRINT\n")
        for host, value in sorted(known.items()):
            out.write(f"{host} {value}\n")


def changed_certificate_warning(where: str, found: str, expected: str, source: str) -> str:
    bar = "@" * 64
    return (f"{bar}\nWARNING: THE CHAT SERVER'S CERTIFICATE IS NOT THE ONE EXPECTED\n{bar}\n"
            f"{where} showed a certificate with fingerprint\n  {found}\n"
            f"but {source} says\n  {expected}\n"
            "Someone may be intercepting this connection, or the server has a new "
            "certificate.\nNot connecting. If the server's owner confirms the new "
            f"fingerprint, join with\n  python client.py '{where}#{found}' --tls")


def check_certificate(sock: "ssl.SSLSocket", where: str, tls: TlsOptions,
                      note: Callable[[str], None]) -> None:
    """Trust on first use, like SSH, unless a CA file or a pinned fingerprint decides.

    Raises CannotConnect with a loud warning when the certificate is not
    the one this client expected.
    """
    if tls.insecure or tls.cafile:
        return      # --insecure was warned about; with --cafile, ssl verified the chain
    found = hashlib.sha256(sock.getpeercert(binary_form=True)).hexdigest()
    known = read_known_hosts(tls.known_hosts).get(where)
    if tls.pinned is not None:
        if normalize_fingerprint(tls.pinned) != found:
            raise CannotConnect(changed_certificate_warning(
                where, found, normalize_fingerprint(tls.pinned), "the join string"))
        if known != found:
            remember_host(tls.known_hosts, where, found)
        return
    if known is None:
        remember_host(tls.known_hosts, where, found)
        note(f"* first TLS connection to {where}; its certificate fingerprint is\n"
             f"*   {found}\n* check it against the one the server printed at start-up; "
             f"it is remembered in {tls.known_hosts}")
    elif known != found:
        raise CannotConnect(changed_certificate_warning(
            where, found, known, f"{tls.known_hosts} (from an earlier visit)"))


def start_tls(sock: socket.socket, host: str, where: str, tls: TlsOptions,
              note: Callable[[str], None]) -> socket.socket:
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
        raise CannotConnect(f"{where} does not answer TLS ({getattr(exc, 'reason', None) or exc})"
                            "\nIs the server running with --tls-cert?") from None
    try:
        check_certificate(secure, where, tls, note)
    except CannotConnect:
        secure.close()
        raise
    return secure


class ServerConnection:
    """A socket that speaks the frame protocol.

    One thread may receive while others send: sends hold a lock so that
    frames from two threads never interleave.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self._send_lock = threading.Lock()

    @classmethod
    def open(cls, host: str, port: int, tls: Optional[TlsOptions] = None,
             note: Callable[[str], None] = lambda text: print(text, file=sys.stderr)
             ) -> "ServerConnection":
        where = join_address(host, port)
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
        if tls is not None:
            sock = start_tls(sock, host, where, tls, note)
        return cls(sock)

    def send(self, message: dict) -> None:
        frame = encode_frame(message)
        with self._send_lock:
            self.sock.sendall(frame)

    def receive(self) -> dict:
        """Block until the next message arrives.

        Raises ConnectionClosed at EOF, ProtocolError on bad data, OSError
        on a broken connection or a timeout set on the socket.
        """
        while True:
            payload = next(self.decoder, None)
            if payload is not None:
                return decode_payload(payload)
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionClosed()
            self.decoder.feed(data)

    def finish_sending(self) -> None:
        """Tell the server we will send nothing more (TCP half-close)."""
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
    try:
        connection.sock.settimeout(HANDSHAKE_TIMEOUT)
        connection.send(hello)
        while True:
            reply = connection.receive()
            if reply["type"] == "welcome" and not check_fields(reply, SERVER_MESSAGES["welcome"]):
                connection.sock.settimeout(None)
                return connection, reply
            if reply["type"] == "error" and not check_fields(reply, SERVER_MESSAGES["error"]):
                raise JoinRefused(reply["code"], clean_text(reply["text"]))
            if reply["type"] == "shutdown":
                raise JoinRefused("server_shutdown", "The server is shutting down.")
    except (JoinRefused, ValueError):
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
# The chat session: what you type, what arrives
# ---------------------------------------------------------------------------

class ConnectionLost(Exception):
    """Raised in the main thread when the receiver thread finds the connection gone."""


class Command(NamedTuple):
    usage: str
    summary: str
    run: Callable[["ChatSession", str], None]
    for_operators: bool = False


def moderation_command(name: str) -> Callable[["ChatSession", str], None]:
    """A client command that asks the server to run moderation command `name`."""
    def run(session: "ChatSession", argument: str) -> None:
        session.send({"type": "moderate", "command": name, "args": argument})
    return run


def parse_line(line: str) -> Tuple[str, str]:
    """Split an input line into (command, argument); plain text is ("say", text).

    "/name args" and "\\name args" are commands; "//text" sends "/text".
    Backslash only counts for known commands, so "\\o/" is still chat.
    """
    if line.startswith("//"):
        return "say", line[1:]
    if line.startswith("/") or line.startswith("\\"):
        word, _, rest = line[1:].partition(" ")
        word = word.lower()
        if line.startswith("/") or word in COMMANDS or word in ALIASES:
            return word, rest.strip()
    return "say", line


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


class ChatSession:
    """A joined connection: sends what you type, shows what arrives."""

    def __init__(self, connection: ServerConnection, name: str, server: str,
                 out: TextIO = sys.stdout, log_file: Optional[TextIO] = None,
                 on_lost: Optional[Callable[[], None]] = None, limits: Optional[dict] = None,
                 ask_secret: Optional[Callable[[str], str]] = None) -> None:
        self.connection = connection
        self.name = name
        self.server = server                # HOST:PORT, for the transcript
        self.out = out
        self.log_file = log_file            # --log: every line shown is appended here
        self.transcript: Deque[str] = deque(maxlen=TRANSCRIPT_LINES)
        self.started = datetime.now()
        self.on_lost = on_lost or wake_main_thread  # called when the connection drops
        self.pacer = Pacer(limits or {})
        self.ask_secret = ask_secret        # prompts without echo; None when not on a terminal
        self._in_history = False            # between a first history frame and history_end
        # A header for each batch of history frames still to come, in order: the server
        # answers requests in order and ends every batch, even the join replay, with
        # history_end.
        self._history_headers: Deque[str] = deque(["--- earlier messages ---"])
        self.operator = False               # the server accepted our /op
        self.leaving = threading.Event()    # we asked to leave: EOF is expected
        self.closed = threading.Event()     # the receiver thread has stopped
        self.lost_reason: Optional[str] = None
        self._told_why = False      # the server said why it is closing (an error, a shutdown)
        self._print_lock = threading.Lock()
        self._receiver = threading.Thread(target=self._receive_loop, name="receiver", daemon=True)

    # -- output -------------------------------------------------------------

    def show(self, line: str) -> None:
        """Print a line, keep it for /save, and append it to the --log file."""
        with self._print_lock:
            self.out.write(line + "\n")
            self.out.flush()
            self.transcript.append(line)
            if self.log_file is not None:
                try:
                    self.log_file.write(line + "\n")
                    self.log_file.flush()
                except OSError as exc:
                    self.log_file = None
                    self.out.write(f"! stopped writing the log: {exc.strerror or exc}\n")

    def show_banner(self, welcome: dict) -> None:
        others = [user for user in welcome["users"] if str(user).lower() != self.name.lower()]
        self.show(f"* connected to {self.server} as {self.name}")
        self.show(f"* here now: {names_list(others, welcome.get('ops'))}" if others
                  else "* nobody else is here yet")
        self.show("* type /help for commands, /quit to leave")

    # -- receiving (runs in its own thread) ----------------------------------

    def start(self) -> None:
        self._receiver.start()

    def _receive_loop(self) -> None:
        reason = "connection to the server lost"
        try:
            while True:
                self._handle_incoming(self.connection.receive())
        except ConnectionClosed:
            if self._told_why:      # the reason was shown just above
                reason = "disconnected"
        except ProtocolError as exc:
            reason = f"connection closed: the server sent bad data ({exc.text})"
        except OSError as exc:
            reason = f"connection to the server lost ({exc.strerror or exc})"
        finally:
            self.closed.set()
        if not self.leaving.is_set():
            self.lost_reason = reason
            self.show(f"! {reason}")
            self.on_lost()

    def _handle_incoming(self, message: dict) -> None:
        kind = message["type"]
        fields = SERVER_MESSAGES.get(kind)
        if fields is None:
            return      # from a newer server; nothing we know how to show
        problem = check_fields(message, fields)
        if problem:
            self.show(f"! the server sent a malformed {kind!r} message ({problem})")
            return
        if kind == "ping":
            self._send_quietly({"type": "pong"})
            return
        self._told_why = kind in ("shutdown", "error")  # in case the connection now closes
        if kind == "history" and not self._in_history:
            self._in_history = True
            self.show(self._history_headers[0] if self._history_headers else "--- history ---")
        elif kind == "history_end":
            self._in_history = False
            if self._history_headers:
                self._history_headers.popleft()
        elif kind == "notice" and message["code"] in ("op", "deop"):
            self.operator = message["code"] == "op"
        line = format_message(message, self.name)
        if line:
            self.show(line)

    def _send_quietly(self, message: dict) -> None:
        try:
            self.connection.send(message)
        except OSError:
            pass    # the receiver will see the connection go and say so

    # -- sending (main thread) ----------------------------------------------

    def handle_line(self, line: str) -> None:
        """Act on one line of input: a command, or text to send to everyone."""
        command, argument = parse_line(line.rstrip("\r\n"))
        if command == "say":
            if argument.strip():
                self.send({"type": "say", "text": argument})
            return
        entry = COMMANDS.get(ALIASES.get(command, command))
        if entry is None:
            self.show(f"! unknown command /{command}: type /help for the list, "
                      "or start with // to send a line beginning with /")
            return
        entry.run(self, argument)

    def send(self, message: dict) -> None:
        """Send from the main thread, within the server's rate."""
        self.pacer.wait()
        self.connection.send(message)

    def leave(self) -> None:
        """Say goodbye, and wait until the server has handled everything we sent."""
        if self.leaving.is_set():
            return
        self.leaving.set()
        try:
            self.send({"type": "bye"})
            self.connection.finish_sending()
        except OSError:
            pass
        self.closed.wait(LEAVE_TIMEOUT)
        self.connection.close()

    # -- commands -------------------------------------------------------------

    def cmd_help(self, argument: str) -> None:
        for line in command_help_lines():
            self.show(line)

    def cmd_clients(self, argument: str) -> None:
        if self.operator:   # addresses, times and counts, as on the server console
            self.send({"type": "moderate", "command": "clients"})
        else:
            self.send({"type": "who"})

    def cmd_op(self, argument: str) -> None:
        password = argument or self._secret("operator password: ", "/op PASSWORD")
        if password:
            self.send({"type": "op", "password": password})

    def cmd_deop(self, argument: str) -> None:
        self.send({"type": "deop"})

    def cmd_whisper(self, argument: str) -> None:
        target, _, text = argument.partition(" ")
        if not target or not text.strip():
            self.show("! usage: /w NAME TEXT")
            return
        self.send({"type": "whisper", "to": target, "text": text.strip()})

    def cmd_history(self, argument: str) -> None:
        if argument and not (argument.isdigit() and 1 <= int(argument) <= HISTORY_MAX):
            self.show(f"! usage: /history [N], N from 1 to {HISTORY_MAX}")
            return
        request = {"type": "get_history"}
        if argument:
            request["limit"] = int(argument)
        self._history_headers.append("--- history ---")
        self.send(request)

    def cmd_search(self, argument: str) -> None:
        if not argument.strip():
            self.show("! usage: /search WORDS")
            return
        self._history_headers.append(f"--- search: {argument.strip()} ---")
        self.send({"type": "search", "text": argument})

    def cmd_save(self, argument: str) -> None:
        overwrite = argument.startswith("-f ") or argument == "-f"
        path = argument[2:].strip() if overwrite else argument.strip()
        header = (f"Chat on {self.server} as {self.name}, "
                  f"{self.started:%Y-%m-%d %H:%M} to {datetime.now():%Y-%m-%d %H:%M} (local time)")
        with self._print_lock:
            lines = [header, ""] + list(self.transcript)
        try:
            saved_to = save_transcript(lines, path or None, overwrite)
        except FileExistsError:
            self.show(f"! {path} exists: '/save -f {path}' overwrites it, or choose another name")
        except OSError as exc:
            self.show(f"! cannot save to {path}: {exc.strerror or exc}")
        else:
            self.show(f"* saved {len(lines) - 2} lines to {saved_to}")

    def cmd_register(self, argument: str) -> None:
        password = argument or self._new_password("/register PASSWORD")
        if password:
            self.send({"type": "register", "password": password})

    def cmd_unregister(self, argument: str) -> None:
        password = argument or self._secret("your password: ", "/unregister PASSWORD")
        if password:
            self.send({"type": "unregister", "password": password})

    def cmd_password(self, argument: str) -> None:
        old, _, new = argument.partition(" ")
        if not argument:
            old = self._secret("current password: ", "/password OLD NEW")
            new = old and self._new_password("/password OLD NEW")
        elif not new:
            self.show("! usage: /password OLD NEW, or /password alone to be asked")
            return
        if old and new:
            self.send({"type": "change_password", "password": old, "new_password": new})

    def _secret(self, prompt: str, usage: str) -> Optional[str]:
        """Ask for a password without echo; on a pipe, explain the usage instead."""
        if self.ask_secret is None:
            self.show(f"! usage: {usage}")
            return None
        return self.ask_secret(prompt) or None

    def _new_password(self, usage: str) -> Optional[str]:
        first = self._secret("new password: ", usage)
        if first and self._secret("the same again: ", usage) != first:
            self.show("! the two passwords differ; nothing changed")
            return None
        return first

    def cmd_clear(self, argument: str) -> None:
        if not self.out.isatty():
            return
        if os.name == "nt":
            os.system("cls")
        else:
            with self._print_lock:
                self.out.write("\033[2J\033[3J\033[H")
                self.out.flush()

    def cmd_quit(self, argument: str) -> None:
        raise EOFError      # leaves exactly as the end of input does


COMMANDS: Dict[str, Command] = {
    "help": Command("", "show this list", ChatSession.cmd_help),
    "clients": Command("", "who is here", ChatSession.cmd_clients),
    "w": Command("NAME TEXT", "whisper: only NAME sees TEXT", ChatSession.cmd_whisper),
    "history": Command("[N]", "show the last N messages (20 if no N)", ChatSession.cmd_history),
    "search": Command("WORDS", "find messages holding all the words", ChatSession.cmd_search),
    "save": Command("[FILE]", "save this session as text; -f overwrites",
                    ChatSession.cmd_save),
    "register": Command("", "protect your name with a password", ChatSession.cmd_register),
    "unregister": Command("", "remove your name's password", ChatSession.cmd_unregister),
    "password": Command("", "change your name's password", ChatSession.cmd_password),
    "clear": Command("", "clear the screen", ChatSession.cmd_clear),
    "quit": Command("", "leave the chat; so does Ctrl-D", ChatSession.cmd_quit),
    "op": Command("", "become an operator (asks for the operator password)",
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


def save_transcript(lines: List[str], path: Optional[str], overwrite: bool) -> str:
    """Write lines to path, or to a new dated file here; return the absolute path.

    Never replaces an existing file unless overwrite is set: FileExistsError.
    """
    if path is None:
        base = f"chat-{datetime.now():%Y-%m-%d-%H%M}"
        candidates = [f"{base}.txt"] + [f"{base}-{number}.txt" for number in range(2, 1000)]
    else:
        candidates = [os.path.expanduser(path)]
    for candidate in candidates:
        try:
            with open(candidate, "w" if overwrite else "x", encoding="utf-8") as out:
                out.write("\n".join(lines) + "\n")
            return os.path.abspath(candidate)
        except FileExistsError:
            if candidate is candidates[-1]:
                raise
    raise FileExistsError(path)


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
            if len(label) > 18:     # a long usage gets a line of its own
                lines.append(f"  {label}")
                label = ""
            lines.append(f"  {label:<18} {command.summary}{also}")
        if not operators:
            lines.append(f"  {'//text':<18} send a line that starts with /")
            lines.append("  Backslash works as well as slash: \\quit, \\clients, ...")
    return lines


def wake_main_thread() -> None:
    """Interrupt the main thread's blocking read so that it can exit.

    POSIX: a signal aimed at the main thread makes input() return with
    ConnectionLost (see main). Windows cannot interrupt a console read, so
    there the process ends here, with everything printed.
    """
    if hasattr(signal, "pthread_kill") and hasattr(signal, "SIGUSR1"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def _raise_connection_lost(signum: int, frame: object) -> None:
    raise ConnectionLost()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def split_address(target: str, port: Optional[int]) -> Tuple[str, int, Optional[str]]:
    """HOST, HOST:PORT or [IPv6]:PORT, with an optional #FINGERPRINT, and maybe a PORT."""
    target, _, fingerprint = target.partition("#")
    host = target
    if target.startswith("[") and "]" in target:
        host, _, after = target[1:].partition("]")
        if after.startswith(":") and after[1:].isdigit() and port is None:
            port = int(after[1:])
    elif target.count(":") == 1:
        name, _, maybe_port = target.partition(":")
        if maybe_port.isdigit() and port is None:
            host, port = name, int(maybe_port)
    return host, DEFAULT_PORT if port is None else port, fingerprint or None


def read_name(interactive: bool) -> str:
    """Ask for a name on the terminal, or take the next input line when piped."""
    while True:
        line = input("your name: " if interactive else "")
        name = line.strip()
        if name:
            return name


class GiveUp(Exception):
    """Joining failed in a way asking again cannot fix."""


class Joiner:
    """Joins the chat, asking again for whatever the server refused.

    FIXES maps each refusal code to the method that asks the user for a
    better name or a password; codes without a fix end the attempt.
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
            self.name = read_name(self.interactive)
        while True:
            try:
                return join(self.host, self.port, self.name, self.credentials, self.tls)
            except JoinRefused as refused:
                print(f"! {refused.text}", file=sys.stderr)
                fix = self.FIXES.get(refused.code)
                if fix is None or not fix(self):
                    raise GiveUp() from None

    def ask_name(self) -> bool:
        if self.name_from_flag and not self.interactive:
            return False
        self.name = read_name(self.interactive)
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

    FIXES: Dict[str, Callable[["Joiner"], bool]] = {
        "bad_name": ask_name,
        "name_taken": ask_name,
        "name_reserved": ask_name,
        "password_required": ask_room_password,
        "bad_password": ask_room_password,
        "name_protected": ask_name_password,
        "bad_name_password": ask_name_password,
    }


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Terminal chat client. Type a line to send it to everyone; lines\n"
                    "starting with / are commands. With input piped in, it sends each\n"
                    "line and exits once the server has them all.",
        epilog="commands in the chat:\n" + "\n".join(command_help_lines()) +
               "\n\nexit status: 0 after /quit or the end of input; 1 when the\n"
               "connection fails or is lost.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("host", nargs="?", default=DEFAULT_HOST,
                        help=f"server name or IP address; HOST:PORT works too, and so does "
                             f"the server's join string HOST:PORT#FINGERPRINT, which means "
                             f"--tls (default: {DEFAULT_HOST})")
    parser.add_argument("port", nargs="?", type=int, default=None,
                        help=f"server port (default: {DEFAULT_PORT})")
    parser.add_argument("--name", help="your name in the chat: 1 to 32 letters, digits, "
                                       "'_', '-' or '.' (asked for when not given)")
    parser.add_argument("--log", metavar="FILE",
                        help="append every line shown to FILE as plain text")
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


def main(argv: Optional[List[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    configure_text_streams()
    host, port, fingerprint = split_address(args.host, args.port)
    interactive = sys.stdin.isatty()
    tls = None
    if args.tls or args.cafile or args.insecure or fingerprint:
        tls = TlsOptions(cafile=args.cafile, insecure=args.insecure, pinned=fingerprint,
                         known_hosts=os.path.expanduser(args.known_hosts))
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
    try:
        connection, welcome = Joiner(host, port, args.name, credentials, tls, interactive).run()
    except CannotConnect as exc:
        print(exc, file=sys.stderr)
        return 1
    except GiveUp:
        return 1
    except (EOFError, KeyboardInterrupt):
        print("no name given; leaving", file=sys.stderr)
        return 1

    session = ChatSession(connection, welcome["name"], join_address(host, port),
                          log_file=log_file, limits=welcome.get("limits"),
                          ask_secret=getpass.getpass if interactive else None)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, _raise_connection_lost)
    session.show_banner(welcome)
    session.start()
    try:
        while True:
            session.handle_line(input())
    except (EOFError, KeyboardInterrupt):
        session.leave()
        if interactive:
            print("* you left the chat")
    except ConnectionLost:
        return 1
    except OSError:
        session.closed.wait(LEAVE_TIMEOUT)  # the receiver explains what happened
        return 1
    return 1 if session.lost_reason else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConnectionLost:  # arrived after main() had already returned
        sys.exit(1)
    except KeyboardInterrupt:   # a second Ctrl-C while leaving
        sys.exit(130)
