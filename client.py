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
import json
import os
import signal
import socket
import sys
import threading
import unicodedata
from datetime import date, datetime
from collections import deque
from typing import Callable, Deque, Dict, List, NamedTuple, Optional, TextIO, Tuple

DEFAULT_HOST = "localhost"
DEFAULT_PORT = 5050
CONNECT_TIMEOUT = 10.0      # seconds to reach the server
HANDSHAKE_TIMEOUT = 10.0    # seconds for the server to answer hello
LEAVE_TIMEOUT = 5.0         # seconds to wait for the server to confirm we left
TRANSCRIPT_LINES = 100_000  # lines of this session kept for /save
HISTORY_MAX = 200           # the most /history asks for (the server's limit too)
RECV_SIZE = 64 * 1024

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
    "welcome": {"name": str, "users": list},
    "message": {"from": str, "text": str, "ts?": str},
    "whisper": {"from": str, "to": str, "text": str, "ts?": str},
    "sent": {"text": str, "to?": str, "ts?": str},
    "join": {"name": str, "ts?": str},
    "leave": {"name": str, "reason?": str, "ts?": str},
    "users": {"users": list},
    "history": {"kind": str, "from": str, "text": str, "ts": str, "to?": str},
    "history_end": {"for": str, "count": int, "text?": str},
    "error": {"code": str, "text": str},
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


def names_list(users: list) -> str:
    return ", ".join(clean_text(str(user)) for user in users)


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
    "users": lambda m, me: f"* {len(m['users'])} here: {names_list(m['users'])}",
    "error": lambda m, me: f"! {clean_text(m['text'])}",
    "shutdown": lambda m, me: f"* {clean_text(m.get('text', 'The server is shutting down.'))}",
    "history": _show_history,
    "history_end": _show_history_end,
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
    """The server could not be reached; the text is for the user."""


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
    def open(cls, host: str, port: int) -> "ServerConnection":
        where = f"{host}:{port}"
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


def join(host: str, port: int, name: str) -> Tuple[ServerConnection, dict]:
    """Connect and say hello; return the connection and the welcome message."""
    connection = ServerConnection.open(host, port)
    where = f"{host}:{port}"
    try:
        connection.sock.settimeout(HANDSHAKE_TIMEOUT)
        connection.send({"type": "hello", "name": name})
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
                            "is it a chat server?") from None
    except (ConnectionClosed, OSError):
        connection.close()
        raise CannotConnect(f"{where} closed the connection before we could join") from None


# ---------------------------------------------------------------------------
# The chat session: what you type, what arrives
# ---------------------------------------------------------------------------

class ConnectionLost(Exception):
    """Raised in the main thread when the receiver thread finds the connection gone."""


class Command(NamedTuple):
    usage: str
    summary: str
    run: Callable[["ChatSession", str], None]


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


class ChatSession:
    """A joined connection: sends what you type, shows what arrives."""

    def __init__(self, connection: ServerConnection, name: str, server: str,
                 out: TextIO = sys.stdout, log_file: Optional[TextIO] = None,
                 on_lost: Optional[Callable[[], None]] = None) -> None:
        self.connection = connection
        self.name = name
        self.server = server                # HOST:PORT, for the transcript
        self.out = out
        self.log_file = log_file            # --log: every line shown is appended here
        self.transcript: Deque[str] = deque(maxlen=TRANSCRIPT_LINES)
        self.started = datetime.now()
        self.on_lost = on_lost or wake_main_thread  # called when the connection drops
        self._in_history = False            # between a first history frame and history_end
        # A header for each batch of history frames still to come, in order: the server
        # answers requests in order and ends every batch, even the join replay, with
        # history_end.
        self._history_headers: Deque[str] = deque(["--- earlier messages ---"])
        self.leaving = threading.Event()    # we asked to leave: EOF is expected
        self.closed = threading.Event()     # the receiver thread has stopped
        self.lost_reason: Optional[str] = None
        self._last_notice: Optional[str] = None     # the server's last word before closing
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
        self.show(f"* here now: {names_list(others)}" if others else "* nobody else is here yet")
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
            if self._last_notice:
                reason = f"disconnected: {self._last_notice}"
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
        if kind == "shutdown":
            self._last_notice = "the server shut down"
        elif kind == "error":
            self._last_notice = clean_text(message["text"])
        elif kind == "history" and not self._in_history:
            self._in_history = True
            self.show(self._history_headers[0] if self._history_headers else "--- history ---")
        elif kind == "history_end":
            self._in_history = False
            if self._history_headers:
                self._history_headers.popleft()
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
                self.connection.send({"type": "say", "text": argument})
            return
        entry = COMMANDS.get(ALIASES.get(command, command))
        if entry is None:
            self.show(f"! unknown command /{command}: type /help for the list, "
                      "or start with // to send a line beginning with /")
            return
        entry.run(self, argument)

    def leave(self) -> None:
        """Say goodbye, and wait until the server has handled everything we sent."""
        if self.leaving.is_set():
            return
        self.leaving.set()
        try:
            self.connection.send({"type": "bye"})
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
        self.connection.send({"type": "who"})

    def cmd_whisper(self, argument: str) -> None:
        target, _, text = argument.partition(" ")
        if not target or not text.strip():
            self.show("! usage: /w NAME TEXT")
            return
        self.connection.send({"type": "whisper", "to": target, "text": text.strip()})

    def cmd_history(self, argument: str) -> None:
        if argument and not (argument.isdigit() and 1 <= int(argument) <= HISTORY_MAX):
            self.show(f"! usage: /history [N], N from 1 to {HISTORY_MAX}")
            return
        request = {"type": "get_history"}
        if argument:
            request["limit"] = int(argument)
        self._history_headers.append("--- history ---")
        self.connection.send(request)

    def cmd_search(self, argument: str) -> None:
        if not argument.strip():
            self.show("! usage: /search WORDS")
            return
        self._history_headers.append(f"--- search: {argument.strip()} ---")
        self.connection.send({"type": "search", "text": argument})

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
    "clear": Command("", "clear the screen", ChatSession.cmd_clear),
    "quit": Command("", "leave the chat; so does Ctrl-D", ChatSession.cmd_quit),
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
    for name, command in COMMANDS.items():
        aliases = [f"/{alias}" for alias, target in ALIASES.items() if target == name]
        label = f"/{name} {command.usage}".strip()
        also = f" (also {', '.join(aliases)})" if aliases else ""
        lines.append(f"  {label:<18} {command.summary}{also}")
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

def split_address(host: str, port: Optional[int]) -> Tuple[str, int]:
    """Accept HOST, HOST:PORT and [IPv6]:PORT as well as a separate PORT."""
    if host.startswith("[") and "]" in host:
        inside, _, after = host[1:].partition("]")
        if after.startswith(":") and after[1:].isdigit() and port is None:
            port = int(after[1:])
        host = inside
    elif host.count(":") == 1:
        name, _, maybe_port = host.partition(":")
        if maybe_port.isdigit() and port is None:
            host, port = name, int(maybe_port)
    return host, DEFAULT_PORT if port is None else port


def read_name(interactive: bool) -> str:
    """Ask for a name on the terminal, or take the next input line when piped."""
    while True:
        line = input("your name: " if interactive else "")
        name = line.strip()
        if name:
            return name


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
                        help=f"server name or IP address; HOST:PORT works too "
                             f"(default: {DEFAULT_HOST})")
    parser.add_argument("port", nargs="?", type=int, default=None,
                        help=f"server port (default: {DEFAULT_PORT})")
    parser.add_argument("--name", help="your name in the chat: 1 to 32 letters, digits, "
                                       "'_', '-' or '.' (asked for when not given)")
    parser.add_argument("--log", metavar="FILE",
                        help="append every line shown to FILE as plain text")
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
    host, port = split_address(args.host, args.port)
    interactive = sys.stdin.isatty()
    log_file = None
    if args.log:
        try:
            log_file = open(os.path.expanduser(args.log), "a", encoding="utf-8")
        except OSError as exc:
            print(f"error: cannot write the log {args.log}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
    name = args.name
    try:
        if not name:
            name = read_name(interactive)
        while True:
            try:
                connection, welcome = join(host, port, name)
                break
            except JoinRefused as exc:
                print(f"! {exc.text}", file=sys.stderr)
                if exc.code not in NAME_PROBLEMS or (args.name and not interactive):
                    return 1
                name = read_name(interactive)
    except CannotConnect as exc:
        print(exc, file=sys.stderr)
        return 1
    except (EOFError, KeyboardInterrupt):
        print("no name given; leaving", file=sys.stderr)
        return 1

    session = ChatSession(connection, welcome["name"], f"{host}:{port}", log_file=log_file)
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
