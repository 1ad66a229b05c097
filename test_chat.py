"""Tests for the chat: run with ``python -m unittest test_chat``.

Everything runs over loopback against real sockets: servers run in a thread
of this process (fast, and their state can be inspected) or as subprocesses
(for start-up, signals and the command line). Waiting is done with reads
that time out and with events, never with fixed sleeps.
"""

import codecs
import collections
import colorsys
import contextlib
import dataclasses
import hashlib
import io
import ipaddress
import itertools
import json
import logging
import os
import py_compile
import queue
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import select
import selectors
import shutil
import ssl
import tempfile
import threading
import time
import types
import unicodedata
import unittest
import zlib
from datetime import datetime
from typing import Any, Dict, List, Optional, Tuple

try:
    import resource
except ImportError:     # Windows
    resource = None  # type: ignore

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SERVER_SCRIPT = os.path.join(HERE, "socket_server.py")
CLIENT_SCRIPT = os.path.join(HERE, "client.py")

# The processes the tests start run the scripts as `python -m NAME` from this
# directory: the same file, with its bytecode taken from __pycache__, where
# `python NAME.py` compiles thousands of lines at every start (0.1 s a start here,
# seconds of the suite). It is written here even where PYTHONDONTWRITEBYTECODE is
# set; a checkout that cannot take it only starts them slower. The tests of
# --help, of bad flags and of --export run the scripts by their paths.
MODULE_OF_SCRIPT = {SERVER_SCRIPT: "socket_server", CLIENT_SCRIPT: "client"}
for _script in MODULE_OF_SCRIPT:
    try:
        py_compile.compile(_script, doraise=True)
    except OSError:
        pass

import client  # noqa: E402
import socket_server  # noqa: E402
from socket_server import FrameDecoder, ProtocolError, decode_payload, encode_frame  # noqa: E402

# Password hashes in servers run inside the tests cost a sixteenth of the real one
# (each hash records its cost, so checking them is unchanged); the servers the tests
# start as processes keep the real cost.
socket_server.SCRYPT_COST = (2 ** 10, 8, 1)

TIMEOUT = 10.0      # longest wait for anything that should happen (a VM may stall for seconds)
POSIX = os.name == "posix"
# Long runs (the benchmark's smoke run, the full fuzz run, waits of whole seconds) only
# when CHAT_LONG_TESTS is set: .ci/run sets it, so CI runs everything.
LONG_TESTS = bool(os.environ.get("CHAT_LONG_TESTS"))
long_test = unittest.skipUnless(LONG_TESTS, "a long run: set CHAT_LONG_TESTS=1 to include it")

# The server under test logs through "chat"; keep test output clean.
logging.getLogger("chat").addHandler(logging.NullHandler())
logging.getLogger("chat").propagate = False


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def settings_for_tests(**changes) -> "socket_server.Settings":
    """Settings for a server under test: loopback, history in memory, and no flood or
    per-address limits (every test client comes from 127.0.0.1), unless changed."""
    values = dict(host="127.0.0.1", port=0, db=":memory:", rate_limit=0, max_per_address=0)
    values.update(changes)
    return socket_server.Settings(**values)


class ServerThread:
    """A ChatServer on 127.0.0.1, on a free port, running in a thread."""

    def __init__(self, server_class=socket_server.ChatServer, **settings) -> None:
        self.server = server_class(settings_for_tests(**settings))
        self.host, self.port = self.server.listen()
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(TIMEOUT)
        if self.thread.is_alive():
            raise AssertionError("server thread did not stop")


class Peer:
    """A test client: a blocking socket with a timeout, and the decoder under test."""

    def __init__(self, port: int, name: Optional[str] = None, rcvbuf: Optional[int] = None,
                 host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect((host, port))
        self.decoder = FrameDecoder()
        self.welcome = None
        self.room: Optional[dict] = None    # the last `room` frame, for the room just joined
        self.replay: List[dict] = []    # history sent after the welcome
        if name:
            self.send({"type": "hello", "name": name})
            self.welcome = self.expect("welcome")
            self.replay = self.collect_history()

    def collect_history(self) -> List[dict]:
        """The history frames up to and including the closing history_end; the `room`
        frame that comes before a room's replay is kept in self.room."""
        frames = []
        while True:
            frame = self.receive()
            if frame["type"] == "room":
                self.room = frame
                continue
            frames.append(frame)
            if frame["type"] == "history_end":
                return frames

    def send(self, message: dict) -> None:
        self.sock.sendall(encode_frame(message))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def say(self, text: str) -> dict:
        """Send a chat line and return the server's acknowledgement."""
        self.send({"type": "say", "text": text})
        return self.expect("sent")

    def receive(self) -> dict:
        """The next message; fails the test on timeout or EOF."""
        while True:
            payload = next(self.decoder, None)
            if payload is not None:
                return decode_payload(payload)
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("connection closed while a message was expected")
            self.decoder.feed(data)

    def expect(self, kind: str) -> dict:
        """Read until a message of this type arrives; others are dropped."""
        while True:
            message = self.receive()
            if message["type"] == kind:
                return message

    def expect_next_of(self, kind: str, **fields: Any) -> dict:
        """Read until a message of this type with these fields arrives; others are dropped."""
        while True:
            message = self.expect(kind)
            if all(message.get(field) == value for field, value in fields.items()):
                return message

    def sync(self) -> List[dict]:
        """Round-trip a ping; return what arrived before the pong.

        Everything the server queued for us before it handled our ping
        arrives before the pong, so this proves what we did not receive.
        """
        self.send({"type": "ping"})
        before = []
        while True:
            message = self.receive()
            if message["type"] == "pong":
                return before
            before.append(message)

    def read_until_closed(self) -> List[dict]:
        """Everything that arrives until the server closes the connection."""
        messages = []
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return messages
            self.decoder.feed(data)
            messages.extend(decode_payload(payload) for payload in self.decoder)

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close abruptly, with a TCP reset instead of a goodbye."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        self.sock.close()


class ChatTestCase(unittest.TestCase):
    """Starts a server thread per test and closes what the test opened."""

    server_settings: dict = {}
    server_class = socket_server.ChatServer

    def setUp(self) -> None:
        self.server = ServerThread(self.server_class, **self.server_settings)
        self.addCleanup(self.server.stop)
        self.port = self.server.port

    def peer(self, name: Optional[str] = None, **options) -> Peer:
        peer = Peer(self.port, name, **options)
        self.addCleanup(peer.close)
        return peer

    def assert_rejected(self, peer: Peer, code: str) -> dict:
        """The server sent this error and then closed the connection."""
        messages = peer.read_until_closed()
        errors = [m for m in messages if m["type"] == "error"]
        self.assertTrue(errors, f"no error frame before close, got {messages}")
        self.assertEqual(errors[-1]["code"], code)
        return errors[-1]


def temp_dir(test: unittest.TestCase) -> str:
    """A directory removed when the test ends."""
    directory = tempfile.TemporaryDirectory()
    test.addCleanup(directory.cleanup)
    return directory.name


def ascii_frame(message: dict) -> bytes:
    """A frame whose JSON escapes non-ASCII, so it can carry lone surrogates (\\ud800)."""
    payload = json.dumps(message).encode("ascii")
    return f"{len(payload):<10}".encode("ascii") + payload


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A script run as a subprocess, its output read by threads into queues."""

    def __init__(self, *args: str, stdin_data: Optional[str] = None) -> None:
        env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")
        if args and args[0] in MODULE_OF_SCRIPT:    # see MODULE_OF_SCRIPT
            args = ("-m", MODULE_OF_SCRIPT[args[0]], *args[1:])
        self.proc = subprocess.Popen(
            [sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, cwd=HERE)
        self.lines = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen = {"stdout": [], "stderr": []}
        for name in ("stdout", "stderr"):
            threading.Thread(target=self._pump, args=(name,), daemon=True).start()
        if stdin_data is not None:
            self.proc.stdin.write(stdin_data.encode("utf-8"))
            self.proc.stdin.close()

    def _pump(self, name: str) -> None:
        for raw in getattr(self.proc, name):
            self.lines[name].put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        self.lines[name].put(None)

    def wait_for_line(self, pattern: str, stream: str = "stdout") -> "re.Match":
        """The first new line matching pattern; fails on timeout or end of output."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                line = self.lines[stream].get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in {stream}; "
                                     f"saw {self.seen[stream]}") from None
            if line is None:
                self.lines[stream].put(None)
                raise AssertionError(f"{stream} ended without {pattern!r}; saw {self.seen[stream]}")
            self.seen[stream].append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def finish(self) -> int:
        """Wait for exit; collect the rest of the output."""
        code = self.proc.wait(TIMEOUT)
        for name in ("stdout", "stderr"):
            while True:
                line = self.lines[name].get(timeout=TIMEOUT)
                if line is None:
                    self.lines[name].put(None)
                    break
                self.seen[name].append(line)
        return code

    def output(self, stream: str = "stdout") -> str:
        return "\n".join(self.seen[stream])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                pipe.close()
            except OSError:
                pass


def start_server_process(*extra: str) -> "tuple":
    """socket_server.py on loopback and a free port: (Process, port)."""
    if "--db" not in extra and "--no-history" not in extra:
        extra += ("--db", ":memory:")
    process = Process(SERVER_SCRIPT, "--host", "127.0.0.1", "--port", "0", *extra)
    match = process.wait_for_line(r"^listening on 127\.0\.0\.1:(\d+)$")
    return process, int(match.group(1))


# ---------------------------------------------------------------------------
# Framing: the sans-IO decoder and payload rules
# ---------------------------------------------------------------------------

class FramingTests(unittest.TestCase):
    MESSAGES = [{"type": "say", "text": "hello"},
                {"type": "say", "text": "naïve café 日本語 🎉"},
                {"type": "who"}]

    def decode_chunks(self, chunks: List[bytes]) -> List[dict]:
        decoder = FrameDecoder()
        out = []
        for chunk in chunks:
            decoder.feed(chunk)
            out.extend(decode_payload(payload) for payload in decoder)
        self.assertEqual(decoder.buffered, 0)
        return out

    def test_header_is_left_aligned_decimal_length(self) -> None:
        frame = encode_frame({"type": "who"})
        payload = b'{"type":"who"}'
        self.assertEqual(frame, b"14        " + payload)
        self.assertEqual(frame, f"{len(payload):<10}".encode() + payload)

    def test_every_payload_size_gets_its_own_length(self) -> None:
        sizes = [*range(1100), socket_server.MAX_PAYLOAD - 1, socket_server.MAX_PAYLOAD]
        for frame_of in (socket_server.frame_of, client.frame_of):
            for size in sizes:
                payload = b"x" * size
                self.assertEqual(frame_of(payload), f"{size:<10}".encode() + payload, size)
            with self.assertRaises(ValueError):
                frame_of(b"x" * (socket_server.MAX_PAYLOAD + 1))

    def test_every_split_into_two_and_three_chunks(self) -> None:
        stream = b"".join(encode_frame(m) for m in self.MESSAGES)
        for i in range(len(stream) + 1):
            self.assertEqual(self.decode_chunks([stream[:i], stream[i:]]), self.MESSAGES)
        for i in range(0, len(stream) + 1, 3):
            for j in range(i, len(stream) + 1, 2):
                self.assertEqual(self.decode_chunks([stream[:i], stream[i:j], stream[j:]]),
                                 self.MESSAGES)

    def test_end_of_stream_is_an_input(self) -> None:
        frame = encode_frame({"type": "who"})
        decoder = FrameDecoder()
        decoder.feed(frame + frame[:5])
        decoder.feed_eof()
        self.assertEqual(decode_payload(next(decoder)), {"type": "who"})  # complete: delivered
        with self.assertRaises(ProtocolError) as caught:
            next(decoder)
        self.assertEqual(caught.exception.code, "truncated")
        clean = FrameDecoder()
        clean.feed(frame)
        clean.feed_eof()
        self.assertEqual(len(list(clean)), 1)   # ends quietly at a frame boundary

    def test_the_client_tells_a_stream_cut_mid_frame_from_a_clean_close(self) -> None:
        for cut, expected in ((5, client.ProtocolError), (0, client.ConnectionClosed)):
            ours, theirs = socket.socketpair()
            self.addCleanup(ours.close)
            connection = client.ServerConnection(ours)
            theirs.sendall(encode_frame({"type": "who"})[:cut])
            theirs.close()
            with self.assertRaises(expected):
                connection.receive()

    def test_one_byte_at_a_time(self) -> None:
        stream = b"".join(encode_frame(m) for m in self.MESSAGES)
        chunks = [stream[i:i + 1] for i in range(len(stream))]
        self.assertEqual(self.decode_chunks(chunks), self.MESSAGES)

    def test_a_fed_bytearray_is_copied_and_never_grown(self) -> None:
        """Bytes are kept as they came (frames cut from them are not copied again),
        but a caller's bytearray, which it may reuse for its next read, is copied."""
        frame = encode_frame({"type": "who"})
        chunk = bytearray(frame[:20])
        decoder = FrameDecoder()
        decoder.feed(chunk)
        chunk[:] = b"x" * 20            # the caller's next read into the same buffer
        decoder.feed(frame[20:])
        self.assertEqual(list(decoder), [frame[10:]])
        self.assertEqual(chunk, bytearray(b"x" * 20))

    def test_incomplete_frame_waits(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(encode_frame({"type": "who"})[:-1])
        self.assertEqual(list(decoder), [])
        self.assertEqual(decoder.buffered, 23)

    def test_right_aligned_header_is_accepted(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(b"        14" + b'{"type":"who"}')
        self.assertEqual(list(decoder), [b'{"type":"who"}'])

    def test_largest_payload_passes_and_one_more_byte_fails(self) -> None:
        decoder = FrameDecoder()
        payload = b"x" * socket_server.MAX_PAYLOAD
        decoder.feed(f"{len(payload):<10}".encode() + payload)
        self.assertEqual(list(decoder), [payload])
        decoder.feed(f"{len(payload) + 1:<10}".encode())    # rejected before any payload
        with self.assertRaises(ProtocolError) as caught:
            list(decoder)
        self.assertEqual(caught.exception.code, "too_large")

    def test_custom_limit(self) -> None:
        class SmallFrames(FrameDecoder):
            __slots__ = ()
            max_payload = 5
        decoder = SmallFrames()
        decoder.feed(b"6         ")
        with self.assertRaises(ProtocolError):
            next(decoder)

    def test_encode_refuses_oversized_and_unencodable(self) -> None:
        with self.assertRaises(ValueError):
            encode_frame({"type": "say", "text": "x" * socket_server.MAX_PAYLOAD})
        with self.assertRaises(ValueError):
            encode_frame({"type": "say", "text": "\ud800"})

    def test_bad_headers(self) -> None:
        for header in [b"abcdefghij", b"12x       ", b"          ", b"-5        ",
                       b"+5        ", b"1 2       ", b"\t5        ", b"5\n        ",
                       b"0x10      ", "５".encode() + b"        ", b"1_0       "]:
            with self.subTest(header=header):
                decoder = FrameDecoder()
                decoder.feed(header + b"{}")
                with self.assertRaises(ProtocolError) as caught:
                    next(decoder)
                self.assertEqual(caught.exception.code, "bad_header")

    def test_a_bad_header_is_shown_readably_and_safely(self) -> None:
        # The text reaches the server's log and the peer: no control byte may pass.
        decoder = FrameDecoder()
        decoder.feed(b"\x1b[2J\xffab")
        with self.assertRaises(ProtocolError) as caught:
            next(decoder)
        self.assertEqual(caught.exception.text,
                         'frame header "\\x1b[2J\\xffab" is not a decimal length')
        self.assertEqual(socket_server.check_fields({"type": "say", "text": 5},
                                                    socket_server.field_rules({"text": str})),
                         '"text" must be a string')

    def test_bad_header_is_caught_from_its_first_bytes(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(b"GET")    # someone pointed a web browser at the server
        with self.assertRaises(ProtocolError):
            next(decoder)

    def test_frames_before_a_bad_one_are_delivered(self) -> None:
        decoder = FrameDecoder()
        decoder.feed(encode_frame({"type": "who"}) + b"garbage!!!")
        self.assertEqual(next(decoder), b'{"type":"who"}')
        with self.assertRaises(ProtocolError):
            next(decoder)

    def test_payload_rules(self) -> None:
        cases = {b"\xff\xfe": "bad_utf8", b"\xc3": "bad_utf8", b"": "bad_json",
                 b"{nope": "bad_json", b"[" * 100000: "bad_json", b'"text"': "bad_message",
                 b"[1, 2]": "bad_message", b"{}": "bad_message", b'{"type": 5}': "bad_message",
                 b"null": "bad_message", b'{"type": "x", "limit": NaN}': "bad_json",
                 b'{"type": "x", "n": -Infinity}': "bad_json"}
        for payload, code in cases.items():
            with self.subTest(payload=payload[:20]):
                with self.assertRaises(ProtocolError) as caught:
                    decode_payload(payload)
                self.assertEqual(caught.exception.code, code)
        self.assertEqual(decode_payload(b'{"type": "x", "extra": [1]}'),
                         {"type": "x", "extra": [1]})
        rules = socket_server.field_rules({"limit?": int, "text?": str})
        for value, problem in ((20, None), (True, '"limit" must be a whole number'),
                               (1.5, '"limit" must be a whole number')):
            self.assertEqual(socket_server.check_fields({"type": "x", "limit": value}, rules),
                             problem)

    def test_clean_text(self) -> None:
        cases = {
            "plain": "plain",
            "  padded\t": "padded",
            "two\nlines\r\n": "two lines",
            "\x1b[31mred\x1b[0m": "[31mred[0m",
            "title\x1b]0;pwned\x07": "title]0;pwned",
            "bell\x07\x00\x7f\x9b": "bell",
            "rtl \u202eevil": "rtl evil",
            "lone \ud800 surrogate": "lone  surrogate",
            "family 👨\u200d👩\u200d👧 日本": "family 👨\u200d👩\u200d👧 日本",
        }
        for raw, clean in cases.items():
            with self.subTest(raw=raw):
                self.assertEqual(socket_server.clean_text(raw), clean)

    def test_check_fields(self) -> None:
        fields = socket_server.field_rules({"name": str, "password?": str})
        self.assertEqual(fields, (("name", str, True), ("password", str, False)))
        self.assertIsNone(socket_server.check_fields({"type": "t", "name": "a"}, fields))
        self.assertEqual(socket_server.check_fields({"type": "t"}, fields),
                         '"t" needs a "name" field')
        both = socket_server.field_rules({"first": str, "second": int, "third?": str})
        self.assertEqual(socket_server.check_fields({"type": "t", "third": "x"}, both),
                         '"t" needs a "first" field')      # the first in the table
        self.assertEqual(socket_server.check_fields({"type": "t", "second": 2, "first": "a",
                                                     "other": None}, both), None)
        self.assertIn("must be", socket_server.check_fields({"type": "t", "name": 1}, fields))
        self.assertIn("must be", socket_server.check_fields(
            {"type": "t", "name": "a", "password": None}, fields))


# ---------------------------------------------------------------------------
# The chat core, sans-IO: requests in, actions out, a clock moved by hand
# ---------------------------------------------------------------------------

class FakeClock:
    """The core's clock, moved by the test: both the monotonic and the wall time."""

    def __init__(self) -> None:
        self.seconds = 1000.0
        self.unix = 1_780_000_000.0

    def now(self) -> float:
        return self.seconds

    def wall(self) -> float:
        return self.unix

    def advance(self, seconds: float) -> None:
        self.seconds += seconds
        self.unix += seconds


class CoreHarness:
    """A ChatCore with an in-memory store and a fake clock; links are just names.

    The harness plays the part ChatServer plays over sockets: it collects the
    actions and can carry out jobs and timers when the test says so.
    """

    def __init__(self, **settings: Any) -> None:
        self.clock = FakeClock()
        values = dict(rate_limit=0, max_per_address=0)
        values.update(settings)
        self.core = socket_server.ChatCore(settings_for_tests(**values),
                                           socket_server.ChatStore(":memory:"), self.clock)
        self.log: List[tuple] = []      # every action so far
        self.jobs: List[tuple] = []
        self.timers: List[tuple] = []   # (due, function)

    def connect(self, link: str = "peer", host: str = "10.0.0.1") -> "socket_server.Session":
        session = self.core.connect(link, host, f"{host}:4000")
        self.collect()
        return session

    def join(self, name: str) -> "socket_server.Session":
        session = self.connect(name)
        self.request(session, {"type": "hello", "name": name})
        return session

    def request(self, session: "socket_server.Session", request: dict) -> List[tuple]:
        self.core.receive(session, request)
        return self.collect()

    def collect(self) -> List[tuple]:
        actions, self.core.actions[:] = list(self.core.actions), []
        for action in actions:
            if action[0] == "job":
                self.jobs.append(action)
            elif action[0] == "later":
                self.timers.append((self.clock.now() + action[1], action[2]))
        self.log.extend(actions)
        return actions

    def finish_jobs(self) -> List[tuple]:
        jobs, self.jobs = self.jobs, []
        for _, job, then in jobs:
            then(lambda job=job: job())
        return self.collect()

    def advance(self, seconds: float) -> List[tuple]:
        """Move the clock; run the timers that fall due, and a tick."""
        self.clock.advance(seconds)
        due = [timer for timer in self.timers if timer[0] <= self.clock.now()]
        self.timers = [timer for timer in self.timers if timer[0] > self.clock.now()]
        for _, function in due:
            function()
        self.core.tick()
        return self.collect()

    def received(self, session: "socket_server.Session",
                 actions: Optional[List[tuple]] = None) -> List[dict]:
        """The events these actions (by default, all so far) bring to session, in order."""
        events = []
        for action in self.log if actions is None else actions:
            if action[0] == "send" and action[1] is session:
                events.append(action[2])
            elif action[0] == "deliver":
                _, audience, event, sender, echo = action
                if session is sender:
                    if echo is not None:
                        events.append(echo)
                elif session in audience:
                    events.append(event)
        return events

    def closed(self, session: "socket_server.Session") -> bool:
        return any(action[0] == "close" and action[1] is session for action in self.log)


class CoreTests(unittest.TestCase):
    """The chat's rules without a socket: what each request makes happen."""

    def test_a_client_that_keeps_its_window_is_replayed_only_what_it_missed(self) -> None:
        chat = CoreHarness()
        bob = chat.join("bob")
        chat.request(bob, {"type": "join", "room": "dev"})

        def arrive(**hello: Any) -> "socket_server.Session":
            session = chat.connect("irc")
            chat.request(session, {"type": "hello", "name": "ira", "rooms": [], **hello})
            return session

        def replayed(session: "socket_server.Session") -> List[str]:
            actions = chat.request(session, {"type": "join", "room": "dev"})
            return [event.get("text", "") for event in chat.received(session, actions)
                    if event["type"] in ("history", "notice")]

        ira = arrive(missed_only=True)
        chat.request(bob, {"type": "say", "room": "dev", "text": "one"})
        self.assertEqual(replayed(ira), ["one"])        # new here: the recent ones
        chat.request(ira, {"type": "part", "room": "dev"})
        chat.request(bob, {"type": "say", "room": "dev", "text": "two"})
        self.assertEqual(replayed(ira), ["one", "two"])     # irssi closes a parted window
        chat.request(bob, {"type": "kick", "room": "dev", "name": "ira"})
        chat.request(bob, {"type": "say", "room": "dev", "text": "three"})
        self.assertEqual(replayed(ira), ["New since you were last here", "three"])
        chat.request(bob, {"type": "kick", "room": "dev", "name": "ira"})
        self.assertEqual(replayed(ira), [])             # nothing new: its window has it all
        chat.request(ira, {"type": "bye"})              # a QUIT: it saw all until then
        chat.request(bob, {"type": "say", "room": "dev", "text": "four"})
        ira = arrive(missed_only=True)
        self.assertEqual(replayed(ira), ["New since you were last here", "four"])
        # A lost connection may have lost what was sent last: everything again.
        everything = ["one", "two", "three", "four"]
        chat.core.close(ira, "connection closed", graceful=False)
        ira = arrive(missed_only=True)
        self.assertEqual(replayed(ira), everything)
        chat.request(ira, {"type": "bye"})              # long gone: its window is another
        chat.advance(socket_server.PARTING_MEMORY + 1)
        ira = arrive(missed_only=True)
        self.assertEqual(replayed(ira), everything)
        chat.request(ira, {"type": "bye"})              # a client without a window of its own
        self.assertEqual(replayed(arrive()), everything)

    def test_a_registered_name_back_in_a_room_is_shown_new_what_came_since_it_left(
            self) -> None:
        # "New since you were last here" is about the room: its mark is where the name
        # left that room, not where it last left the chat (its own lines are not new).
        chat = CoreHarness()
        ann, bob = chat.join("ann"), chat.join("bob")
        chat.request(ann, {"type": "register", "password": "correct horse"})
        chat.finish_jobs()
        chat.request(bob, {"type": "say", "text": "before"})
        chat.core.store.mark_left("ann")        # as if ann had left the chat then, and came back
        for session in (ann, bob):
            chat.request(session, {"type": "join", "room": "dev"})
        chat.request(ann, {"type": "say", "room": "dev", "text": "mine"})

        def rejoined() -> List[str]:
            chat.request(ann, {"type": "part", "room": "dev"})
            for text in said:
                chat.request(bob, {"type": "say", "room": "dev", "text": text})
            actions = chat.request(ann, {"type": "join", "room": "dev"})
            return [event.get("text", "") for event in chat.received(ann, actions)
                    if event["type"] in ("history", "notice")]

        said = []
        self.assertEqual(rejoined(), ["mine"])
        said = ["while ann was out"]
        self.assertEqual(rejoined(), ["mine", "New since you were last here",
                                      "while ann was out"])

    def test_a_kick_from_a_room_is_logged(self) -> None:
        chat = CoreHarness()
        alice, bob = chat.join("alice"), chat.join("bob")
        for session in (alice, bob):
            chat.request(session, {"type": "join", "room": "dev"})
        with self.assertLogs("chat", "INFO") as logs:
            chat.request(alice, {"type": "kick", "room": "dev", "name": "bob", "text": "off topic"})
        self.assertIn("INFO:chat:bob was kicked from #dev by alice: off topic", logs.output)

    def test_a_wrong_key_is_logged_as_a_key(self) -> None:
        chat = CoreHarness()
        alice, bob = chat.join("alice"), chat.join("bob")
        chat.request(alice, {"type": "join", "room": "den"})
        chat.request(alice, {"type": "key", "room": "den", "key": "k1"})
        with self.assertLogs("chat", "WARNING") as logs:
            chat.request(bob, {"type": "join", "room": "den", "key": "guess"})
        self.assertEqual([line for line in logs.output if "failed" in line],
                         ["WARNING:chat:failed key from bob (bad_key)"])
        # A keyed room nobody is in: nobody to /invite anyone either.
        chat.request(alice, {"type": "part", "room": "den"})
        actions = chat.request(bob, {"type": "join", "room": "den"})
        self.assertEqual(chat.received(bob, actions)[-1]["text"],
                         "#den needs a key: /join #den KEY, or a server operator to remove "
                         "the key (nobody is in it now)")

    def test_a_room_handed_over_is_run_by_its_heir_only_while_it_is_there(self) -> None:
        # A registered heir that left had kept the room: nobody there could run it.
        chat = CoreHarness()
        ann, ira, wee = chat.join("ann"), chat.join("ira"), chat.join("wee")
        for session in (ira, wee):
            chat.request(session, {"type": "register", "password": "correct horse"})
        chat.finish_jobs()
        for session in (ann, ira, wee):
            chat.request(session, {"type": "join", "room": "dev"})
        dev = chat.core.rooms.all["dev"]

        def leaves(session: "socket_server.Session") -> List[str]:
            chat.request(session, {"type": "part", "room": "dev"})
            actions = chat.advance(0)
            return [event["name"] for event in chat.received(wee if session is not wee else ira,
                                                             actions)
                    if event["type"] == "room_op" and event.get("heir")]

        self.assertEqual(leaves(ann), ["ira"])
        self.assertEqual(dev.operators_here(), ["ira"])
        self.assertEqual(leaves(ira), ["wee"])          # not its own: it goes with it
        chat.request(ira, {"type": "join", "room": "dev"})
        self.assertEqual(dev.operators_here(), ["wee"])
        self.assertEqual(chat.core.store.room_ops(), [])    # nothing of it outlasts a restart
        chat.request(wee, {"type": "room_op", "room": "dev", "name": "ira"})   # for good
        self.assertEqual(leaves(wee), [])               # ira runs it: nothing to hand over
        self.assertEqual(chat.core.store.room_ops(), [("dev", "ira")])
        self.assertEqual(leaves(ira), [])       # the last one out: nobody to hand it to

    def test_an_heir_that_registers_runs_the_room_still_only_while_there(self) -> None:
        chat = CoreHarness(admin_password="op-secret")
        ann, cat, ira = chat.join("ann"), chat.join("cat"), chat.join("ira")
        chat.request(cat, {"type": "op", "password": "op-secret"})     # runs every room
        for session in (ann, cat, ira):
            chat.request(session, {"type": "join", "room": "dev"})
        chat.request(ann, {"type": "part", "room": "dev"})
        actions = chat.advance(0)
        heirs = [event["name"] for event in chat.received(ira, actions)
                 if event["type"] == "room_op"]
        self.assertEqual(heirs, ["ira"])       # not cat, who was there longer but runs it anyway
        chat.request(ira, {"type": "register", "password": "correct horse"})
        chat.finish_jobs()
        self.assertTrue(ira.registered)
        self.assertEqual(chat.core.store.room_ops(), [])    # a restart forgets the heir

    def test_a_new_room_replays_no_announcement_from_before_it(self) -> None:
        chat = CoreHarness()
        alice = chat.join("alice")
        chat.core.announce("server", "before dev")
        chat.advance(1)
        chat.request(alice, {"type": "join", "room": "dev"})
        chat.advance(1)
        chat.core.announce("server", "after dev")
        chat.collect()
        bob = chat.join("bob")
        chat.request(bob, {"type": "join", "room": "dev"})
        replayed = [(event.get("room"), event["text"]) for event in chat.received(bob)
                    if event["type"] == "history"]
        self.assertEqual(replayed, [(None, "before dev"), (None, "after dev"),  # the lobby's
                                    (None, "after dev")])                     # and #dev's

    def test_a_dropped_room_is_forgotten_with_its_messages(self) -> None:
        chat = CoreHarness()
        alice = chat.join("alice")
        chat.request(alice, {"type": "join", "room": "secret"})
        chat.request(alice, {"type": "say", "room": "secret", "text": "old private plan"})
        chat.core.store.recent_public("secret", 7)      # an answer cached, as a join leaves
        chat.core.moderation.run(None, "/droproom #secret")
        mallory = chat.join("mallory")
        chat.request(mallory, {"type": "join", "room": "secret"})
        self.assertEqual([event.get("text") for event in chat.received(mallory)
                          if event["type"] == "history" and event.get("room") == "secret"], [])
        self.assertNotIn("old private plan", str(chat.core.store.recent_public("secret", 7)))

    def test_registering_makes_the_rooms_one_runs_last(self) -> None:
        chat = CoreHarness()
        alice = chat.join("alice")
        chat.request(alice, {"type": "join", "room": "dev"})     # its maker runs it
        chat.request(alice, {"type": "register", "password": "correct horse"})
        chat.finish_jobs()
        self.assertTrue(alice.registered)
        self.assertIn(("dev", "alice"), chat.core.store.room_ops())   # outlasts a restart

    def test_a_full_room_table_forgets_its_oldest_room_nobody_is_in_or_runs(self) -> None:
        chat = CoreHarness(max_rooms=4)     # the lobby and three
        alice, bob = chat.join("alice"), chat.join("bob")
        for name in ("old", "older", "used"):
            chat.request(alice, {"type": "join", "room": name})
            chat.clock.advance(1)
        chat.request(alice, {"type": "join", "room": "held"})   # one too many
        self.assertEqual(chat.received(alice)[-1]["code"], "too_many_rooms")
        for name in ("old", "older"):
            chat.request(alice, {"type": "part", "room": name})
        chat.request(bob, {"type": "join", "room": "new"})      # #old is forgotten for it
        self.assertEqual(sorted(chat.core.rooms.all), ["lobby", "new", "older", "used"])
        self.assertIn(("room", "new"), [(event["type"], event.get("room"))
                                        for event in chat.received(bob)])
        chat.core.accounts.hashes["carol"] = "registered"       # a name that lasts
        chat.core.rooms.all["older"].ops.add("carol")
        chat.request(bob, {"type": "join", "room": "newer"})    # nothing left to forget
        self.assertEqual(chat.received(bob)[-1]["code"], "too_many_rooms")

    def test_an_operator_who_comes_back_is_announced_as_one(self) -> None:
        chat = CoreHarness()
        alice, bob = chat.join("alice"), chat.join("bob")
        chat.request(alice, {"type": "join", "room": "dev"})
        chat.request(alice, {"type": "register", "password": "correct horse"})
        chat.finish_jobs()
        chat.request(bob, {"type": "join", "room": "dev"})
        chat.request(alice, {"type": "part", "room": "dev"})     # registered: still its operator
        actions = chat.request(alice, {"type": "join", "room": "dev"})
        [join] = [event for event in chat.received(bob, actions) if event["type"] == "join"]
        self.assertTrue(join.get("op"))
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.registered, codec.nick = True, "bob"
        self.assertEqual(codec.encode({key: join[key] for key in join if key != "ts"}),
                         b":alice!alice@chat.lan JOIN :#dev\r\n"
                         b":chat.lan MODE #dev +o :alice\r\n")
        actions = chat.request(bob, {"type": "part", "room": "dev"})
        actions = chat.request(bob, {"type": "join", "room": "dev"})
        [join] = [event for event in chat.received(alice, actions) if event["type"] == "join"]
        self.assertNotIn("op", join)

    def test_an_invitation_lets_one_person_past_a_room_key_once(self) -> None:
        chat = CoreHarness()
        alice, bob, carol = chat.join("alice"), chat.join("bob"), chat.join("carol")
        chat.request(alice, {"type": "join", "room": "ops"})
        chat.request(alice, {"type": "key", "room": "ops", "key": "s3cret"})
        for who, request, code in (
                (bob, {"type": "invite", "room": "ops", "name": "carol"}, "not_in_room"),
                (alice, {"type": "invite", "room": "ops", "name": "nobody"}, "unknown_user"),
                (alice, {"type": "invite", "room": "ops", "name": "alice"}, "already_in_room"),
                (alice, {"type": "invite", "room": "gone", "name": "bob"}, "no_such_room")):
            with self.subTest(code=code):
                self.assertEqual(chat.received(who, chat.request(who, request))[-1]["code"], code)
        actions = chat.request(alice, {"type": "invite", "room": "ops", "name": "Bob"})
        self.assertEqual(chat.received(alice, actions)[-1]["code"], "invited")
        [invite] = chat.received(bob, actions)
        self.assertEqual((invite["type"], invite["room"], invite["by"]), ("invite", "ops", "alice"))
        chat.request(carol, {"type": "join", "room": "ops"})     # not invited: the key
        self.assertEqual(chat.received(carol)[-1]["code"], "bad_key")
        chat.request(bob, {"type": "join", "room": "ops"})
        self.assertIn(bob, chat.core.rooms.all["ops"])
        chat.request(bob, {"type": "part", "room": "ops"})
        chat.request(bob, {"type": "join", "room": "ops"})       # once: used up
        self.assertEqual(chat.received(bob)[-1]["code"], "bad_key")

    def test_a_password_for_a_name_nobody_registered_is_refused_not_ignored(self) -> None:
        chat = CoreHarness()
        alice = chat.join("alice")
        actions = chat.request(alice, {"type": "nick", "name": "bad", "name_password": "name!"})
        [error] = chat.received(alice, actions)
        self.assertEqual(error["code"], "not_registered")
        self.assertNotIn("name!", error["text"])    # a password is never said back
        self.assertEqual(alice.name, "alice")

    def test_server_operators_are_shown_as_operators_of_every_room_they_are_in(self) -> None:
        chat = CoreHarness(admin_password="op-secret")
        alice, bob = chat.join("alice"), chat.join("bob")
        chat.request(alice, {"type": "join", "room": "dev"})
        chat.request(bob, {"type": "join", "room": "dev"})
        actions = chat.request(bob, {"type": "op", "password": "op-secret"})
        changes = [(event["room"], event["name"], event["op"], event.get("server_operator"))
                   for event in chat.received(alice, actions) if event["type"] == "room_op"]
        self.assertEqual(sorted(changes), [("dev", "bob", True, True),
                                           ("lobby", "bob", True, True)])
        chat.request(alice, {"type": "who", "room": "dev"})
        self.assertEqual(chat.received(alice)[-1]["ops"], ["alice", "bob"])
        carol = chat.join("carol")
        actions = chat.request(carol, {"type": "join", "room": "dev"})
        [described] = [event for event in chat.received(carol, actions) if event["type"] == "room"]
        self.assertEqual(described["ops"], ["alice", "bob"])
        actions = chat.request(bob, {"type": "deop"})
        changes = [(event["room"], event["name"], event["op"])
                   for event in chat.received(alice, actions) if event["type"] == "room_op"]
        self.assertEqual(sorted(changes), [("dev", "bob", False), ("lobby", "bob", False)])
        # Everyone else is told once, as when it became one (its own answer is its notice).
        notices = [(who, event["code"]) for who in (alice, bob, carol)
                   for event in chat.received(who, actions) if event["type"] == "notice"]
        self.assertEqual(notices, [(alice, "former_operator"), (bob, "deop"),
                                   (carol, "former_operator")])

    def test_timestamps_are_the_wall_clock_to_the_millisecond(self) -> None:
        chat = CoreHarness()
        chat.clock.unix = 1_780_012_799.9985    # 2026-05-28, 23:59:59.998 and a half
        for step in (0, 0.0003, 0.0007, 0.0009, 0.0001, 0.5, 0.499, 86_400.0, 0.001):
            chat.clock.advance(step)
            millisecond = int(chat.clock.unix * 1000) / 1000
            self.assertEqual(chat.core.timestamp(), socket_server.utc_timestamp(millisecond))
        self.assertEqual(chat.core.timestamp(), "2026-05-30T00:00:01.000Z")

    def test_hello_say_and_bye(self) -> None:
        chat = CoreHarness()
        alice = chat.join("alice")
        kinds = [event["type"] for event in chat.received(alice)]
        self.assertEqual(kinds, ["welcome", "room", "history_end"])
        bob = chat.join("bob")
        self.assertEqual(chat.received(alice)[-1]["name"], "bob")      # bob's join
        said = chat.request(alice, {"type": "say", "text": "  hi\tbob ", "id": "7"})
        self.assertEqual(chat.received(bob, said)[0]["text"], "hi bob")
        self.assertEqual(chat.received(alice, said), [
            {"type": "sent", "room": "lobby", "text": "hi bob", "ts": "2026-05-28T20:26:40.000Z",
             "id": "7"}])
        left = chat.request(bob, {"type": "bye"})
        self.assertTrue(chat.closed(bob))
        self.assertEqual(chat.received(alice, left)[0]["reason"], "quit")
        self.assertEqual(list(chat.core.members), ["alice"])

    def test_silent_connections_make_room_for_newcomers(self) -> None:
        chat = CoreHarness(max_clients=4, max_silent=10)
        silent = [chat.connect(f"s{number}", f"10.0.1.{number}") for number in range(4)]
        chat.advance(socket_server.SILENT_GRACE + 1)   # long enough to be taken for an attack
        newcomer = chat.connect("new", "10.0.2.1")      # the server is full: the oldest goes
        self.assertFalse(chat.closed(newcomer))
        self.assertEqual([chat.closed(one) for one in silent], [True, False, False, False])
        self.assertEqual(chat.received(silent[0])[-1]["code"], "crowded_out")
        chat.request(newcomer, {"type": "hello", "name": "carol"})
        self.assertIn("carol", chat.core.members)

    def test_only_connections_silent_for_a_while_are_dropped(self) -> None:
        chat = CoreHarness(max_clients=3, max_silent=10)
        first = [chat.connect(f"s{number}", f"10.0.1.{number}") for number in range(3)]
        late = chat.connect("late", "10.0.2.1")     # all of them just came: no attack seen
        self.assertEqual(chat.received(late)[-1]["code"], "server_full")
        self.assertFalse(any(chat.closed(one) for one in first))

    def test_silent_connections_reopened_at_once_cannot_fill_the_server(self) -> None:
        # An attacker that reconnects the moment it is dropped keeps every silent
        # connection young; past their seats, they give way to a newcomer all the same.
        chat = CoreHarness(max_clients=6, max_silent=2)
        silent = [chat.connect(f"s{number}", f"10.0.1.{number}") for number in range(6)]
        newcomer = chat.connect("new", "10.0.2.1")
        self.assertFalse(chat.closed(newcomer))
        self.assertEqual(chat.received(silent[0])[-1]["code"], "crowded_out")
        self.assertEqual(sum(chat.closed(one) for one in silent), 1)
        chat.request(newcomer, {"type": "hello", "name": "carol"})
        self.assertIn("carol", chat.core.members)

    def test_silent_connections_have_seats_of_their_own(self) -> None:
        chat = CoreHarness(max_clients=100, max_silent=3)
        silent = [chat.connect(f"s{number}", f"10.0.1.{number}") for number in range(3)]
        chat.advance(socket_server.SILENT_GRACE + 1)
        chat.connect("fourth", "10.0.2.1")      # over --max-silent, long before --max-clients
        self.assertEqual([chat.closed(one) for one in silent], [True, False, False])

    def test_a_flood_of_connections_is_summed_up_in_the_log(self) -> None:
        chat = CoreHarness(max_clients=1000)
        with self.assertLogs("chat", "INFO") as logs:
            for number in range(100):
                session = chat.connect(f"c{number}", "10.0.3.1")
                chat.request(session, {"type": "say", "text": "no hello"})   # refused, closed
            chat.join("alice")
            chat.advance(socket_server.LOG_WINDOW + 1)
        connected = [line for line in logs.output if "connection from" in line]
        self.assertEqual(len(connected), socket_server.LOG_BURST)
        self.assertIn(f"... and {101 - socket_server.LOG_BURST} more connections in the last "
                      "minute", "\n".join(logs.output))
        self.assertTrue(any("joined as alice" in line for line in logs.output))

    def test_texts_are_logged_at_debug_level_alone_as_a_tick_finds_it(self) -> None:
        chat = CoreHarness()
        alice, bob = chat.join("alice"), chat.join("bob")
        with self.assertLogs("chat", "DEBUG") as logs:
            chat.advance(1)     # the tick asks logging again
            chat.request(alice, {"type": "say", "text": "hi there"})
            chat.request(alice, {"type": "whisper", "to": "bob", "text": "psst"})
        self.assertIn("alice says in #lobby: hi there", "\n".join(logs.output))
        self.assertIn("alice whispers to bob: psst", "\n".join(logs.output))
        with self.assertLogs("chat", "INFO") as logs:
            chat.advance(1)
            chat.request(bob, {"type": "say", "text": "not for the log"})
            chat.request(bob, {"type": "whisper", "to": "alice", "text": "nor this"})
            logging.getLogger("chat").info("the test's own line")   # assertLogs needs one
        self.assertNotIn("for the log", "\n".join(logs.output))
        self.assertNotIn("nor this", "\n".join(logs.output))

    def test_text_far_over_its_limit_is_never_cleaned_whole(self) -> None:
        chat = CoreHarness(max_length=100)
        alice = chat.join("alice")
        chat.request(alice, {"type": "join", "room": "dev"})
        huge = "x\t" * 30_000     # a tab: no quick way through clean_text
        cleaned: List[int] = []
        clean = socket_server.clean_text

        def counting(text: str) -> str:
            cleaned.append(len(text))
            return clean(text)

        socket_server.clean_text = counting
        self.addCleanup(setattr, socket_server, "clean_text", clean)
        for request in ({"type": "say", "text": huge}, {"type": huge},
                        {"type": "away", "text": huge}, {"type": "topic", "room": "dev",
                                                          "text": huge},
                        {"type": "search", "text": huge}, {"type": "part", "room": "dev",
                                                           "text": huge}):
            with self.subTest(request=request["type"][:10]):
                errors = [event for event in chat.received(alice, chat.request(alice, request))
                          if event["type"] == "error"]
                if request["type"] == "say":
                    self.assertEqual(errors[0]["code"], "too_long")
        longest = max(100, socket_server.MAX_TOPIC_LENGTH + 1, socket_server.MAX_AWAY_LENGTH)
        self.assertLessEqual(max(cleaned), longest * socket_server.CLEANING_SLACK)

    def test_the_first_request_must_be_a_hello(self) -> None:
        chat = CoreHarness()
        session = chat.connect()
        actions = chat.request(session, {"type": "say", "text": "hi"})
        self.assertEqual(chat.received(session, actions)[0]["code"], "hello_required")
        self.assertTrue(chat.closed(session))

    def test_an_error_in_answer_to_a_hello_closes_elsewhere_it_does_not(self) -> None:
        chat = CoreHarness()
        chat.join("alice")
        taken = chat.connect()
        chat.request(taken, {"type": "hello", "name": "ALICE"})
        self.assertEqual(chat.received(taken)[-1]["code"], "name_taken")
        self.assertTrue(chat.closed(taken))
        bob = chat.join("bob")
        chat.request(bob, {"type": "whisper", "to": "nobody", "text": "hi"})
        self.assertEqual(chat.received(bob)[-1]["code"], "unknown_user")
        self.assertFalse(chat.closed(bob))

    def test_every_request_of_a_member_is_metered(self) -> None:
        chat = CoreHarness(rate_limit=1, rate_burst=2)
        alice = chat.join("alice")
        for _ in range(2):
            chat.request(alice, {"type": "nonsense"})
        actions = chat.request(alice, {"type": "also nonsense"})
        self.assertEqual(chat.received(alice, actions)[0]["code"], "rate_limited")
        chat.clock.advance(1)   # one token back
        actions = chat.request(alice, {"type": "say", "text": "hi"})
        self.assertEqual(chat.received(alice, actions)[0]["type"], "sent")
        for _ in range(socket_server.FLOOD_STRIKES + 1):
            chat.request(alice, {"type": "nonsense"})
        self.assertEqual(chat.received(alice)[-1]["code"], "flooding")
        self.assertTrue(chat.closed(alice))

    def test_a_registered_name_waits_for_its_password_check(self) -> None:
        chat = CoreHarness(failure_delay=2)
        chat.core.accounts.hashes["alice"] = socket_server.hash_password("correct horse")
        session = chat.connect()
        actions = chat.request(session, {"type": "hello", "name": "alice",
                                         "name_password": "wrong horse"})
        self.assertEqual([action[0] for action in actions], ["pause", "job"])
        self.assertTrue(session.waiting)
        actions = chat.finish_jobs()            # the hash says no: answered after a delay
        self.assertEqual([action[0] for action in actions], ["resume", "pause", "later"])
        self.assertEqual(chat.advance(1.9), [])
        actions = chat.advance(0.2)
        self.assertEqual(chat.received(session, actions)[0]["code"], "bad_name_password")
        self.assertTrue(chat.closed(session))
        again = chat.connect()
        chat.request(again, {"type": "hello", "name": "alice", "name_password": "correct horse"})
        actions = chat.finish_jobs()
        self.assertEqual(actions[0][0], "resume")
        self.assertTrue(chat.received(again, actions)[0]["registered"])

    def test_a_name_proved_once_is_taken_back_without_its_password(self) -> None:
        chat = CoreHarness(failure_delay=0)
        chat.core.accounts.hashes["alice"] = socket_server.hash_password("correct horse")
        alice = chat.connect()
        chat.request(alice, {"type": "hello", "name": "alice", "name_password": "correct horse"})
        chat.finish_jobs()
        chat.request(alice, {"type": "nick", "name": "alice_away"})
        actions = chat.request(alice, {"type": "nick", "name": "Alice"})   # as on IRC: /nick
        self.assertEqual([event["type"] for event in chat.received(alice, actions)
                          if event["type"] == "error"], [])
        self.assertEqual(alice.name, "Alice")
        # A proof is of one registration: once the name is registered anew, it needs
        # the new password.
        chat.request(alice, {"type": "nick", "name": "alice_away"})
        chat.core.accounts.hashes["alice"] = socket_server.hash_password("another horse")
        actions = chat.request(alice, {"type": "nick", "name": "alice"})
        self.assertEqual([event.get("code") for event in chat.received(alice, actions)],
                         ["name_protected"])
        self.assertEqual(alice.name, "alice_away")

    def test_a_sender_without_acknowledgements_is_told_its_line_was_masked(self) -> None:
        # An IRC client shows its own line as typed; the others saw it masked.
        chat = CoreHarness(blocked_words=["darn"])
        ira, bob = chat.join("ira"), chat.join("bob")
        for request in ({"type": "say", "text": "oh darn it", "ack": False},
                        {"type": "whisper", "to": "bob", "text": "oh darn it", "ack": False}):
            actions = chat.request(ira, request)
            self.assertEqual([event["text"] for event in chat.received(bob, actions)],
                             ["oh **** it"])
            self.assertEqual([(event["type"], event["text"])
                              for event in chat.received(ira, actions)],
                             [("notice", "Sent with a blocked word masked: oh **** it")])
        actions = chat.request(ira, {"type": "say", "text": "oh darn"})    # its sent says so
        self.assertEqual([event["type"] for event in chat.received(ira, actions)], ["sent"])


        # An IRC client without echo-message shows its own lines itself: a `sent` for
        # it would be encoded only to come to nothing.
        chat = CoreHarness()
        ira, bob = chat.join("ira"), chat.join("bob")
        for request in ({"type": "say", "text": "hi all", "ack": False},
                        {"type": "whisper", "to": "bob", "text": "hi bob", "ack": False}):
            actions = chat.request(ira, request)
            self.assertEqual([event["type"] for event in chat.received(ira, actions)], [])
            self.assertEqual([event["text"] for event in chat.received(bob, actions)],
                             [request["text"]])
        actions = chat.request(ira, {"type": "say", "text": "and this?"})
        self.assertEqual([event["type"] for event in chat.received(ira, actions)], ["sent"])
        # What the IRC codec asks for, by whether its client wants its own lines echoed.
        for caps, ack in ((b"", False), (b"echo-message", None)):
            codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
            codec.registered, codec.nick = True, "ira"
            codec.caps = set(caps.decode().split())
            codec.feed(b"PRIVMSG #lobby :hi\r\nPRIVMSG bob :hi\r\n")
            for _ in range(2):
                self.assertEqual(codec.next_request().get("ack"), ack, caps)


        chat = CoreHarness()
        alice, bob = chat.join("alice"), chat.join("bob")

        def since() -> str:
            actions = chat.request(bob, {"type": "whois", "name": "alice"})
            return [event["since"] for event in chat.received(bob, actions)][0]

        came = since()
        for _ in range(2):          # a token from a resumed session's welcome works too
            chat.advance(5)         # (less than a ping's wait: the old one is still here)
            token = [event["resume"] for event in chat.received(alice)
                     if event["type"] == "welcome"][-1]
            alice = chat.connect("alice again")
            chat.request(alice, {"type": "hello", "name": "alice", "resume": token})
            self.assertEqual(since(), came)


        chat = CoreHarness(failure_delay=0, max_failures=2, admin_password="op secret")
        chat.core.accounts.hashes["alice"] = socket_server.hash_password("correct horse")
        # Joined before the lockout, from the same address: the owner of #vault, and three more.
        owner, *insiders = chat.join("owner"), chat.join("in0"), chat.join("in1"), chat.join("in2")
        chat.request(owner, {"type": "join", "room": "vault"})
        chat.request(owner, {"type": "key", "room": "vault", "key": "sesame"})
        for _ in range(2):
            guesser = chat.connect()
            chat.request(guesser, {"type": "hello", "name": "alice", "name_password": "guess"})
            chat.finish_jobs()
            chat.advance(0)
        self.assertGreater(chat.core.accounts.guard.locked_for("10.0.0.1", chat.clock.now()), 0)
        # The right password, tried while the lockout lasts, proves nothing; but those
        # already in stay in, and the one who asked is told how long to wait.
        for request in ({"type": "authenticate", "name": "alice", "password": "correct horse"},
                        {"type": "nick", "name": "alice", "name_password": "correct horse"},
                        {"type": "op", "password": "op secret"}):
            with self.subTest(request=request["type"]):
                session = chat.connect() if request["type"] == "authenticate" else insiders.pop()
                actions = chat.request(session, request) + chat.finish_jobs()
                errors = [event for event in chat.received(session, actions)]
                self.assertEqual([event.get("code") for event in errors], ["locked_out"])
                self.assertIn("Too many wrong passwords from your address: try again in "
                              "5 minutes", errors[0]["text"])
                self.assertFalse(chat.closed(session))
        # A key is not a login: the right one still opens its room; and a hello that
        # needs no password is let in (behind one router, a whole office shares an address).
        keyholder = chat.join("in3")
        chat.request(keyholder, {"type": "join", "room": "vault", "key": "sesame"})
        self.assertIn(keyholder, chat.core.rooms.all["vault"])
        newcomer = chat.join("newcomer")
        self.assertIn("welcome", [event["type"] for event in chat.received(newcomer)])
        self.assertFalse(chat.closed(newcomer))

    def test_the_console_lifts_a_lockout(self) -> None:
        # Behind one router a whole office is one address: an operator must be able to undo
        # what one guesser did.
        chat = CoreHarness(failure_delay=0, max_failures=2, admin_password="op secret")
        owner = chat.join("owner")
        chat.request(owner, {"type": "join", "room": "vault"})
        chat.request(owner, {"type": "key", "room": "vault", "key": "sesame"})
        guesser = chat.join("guesser")
        for _ in range(2):
            chat.request(guesser, {"type": "op", "password": "guess"})
            chat.request(guesser, {"type": "join", "room": "vault", "key": "guess"})
            chat.advance(0)
        run = chat.core.moderation.run
        self.assertEqual(run(None, "/unlock 10.0.0.9"), ["10.0.0.9 is not locked out"])
        self.assertEqual(run(None, "/unlock 10.0.0.1"),
                         ["lifted 10.0.0.1's lockout: its passwords and keys are checked again"])
        chat.request(guesser, {"type": "op", "password": "op secret"})
        self.assertTrue(guesser.operator)
        chat.request(guesser, {"type": "join", "room": "vault", "key": "sesame"})
        self.assertIn(guesser, chat.core.rooms.all["vault"])
        self.assertEqual(run(None, "/unlock"), ["nobody is locked out"])

    def test_wrong_keys_lock_that_room_from_that_address_only(self) -> None:
        chat = CoreHarness(failure_delay=0, max_failures=2, admin_password="op secret")
        owner = chat.join("owner")
        for room in ("vault", "den"):
            chat.request(owner, {"type": "join", "room": room})
            chat.request(owner, {"type": "key", "room": room, "key": room + "-key"})
        guesser = chat.join("guesser")
        answers = []
        for key in ("guess1", "guess2", "vault-key"):
            actions = chat.request(guesser, {"type": "join", "room": "vault", "key": key})
            actions += chat.advance(0)      # (a wrong key is answered after a delay)
            answers += [event["text"] for event in chat.received(guesser, actions)
                        if event["type"] == "error"]
        self.assertEqual(answers[0], "Wrong key for #vault.")
        self.assertIn("Too many wrong keys for #vault from your address: try again in "
                      "5 minutes", answers[1])
        self.assertEqual(answers[1:2] * 2, answers[1:])       # the right key is not tried
        self.assertNotIn(guesser, chat.core.rooms.all["vault"])
        self.assertFalse(chat.closed(guesser))
        # Another room's key, a password, and another address are as before.
        chat.request(guesser, {"type": "join", "room": "den", "key": "den-key"})
        self.assertIn(guesser, chat.core.rooms.all["den"])
        chat.request(guesser, {"type": "op", "password": "op secret"})
        self.assertTrue(guesser.operator)
        elsewhere = chat.connect("far", host="10.0.0.2")
        chat.request(elsewhere, {"type": "hello", "name": "far"})
        chat.request(elsewhere, {"type": "join", "room": "vault", "key": "vault-key"})
        self.assertIn(elsewhere, chat.core.rooms.all["vault"])
        chat.advance(301)
        chat.request(guesser, {"type": "join", "room": "vault", "key": "vault-key"})
        self.assertIn(guesser, chat.core.rooms.all["vault"])

    def test_timeouts_and_pings_follow_the_clock(self) -> None:
        chat = CoreHarness(hello_timeout=10, ping_after=60, drop_after=120)
        silent, alice = chat.connect("silent"), chat.join("alice")
        chat.advance(9)
        self.assertFalse(chat.closed(silent))
        chat.advance(1)
        self.assertEqual(chat.received(silent)[-1]["code"], "hello_timeout")
        actions = chat.advance(50)
        self.assertEqual(chat.received(alice, actions), [{"type": "ping"}])
        self.assertEqual(chat.advance(30), [])      # pinged once, not again
        alice.last_heard = chat.clock.now()         # it answered: bytes arrived
        chat.advance(119)
        self.assertFalse(chat.closed(alice))
        chat.advance(1)
        self.assertTrue(chat.closed(alice))

    def test_a_mute_ends_on_time(self) -> None:
        chat = CoreHarness()
        bob = chat.join("bob")
        self.assertEqual(chat.core.moderation.run(None, "/mute bob 1"),
                         ["bob was muted by server for 1 minute"])
        chat.collect()
        chat.request(bob, {"type": "say", "text": "hi"})
        self.assertEqual(chat.received(bob)[-1]["code"], "muted")
        actions = chat.advance(60)
        self.assertEqual(chat.received(bob, actions)[0]["code"], "unmuted")
        chat.request(bob, {"type": "say", "text": "free"})
        self.assertEqual(chat.received(bob)[-1]["type"], "sent")
        # A mute is the name's: it outlasts a reconnection and follows a rename.
        chat.core.moderation.run(None, "/mute bob 1")
        chat.request(bob, {"type": "bye"})
        back = chat.join("bob")
        chat.request(back, {"type": "nick", "name": "robert"})
        actions = chat.advance(60)
        self.assertEqual([event["code"] for event in chat.received(back, actions)
                          if event["type"] == "notice"], ["unmuted"])
        self.assertEqual(chat.core.moderation.mutes, {})

    def test_a_protocol_error_ends_the_session(self) -> None:
        chat = CoreHarness()
        alice, bob = chat.join("alice"), chat.join("bob")
        chat.core.protocol_error(bob, socket_server.ProtocolError("bad_json", "not JSON"))
        chat.collect()
        self.assertEqual(chat.received(bob)[-1]["code"], "bad_json")
        self.assertTrue(chat.closed(bob))
        self.assertEqual(chat.received(alice)[-1]["type"], "leave")

    def test_a_room_message_goes_to_one_batch_of_its_members(self) -> None:
        chat = CoreHarness()
        alice, bob, carol = chat.join("alice"), chat.join("bob"), chat.join("carol")
        chat.request(alice, {"type": "join", "room": "dev"})
        chat.request(bob, {"type": "join", "room": "dev"})
        actions = chat.request(alice, {"type": "say", "room": "dev", "text": "hi"})
        self.assertEqual([action[0] for action in actions], ["deliver"])
        room = actions[0][1]
        self.assertEqual(sorted(room.members), ["alice", "bob"])
        self.assertEqual(chat.received(carol, actions), [])
        self.assertEqual(chat.received(bob, actions)[0]["room"], "dev")

    def test_a_nick_change_reaches_those_sharing_a_room_and_keeps_operator_status(self) -> None:
        chat = CoreHarness()
        alice, bob = chat.join("alice"), chat.join("bob")
        chat.request(alice, {"type": "join", "room": "dev"})
        actions = chat.request(alice, {"type": "nick", "name": "alicia"})
        self.assertEqual(chat.received(bob, actions)[0]["new"], "alicia")
        self.assertIn("alicia", chat.core.rooms.all["dev"].ops)
        self.assertNotIn("alice", chat.core.rooms.all["dev"].ops)
        chat.core.moderation.run(None, "/mute alicia")
        chat.request(alice, {"type": "nick", "name": "free"})   # a mute follows its person
        self.assertIsNotNone(chat.core.moderation.mute_left("free"))
        chat.request(alice, {"type": "nick", "name": "FREE"})   # the same name, other letters
        self.assertIn("free", chat.core.rooms.all["dev"].ops)
        self.assertIsNotNone(chat.core.moderation.mute_left("free"))

    def test_every_code_the_core_names_is_in_its_tables(self) -> None:
        with open(SERVER_SCRIPT, encoding="utf-8") as script:
            source = script.read()
        refused = set(re.findall(r'refuse\(\s*\w+,\s*"(\w+)"', source))
        refused |= set(re.findall(r'ModerationError\(\s*"(\w+)"', source))
        refused |= set(re.findall(r'ProtocolError\(\s*"(\w+)"', source))
        refused |= set(re.findall(r'"type": "error", "code": "(\w+)"', source))
        self.assertEqual(refused - set(socket_server.ERRORS), set())
        self.assertGreater(len(refused), 30)
        noticed = set(re.findall(r'"type": "notice", "code": "(\w+)"', source))
        noticed |= set(re.findall(r'notify_all\(\s*"(\w+)"', source))
        noticed |= {"registered", "password_changed"}   # sent as `outcome` (Accounts._save)
        self.assertEqual(noticed, set(socket_server.NOTICES))

    def test_the_readme_lists_every_error_code_as_the_server_closes_on_it(self) -> None:
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
            text = readme.read()
        table = text[text.index("**Error codes**"):text.index("## Performance")]
        documented = {}
        for row in re.findall(r"^\| (`.+?) \| (.+?) \|", table, re.MULTILINE):
            for code in re.findall(r"`(\w+)`", row[0]):
                documented[code] = row[1]
        self.assertEqual(set(documented), set(socket_server.ERRORS))
        for code, closes in documented.items():
            always = socket_server.ERRORS[code].closes
            self.assertEqual(closes == "yes", always, f"{code}: README says {closes!r}")

    def test_the_client_acts_only_on_codes_the_server_sends(self) -> None:
        named = set(client.FINAL_ERRORS) | set(client.ASK_AGAIN)
        self.assertEqual(named - set(socket_server.ERRORS), set())
        self.assertEqual(set(client.Link.NOTICE_EFFECTS) - set(socket_server.NOTICES), set())


class CodeShapeTests(unittest.TestCase):
    """What keeps the code easy to change: small pieces, and layers that stay apart."""

    def test_no_class_over_500_lines_and_no_function_over_60(self) -> None:
        import ast
        for script in (SERVER_SCRIPT, CLIENT_SCRIPT):
            with open(script, encoding="utf-8") as source:
                tree = ast.parse(source.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                    size = node.end_lineno - node.lineno + 1
                    limit = 500 if isinstance(node, ast.ClassDef) else 60
                    if "arg_parser" not in node.name:
                        self.assertLessEqual(size, limit, f"{script}: {node.name}")

    def test_the_transport_names_no_chat_concept(self) -> None:
        import inspect
        source = inspect.getsource(socket_server.SelectServer) + \
            inspect.getsource(socket_server.Connection)
        for word in ("chat", "hello", "session", "member", "room", "name", "message",
                     "user", "nick", "codec", "core", "frame", "join"):
            found = re.search(rf"(?i)(?<!\.)\b{word}\w*", source)   # str.join is no chat word
            self.assertIsNone(found, found and found.group())


class SharedBlockTests(unittest.TestCase):
    """The protocol block is copied into both scripts; the copies must not drift."""

    @staticmethod
    def shared_block(path: str) -> str:
        with open(path, encoding="utf-8") as source:
            text = source.read()
        begin = text.index("# ---- begin shared protocol block")
        end = text.index("# ---- end shared protocol block ----")
        return text[begin:end]

    def test_server_and_client_copies_are_identical(self) -> None:
        server_block = self.shared_block(SERVER_SCRIPT)
        client_block = self.shared_block(CLIENT_SCRIPT)
        self.assertIn("class FrameDecoder", server_block)
        self.assertEqual(server_block, client_block,
                         "the shared protocol block differs between socket_server.py and "
                         "client.py: make the same change in both")


# ---------------------------------------------------------------------------
# The server, in a thread, over loopback
# ---------------------------------------------------------------------------

class HandshakeTests(ChatTestCase):
    def test_welcome_lists_everyone(self) -> None:
        alice = self.peer("alice")
        self.assertEqual(alice.welcome["name"], "alice")
        self.assertEqual(alice.welcome["users"], ["alice"])
        bob = self.peer("Bob")
        self.assertEqual(bob.welcome["users"], ["alice", "Bob"])

    def test_join_notice_goes_to_the_others(self) -> None:
        alice = self.peer("alice")
        bob = self.peer("bob")
        joined = alice.expect("join")
        self.assertEqual(joined["name"], "bob")
        self.assertNotIn("join", [m["type"] for m in bob.sync()])

    def test_bad_names_are_refused(self) -> None:
        for name in ["", "x" * 33, "two words", "ünïcode", "tab\t", "esc\x1b[2J", "a/b",
                     ".", "..", "-", "_", "._-"]:
            with self.subTest(name=name):
                peer = self.peer()
                peer.send({"type": "hello", "name": name})
                error = self.assert_rejected(peer, "bad_name")
                self.assertIn("1 to 32", error["text"])
                self.assertIn("with a letter or digit", error["text"])

    def test_edge_names_are_accepted(self) -> None:
        for name in ["a", "x" * 32, "A.b-c_9", "_7", "...x", "-" * 31 + "0"]:
            self.assertEqual(self.peer(name).welcome["name"], name)

    def test_taken_name_is_refused_whatever_its_case(self) -> None:
        self.peer("alice")
        peer = self.peer()
        peer.send({"type": "hello", "name": "ALICE"})
        self.assert_rejected(peer, "name_taken")

    def test_name_is_free_again_after_leaving(self) -> None:
        first = self.peer("alice")
        watcher = self.peer("watcher")
        first.close()
        self.assertEqual(watcher.expect("leave")["name"], "alice")
        self.assertEqual(self.peer("alice").welcome["name"], "alice")

    def test_reserved_names(self) -> None:
        peer = self.peer()
        peer.send({"type": "hello", "name": "Server"})
        self.assert_rejected(peer, "name_reserved")

    def test_hello_must_come_first(self) -> None:
        peer = self.peer()
        peer.send({"type": "say", "text": "hi"})
        self.assert_rejected(peer, "hello_required")

    def test_hello_needs_a_string_name(self) -> None:
        peer = self.peer()
        peer.send({"type": "hello", "name": 42})
        self.assert_rejected(peer, "bad_message")

    def test_second_hello_is_an_error(self) -> None:
        alice = self.peer("alice")
        alice.send({"type": "hello", "name": "other"})
        self.assertEqual(alice.expect("error")["code"], "already_joined")

    def test_server_full(self) -> None:
        server = ServerThread(max_clients=2)
        self.addCleanup(server.stop)
        first, second = Peer(server.port, "one"), Peer(server.port, "two")
        third = Peer(server.port)
        self.assert_rejected(third, "server_full")
        for peer in (first, second, third):
            peer.close()


class HelloTimeoutTests(ChatTestCase):
    server_settings = {"hello_timeout": 0.2}

    def test_silent_connection_is_dropped(self) -> None:
        peer = self.peer()
        started = time.monotonic()
        self.assert_rejected(peer, "hello_timeout")
        self.assertLess(time.monotonic() - started, 2.0)


class ChatTests(ChatTestCase):
    def test_message_reaches_everyone_else(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        sent = alice.say("hello all")
        for peer in (bob, carol):
            message = peer.expect("message")
            self.assertEqual((message["from"], message["text"]), ("alice", "hello all"))
            self.assertEqual(message["ts"], sent["ts"])
        stamp = datetime.fromisoformat(sent["ts"].replace("Z", "+00:00"))
        self.assertEqual(stamp.utcoffset().total_seconds(), 0)
        self.assertLess(abs(time.time() - stamp.timestamp()), 60)
        self.assertNotIn("message", [m["type"] for m in alice.sync()])

    def test_sender_gets_an_acknowledgement_with_the_cleaned_text(self) -> None:
        alice = self.peer("alice")
        sent = alice.say("  two\nlines \x1b[31m ")
        self.assertEqual(sent["text"], "two lines [31m")
        self.assertNotIn("to", sent)

    def test_messages_keep_their_order(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        for number in range(200):
            alice.send({"type": "say", "text": str(number)})
        texts = [bob.expect("message")["text"] for _ in range(200)]
        self.assertEqual(texts, [str(number) for number in range(200)])

    def test_empty_and_too_long_messages_are_refused(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        for text, code in [("", "empty_message"), (" \t\x07 ", "empty_message"),
                           ("x" * (socket_server.MAX_TEXT_LENGTH + 1), "too_long")]:
            alice.send({"type": "say", "text": text})
            self.assertEqual(alice.expect("error")["code"], code)
        alice.say("x" * socket_server.MAX_TEXT_LENGTH)
        self.assertEqual(len(bob.expect("message")["text"]), socket_server.MAX_TEXT_LENGTH)

    def test_whisper_reaches_one_person(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        alice.send({"type": "whisper", "to": "BOB", "text": "psst"})
        sent = alice.expect("sent")
        self.assertEqual((sent["to"], sent["text"]), ("bob", "psst"))
        whisper = bob.expect("whisper")
        self.assertEqual((whisper["from"], whisper["to"], whisper["text"]),
                         ("alice", "bob", "psst"))
        self.assertEqual([m for m in carol.sync() if m["type"] != "join"], [])

    def test_whisper_to_yourself_arrives_once(self) -> None:
        alice = self.peer("alice")
        alice.send({"type": "whisper", "to": "ALICE", "text": "note to self"})
        answers = alice.sync()
        self.assertEqual([m["type"] for m in answers], ["sent"])    # no `whisper` copy too
        self.assertEqual((answers[0]["to"], answers[0]["text"]), ("alice", "note to self"))
        alice.send({"type": "get_history"})
        history = [m for m in alice.collect_history() if m["type"] == "history"]
        self.assertEqual([(m["kind"], m["from"], m["to"], m["text"]) for m in history],
                         [("whisper", "alice", "alice", "note to self")])

    def test_whisper_to_nobody(self) -> None:
        alice = self.peer("alice")
        alice.send({"type": "whisper", "to": "ghost", "text": "hello?"})
        error = alice.expect("error")
        self.assertEqual(error["code"], "unknown_user")
        self.assertIn("ghost", error["text"])

    def test_user_list_on_request(self) -> None:
        alice = self.peer("alice")
        self.peer("bob")
        alice.send({"type": "who"})
        self.assertEqual(alice.expect("users")["users"], ["alice", "bob"])

    def test_leave_notices(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        bob.send({"type": "bye"})
        self.assertNotIn("leave", [m["type"] for m in bob.read_until_closed()])
        leave = alice.expect("leave")
        self.assertEqual((leave["name"], leave["reason"]), ("bob", "quit"))
        carol.reset()
        leave = alice.expect("leave")
        self.assertEqual(leave["name"], "carol")
        alice.send({"type": "who"})
        self.assertEqual(alice.expect("users")["users"], ["alice"])

    def test_everything_sent_before_bye_is_delivered(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        for number in range(50):
            alice.send({"type": "say", "text": f"line {number}"})
        alice.send({"type": "bye"})
        alice.sock.shutdown(socket.SHUT_WR)
        alice.read_until_closed()
        texts = [bob.expect("message")["text"] for _ in range(50)]
        self.assertEqual(texts[-1], "line 49")
        self.assertEqual(bob.expect("leave")["reason"], "quit")

    def test_server_pings_answer(self) -> None:
        alice = self.peer("alice")
        alice.send({"type": "ping"})
        self.assertEqual(alice.receive()["type"], "pong")

    def test_unknown_type_and_bad_fields_keep_the_connection(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        alice.send({"type": "dance"})
        self.assertEqual(alice.expect("error")["code"], "unknown_type")
        alice.send({"type": "say"})
        self.assertEqual(alice.expect("error")["code"], "bad_message")
        alice.send({"type": "whisper", "to": ["bob"], "text": "x"})
        self.assertEqual(alice.expect("error")["code"], "bad_message")
        alice.say("still here")
        self.assertEqual(bob.expect("message")["text"], "still here")

    def test_an_unknown_type_is_quoted_back_cleaned_and_cut(self) -> None:
        alice = self.peer("alice")
        alice.send_raw(ascii_frame({"type": "\x1b[2J\ud800\u202e" + "x" * 5000}))
        error = alice.expect("error")
        self.assertEqual(error["code"], "unknown_type")
        shown = "[2J" + "x" * (socket_server.MAX_QUOTED_LENGTH - 3)
        self.assertEqual(error["text"], f'Unknown message type "{shown}".')

    def test_a_quoted_word_never_doubles_its_quotes(self) -> None:
        alice = self.peer("alice")
        alice.send({"type": "whisper", "to": '"bad', "text": "x"})
        self.assertEqual(alice.expect("error")["text"], """Nobody called '"bad' is here.""")
        quoted = socket_server.quoted
        self.assertEqual(quoted("bob"), '"bob"')
        self.assertEqual(quoted("bob's"), '"bob\'s"')
        self.assertEqual(quoted('say "hi"'), """'say "hi"'""")
        self.assertEqual(quoted('"it\'s"'), '"\\"it\'s\\""')     # both kinds: escaped
        for word in ('"', "'", '""', "'\"'", '"x"', "x" * 39 + '"', '\\"'):
            with self.subTest(word=word):
                shown = quoted(word)
                inner = shown[1:-1].replace('\\"', "")
                self.assertNotIn(shown[0], inner)     # the quote mark never inside, bare

    def test_fifty_clients_at_once(self) -> None:
        peers = [self.peer(f"user{number}") for number in range(55)]
        for peer in peers:
            peer.send({"type": "say", "text": f"from {peer.welcome['name']}"})
        for peer in peers:
            senders = set()
            while len(senders) < len(peers) - 1:
                message = peer.receive()
                if message["type"] == "message":
                    senders.add(message["from"])
            self.assertNotIn(peer.welcome["name"], senders)

    def test_server_shutdown_tells_everyone(self) -> None:
        alice = self.peer("alice")
        self.server.stop()
        messages = alice.read_until_closed()
        self.assertEqual(messages[-1]["type"], "shutdown")

    def test_a_stopping_server_refuses_connections_before_it_says_goodbye(self) -> None:
        # Otherwise a client reconnecting at once is parked in a dying backlog, and a
        # server restarted on the same port finds it still taken.
        attempts = []

        class Recorder(socket_server.ChatServer):
            def shutting_down(self) -> None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
                    attempts.append("accepted")
                except ConnectionRefusedError:
                    attempts.append("refused")
                super().shutting_down()

        server = ServerThread(Recorder)
        port = server.port
        alice = Peer(port, "alice")
        self.addCleanup(alice.close)
        server.stop()
        self.assertEqual(alice.read_until_closed()[-1]["type"], "shutdown")
        self.assertEqual(attempts, ["refused"])


class BadInputTests(ChatTestCase):
    """Each bad input costs its sender the connection and nobody else anything."""

    CASES = [
        ("bad_header", b"hello server\r\n"),
        ("bad_header", b"12x       {}"),
        ("too_large", b"99999999  "),
        ("bad_utf8", b"4         \xff\xfe\xfd\xfc"),
        ("bad_json", b"5         {nope"),
    ]
    # Whole frames of JSON that is no request: refused, and the connection goes on.
    NOT_REQUESTS = [b"7         [1,2,3]", b"2         {}", b'10        {"type":1}',
                    b"4         null"]

    def test_each_bad_input_before_and_after_joining(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        for joined in (False, True):
            for code, data in self.CASES:
                with self.subTest(code=code, data=data, joined=joined):
                    mallory = self.peer("mallory" if joined else None)
                    mallory.send_raw(data)
                    self.assert_rejected(mallory, code)
                    alice.say("still fine")
                    self.assertEqual(bob.expect("message")["text"], "still fine")

    def test_json_that_is_no_request_is_refused_and_the_connection_goes_on(self) -> None:
        bob = self.peer("bob")
        for joined in (False, True):
            for data in self.NOT_REQUESTS:
                with self.subTest(data=data, joined=joined):
                    mallory = self.peer("mallory" if joined else None)
                    mallory.send_raw(data)
                    error = mallory.expect("error")
                    self.assertEqual(error["code"], "bad_message")
                    self.assertNotIn("closing", error)
                    if not joined:
                        mallory.send({"type": "hello", "name": "mallory"})
                        mallory.expect("welcome")
                    mallory.say("still here")
                    self.assertEqual(bob.expect("message")["text"], "still here")
                    mallory.close()
                    bob.expect("leave")

    def test_the_others_are_told_a_plain_reason_and_the_log_the_detail(self) -> None:
        alice, mallory = self.peer("alice"), self.peer("mallory")
        with self.assertLogs("chat", "INFO") as logs:
            mallory.send_raw(b"abcdefghij")
            self.assert_rejected(mallory, "bad_header")
            leave = alice.expect("leave")
        self.assertEqual(leave["reason"], "sent something this server does not understand")
        self.assertTrue(any("mallory left: bad_header: " in line for line in logs.output),
                        logs.output)

    def test_client_vanishing_mid_frame(self) -> None:
        alice, mallory = self.peer("alice"), self.peer("mallory")
        frame = encode_frame({"type": "say", "text": "never finished"})
        mallory.send_raw(frame[:15])
        mallory.close()
        leave = alice.expect("leave")
        self.assertEqual(leave["name"], "mallory")
        self.assertEqual(leave["reason"], "connection lost")
        self.assertNotIn("message", [m["type"] for m in alice.sync()])

    def test_a_peer_that_stops_mid_frame_is_told_so(self) -> None:
        alice, mallory = self.peer("alice"), self.peer("mallory")
        mallory.send_raw(encode_frame({"type": "say", "text": "never finished"})[:15])
        mallory.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(self.assert_rejected(mallory, "truncated")["text"],
                         "the connection closed in the middle of a message")
        self.assertEqual(alice.expect("leave")["reason"], "connection lost")

    def test_half_closed_client_is_seen_leaving(self) -> None:
        alice, mallory = self.peer("alice"), self.peer("mallory")
        mallory.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(alice.expect("leave")["name"], "mallory")
        mallory.read_until_closed()

    def test_bug_in_a_handler_costs_one_message(self) -> None:
        class BrokenCore(socket_server.ChatCore):
            def on_ping(self, session, message):
                raise RuntimeError("bug")

        class BrokenServer(socket_server.ChatServer):
            core_class = BrokenCore

        server = ServerThread(BrokenServer)
        self.addCleanup(server.stop)
        alice, bob = Peer(server.port, "alice"), Peer(server.port, "bob")
        alice.send({"type": "ping"})
        self.assertEqual(alice.expect("error")["code"], "internal_error")
        alice.say("after the bug")
        self.assertEqual(bob.expect("message")["text"], "after the bug")
        alice.close()
        bob.close()


class TransportBookkeepingTests(ChatTestCase):
    """The transport keeps no set of every connection: the selector's map holds them,
    but the paused ones and the lingering ones, which it keeps apart."""

    def connection_of(self, peer: Peer) -> "socket_server.Connection":
        port = peer.sock.getsockname()[1]
        found = [conn for conn in in_loop(self.server, lambda: self.server.server.connections)
                 if conn.port == port]
        self.assertEqual(len(found), 1)
        return found[0]

    def test_a_lingering_connection_closes_at_its_deadline(self) -> None:
        transport = self.server.server
        peer = self.peer()
        conn = self.connection_of(peer)
        peer.sock.sendall(b"nonsense!!")       # a bad header: an error, then a polite close
        self.assertEqual(peer.read_until_closed()[-1]["code"], "bad_header")
        # The peer has not hung up: the server waits for it, until the deadline.
        self.assertIn(conn, in_loop(self.server, lambda: transport.connections))
        self.assertIn(conn, transport._lingering)

        def deadline_passes() -> None:
            conn.deadline = transport.now
            transport._check_closing()
        in_loop(self.server, deadline_passes)
        self.assertTrue(conn.closed)
        self.assertNotIn(conn, in_loop(self.server, lambda: transport.connections))
        self.assertEqual(transport._lingering, set())

    def test_send_many_sends_now_and_queues_behind_what_waits(self) -> None:
        transport = self.server.server
        waiting, idle = self.peer("waiting"), self.peer("idle")
        slow = self.peer("slow", rcvbuf=4096)
        for peer in (waiting, idle, slow):
            peer.sync()     # nothing more on its way to any of them
        conns = [self.connection_of(peer) for peer in (waiting, idle, slow)]
        first = socket_server.encode_event({"type": "pong"})
        shared = socket_server.encode_event({"type": "notice", "text": "for all"})
        burst = b"".join(socket_server.encode_event({"type": "notice", "text": f"{n} " * 200})
                         for n in range(300))      # ~200 KB: more than a small buffer takes

        def one_pass() -> list:
            conns[2].sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            transport.write(conns[0], first)
            transport.send_many(conns[:2], shared)
            transport.send_many(conns[2:], burst)
            return [list(conn.outbox) for conn in conns] + [conns[2] in transport._to_flush]
        waiting_box, idle_box, slow_box, slow_to_flush = in_loop(self.server, one_pass)
        self.assertEqual(waiting_box, [first, shared])  # queued behind what waited
        self.assertEqual(idle_box, [])                  # sent at once
        self.assertEqual(len(slow_box), 1)              # the rest, for _flush()
        self.assertTrue(burst.endswith(slow_box[0]) and len(slow_box[0]) < len(burst))
        self.assertTrue(slow_to_flush)
        self.assertEqual([waiting.receive()["type"] for _ in range(2)], ["pong", "notice"])
        self.assertEqual(idle.receive()["text"], "for all")
        self.assertEqual([slow.receive()["text"].split()[0] for _ in range(300)],
                         [str(n) for n in range(300)])

    def test_a_paused_connection_is_counted_and_closed_at_shutdown(self) -> None:
        transport = self.server.server
        paused, reading = self.peer("paused"), self.peer("reading")
        conn = self.connection_of(paused)
        in_loop(self.server, lambda: transport.pause_reading(conn))
        self.assertIn(conn, in_loop(self.server, lambda: transport.connections))
        self.assertEqual(len(in_loop(self.server, lambda: transport.connections)), 2)
        self.server.stop()
        for peer in (paused, reading):   # each told, then closed
            self.assertEqual(peer.read_until_closed()[-1]["type"], "shutdown")
        self.assertTrue(conn.closed)
        self.assertEqual(transport._paused, set())


class PollerTests(unittest.TestCase):
    """epoll asked directly (Linux) and the selectors module (everywhere else) say
    the same of the same sockets."""

    def check(self, poller_class) -> None:
        poller = poller_class()
        self.addCleanup(poller.close)
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        poller.register(ours, read, "ours")
        self.assertEqual((len(poller), poller.watched()), (1, ["ours"]))
        self.assertEqual(poller.select(0), [])              # nothing to read yet
        theirs.send(b"x")
        self.assertEqual(poller.select(0), [("ours", read)])
        poller.modify(ours, read | write, "still ours")
        self.assertEqual(poller.select(0), [("still ours", read | write)])
        ours.recv(1)
        theirs.close()      # a hang-up reads as readable
        self.assertEqual(poller.select(0), [("still ours", read | write)])
        poller.unregister(ours)
        self.assertEqual((len(poller), poller.watched(), poller.select(0)), (0, [], []))
        with self.assertRaises(KeyError):
            poller.unregister(ours)

    def test_the_selectors_poller(self) -> None:
        self.check(socket_server.SelectorPoller)

    @unittest.skipUnless(hasattr(select, "epoll"), "no epoll on this system")
    def test_the_epoll_poller(self) -> None:
        self.check(socket_server.EpollPoller)


class SelectorsChatServer(socket_server.ChatServer):
    poller_class = socket_server.SelectorPoller


class SelectorsChatTests(ChatTests):
    """The chat over the selectors module, as on macOS and Windows (Linux has epoll)."""
    server_class = SelectorsChatServer


class WritingOutServer(socket_server.ChatServer):
    """A chat server with a small pass output limit that notes, at every write-out,
    how many bytes were queued."""

    output_limit = 100

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.queued_at_write_out: List[int] = []

    def end_of_pass(self) -> None:
        self.queued_at_write_out.append(self._queued)
        super().end_of_pass()


class PassOutputLimitTests(ChatTestCase):
    """A burst of answers in one pass goes out in pieces of about output_limit bytes,
    so that the memory a burst takes does not grow with the burst."""

    server_class = WritingOutServer

    def test_a_burst_of_answers_is_sent_in_pieces(self) -> None:
        transport = self.server.server
        peers = [self.peer(f"p{number}") for number in range(12)]
        gate = threading.Event()
        transport.call_soon(lambda: gate.wait(TIMEOUT))     # the loop waits: requests pile up
        for peer in peers:
            peer.send({"type": "ping"})
        transport.queued_at_write_out.clear()   # the loop is held: nothing else touches it
        gate.set()
        for peer in peers:      # all answered
            peer.expect("pong")
        queued = in_loop(self.server, lambda: list(transport.queued_at_write_out))
        pong = len(socket_server.encode_event({"type": "pong"}))
        self.assertGreaterEqual(sum(queued), 12 * pong)
        self.assertLessEqual(max(queued), transport.output_limit + pong)


class SlowReaderTests(ChatTestCase):
    server_settings = {"max_backlog": 64 * 1024, "max_length": 16000}

    def test_client_that_never_reads_is_cut_off_without_stalling_others(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        sloth = self.peer("sloth", rcvbuf=4096)
        alice.expect("join")
        bob.expect("join")
        text = "x" * 15000
        sent = 0
        left = None
        while left is None and sent < 2000:     # ~30 MB at most; it takes far less
            alice.send({"type": "say", "text": f"{sent} {text}"})
            sent += 1
            while True:
                message = bob.receive()
                if message["type"] == "leave":
                    left = message
                    break
                if message["type"] == "message":
                    self.assertEqual(message["text"].split()[0], str(sent - 1))
                    break
        self.assertIsNotNone(left, "the slow reader was never disconnected")
        self.assertEqual(left["name"], "sloth")
        self.assertIn("too slow", left["reason"])
        alice.say("after")
        while True:     # bob still gets everything, in order
            message = bob.receive()
            if message["type"] == "message" and message["text"] == "after":
                break
        memory = sum(len(b"".join(conn.outbox)) for conn in self.server.server.connections)
        self.assertLess(memory, 1024 * 1024)


class SelectorsSlowReaderTests(SlowReaderTests):
    server_class = SelectorsChatServer


class PingTests(ChatTestCase):
    server_settings = {"ping_after": 0.1, "drop_after": 0.5}

    def test_silent_client_is_pinged_then_dropped(self) -> None:
        alice, ghost = self.peer("alice"), self.peer("ghost")
        self.assertEqual(ghost.receive()["type"], "ping")
        # alice answers every ping; ghost never does.
        while True:
            message = alice.receive()
            if message["type"] == "ping":
                alice.send({"type": "pong"})
            elif message["type"] == "leave":
                break
        self.assertEqual(message["name"], "ghost")
        self.assertIn("no sign of life", message["reason"])
        told = ghost.read_until_closed()[-1]    # told why, in case it can still hear
        self.assertEqual((told["type"], told["code"], told["closing"]),
                         ("error", "timed_out", True))
        alice.send({"type": "who"})
        self.assertEqual(alice.expect("users")["users"], ["alice"])


# ---------------------------------------------------------------------------
# The server as a program
# ---------------------------------------------------------------------------

class ServerProcessTests(unittest.TestCase):
    def start(self, *extra: str) -> "tuple":
        process, port = start_server_process(*extra)
        self.addCleanup(process.kill)
        return process, port

    @unittest.skipUnless(POSIX, "signals are POSIX")
    def test_ctrl_c_and_sigterm_stop_cleanly(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            with self.subTest(signal=signum):
                process, port = self.start()
                peer = Peer(port, "alice")
                process.proc.send_signal(signum)
                messages = peer.read_until_closed()
                peer.close()
                self.assertEqual(messages[-1]["type"], "shutdown")
                self.assertEqual(process.finish(), 0)
                self.assertNotIn("Traceback", process.output("stderr"))

    def test_startup_output(self) -> None:
        process, port = self.start()
        process.wait_for_line("loopback only: other machines cannot reach")
        process.wait_for_line("Ctrl-C")
        # With a room password and IRC: how an IRC client gives it (irssi only says no).
        process, port = self.start("--password", "pw", "--irc-port", "0")
        process.wait_for_line(r"^a room password is required to join$")
        process.wait_for_line(r"^  IRC clients give it as the server password: irssi /connect "
                              r"HOST PORT PASSWORD, WeeChat -password=PASSWORD$")

    def test_port_in_use_is_one_clear_line(self) -> None:
        _, port = self.start()
        second = Process(SERVER_SCRIPT, "--host", "127.0.0.1", "--port", str(port), "--no-history")
        self.addCleanup(second.kill)
        self.assertEqual(second.finish(), 1)
        errors = second.output("stderr").splitlines()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(str(port), errors[0])
        self.assertIn("--port", errors[0])
        # The IRC port taken: that one is named, with its flag.
        third = Process(SERVER_SCRIPT, "--host", "127.0.0.1", "--port", "0", "--irc-port",
                        str(port), "--no-history")
        self.addCleanup(third.kill)
        self.assertEqual(third.finish(), 1)
        errors = third.output("stderr").splitlines()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(f"port {port} is already in use", errors[0])
        self.assertIn("--irc-port", errors[0])

    def test_logs_connections_but_not_message_text(self) -> None:
        process, port = self.start()
        alice, bob = Peer(port, "alice"), Peer(port, "bob")
        alice.say("top secret words")
        bob.expect("message")
        alice.send({"type": "bye"})
        alice.read_until_closed()
        process.wait_for_line(r"alice left: quit", "stderr")
        bob.close()
        alice.close()
        process.proc.terminate()
        process.finish()
        log_text = process.output("stderr")
        self.assertRegex(log_text, r"\d\d:\d\d:\d\d.*joined as alice")
        self.assertNotIn("top secret", log_text)

    def test_ipv6_loopback(self) -> None:
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError:
            self.skipTest("no IPv6 loopback here")
        process = Process(SERVER_SCRIPT, "--host", "::1", "--port", "0", "--no-history")
        self.addCleanup(process.kill)
        port = int(process.wait_for_line(r"^listening on \[::1\]:(\d+)$").group(1))
        peer = Peer(port, "six", host="::1")
        self.assertEqual(peer.welcome["users"], ["six"])
        peer.close()

    def test_help_and_bad_flags(self) -> None:
        for script, flags in ((SERVER_SCRIPT, ["--host", "--port", "--max-clients", "--log-level",
                                               "--max-backlog", "--ping-after", "--drop-after"]),
                              (CLIENT_SCRIPT, ["host", "port", "--name"])):
            result = subprocess.run([sys.executable, script, "--help"], capture_output=True,
                                    text=True, timeout=TIMEOUT)
            self.assertEqual(result.returncode, 0)
            for flag in flags:
                self.assertIn(flag, result.stdout)
        result = subprocess.run([sys.executable, SERVER_SCRIPT, "--port", "70000"],
                                capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--port", result.stderr)


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used so far, from Linux's /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class OutOfFileDescriptorTests(unittest.TestCase):
    FILE_LIMIT = 32         # the server's RLIMIT_NOFILE: room for about 25 connections
    CONNECTIONS = 40        # more than fit, so accept() fails with EMFILE
    # Start the server with its open-file limit lowered, as if the system had run out.
    LIMITED = ("import resource, runpy, sys; "
               "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
               "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), hard)); "
               "sys.argv = sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")

    @long_test
    @unittest.skipUnless(resource is not None and os.path.exists("/proc/self/stat"),
                         "needs the resource module and Linux's /proc")
    def test_pause_after_emfile_does_not_spin_and_accepting_resumes(self) -> None:
        process = Process("-c", self.LIMITED, str(self.FILE_LIMIT), SERVER_SCRIPT,
                          "--host", "127.0.0.1", "--port", "0", "--no-history",
                          "--max-per-address", "0")
        self.addCleanup(process.kill)
        port = int(process.wait_for_line(r"^listening on 127\.0\.0\.1:(\d+)$").group(1))
        fillers = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                   for _ in range(self.CONNECTIONS)]
        for sock in fillers:
            self.addCleanup(sock.close)
        # From one failed accept() to the next lies one whole pause.
        process.wait_for_line("cannot accept connections", "stderr")
        before = cpu_seconds(process.proc.pid)
        process.wait_for_line("cannot accept connections", "stderr")
        spent = cpu_seconds(process.proc.pid) - before
        self.assertLess(spent, socket_server.ACCEPT_PAUSE / 4, "the loop spun while paused")
        for sock in fillers:
            sock.close()
        late = Peer(port, "late")      # accepted once the pause is over
        self.addCleanup(late.close)
        self.assertEqual(late.welcome["name"], "late")


class ArgumentTests(unittest.TestCase):
    """The command line, parsed in this process."""

    def help_text(self) -> str:
        return " ".join(socket_server.build_arg_parser().format_help().split())

    def test_admin_password_help_says_how_op_works(self) -> None:
        text = self.help_text()
        self.assertIn("--admin-password PASSWORD ", text)
        self.assertIn("the client's /op asks for this password (/op PASSWORD works too)", text)

    def refusal(self, *argv: str) -> str:
        """The error line for settings that check_settings refuses (it starts no server)."""
        parser = socket_server.build_arg_parser()
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), self.assertRaises(SystemExit) as stopped:
            socket_server.check_settings(parser, socket_server.settings_from_args(
                parser.parse_args(list(argv))))
        self.assertEqual(stopped.exception.code, 2)
        return stderr.getvalue().splitlines()[-1]

    def test_float_flags_must_be_finite(self) -> None:
        for flag in ("--hello-timeout", "--ping-after", "--drop-after", "--rate-limit",
                     "--lockout"):
            for value in ("nan", "inf", "-inf", "NaN"):
                with self.subTest(flag=flag, value=value):
                    self.assertIn(f"{flag} must be a finite number",
                                  self.refusal(f"{flag}={value}"))
        self.assertIn("--lockout must be more than 0", self.refusal("--lockout", "0"))


class LanAddressTests(unittest.TestCase):
    def test_lan_addresses_are_real_non_loopback_addresses(self) -> None:
        for address in socket_server.lan_addresses():
            self.assertFalse(ipaddress.ip_address(address).is_loopback)

    def test_reach_description(self) -> None:
        self.assertIn("loopback", socket_server.describe_reach("127.0.0.1", 5050)[0])
        self.assertIn("python client.py 10.0.0.5 5050",
                      socket_server.describe_reach("10.0.0.5", 5050)[0])
        lines = socket_server.describe_reach("::", 5050)
        self.assertIn("python client.py localhost 5050", lines[-1])

    def test_the_message_rules_in_force_are_said_at_start(self) -> None:
        describe = lambda **rules: socket_server.describe_rules(settings_for_tests(**rules))
        self.assertIsNone(describe())
        self.assertEqual(describe(blocked_words=["darn", "free money"], no_links=True),
                         "message rules: 2 blocked words or phrases (masked), no links")
        self.assertEqual(describe(blocked_words=["darn"], filter_action="reject",
                                  no_whisper=True),
                         "message rules: 1 blocked word or phrase (refused), no whispers")

    def test_irc_commands_pin_a_tls_certificate_as_each_client_spells_it(self) -> None:
        plain = socket_server.irc_commands("10.0.0.5", 6667)
        self.assertEqual(plain, ["IRC: /connect 10.0.0.5 6667 (irssi), /server add lan "
                                 "10.0.0.5/6667 -notls then /connect lan (WeeChat)"])
        fingerprint = "01716d1b" + "ab" * 28
        irssi, weechat, old_weechat = socket_server.irc_commands("10.0.0.5", 6697, fingerprint)
        # irssi compares pairs in capitals, with colons (tried with irssi 1.4.3); WeeChat
        # takes the hex digits, and before 4.0 (3.8 tried) knows only -ssl.
        self.assertIn("/connect -tls -tls_pinned_cert 01:71:6D:1B:AB:", irssi)
        self.assertTrue(irssi.endswith(":AB 10.0.0.5 6697"), irssi)
        self.assertIn(f"10.0.0.5/6697 -tls -tls_fingerprint={fingerprint} then", weechat)
        self.assertIn(f"10.0.0.5/6697 -ssl -ssl_fingerprint={fingerprint})", old_weechat)


# ---------------------------------------------------------------------------
# History: the sqlite store, replay, /history, /search, --export
# ---------------------------------------------------------------------------

T0 = "2026-01-01T10:00:00.000Z"
T1 = "2026-01-01T11:00:00.000Z"
T2 = "2026-01-01T12:00:00.000Z"


class ChatStoreTests(unittest.TestCase):
    def store(self, path: str = ":memory:") -> socket_server.ChatStore:
        store = socket_server.ChatStore(path)
        self.addCleanup(store.db.close)
        return store

    def test_recent_public_messages_in_order(self) -> None:
        store = self.store()
        for number in range(10):
            store.record(T0, "message", "alice", None, f"m{number}", room="lobby")
        store.record(T0, "whisper", "alice", "bob", "secret")
        store.record(T0, "join", "carol", room="lobby")
        store.record(T0, "message", "bob", None, "elsewhere", room="dev")
        rows = store.recent_public("LOBBY", 3)
        self.assertEqual([row[5] for row in rows], ["m7", "m8", "m9"])
        store.record(T1, "announcement", "server", None, "for every room", room="")
        self.assertEqual([row[5] for row in store.recent_public("dev", 3)],
                         ["elsewhere", "for every room"])
        self.assertEqual(store.recent_public("lobby", 2)[-1][5], "for every room")

    def test_whispers_only_for_their_parties_and_only_after_joining(self) -> None:
        store = self.store()
        store.record(T0, "whisper", "alice", "bob", "old, to the previous bob")
        store.record(T1, "message", "alice", None, "public", room="lobby")
        store.record(T2, "whisper", "alice", "BOB", "to this bob")
        store.record(T2, "whisper", "bob", "alice", "from this bob")
        store.record(T2, "whisper", "alice", "carol", "to carol")
        texts = [row[5] for row in store.recent_for("bob", "lobby", 50, whispers_after=2)]
        self.assertEqual(texts, ["public", "to this bob", "from this bob"])
        texts = [row[5] for row in store.recent_for("dave", "lobby", 50, whispers_after=0)]
        self.assertEqual(texts, ["public"])
        texts = [row[5] for row in store.recent_for("dave", "dev", 50, whispers_after=0)]
        self.assertEqual(texts, [])

    def test_only_whispers_store_a_recipient(self) -> None:
        store = self.store()
        store.record(T0, "message", "alice", None, "to the room", room="lobby")
        store.record(T0, "whisper", "alice", "bob", "to bob")
        store.record(T0, "join", "carol", room="lobby")
        store.commit()
        stored = store.db.execute("SELECT kind, recipient FROM events ORDER BY id").fetchall()
        self.assertEqual(stored, [("message", None), ("whisper", "bob"), ("join", None)])
        self.assertIsNone(store.recent_public("lobby", 5)[0][4])

    def test_a_commit_of_many_rows_keeps_their_order_and_ids(self) -> None:
        store = self.store()
        count = socket_server.STORE_ROWS_PER_INSERT * 2 + 5     # two whole INSERTs and a part
        for number in range(count):
            store.record(T0, "message", "alice", None, f"m{number}", room="lobby")
        self.assertEqual(store.last_id(), count)
        store.commit()
        stored = store.db.execute("SELECT id, text FROM events ORDER BY id").fetchall()
        self.assertEqual(stored, [(number + 1, f"m{number}") for number in range(count)])
        self.assertFalse(store.db.in_transaction)
        store.record(T1, "message", "bob", None, "alone", room="lobby")
        self.assertEqual(store.last_id(), count + 1)
        self.assertEqual(store.recent_public("lobby", 2)[-1][:2], (count + 1, T1))

    def test_rows_of_every_shape_in_one_commit_keep_their_order_and_values(self) -> None:
        # A plain message is queued with fewer values than the other rows (the INSERT
        # writes its kind and its missing recipient): runs of each, some longer than
        # one INSERT, then single rows between them.
        size = socket_server.STORE_ROWS_PER_INSERT
        events = [(T0, "message", "alice", None, f"m{number}", "lobby")
                  for number in range(size + 3)]
        events += [(T0, "join", "bob", None, "", "dev"),
                   (T1, "whisper", "bob", "alice", "psst", None)]
        events += [(T1, "message", "bob", None, f"n{number}", "dev") for number in range(size * 2)]
        events += [(T1, "action", "carol", None, "waves", "lobby"),
                   (T1, "message", "carol", None, "one", "lobby"),
                   (T1, "announcement", "server", None, "hear", socket_server.EVERY_ROOM),
                   (T1, "leave", "bob", None, "gone", None),
                   (T1, "message", "alice", None, "last", "lobby")]
        store = self.store()
        for event in events:
            store.record(*event)
        self.assertEqual(store.last_id(), len(events))
        store.commit()
        self.assertFalse(store.db.in_transaction)
        stored = store.db.execute("SELECT id, ts, kind, sender, recipient, text, room "
                                  "FROM events ORDER BY id").fetchall()
        self.assertEqual(stored, [(number, *event) for number, event in enumerate(events, 1)])

    def test_a_commit_is_one_transaction_whatever_the_shapes_of_its_rows(self) -> None:
        store = self.store()
        store.db.execute("CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.text = 'no' "
                         "BEGIN SELECT RAISE(ABORT, 'refused'); END")
        store.record(T0, "message", "alice", None, "fine", room="lobby")
        store.record(T0, "leave", "alice", None, "no")     # another shape: a second INSERT
        with self.assertLogs("chat", "ERROR"):
            store.commit()
        self.assertFalse(store.db.in_transaction)
        self.assertEqual(store.db.execute("SELECT count(*) FROM events").fetchone(), (0,))

    def test_search_needs_every_word_in_any_case_and_wildcards_are_literal(self) -> None:
        store = self.store()
        store.record(T0, "message", "alice", None, "Lunch at noon?", room="lobby")
        store.record(T0, "message", "bob", None, "no lunch today", room="lobby")
        store.record(T0, "message", "bob", None, "100% sure", room="lobby")
        store.record(T0, "message", "bob", None, "1000 sure", room="lobby")
        store.record(T0, "whisper", "bob", "carol", "lunch secret")
        store.record(T0, "message", "bob", None, "lunch in #dev", room="dev")
        search = lambda *words: [row[5] for row in store.search_for("alice", ["lobby"],
                                                                     list(words), 50, 0)]
        self.assertEqual(search("LUNCH"), ["Lunch at noon?", "no lunch today"])
        everywhere = store.search_for("alice", ["lobby", "dev"], ["lunch"], 50, 0)
        self.assertEqual(len(everywhere), 3)
        self.assertEqual(search("lunch", "noon"), ["Lunch at noon?"])
        self.assertEqual(search("0%"), ["100% sure"])
        self.assertEqual(search("_"), [])
        self.assertEqual(search("secret"), [])

    def test_migrates_every_older_schema(self) -> None:
        latest = len(socket_server.ChatStore.MIGRATIONS)
        for version in range(latest):
            with self.subTest(version=version):
                path = os.path.join(temp_dir(self), "old.sqlite3")

                class OldStore(socket_server.ChatStore):
                    MIGRATIONS = socket_server.ChatStore.MIGRATIONS[:version]

                old = OldStore(path)
                if version >= 1:    # as the server of that version wrote it
                    old.db.execute("INSERT INTO events (ts, kind, sender, text) "
                                   "VALUES (?, 'message', 'alice', 'from an old server')", (T0,))
                old.close()
                store = self.store(path)
                self.assertEqual(store.db.execute("PRAGMA user_version").fetchone()[0], latest)
                if version >= 1:    # from before rooms: in the lobby
                    self.assertEqual(store.recent_public("lobby", 5)[0][5], "from an old server")

    def test_database_from_a_newer_server_is_refused(self) -> None:
        path = os.path.join(temp_dir(self), "new.sqlite3")
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA user_version = 999")
        db.close()
        with self.assertRaisesRegex(socket_server.StoreError, "newer server"):
            socket_server.ChatStore(path)

    def test_unusable_files_are_clear_errors(self) -> None:
        directory = temp_dir(self)
        garbage = os.path.join(directory, "garbage.sqlite3")
        with open(garbage, "wb") as out:
            out.write(b"this is not a database at all" * 100)
        with self.assertRaisesRegex(socket_server.StoreError, "garbage.sqlite3"):
            socket_server.ChatStore(garbage)
        with self.assertRaises(socket_server.StoreError):
            socket_server.ChatStore(os.path.join(directory, "no", "such", "dir.sqlite3"))

    def test_a_room_keeps_one_cached_answer_whatever_the_limits_asked(self) -> None:
        store = self.store(":memory:")
        for number in range(300):
            store.record(T0, "message", "alice", None, f"m{number}", room="lobby")
        store.commit()
        for limit in range(1, 201):
            self.assertEqual([row[-2] for row in store.recent_public("lobby", limit)],
                             [f"m{number}" for number in range(300 - limit, 300)])
        self.assertEqual([(limit, len(rows)) for limit, rows in store._recent_public.values()],
                         [(200, 200)])

    def test_locked_database_at_start_up(self) -> None:
        path = os.path.join(temp_dir(self), "locked.sqlite3")
        holder = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("BEGIN EXCLUSIVE")
        with self.assertRaisesRegex(socket_server.StoreError, "locked"):
            socket_server.ChatStore(path)
        holder.execute("ROLLBACK")

    def test_full_disk_stops_history_not_the_store_user(self) -> None:
        store = self.store(os.path.join(temp_dir(self), "full.sqlite3"))
        page_count = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {page_count + 2}")
        with self.assertLogs("chat", "ERROR") as logs:
            for _ in range(20):
                for number in range(200):
                    store.record(T0, "message", "alice", None, "x" * 1000, room="lobby")
                store.commit()
        self.assertFalse(store.working)
        self.assertIn("without history", logs.output[0])
        self.assertEqual(store.recent_public("lobby", 5), [])
        store.record(T0, "message", "alice", None, "ignored", room="lobby")   # no error, no growth
        self.assertEqual(store._pending, [])


class ExecuteTests(ChatTestCase):
    """ChatServer.execute() carries out the core's actions in order, those that
    carrying out one of them makes too."""

    def test_an_action_that_makes_another_has_it_carried_out(self) -> None:
        alice = self.peer("alice")
        server = self.server.server

        def in_the_loop() -> None:
            session = server.core.members["alice"]
            server._carry_out["test"] = lambda: server.core.send(
                session, {"type": "notice", "text": "made while carrying out"})
            server.core.actions.append(("test",))
            server.execute()
        in_loop(self.server, in_the_loop)
        self.assertIn("made while carrying out", [m.get("text") for m in alice.sync()])


class SendWatchingServer(socket_server.ChatServer):
    """Watches the sends to sockets: those made while rows wait to be committed, and
    the most made to one connection in one loop pass."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sends = self.sends_unstored = self.most_sends_in_a_pass = 0
        self._this_pass: collections.Counter = collections.Counter()     # connection -> sends in this pass

    def _run_once(self) -> None:
        self._this_pass.clear()
        super()._run_once()
        self.most_sends_in_a_pass = max(self.most_sends_in_a_pass,
                                        max(self._this_pass.values(), default=0))

    def deliver_batches(self, at_once: bool = False) -> None:
        self.most_batches = max(getattr(self, "most_batches", 0), len(self._batches))
        super().deliver_batches(at_once)

    def _note_send(self, conn) -> None:
        self.sends += 1
        self.sends_unstored += bool(self.core.store._pending)
        self._this_pass[conn] += 1

    def send_many(self, conns, data: bytes) -> None:
        conns = list(conns)
        sendable = [conn for conn in conns if not conn.outbox and conn.open]
        super().send_many(conns, data)
        for conn in sendable:
            self._note_send(conn)

    def _flush(self, conn) -> None:
        if conn.outbox:
            self._note_send(conn)
        super()._flush(conn)


class SendWatchingTests(ChatTestCase):
    server_class = SendWatchingServer

    def test_nothing_reaches_anyone_before_it_is_stored(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        server = self.server.server
        # In one read: messages to the room, each followed by a whisper to one of its
        # members, whose room batch then goes out before the whisper (in mid-pass).
        alice.send_raw(b"".join(
            encode_frame({"type": "say", "text": f"m{n}"})
            + encode_frame({"type": "whisper", "to": "bob", "text": f"w{n}"})
            for n in range(50)))
        for n in range(50):
            self.assertEqual(bob.expect("message")["text"], f"m{n}")
            self.assertEqual(bob.expect("whisper")["text"], f"w{n}")
            self.assertEqual(carol.expect("message")["text"], f"m{n}")
        counts = in_loop(self.server, lambda: (server.sends, server.sends_unstored))
        self.assertGreater(counts[0], 0)
        self.assertEqual(counts[1], 0, "bytes left before their rows were committed")

    def test_a_pass_of_many_batches_sends_each_connection_one_call(self) -> None:
        server = self.server.server
        watcher = self.peer("watcher")
        newcomers = [self.peer() for _ in range(20)]
        gate = threading.Event()
        server.call_soon(lambda: gate.wait(TIMEOUT))    # the loop waits: the hellos pile up
        for number, peer in enumerate(newcomers):
            peer.send({"type": "hello", "name": f"new{number}"})
        gate.set()
        for peer in newcomers:
            peer.expect("welcome")
        joined = [watcher.expect("join")["name"] for _ in newcomers]
        self.assertEqual(sorted(joined), sorted(f"new{n}" for n in range(20)))
        # One batch, grown by each join; the watcher gets it with one send.
        self.assertEqual(in_loop(self.server, lambda: server.most_sends_in_a_pass), 1)

    def test_a_pass_of_many_rooms_batches_sends_each_connection_one_call(self) -> None:
        server = self.server.server
        watcher = self.peer("watcher")
        speakers = [self.peer(f"speaker{number}") for number in range(10)]
        for number, speaker in enumerate(speakers):
            enter(speaker, f"room{number}")
            enter(watcher, f"room{number}")
        watcher.sync()
        gate = threading.Event()
        server.call_soon(lambda: gate.wait(TIMEOUT))    # the loop waits: the says pile up
        for number, speaker in enumerate(speakers):
            speaker.send({"type": "say", "room": f"room{number}", "text": f"in {number}"})
        gate.set()
        heard = sorted(watcher.expect("message")["text"] for _ in speakers)
        self.assertEqual(heard, sorted(f"in {number}" for number in range(10)))
        # A batch a room, the watcher in each: one send for all of them.
        self.assertGreater(in_loop(self.server, lambda: server.most_batches), 1)
        self.assertEqual(in_loop(self.server, lambda: server.most_sends_in_a_pass), 1)


class HistoryTests(ChatTestCase):
    def test_newcomer_gets_recent_public_messages_first(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        for number in range(3):
            alice.say(f"before {number}")
        bob.send({"type": "whisper", "to": "alice", "text": "private"})
        bob.expect("sent")
        carol = self.peer("carol")
        history = [m for m in carol.replay if m["type"] == "history"]
        self.assertEqual([(m["from"], m["text"]) for m in history],
                         [("alice", "before 0"), ("alice", "before 1"), ("alice", "before 2")])
        self.assertEqual(carol.replay[-1], {"type": "history_end", "for": "join", "count": 3,
                                            "room": "lobby"})

    def test_replay_length_is_a_setting(self) -> None:
        for replay, expected in ((2, ["m3", "m4"]), (0, [])):
            with self.subTest(replay=replay):
                server = ServerThread(history=replay)
                self.addCleanup(server.stop)
                alice = Peer(server.port, "alice")
                self.addCleanup(alice.close)
                for number in range(5):
                    alice.say(f"m{number}")
                bob = Peer(server.port, "bob")
                self.addCleanup(bob.close)
                self.assertEqual([m.get("text") for m in bob.replay], expected + [None])

    def test_history_and_search_on_request(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        alice.say("lunch at noon")
        alice.send({"type": "whisper", "to": "bob", "text": "lunch is on me"})
        alice.expect("sent")
        bob.send({"type": "get_history", "limit": 5})
        frames = [m for m in bob.collect_history() if m["type"].startswith("history")]
        self.assertEqual([m.get("text") for m in frames], ["lunch at noon", "lunch is on me", None])
        self.assertEqual([m.get("kind") for m in frames[:2]], ["message", "whisper"])
        self.assertEqual(frames[-1]["for"], "history")
        carol = self.peer("carol")
        carol.send({"type": "search", "text": "LUNCH"})
        frames = carol.collect_history()
        self.assertEqual([m.get("text") for m in frames], ["lunch at noon", None])
        carol.send({"type": "search", "text": " \t"})
        self.assertEqual(carol.expect("error")["code"], "empty_search")

    def test_a_search_with_too_many_words_is_refused(self) -> None:
        alice = self.peer("alice")
        words = [f"word{number}" for number in range(socket_server.SEARCH_MAX_WORDS + 1)]
        alice.say(" ".join(words[:-1]))
        alice.send({"type": "search", "text": " ".join(words[:-1])})
        self.assertEqual(alice.expect("history_end")["count"], 1)
        alice.send({"type": "search", "text": " ".join(words)})
        answers = alice.sync()
        self.assertEqual([(m["type"], m.get("code")) for m in answers],
                         [("error", "too_many_words")])
        self.assertIn(f"at most {socket_server.SEARCH_MAX_WORDS} words", answers[0]["text"])

    def test_history_limit_is_capped(self) -> None:
        alice = self.peer("alice")
        alice.send_raw(b"".join(encode_frame({"type": "say", "text": f"line {number}"})
                                for number in range(socket_server.HISTORY_MAX + 1)))
        for limit, count in ((10 ** 9, socket_server.HISTORY_MAX), (0, 1), (-5, 1)):
            alice.send({"type": "get_history", "limit": limit})
            self.assertEqual(alice.expect("history_end")["count"], count, limit)

    def test_searching_cannot_take_over_the_loop(self) -> None:
        alice = self.peer("alice")
        store = self.server.server.core.store

        def fill() -> None:     # enough rows that sqlite checks the clock during a search
            for number in range(5000):
                store.record(T0, "message", "bob", None, f"filler {number}", room="lobby")
            store.commit()

        in_loop(self.server, fill)
        saved = socket_server.QUERY_TIME_LIMIT
        socket_server.QUERY_TIME_LIMIT = 1e-9     # every lookup is now too slow
        try:
            alice.send({"type": "search", "text": "something"})
            self.assertEqual(alice.expect("error")["code"], "too_slow")
        finally:
            socket_server.QUERY_TIME_LIMIT = saved
        in_loop(self.server, lambda: self.server.server.core.history.reading_time.spend(10))
        alice.send({"type": "get_history"})
        self.assertEqual(alice.expect("error")["code"], "busy")
        alice.say("the chat goes on")

    def test_whispers_are_not_inherited_with_a_name(self) -> None:
        alice, bob, mallory = self.peer("alice"), self.peer("bob"), self.peer("mallory")
        alice.send({"type": "whisper", "to": "bob", "text": "for the first bob"})
        alice.expect("sent")
        bob.send({"type": "bye"})
        bob.read_until_closed()
        alice.expect("leave")
        impostor = self.peer("bob")
        impostor.send({"type": "get_history"})
        self.assertEqual(impostor.collect_history()[-1]["count"], 0)
        impostor.send({"type": "search", "text": "first"})
        self.assertEqual(impostor.collect_history()[-1]["count"], 0)
        # Nor by someone here all along who takes the name with /nick.
        impostor.send({"type": "bye"})
        impostor.read_until_closed()
        mallory.send({"type": "nick", "name": "bob"})
        self.assertEqual(mallory.expect("nick")["new"], "bob")
        mallory.send({"type": "get_history"})
        self.assertEqual(mallory.collect_history()[-1]["count"], 0)
        mallory.send({"type": "search", "text": "first"})
        self.assertEqual(mallory.collect_history()[-1]["count"], 0)

    def test_history_survives_a_restart(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        first = ServerThread(db=path)
        alice = Peer(first.port, "alice")
        alice.say("remember me")
        alice.close()
        first.stop()
        second = ServerThread(db=path)
        self.addCleanup(second.stop)
        bob = Peer(second.port, "bob")
        self.addCleanup(bob.close)
        self.assertEqual([m.get("text") for m in bob.replay], ["remember me", None])

    def test_group_commit_writes_a_burst_in_few_transactions(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        store = self.server.server.core.store
        before = store.commits
        burst = b"".join(encode_frame({"type": "say", "text": f"burst {n}"}) for n in range(500))
        alice.send_raw(burst)
        for _ in range(500):
            bob.expect("message")
        self.assertLess(store.commits - before, 100)
        bob.send({"type": "get_history", "limit": 200})
        self.assertEqual(bob.collect_history()[-2]["text"], "burst 499")

    def test_no_history_replays_nothing_and_says_so(self) -> None:
        server = ServerThread(keep_history=False)
        self.addCleanup(server.stop)
        alice = Peer(server.port, "alice")
        self.addCleanup(alice.close)
        alice.say("gone with the wind")
        bob = Peer(server.port, "bob")
        self.addCleanup(bob.close)
        self.assertEqual(bob.replay[-1]["count"], 0)
        self.assertIn("no history", bob.replay[-1]["text"])

    def test_no_history_is_said_at_the_first_join_not_after_a_reconnect(self) -> None:
        server = ServerThread(keep_history=False)
        self.addCleanup(server.stop)
        alice = Peer(server.port, "alice")
        self.addCleanup(alice.close)
        self.assertEqual(alice.replay[-1]["text"], "The server keeps no history.")
        alice.reset()       # the network dropped; the client comes back with its token
        back = Peer(server.port)
        self.addCleanup(back.close)
        back.send({"type": "hello", "name": "alice", "resume": alice.welcome["resume"]})
        back.expect("welcome")
        end = back.collect_history()[-1]
        self.assertEqual((end["for"], end.get("text")), ("join", None))
        back.send({"type": "get_history"})      # a question is still answered in full
        self.assertEqual(back.collect_history()[-1]["text"], "The server keeps no history.")

    def test_chat_goes_on_when_the_disk_fills(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        server = ServerThread(db=path)
        self.addCleanup(server.stop)
        alice, bob = Peer(server.port, "alice"), Peer(server.port, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)
        filled = threading.Event()

        def fill_the_disk() -> None:
            db = server.server.core.store.db
            db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
            filled.set()

        server.server.call_soon(fill_the_disk)
        self.assertTrue(filled.wait(TIMEOUT))
        with self.assertLogs("chat", "ERROR"):
            for number in range(300):
                alice.send({"type": "say", "text": f"{number} " + "x" * 1900})
            for number in range(300):
                self.assertEqual(bob.expect("message")["text"].split()[0], str(number))
        self.assertFalse(server.server.core.store.working)
        alice.say("still chatting")
        self.assertEqual(bob.expect("message")["text"], "still chatting")


class HistoryProcessTests(unittest.TestCase):
    def test_kill_9_loses_no_delivered_message(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        process, port = start_server_process("--db", path, "--rate-limit", "0")
        self.addCleanup(process.kill)
        alice, bob = Peer(port, "alice"), Peer(port, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)

        padding = "x" * 1500    # big batches per loop pass: a long commit to be killed in
        burst = b"".join(encode_frame({"type": "say", "text": f"load {number} {padding}"})
                         for number in range(3000))

        def flood() -> None:
            try:
                alice.send_raw(burst)
            except OSError:
                pass    # the server is gone: that is the point

        sender = threading.Thread(target=flood, daemon=True)
        sender.start()
        received = []
        while len(received) < 300:
            message = bob.receive()
            if message["type"] == "message":
                received.append(message["text"])
        process.proc.kill()     # SIGKILL on POSIX: no chance to flush anything
        process.proc.wait(TIMEOUT)
        while True:
            try:
                data = bob.sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            bob.decoder.feed(data)
            received += [m["text"] for m in map(decode_payload, bob.decoder)
                         if m["type"] == "message"]
        sender.join(TIMEOUT)
        db = sqlite3.connect(path)
        stored = {row[0] for row in db.execute("SELECT text FROM events WHERE kind='message'")}
        db.close()
        missing = [text for text in received if text not in stored]
        self.assertEqual(missing, [], f"{len(missing)} of {len(received)} delivered, not stored")

    def test_export(self) -> None:
        directory = temp_dir(self)
        path = os.path.join(directory, "chat.sqlite3")
        server = ServerThread(db=path)
        alice, bob = Peer(server.port, "alice"), Peer(server.port, "bob")
        alice.say("hello bob")
        alice.send({"type": "whisper", "to": "bob", "text": "psst"})
        alice.expect("sent")
        enter(bob, "dev")
        bob.send({"type": "topic", "room": "dev", "text": "release friday"})
        bob.expect("topic")
        bob.send({"type": "nick", "name": "robert"})
        bob.expect("nick")
        alice.expect("nick")    # read all: a close with unread bytes is a reset
        alice.close()
        bob.expect("leave")
        bob.send({"type": "bye", "text": "gone home"})
        bob.read_until_closed()
        bob.close()
        server.stop()
        out = os.path.join(directory, "export.txt")
        for attempt in range(2):
            result = subprocess.run([sys.executable, SERVER_SCRIPT, "--db", path, "--export", out],
                                    capture_output=True, text=True, timeout=TIMEOUT)
            if attempt == 0:
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn("exported", result.stdout)
            else:   # never overwrites
                self.assertEqual(result.returncode, 1)
                self.assertIn("exists", result.stderr)
        with open(out, encoding="utf-8") as exported:
            text = exported.read()
        self.assertRegex(text, r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC  #lobby  \* alice joined")
        self.assertIn("alice: hello bob", text)
        self.assertIn("[whisper alice -> bob] psst", text)
        self.assertIn("* alice left (connection closed)", text)
        self.assertIn("#dev  * bob set the topic: release friday", text)
        self.assertIn("* bob is now known as robert", text)
        self.assertIn("* robert left (gone home)", text)   # a quit's words are kept
        result = subprocess.run([sys.executable, SERVER_SCRIPT, "--db", out + ".missing",
                                 "--export", "-"], capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 1)
        self.assertIn("no history database", result.stderr)
        result = subprocess.run([sys.executable, SERVER_SCRIPT, "--no-history", "--export", "-"],
                                capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 2)   # the two flags contradict: a usage error
        self.assertIn("--no-history keeps no history to export", result.stderr)

    def test_export_writes_utf_8_whatever_the_output_encoding(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        store = socket_server.ChatStore(path)
        store.record(T0, "message", "alice", None, "emoji \U0001f600 and é", room="lobby")
        store.commit()
        store.db.close()
        # As on Windows, where redirected output takes the ANSI code page.
        result = subprocess.run([sys.executable, SERVER_SCRIPT, "--db", path, "--export", "-"],
                                capture_output=True, timeout=TIMEOUT,
                                env=dict(os.environ, PYTHONIOENCODING="cp1252"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("alice: emoji \U0001f600 and é", result.stdout.decode("utf-8"))

    @unittest.skipUnless(POSIX, "a closed pipe is EPIPE on POSIX")
    def test_export_to_a_pipe_closed_early_ends_quietly(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        store = socket_server.ChatStore(path)
        for number in range(2000):      # 2 MB: far more than a pipe holds
            store.record(T0, "message", "alice", None, f"{number} " + "x" * 1000)
        store.close()
        proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, "--db", path, "--export", "-"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        self.assertIn("alice: 0 xxx", proc.stdout.readline().decode())
        proc.stdout.close()     # like "| head -1"
        errors = proc.stderr.read().decode()
        proc.stderr.close()
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertEqual(errors, "")

    def test_corrupt_database_is_a_one_line_error_at_start(self) -> None:
        path = os.path.join(temp_dir(self), "bad.sqlite3")
        with open(path, "wb") as out:
            out.write(b"\0garbage" * 1000)
        result = subprocess.run([sys.executable, SERVER_SCRIPT, "--host", "127.0.0.1",
                                 "--port", "0", "--db", path],
                                capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn("bad.sqlite3", result.stderr)
        self.assertIn("--db", result.stderr)


# ---------------------------------------------------------------------------
# Security: passwords, lockouts, registered names, flood control, TLS, fuzzing
# ---------------------------------------------------------------------------

# Test certificates (EC P-256, valid until 2126), made once with openssl:
# SELF_SIGNED for localhost, 127.0.0.1 and ::1; TEST_CA, and CA_SIGNED (for the
# same names) signed by it. Private keys in a test file protect nothing.
SELF_SIGNED_CERT = """-----BEGIN CERTIFICATE-----
MIIBrjCCAVSgAwIBAgIUZz01rstk6fmRXIR3vSv3K+yCHcswCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTEyNTE1NDE1N1oYDzIxMjYxMTAx
MTU0MTU3WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAAR0GQQToKrkvfBh6hv9b86Dv9mIb+Hi07xLgLiCV/8TN886uPevOpV/
8o29K4/AvUW+81RY1nKVXsu7hQRYbp3wo4GBMH8wHQYDVR0OBBYEFLYaQ55DLOj6
wJSq3KFXP0fCoQxJMB8GA1UdIwQYMBaAFLYaQ55DLOj6wJSq3KFXP0fCoQxJMA8G
A1UdEwEB/wQFMAMBAf8wLAYDVR0RBCUwI4IJbG9jYWxob3N0hwR/AAABhxAAAAAA
AAAAAAAAAAAAAAABMAoGCCqGSM49BAMCA0gAMEUCICeuC8/HNJ6U6VYPLpt+fIsd
kvcckYfA7TAU/fzWhKuxAiEA7YB0b7ryhMSe/jvcKvH25G1GwGV02iUvyGnbk6x/
o/I=
-----END CERTIFICATE-----
"""
SELF_SIGNED_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgBruxpKhIqTWJw11E
hlFoNsBx4sp+pGR3CCMmIKtKjaShRANCAAR0GQQToKrkvfBh6hv9b86Dv9mIb+Hi
07xLgLiCV/8TN886uPevOpV/8o29K4/AvUW+81RY1nKVXsu7hQRYbp3w
-----END PRIVATE KEY-----
"""
SELF_SIGNED_FINGERPRINT = "01716d1b4fe3f09d66331f128fa68d2fbbe14ed898d888a76cf4c00ad2ad9515"
TEST_CA_CERT = """-----BEGIN CERTIFICATE-----
MIIBljCCATugAwIBAgIUaMMGFqrLD+b32QMtXpO9cOxltRwwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMQ2hhdCBUZXN0IENBMCAXDTI2MTEyNTE1NDE1N1oYDzIxMjYx
MTAxMTU0MTU3WjAXMRUwEwYDVQQDDAxDaGF0IFRlc3QgQ0EwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAASpWq3gxreleqkDEtR8hJ7j2EB3K+dZ47vSrSQM/9Ryiye3
9bPKtqt6BxC244IkJPCfbmZWrp7M6HRMIqByjp6Qo2MwYTAdBgNVHQ4EFgQUHYUv
9E/WJ/CFvisjJMDoiZ5DbVYwHwYDVR0jBBgwFoAUHYUv9E/WJ/CFvisjJMDoiZ5D
bVYwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwCgYIKoZIzj0EAwID
SQAwRgIhAJbw1pu5/xul1OQBEvEYSJ7eo2hozQWmrhekvTagpjhIAiEAkKB1n1Ba
42ZpK/0nrpyMTVH/GzRoKsHv78lpILFdyIo=
-----END CERTIFICATE-----
"""
CA_SIGNED_CERT = """-----BEGIN CERTIFICATE-----
MIIBwTCCAWegAwIBAgIUdn6JAxZqxsI7nXVBxvn/bZoM8R4wCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMQ2hhdCBUZXN0IENBMCAXDTI2MTEyNTE1NDE1N1oYDzIxMjYx
MTAxMTU0MTU3WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggq
hkjOPQMBBwNCAAS7b4nY1RmkoxhRBvjb/6zLdf9jw8rWFwzXh+zWyw3OyDcS+gU1
KMv2MMYazaXwk2pWS2iiGQXNphsaD3/t34xto4GRMIGOMCwGA1UdEQQlMCOCCWxv
Y2FsaG9zdIcEfwAAAYcQAAAAAAAAAAAAAAAAAAAAATAJBgNVHRMEAjAAMBMGA1Ud
JQQMMAoGCCsGAQUFBwMBMB0GA1UdDgQWBBTBADjHWEmntSxrkk1pyeyKORxX+jAf
BgNVHSMEGDAWgBQdhS/0T9Yn8IW+KyMkwOiJnkNtVjAKBggqhkjOPQQDAgNIADBF
AiEA45JItLorW7yDXADMrto0/veGh6s9HUGZalgEvf2wZPMCIARpwT8PtwIo6QA0
Qn1feX+LbxeXGHRh06fOfpUuUm32
-----END CERTIFICATE-----
"""
CA_SIGNED_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKMtg8OLJQBpEtS2e
D/FLMxJ8MT6b28E/6nmeHDwjxDahRANCAAS7b4nY1RmkoxhRBvjb/6zLdf9jw8rW
FwzXh+zWyw3OyDcS+gU1KMv2MMYazaXwk2pWS2iiGQXNphsaD3/t34xt
-----END PRIVATE KEY-----
"""


def write_file(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w", encoding="ascii") as out:
        out.write(text)
    return path


class PasswordAndGuardTests(unittest.TestCase):
    def test_hash_and_verify(self) -> None:
        stored = socket_server.hash_password("correct horse")
        self.assertNotIn("correct horse", stored)
        self.assertTrue(stored.startswith("scrypt$"))
        self.assertTrue(socket_server.verify_password("correct horse", stored))
        self.assertFalse(socket_server.verify_password("correct horsE", stored))
        self.assertNotEqual(stored, socket_server.hash_password("correct horse"))   # salted
        for damaged in ("", "scrypt$1$2", "md5$x$y", stored[:-2] + "zz"):
            self.assertFalse(socket_server.verify_password("correct horse", damaged))

    def test_pbkdf2_records_verify_too(self) -> None:
        salt = b"0123456789abcdef"
        digest = hashlib.pbkdf2_hmac("sha256", b"secret pass", salt, 1000)
        stored = f"pbkdf2_sha256$1000${salt.hex()}${digest.hex()}"
        self.assertTrue(socket_server.verify_password("secret pass", stored))
        self.assertFalse(socket_server.verify_password("secret pasS", stored))

    def test_same_secret(self) -> None:
        self.assertTrue(socket_server.same_secret("sesame", "sesame"))
        self.assertFalse(socket_server.same_secret("sesame", "sesame!"))
        self.assertFalse(socket_server.same_secret("", "sesame"))

    def test_guard_slows_then_locks_out_then_forgets(self) -> None:
        guard = socket_server.LoginGuard(max_failures=3, lockout=60, delay=1.0)
        self.assertEqual([guard.failed("h", 0), guard.failed("h", 1)], [1.0, 2.0])
        self.assertEqual(guard.locked_for("h", 1), 0)
        guard.failed("h", 2)
        self.assertEqual(guard.locked_for("h", 2), 60)
        self.assertEqual(guard.locked_for("other", 2), 0)
        self.assertEqual(guard.locked_for("h", 63), 0)
        guard.failed("x", 0)
        self.assertEqual(guard.failed("x", 100), 1.0)  # counting starts again after a quiet while
        guard.forget_old(1000)
        self.assertEqual((guard._failures, guard._locked_until), ({}, {}))

    def test_guard_without_lockouts(self) -> None:
        guard = socket_server.LoginGuard(max_failures=0, lockout=60, delay=1.0)
        for second in range(20):
            guard.failed("h", second)
        self.assertEqual(guard.locked_for("h", 20), 0)

    def test_token_bucket(self) -> None:
        bucket = socket_server.TokenBucket(burst=3, now=0.0)
        self.assertEqual([bucket.take(0.0, 2, 3) for _ in range(4)], [True, True, True, False])
        self.assertTrue(bucket.take(0.5, 2, 3))        # one token back after half a second
        for _ in range(30):                             # a flood piles up strikes
            bucket.take(0.5, 2, 3)
        self.assertGreater(bucket.strikes, socket_server.FLOOD_STRIKES)
        self.assertTrue(bucket.take(100.0, 2, 3))       # and they drain in time
        self.assertEqual(bucket.strikes, 0)


class RoomPasswordTests(ChatTestCase):
    server_settings = {"password": "sesame", "max_failures": 3, "failure_delay": 0.01}

    def hello(self, **fields) -> Peer:
        peer = self.peer()
        peer.send(dict({"type": "hello", "name": "alice"}, **fields))
        return peer

    def test_password_needed_and_checked(self) -> None:
        self.assert_rejected(self.hello(), "password_required")
        self.assert_rejected(self.hello(password="open sesame"), "bad_password")
        peer = self.hello(password="sesame")
        self.assertEqual(peer.expect("welcome")["name"], "alice")

    def test_repeated_failures_lock_the_address_out(self) -> None:
        for _ in range(3):
            self.assert_rejected(self.hello(password="guess"), "bad_password")
        error = self.assert_rejected(self.hello(password="sesame"), "locked_out")
        self.assertIn("5 minutes", error["text"])

    def test_failures_are_answered_ever_more_slowly(self) -> None:
        server = ServerThread(password="sesame", max_failures=0, failure_delay=0.08)
        self.addCleanup(server.stop)
        times = []
        for _ in range(3):
            peer = Peer(server.port)
            started = time.monotonic()
            peer.send({"type": "hello", "name": "x", "password": "wrong"})
            self.assertEqual(peer.expect("error")["code"], "bad_password")
            times.append(time.monotonic() - started)
            peer.close()
        self.assertGreaterEqual(times[0], 0.08)
        self.assertGreaterEqual(times[2], 0.24)

    def test_a_slowed_answer_holds_up_nobody_else(self) -> None:
        server = ServerThread(password="sesame", max_failures=0, failure_delay=3)
        self.addCleanup(server.stop)
        guesser = Peer(server.port)
        self.addCleanup(guesser.close)
        guesser.send({"type": "hello", "name": "x", "password": "wrong"})
        started = time.monotonic()
        alice = Peer(server.port)
        self.addCleanup(alice.close)
        alice.send({"type": "hello", "name": "alice", "password": "sesame"})
        alice.expect("welcome")
        self.assertLess(time.monotonic() - started, 2.0)     # the guesser waits 3 s

    def test_passwords_never_reach_the_log(self) -> None:
        with self.assertLogs("chat", "DEBUG") as logs:
            self.assert_rejected(self.hello(password="wrong-guess-123"), "bad_password")
            self.hello(password="sesame").expect("welcome")
        text = "\n".join(logs.output)
        self.assertIn("failed password", text)
        self.assertNotIn("wrong-guess-123", text)
        self.assertNotIn("sesame", text)


class LockoutTests(ChatTestCase):
    server_settings = {"admin_password": "op-secret", "max_failures": 3,
                       "failure_delay": 0.2}

    def test_joining_again_does_not_reset_the_count(self) -> None:
        for name in ("guess1", "guess2", "guess3"):
            peer = self.peer(name)
            peer.send({"type": "op", "password": "wrong"})
            if name == "guess3":        # told at once, and still in the chat
                error = peer.expect("error")
                self.assertEqual(error["code"], "locked_out")
                self.assertIn("5 minutes", error["text"])
                self.assertNotIn("closing", error)
                peer.send({"type": "say", "text": "still here"})
                self.assertEqual(peer.expect("sent")["type"], "sent")
            else:
                started = time.monotonic()
                self.assertEqual(peer.expect("error")["code"], "bad_admin_password")
                self.assertGreaterEqual(time.monotonic() - started, 0.2)    # answered late
                peer.close()

    def test_a_lockout_under_a_minute_is_told_in_seconds(self) -> None:
        server = ServerThread(admin_password="op-secret", max_failures=1, lockout=20,
                              failure_delay=0.01)
        self.addCleanup(server.stop)
        peer = Peer(server.port, "guess")
        self.addCleanup(peer.close)
        peer.send({"type": "op", "password": "wrong"})
        self.assertIn("try again in 20 seconds", peer.expect("error")["text"])

    def test_durations_in_seconds_under_a_minute_else_in_minutes(self) -> None:
        for seconds, text in ((0.2, "1 second"), (1, "1 second"), (20, "20 seconds"),
                              (59.4, "59 seconds"), (59.6, "1 minute"), (89, "1 minute"),
                              (300, "5 minutes"), (7200, "120 minutes")):
            self.assertEqual(socket_server.duration(seconds), text, seconds)

    def test_a_shut_down_server_remembers_who_was_there(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        first = ServerThread(db=path)
        alice, bob = Peer(first.port, "alice"), Peer(first.port, "bob")
        alice.send({"type": "register", "password": "correct horse"})
        alice.expect("notice")
        bob.say("seen live by alice")
        alice.expect("message")
        first.stop()
        alice.close()
        bob.close()
        second = ServerThread(db=path)
        self.addCleanup(second.stop)
        back = Peer(second.port)
        self.addCleanup(back.close)
        back.send({"type": "hello", "name": "alice", "name_password": "correct horse"})
        back.expect("welcome")
        replay = back.collect_history()
        self.assertNotIn("notice", [m["type"] for m in replay])    # nothing new since


class RegisteredNameTests(ChatTestCase):
    server_settings = {"failure_delay": 0.01, "max_failures": 0}

    def login(self, name: str, name_password: Optional[str] = None) -> Peer:
        peer = self.peer()
        hello = {"type": "hello", "name": name}
        if name_password is not None:
            hello["name_password"] = name_password
        peer.send(hello)
        return peer

    def register(self, peer: Peer, password: str = "correct horse") -> dict:
        peer.send({"type": "register", "password": password})
        return peer.expect("notice")

    def test_unregistering_ends_the_names_lasting_room_operator_status(self) -> None:
        alice = self.peer("alice")
        self.register(alice)
        enter(alice, "ops")     # its maker, registered: an operator that lasts
        alice.send({"type": "part", "room": "ops"})
        alice.expect("leave")
        alice.send({"type": "unregister", "password": "correct horse"})
        self.assertEqual(alice.expect("notice")["code"], "unregistered")
        bystander = self.peer("bystander")  # the first into a room nobody runs now
        self.assertEqual(enter(bystander, "ops")["ops"], ["bystander"])

    def test_register_protects_the_name(self) -> None:
        alice = self.peer("alice")
        self.assertFalse(alice.welcome["registered"])
        self.assertEqual(self.register(alice)["code"], "registered")
        self.assert_rejected(self.login("ALICE"), "name_protected")
        self.assert_rejected(self.login("alice", "wrong horse"), "bad_name_password")
        alice.send({"type": "bye"})
        alice.read_until_closed()
        back = self.login("alice", "correct horse")
        self.assertTrue(back.expect("welcome")["registered"])

    def test_a_hello_checked_on_a_thread_is_answered_before_what_came_with_it(self) -> None:
        alice = self.peer("alice")
        self.register(alice)
        alice.send({"type": "bye"})
        alice.read_until_closed()
        back = self.peer()
        back.send_raw(encode_frame({"type": "hello", "name": "alice",
                                    "name_password": "correct horse"}) +
                      encode_frame({"type": "say", "text": "first words"}))
        self.assertEqual(back.receive()["type"], "welcome")
        self.assertEqual(back.expect("sent")["text"], "first words")

    def test_answers_come_in_the_order_of_the_requests(self) -> None:
        alice = self.peer("alice")
        alice.send_raw(encode_frame({"type": "register", "password": "correct horse"}) +
                       encode_frame({"type": "say", "text": "now registered"}))
        first, second = alice.receive(), alice.receive()
        self.assertEqual((first["type"], first.get("code")), ("notice", "registered"))
        self.assertEqual((second["type"], second["text"]), ("sent", "now registered"))
        # A wrong password is answered after a delay; what follows waits for it.
        alice.send_raw(encode_frame({"type": "unregister", "password": "wrong horse"}) +
                       encode_frame({"type": "say", "text": "after the mistake"}))
        first, second = alice.receive(), alice.receive()
        self.assertEqual((first["type"], first.get("code")), ("error", "bad_name_password"))
        self.assertEqual((second["type"], second["text"]), ("sent", "after the mistake"))

    def test_password_rules_and_double_registration(self) -> None:
        alice = self.peer("alice")
        alice.send({"type": "register", "password": "short"})
        self.assertEqual(alice.expect("error")["code"], "weak_password")
        self.register(alice)
        alice.send({"type": "register", "password": "another one"})
        self.assertEqual(alice.expect("error")["code"], "already_registered")

    def test_owner_logging_in_again_replaces_the_old_session(self) -> None:
        alice = self.peer("alice")
        self.register(alice)
        watcher = self.peer("watcher")
        again = self.login("alice", "correct horse")
        first = again.receive()
        self.assertEqual((first["type"], first.get("name")), ("welcome", "alice"))
        messages = alice.read_until_closed()
        self.assertIn("replaced", [m.get("code") for m in messages])
        self.assertEqual(watcher.expect("leave")["name"], "alice")
        self.assertEqual(watcher.expect("join")["name"], "alice")
        # The new session is not told of the old one's leaving, made in the same step.
        self.assertNotIn("leave", [m["type"] for m in again.sync()])

    def test_change_password_and_unregister(self) -> None:
        alice = self.peer("alice")
        self.register(alice)
        alice.send({"type": "change_password", "password": "wrong", "new_password": "new horse!"})
        self.assertEqual(alice.expect("error")["code"], "bad_name_password")
        alice.send({"type": "change_password", "password": "correct horse",
                    "new_password": "new horse!"})
        self.assertEqual(alice.expect("notice")["code"], "password_changed")
        self.assert_rejected(self.login("alice", "correct horse"), "bad_name_password")
        alice.send({"type": "unregister", "password": "wrong"})
        self.assertEqual(alice.expect("error")["code"], "bad_name_password")
        alice.send({"type": "unregister", "password": "new horse!"})
        self.assertEqual(alice.expect("notice")["code"], "unregistered")
        alice.send({"type": "bye"})
        alice.read_until_closed()
        self.assertFalse(self.peer("alice").welcome["registered"])

    def test_registration_survives_a_restart_and_stores_no_password(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        first = ServerThread(db=path)
        alice = Peer(first.port, "alice")
        self.register(alice, "unguessable words")
        alice.close()
        first.stop()
        with open(path, "rb") as database:
            self.assertNotIn(b"unguessable", database.read())
        second = ServerThread(db=path)
        self.addCleanup(second.stop)
        peer = Peer(second.port)
        self.addCleanup(peer.close)
        peer.send({"type": "hello", "name": "alice"})
        self.assert_rejected(peer, "name_protected")

    def test_returning_name_gets_what_it_missed(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        self.register(alice)
        bob.say("before alice left")
        alice.expect("message")
        alice.send({"type": "bye"})
        alice.read_until_closed()
        bob.expect("leave")
        for number in range(3):
            bob.say(f"missed {number}")
        back = self.login("alice", "correct horse")
        back.expect("welcome")
        replay = back.collect_history()
        shown = [m.get("text") if m["type"] == "history" else m["type"] for m in replay]
        self.assertEqual(shown, ["before alice left", "notice", "missed 0", "missed 1",
                                 "missed 2", "history_end"])
        self.assertEqual(replay[1]["code"], "new_since")

    def test_registered_names_keep_their_whispers_across_visits(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        bob.send({"type": "whisper", "to": "alice", "text": "before registering"})
        bob.expect("sent")
        self.register(alice)
        bob.send({"type": "whisper", "to": "alice", "text": "after registering"})
        bob.expect("sent")
        alice.send({"type": "bye"})
        alice.read_until_closed()
        back = self.login("alice", "correct horse")
        back.expect("welcome")
        back.collect_history()
        back.send({"type": "get_history"})
        texts = [m.get("text") for m in back.collect_history() if m["type"] == "history"]
        self.assertEqual(texts, ["after registering"])


class FloodTests(ChatTestCase):
    server_settings = {"rate_limit": 5, "rate_burst": 3}

    def test_over_the_rate_is_refused_then_flooders_are_cut_off(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        self.assertEqual(alice.welcome["limits"], {"max_length": 2000, "rate": 5, "burst": 3})
        for number in range(3):
            alice.send({"type": "say", "text": f"burst {number}"})
        alice.send({"type": "say", "text": "one too many"})
        self.assertEqual(alice.expect("error")["code"], "rate_limited")
        self.assertEqual([bob.expect("message")["text"] for _ in range(3)],
                         ["burst 0", "burst 1", "burst 2"])
        flood = b"".join(encode_frame({"type": "say", "text": "x"}) for _ in range(200))
        alice.send_raw(flood)
        self.assertEqual(alice.read_until_closed()[-1]["code"], "flooding")
        self.assertEqual(bob.expect("leave")["reason"], "sent too fast")

    def test_every_frame_is_metered_even_those_of_unknown_types(self) -> None:
        mallory, bob = self.peer("mallory"), self.peer("bob")
        mallory.send_raw(b"".join(encode_frame({"type": "nonsense"}) for _ in range(500)))
        codes = [m["code"] for m in mallory.read_until_closed() if m["type"] == "error"]
        self.assertLessEqual(codes.count("unknown_type"), 5)    # the burst, and a refill
        self.assertIn("rate_limited", codes)
        self.assertEqual(codes[-1], "flooding")
        self.assertEqual(bob.expect("leave")["reason"], "sent too fast")

    def test_pongs_are_metered_too(self) -> None:
        mallory = self.peer("mallory")
        mallory.send_raw(encode_frame({"type": "pong"}) * 500)
        codes = [m["code"] for m in mallory.read_until_closed() if m["type"] == "error"]
        self.assertEqual(codes[-1], "flooding")
        self.assertLess(len(codes), 100, codes[:5])

    def test_a_select_based_server_stays_under_its_socket_limit(self) -> None:
        in_loop(self.server, lambda: setattr(self.server.server, "socket_limit", 5))
        held = [self.peer(f"user{n}") for n in range(3)]
        extra = self.peer()
        extra.sock.settimeout(TIMEOUT)
        self.assertEqual(extra.sock.recv(100), b"")     # closed at once, before any frame
        held[0].say("the others are fine")

    def test_per_address_limit(self) -> None:
        server = ServerThread(max_per_address=2)
        self.addCleanup(server.stop)
        first, second = Peer(server.port), Peer(server.port)
        third = Peer(server.port)
        self.assert_rejected(third, "too_many_connections")
        for peer in (first, second, third):
            peer.close()

    def test_a_thousand_silent_connections_cannot_lock_others_out(self) -> None:
        try:
            import resource
        except ImportError:
            self.skipTest("no resource module to check the file limit")
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2500:
            self.skipTest("the open-file limit is too low for 1000 connections here")
        try:
            probes = [socket.socket() for _ in range(2)]
            probes[0].bind(("127.0.0.2", 0))
            probes[1].bind(("127.0.0.3", 0))
        except OSError:
            self.skipTest("no 127.0.0.2 loopback address here")
        finally:
            for probe in probes:
                probe.close()
        server = ServerThread(max_per_address=20, hello_timeout=30)
        self.addCleanup(server.stop)
        silent = []
        self.addCleanup(lambda: [sock.close() for sock in silent])
        for _ in range(1000):
            silent.append(socket.create_connection(("127.0.0.1", server.port)))
        people = []
        for address, name in (("127.0.0.2", "alice"), ("127.0.0.3", "bob")):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT,
                                            source_address=(address, 0))
            peer = Peer.__new__(Peer)
            peer.sock, peer.decoder = sock, FrameDecoder()
            peer.send({"type": "hello", "name": name})
            peer.welcome = peer.expect("welcome")
            peer.collect_history()
            people.append(peer)
            self.addCleanup(peer.close)
        alice, bob = people
        alice.say("still reachable")
        self.assertEqual(bob.expect("message")["text"], "still reachable")
        self.assertLessEqual(server.server.core.connected(), 22)


class TlsTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls._directory = tempfile.TemporaryDirectory()
        directory = cls._directory.name
        cls.self_signed = (write_file(directory, "self.crt", SELF_SIGNED_CERT),
                           write_file(directory, "self.key", SELF_SIGNED_KEY))
        cls.ca_signed = (write_file(directory, "signed.crt", CA_SIGNED_CERT),
                         write_file(directory, "signed.key", CA_SIGNED_KEY))
        cls.ca_file = write_file(directory, "ca.crt", TEST_CA_CERT)

    @classmethod
    def tearDownClass(cls) -> None:
        cls._directory.cleanup()

    def server(self, cert: tuple, hello_timeout: float = 3.0) -> ServerThread:
        server = ServerThread(tls_cert=cert[0], tls_key=cert[1], hello_timeout=hello_timeout,
                              max_length=16000)
        self.addCleanup(server.stop)
        return server

    def options(self, **changes) -> "client.TlsOptions":
        return client.TlsOptions(known_hosts=os.path.join(temp_dir(self), "known"), **changes)

    def join(self, server: ServerThread, name: str, tls: "client.TlsOptions",
             notes: Optional[list] = None):
        connection = client.ServerConnection.open(
            "127.0.0.1", server.port, tls, note=(notes if notes is not None else []).append)
        self.addCleanup(connection.close)
        connection.send({"type": "hello", "name": name})
        self.assertEqual(connection.receive()["type"], "welcome")
        return connection

    def test_fingerprint_matches_openssl(self) -> None:
        self.assertEqual(socket_server.certificate_fingerprint(self.self_signed[0]),
                         SELF_SIGNED_FINGERPRINT)

    def test_trust_on_first_use_then_refuse_a_change(self) -> None:
        server = self.server(self.self_signed)
        tls = self.options()
        notes: List[str] = []
        alice = self.join(server, "alice", tls, notes)
        self.assertIn(SELF_SIGNED_FINGERPRINT, notes[0])
        with open(tls.known_hosts, encoding="utf-8") as known:
            self.assertIn(f"127.0.0.1:{server.port} {SELF_SIGNED_FINGERPRINT}", known.read())
        notes.clear()
        bob = self.join(server, "bob", tls, notes)
        self.assertEqual(notes, [])     # known and unchanged: nothing to say
        bob.send({"type": "say", "text": "é" * 15000})   # 30 KB: more than one TLS record
        while True:
            message = alice.receive()
            if message["type"] == "message":
                break
        self.assertEqual(len(message["text"]), 15000)
        client.remember_host(tls.known_hosts, f"127.0.0.1:{server.port}", "ab" * 32,
                             notes.append)
        later_run = dataclasses.replace(tls, trusted=None)    # the client started again
        with self.assertRaises(client.CannotConnect) as caught:
            client.ServerConnection.open("127.0.0.1", server.port, later_run, note=notes.append)
        self.assertIn("WARNING", str(caught.exception))
        self.assertIn(SELF_SIGNED_FINGERPRINT, str(caught.exception))

    def test_first_contact_asks_before_trusting(self) -> None:
        server = self.server(self.self_signed)
        questions: List[str] = []
        declined = self.options(confirm=lambda question: questions.append(question) or False)
        notes: List[str] = []
        with self.assertRaises(client.CannotConnect) as caught:
            client.ServerConnection.open("127.0.0.1", server.port, declined, note=notes.append)
        self.assertIn("not trusted", str(caught.exception))
        self.assertIn(SELF_SIGNED_FINGERPRINT, notes[0])    # shown before the question
        self.assertEqual(len(questions), 1)
        self.assertFalse(os.path.exists(declined.known_hosts))
        accepted = self.options(confirm=lambda question: True)
        self.join(server, "alice", accepted)
        with open(accepted.known_hosts, encoding="utf-8") as known:
            self.assertIn(SELF_SIGNED_FINGERPRINT, known.read())
        nowhere = client.TlsOptions(known_hosts=os.path.join(temp_dir(self), "no", "known"))
        notes.clear()
        connection = client.ServerConnection.open("127.0.0.1", server.port, nowhere,
                                                  note=notes.append)
        connection.close()
        self.assertTrue(any("cannot remember the fingerprint" in note for note in notes))
        self.assertFalse([note for note in notes if "remembered in" in note], notes)

    def test_a_slow_answer_to_the_trust_question_still_joins(self) -> None:
        gave_up = threading.Event()

        class Impatient(socket_server.ChatServer):
            def connection_lost(self, conn, reason: str) -> None:
                if "hello" in reason:
                    gave_up.set()
                super().connection_lost(conn, reason)

        server = ServerThread(Impatient, tls_cert=self.self_signed[0],
                              tls_key=self.self_signed[1], hello_timeout=0.2)
        self.addCleanup(server.stop)
        # The user thinks until the server has given up waiting for a hello.
        tls = self.options(confirm=lambda question: gave_up.wait(TIMEOUT))
        self.join(server, "alice", tls)

    def test_a_session_keeps_its_server_even_when_nothing_can_be_remembered(self) -> None:
        first, other = self.server(self.self_signed), self.server(self.ca_signed)
        tls = self.options()
        tls.known_hosts = os.path.join(temp_dir(self), "no such folder", "known")
        notes: List[str] = []
        self.join(first, "alice", tls, notes)
        self.assertTrue(any("cannot remember" in note for note in notes), notes)
        self.join(first, "bob", tls)        # reconnecting: the same certificate passes
        with self.assertRaises(client.CannotConnect) as caught:
            client.ServerConnection.open("127.0.0.1", other.port, tls, note=notes.append)
        self.assertIn("the server this session joined", str(caught.exception))

    def test_a_certificate_changed_while_away_is_shown_once_and_ends_the_session(self) -> None:
        first = self.server(self.self_signed)
        port = first.port
        tls = self.options(pinned=SELF_SIGNED_FINGERPRINT)

        def rejoin(name: str, resume: Optional[str], rooms: list):
            return client.join("127.0.0.1", port, name, client.Credentials(resume=resume), tls,
                               rooms)

        connection, welcome = rejoin("bot", None, ["lobby"])
        lost = threading.Event()
        session = client.ChatSession(connection, welcome, f"127.0.0.1:{port}", make_screen(),
                                     on_lost=lost.set, rejoin=rejoin)
        self.addCleanup(session.leave)
        session.start()
        first.stop()        # and the server comes back at once, with another certificate
        self.addCleanup(ServerThread(tls_cert=self.ca_signed[0], tls_key=self.ca_signed[1],
                                     port=port).stop)
        self.assertTrue(lost.wait(TIMEOUT), "it kept trying what cannot succeed")
        lines = session.screen.out.lines
        self.assertEqual(sum("WARNING" in line for line in lines), 1, lines)   # once, whole
        self.assertIn("  Someone may be intercepting this connection, or the server has a "
                      "new certificate.", lines)
        self.assertIn(f'    python client.py "127.0.0.1:{port}#', "\n".join(lines))
        self.assertFalse([line for line in lines if "attempt 2" in line], lines)
        self.assertEqual(lines[-1], "! not reconnecting: the server's certificate has changed")

    def test_tls_options_that_cannot_work_are_usage_errors(self) -> None:
        port = free_port()      # nothing listens: connecting would be refused
        for options, shown in ((["--insecure", "--cafile", __file__], "--insecure checks no"),
                               (["--cafile", os.path.join(HERE, "no", "ca.pem")],
                                "no such file")):
            with self.subTest(options=options):
                bot = Process(CLIENT_SCRIPT, "127.0.0.1", str(port), "--name", "bot",
                              *options, stdin_data="hi\n")
                self.addCleanup(bot.kill)
                self.assertEqual(bot.finish(), 2)
                lines = bot.output("stderr").splitlines()
                self.assertEqual(len(lines), 1, lines)
                self.assertIn(shown, lines[0])

    def test_a_certificate_that_cannot_be_used_names_the_file_and_the_fix(self) -> None:
        cert, key = self.self_signed
        missing = os.path.join(HERE, "no", "such.pem")
        for files, shown in (((missing, None), f"cannot read --tls-cert {missing}: "),
                             ((cert, missing), f"cannot read --tls-key {missing}: "),
                             ((cert, None), "no private key in it; give --tls-key"),
                             ((key, key), "no PEM certificate in it"),
                             ((cert, self.ca_signed[1]), "--tls-key " + self.ca_signed[1]
                              + " is not the key of that certificate")):
            with self.subTest(files=files):
                settings = settings_for_tests(tls_cert=files[0], tls_key=files[1])
                with self.assertRaises(socket_server.CannotStart) as caught:
                    socket_server.open_server(settings)
                self.assertIn(shown, str(caught.exception))
                self.assertNotIn("_ssl.c", str(caught.exception))

    def test_a_join_string_without_a_possible_fingerprint_is_a_usage_error(self) -> None:
        port = free_port()      # nothing listens: connecting would be refused
        for target, shown in ((f"127.0.0.1:{port}#abc", '"abc" is not'),
                              (f"127.0.0.1:{port}#", "nothing")):
            with self.subTest(target=target):
                bot = Process(CLIENT_SCRIPT, target, "--name", "bot", stdin_data="hi\n")
                self.addCleanup(bot.kill)
                self.assertEqual(bot.finish(), 2)
                lines = bot.output("stderr").splitlines()
                self.assertEqual(len(lines), 1, lines)
                self.assertTrue(lines[0].startswith(f'client.py: error: the join string '
                                                    f'"{target}" has '), lines)
                self.assertIn(shown, lines[0])

    def test_an_unreadable_known_hosts_file_is_one_line(self) -> None:
        server = self.server(self.self_signed)
        bot = Process(CLIENT_SCRIPT, "127.0.0.1", str(server.port), "--tls", "--name", "bot",
                      "--known-hosts", temp_dir(self), stdin_data="hi\n")
        self.addCleanup(bot.kill)
        self.assertEqual(bot.finish(), 1)
        self.assertIn("cannot read the known-hosts file", bot.output("stderr"))
        self.assertNotIn("Traceback", bot.output("stderr"))

    def test_pinned_fingerprint(self) -> None:
        server = self.server(self.self_signed)
        pinned = ":".join(SELF_SIGNED_FINGERPRINT[i:i + 2].upper() for i in range(0, 64, 2))
        self.join(server, "alice", self.options(pinned=pinned))
        with self.assertRaises(client.CannotConnect) as caught:
            client.ServerConnection.open("127.0.0.1", server.port,
                                         self.options(pinned="00" * 32))
        self.assertIn("join string", str(caught.exception))

    def test_ca_file_verification(self) -> None:
        signed = self.server(self.ca_signed)
        self.join(signed, "alice", self.options(cafile=self.ca_file))
        self_signed = self.server(self.self_signed)
        with self.assertRaises(client.CannotConnect) as caught:
            client.ServerConnection.open("127.0.0.1", self_signed.port,
                                         self.options(cafile=self.ca_file))
        self.assertIn("cannot verify", str(caught.exception))

    def test_insecure_warns(self) -> None:
        notes: List[str] = []
        connection = self.join(self.server(self.self_signed), "alice",
                               self.options(insecure=True), notes)
        self.assertIn("WARNING", notes[0])
        self.assertEqual(connection.encryption, "encrypted with TLS, but the server's identity "
                         "is not checked (--insecure)")

    def test_ca_verified_connections_say_so(self) -> None:
        connection = self.join(self.server(self.ca_signed), "alice",
                               self.options(cafile=self.ca_file))
        self.assertRegex(connection.encryption, r"^encrypted with TLS; certificate fingerprint: "
                                                r"[0-9a-f]{64}, verified with .*ca\.crt$")

    def test_wrong_side_plain_text_or_tls(self) -> None:
        server = self.server(self.self_signed)
        plain = Peer(server.port)
        self.addCleanup(plain.close)
        plain.send({"type": "hello", "name": "alice"})
        self.assertIn("--tls", plain.expect("error")["text"])
        plain_server = ServerThread()
        self.addCleanup(plain_server.stop)
        with self.assertRaises(client.CannotConnect) as caught:
            client.ServerConnection.open("127.0.0.1", plain_server.port, self.options())
        self.assertIn("does not answer TLS", str(caught.exception))

    def test_irc_over_tls_and_a_plain_irc_client_told_how(self) -> None:
        server = ServerThread(tls_cert=self.self_signed[0], tls_key=self.self_signed[1],
                              irc_port=0, server_name="test.lan")
        self.addCleanup(server.stop)
        port = server.server.irc_address[1]
        alice = IrcPeer(port, "alice", tls=True)
        self.addCleanup(alice.close)
        alice.send("JOIN #lobby")
        alice.expect(r" 366 alice #lobby ")
        plain = IrcPeer(port)
        self.addCleanup(plain.close)
        plain.send("NICK bob")
        lines = plain.read_until_closed()
        self.assertIn("irssi: /connect -tls", lines[0])
        self.assertTrue(lines[-1].startswith("ERROR :Closing Link"), lines)

    def test_stalled_handshakes_block_nobody(self) -> None:
        server = self.server(self.self_signed, hello_timeout=0.8)
        stalled = []
        for _ in range(5):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"\x16\x03\x01\x02\x00")     # the start of a ClientHello, then nothing
            stalled.append(sock)
        self.addCleanup(lambda: [sock.close() for sock in stalled])
        started = time.monotonic()
        alice = self.join(server, "alice", self.options(insecure=True), [])
        self.assertLess(time.monotonic() - started, 0.7)     # before the stalled ones end
        alice.send({"type": "ping"})
        self.assertIn(alice.receive()["type"], ("room", "history_end", "pong"))
        for sock in stalled:    # and the hello timeout ends them
            sock.settimeout(TIMEOUT)
            self.assertIn(sock.recv(100), (b"",))

    def test_replies_after_bye_still_arrive_over_tls(self) -> None:
        server = self.server(self.self_signed)
        connection = self.join(server, "alice", self.options(insecure=True), [])
        connection.send({"type": "say", "text": "last words"})
        connection.send({"type": "bye"})
        connection.finish_sending()
        kinds = []
        with self.assertRaises(client.ConnectionClosed):
            while True:
                kinds.append(connection.receive()["type"])
        self.assertIn("sent", kinds)

    def test_the_server_ends_a_tls_stream_with_close_notify(self) -> None:
        server = self.server(self.self_signed)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        with context.wrap_socket(raw, suppress_ragged_eofs=False) as sock:
            sock.sendall(encode_frame({"type": "hello", "name": "alice"}) +
                         encode_frame({"type": "bye"}))
            received = b""
            while True:     # an end without close_notify raises SSLEOFError here instead
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        self.assertIn(b'"welcome"', received)

    def test_a_tls_reader_that_falls_behind_gets_everything_in_order(self) -> None:
        server = self.server(self.self_signed)
        alice = self.join(server, "alice", self.options(insecure=True))
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(TIMEOUT)
        raw.connect(("127.0.0.1", server.port))
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        bob = context.wrap_socket(raw)
        self.addCleanup(bob.close)
        bob.sendall(encode_frame({"type": "hello", "name": "bob"}))
        decoder = FrameDecoder()

        def frames():
            while True:
                for payload in decoder:
                    yield decode_payload(payload)
                decoder.feed(bob.recv(65536))
        incoming = frames()
        while next(incoming)["type"] != "history_end":
            pass
        port = bob.getsockname()[1]
        in_loop(server, lambda: [conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                                 for conn in server.server.connections if conn.port == port])
        # Bob reads nothing until alice has all her answers: his share waits in the
        # server, sent by TLS writes that the full socket cuts short or refuses.
        for number in range(40):
            alice.send({"type": "say", "text": f"{number} " + "x" * 10000})
        answered = 0
        while answered < 40:
            answered += alice.receive()["type"] == "sent"
        heard = []
        while len(heard) < 40:
            frame = next(incoming)
            if frame["type"] == "message":
                heard.append(frame["text"])
        self.assertEqual([text.split()[0] for text in heard], [str(n) for n in range(40)])
        self.assertTrue(all(text.endswith("x" * 10000) for text in heard))

    def test_client_program_with_the_servers_join_string(self) -> None:
        directory = temp_dir(self)
        process, port = start_server_process("--tls-cert", self.self_signed[0],
                                             "--tls-key", self.self_signed[1])
        self.addCleanup(process.kill)
        join_string = process.wait_for_line(r'join with: python client\.py "(.+)" --tls').group(1)
        self.assertEqual(join_string, f"127.0.0.1:{port}#{SELF_SIGNED_FINGERPRINT}")
        process.wait_for_line("certificate fingerprint: " + SELF_SIGNED_FINGERPRINT)
        watcher = client.ServerConnection.open("127.0.0.1", port, self.options(insecure=True),
                                               note=lambda text: None)
        self.addCleanup(watcher.close)
        watcher.send({"type": "hello", "name": "watcher"})
        bot = Process(CLIENT_SCRIPT, join_string, "--name", "bot", "--known-hosts",
                      os.path.join(directory, "known"), "--show-chat", stdin_data="over TLS\n")
        self.addCleanup(bot.kill)
        self.assertEqual(bot.finish(), 0, bot.output("stderr"))
        self.assertIn(f"-!- encrypted with TLS; certificate fingerprint: {SELF_SIGNED_FINGERPRINT}",
                      bot.output().splitlines())     # said once, when joining
        while True:
            message = watcher.receive()
            if message["type"] == "message":
                break
        self.assertEqual(message["text"], "over TLS")


class ClientCredentialTests(ChatTestCase):
    server_settings = {"password": "sesame", "failure_delay": 0.01}

    def test_room_password_from_the_environment_or_flag(self) -> None:
        for extra, environment in ((["--password", "sesame"], {}), ([], {"CHAT_PASSWORD": "sesame"})):
            os.environ.update(environment)
            try:
                bot = Process(CLIENT_SCRIPT, "127.0.0.1", str(self.port), "--name", "bot", *extra,
                              stdin_data="hi\n")
            finally:
                for key in environment:
                    del os.environ[key]
            self.addCleanup(bot.kill)
            self.assertEqual(bot.finish(), 0, bot.output("stderr"))

    def test_a_password_check_that_takes_a_while_is_noted_once(self) -> None:
        # A wrong password is answered 1 to 5 s late, on purpose: the user is told why
        # nothing happens, once, and a right one (answered at once) says nothing.
        server = ServerThread(password="sesame", failure_delay=0.3)
        self.addCleanup(server.stop)
        notes, note_after = [], client.PASSWORD_NOTE_AFTER
        client.PASSWORD_NOTE_AFTER = 0.1       # under the server's delay, for a short test
        try:
            with self.assertRaises(client.JoinRefused) as refused:
                client.join("127.0.0.1", server.port, "bot",
                            client.Credentials(password="guess"),
                            on_slow=lambda: notes.append("checking"))
        finally:
            client.PASSWORD_NOTE_AFTER = note_after
        self.assertEqual(refused.exception.code, "bad_password")
        self.assertEqual(notes, ["checking"])
        connection, _ = client.join("127.0.0.1", server.port, "bot",
                                    client.Credentials(password="sesame"),
                                    on_slow=lambda: notes.append("again"))
        connection.close()
        self.assertEqual(notes, ["checking"])

    def test_missing_password_without_a_terminal_explains_itself(self) -> None:
        bot = Process(CLIENT_SCRIPT, "127.0.0.1", str(self.port), "--name", "bot", stdin_data="")
        self.addCleanup(bot.kill)
        self.assertEqual(bot.finish(), 1)
        self.assertIn("needs a password", bot.output("stderr"))
        self.assertIn("CHAT_PASSWORD", bot.output("stderr"))


class FuzzTests(unittest.TestCase):
    """Thousands of random and mutated frames from several connections at once.

    Seeded: set CHAT_FUZZ_SEED to replay a failure (the seed is in the message),
    and CHAT_FUZZ_FRAMES for a longer run.
    """

    SEED = int(os.environ.get("CHAT_FUZZ_SEED", "20261125"))
    ATTACKERS = 4
    FRAMES_EACH = int(os.environ.get("CHAT_FUZZ_FRAMES",            # per attacker
                                     "800" if LONG_TESTS else "150"))
    TYPES = ["hello", "say", "whisper", "who", "get_history", "search", "ping", "pong", "bye",
             "register", "unregister", "change_password", "nonsense", ""]

    def random_value(self, rng: random.Random, depth: int = 0):
        choice = rng.randrange(9 if depth < 3 else 6)
        if choice == 0:
            return rng.randint(-2 ** 70, 2 ** 70)
        if choice == 1:
            return rng.random() * 1e300
        if choice in (2, 3):
            alphabet = "ab \x00\x1b[2J\x07\n\t\u202e\ud800é日🎉\u200d/\\\"" + "x" * 5
            return "".join(rng.choice(alphabet) for _ in range(rng.randrange(40)))
        if choice == 4:
            return rng.choice([None, True, False])
        if choice == 5:
            return rng.choice(["alice", "bob", "x" * 40, "", "Server"])
        if choice in (6, 7):
            return [self.random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
        return {str(self.random_value(rng, depth + 1))[:10]: self.random_value(rng, depth + 1)
                for _ in range(rng.randrange(4))}

    def random_frame(self, rng: random.Random) -> "tuple":
        """(bytes, whether the framing is intact) for one random or damaged frame."""
        kind = rng.randrange(10)
        message = {"type": rng.choice(self.TYPES)}
        for field in ("name", "text", "to", "password", "new_password", "limit"):
            if rng.random() < 0.5:
                message[field] = self.random_value(rng)
        if kind == 0:
            message = self.random_value(rng)
        try:
            frame = encode_frame(message)
        except (ValueError, TypeError):
            frame = encode_frame({"type": "say", "text": repr(message)[:1000]})
        if kind in (1, 2):      # a few bytes changed anywhere, header included
            data = bytearray(frame)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            return bytes(data), False
        if kind == 3:           # cut short
            return frame[:rng.randrange(len(frame))], False
        if kind == 4:           # a lying header
            return f"{rng.randrange(10 ** 9):<10}".encode() + frame[10:], False
        if kind == 5:           # noise
            return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), False
        return frame, True

    @staticmethod
    def round_trip(sock: socket.socket) -> bool:
        """Ping and read up to the pong: True if the connection is still usable."""
        sock.sendall(encode_frame({"type": "ping"}))
        decoder = FrameDecoder()
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return False
            decoder.feed(data)
            for payload in decoder:
                if decode_payload(payload)["type"] == "pong":
                    return True

    def attack(self, port: int, seed: int, stop: threading.Event) -> None:
        """Send FRAMES_EACH frames, each one really handled by the server.

        A frame that breaks the framing ends its connection (what follows
        would only be read as part of it); after a well-framed one, a ping
        round trip shows whether the server kept the connection.
        """
        rng = random.Random(seed)
        sock = None
        for _ in range(self.FRAMES_EACH):
            if stop.is_set():
                break
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
                    if rng.random() < 0.8:
                        sock.sendall(encode_frame({"type": "hello",
                                                   "name": f"fz{rng.randrange(10 ** 6)}"}))
                frame, intact = self.random_frame(rng)
                sock.sendall(frame)
                if intact and self.round_trip(sock):
                    continue
            except (OSError, ProtocolError):
                pass
            if sock is not None:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def test_random_and_mutated_frames(self) -> None:
        server = ServerThread(max_per_address=0, failure_delay=0.001, hello_timeout=1,
                              rate_limit=1000, rate_burst=1000)
        self.addCleanup(server.stop)
        alice, bob = Peer(server.port, "alice"), Peer(server.port, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)
        stop = threading.Event()
        attackers = [threading.Thread(target=self.attack, args=(server.port, self.SEED + n, stop),
                                      daemon=True) for n in range(self.ATTACKERS)]
        for thread in attackers:
            thread.start()
        try:
            number = 0
            while any(thread.is_alive() for thread in attackers):
                alice.send({"type": "say", "text": f"still here {number}"})
                while True:     # bob must get every message, whatever else arrives
                    message = bob.receive()
                    if message["type"] == "message" and message["from"] == "alice":
                        break
                self.assertEqual(message["text"], f"still here {number}",
                                 f"CHAT_FUZZ_SEED={self.SEED}")
                number += 1
                for thread in attackers:
                    thread.join(0.01)
        finally:
            stop.set()
        self.assertTrue(server.thread.is_alive(), f"server died; CHAT_FUZZ_SEED={self.SEED}")
        alice.say("after the storm")
        while True:
            message = bob.expect("message")
            if message["from"] == "alice":
                break
        self.assertEqual(message["text"], "after the storm")
        buffered = sum(conn.protocol.buffered + sum(map(len, conn.outbox))
                       for conn in list(server.server.connections))
        self.assertLess(buffered, 8 * 1024 * 1024, f"CHAT_FUZZ_SEED={self.SEED}")


# ---------------------------------------------------------------------------
# Moderation: the console, operators, bans, mutes, message rules
# ---------------------------------------------------------------------------

def in_loop(server: ServerThread, function):
    """Run function inside the server's loop thread and return its result."""
    done, result = threading.Event(), []

    def call() -> None:
        try:
            result.append(function())
        finally:
            done.set()

    server.server.call_soon(call)
    if not done.wait(TIMEOUT):
        raise AssertionError("the server loop did not run the call")
    return result[0]


def loopback_peer(port: int, source: str, name: Optional[str] = None) -> Peer:
    """A Peer connecting from another loopback address (127.0.0.2, ...)."""
    peer = Peer.__new__(Peer)
    peer.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                         source_address=(source, 0))
    peer.decoder, peer.welcome, peer.replay, peer.room = FrameDecoder(), None, [], None
    if name:
        peer.send({"type": "hello", "name": name})
        peer.welcome = peer.expect("welcome")
        peer.replay = peer.collect_history()
    return peer


def have_extra_loopback() -> bool:
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


class ConsoleTests(unittest.TestCase):
    def test_the_readme_lists_every_console_command(self) -> None:
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
            table = readme.read().split("### The server console", 1)[1].split("\n\n|", 1)[1]
        for command, (usage, _, _) in socket_server.Moderation.COMMANDS.items():
            self.assertIn(f"| `/{command}{' ' + usage if usage else ''}` |",
                          table.replace("\\|", "|"))

    def test_what_can_be_a_console(self) -> None:
        self.assertIsNone(socket_server.Console.kind(WatchedOutput()))    # no file at all
        with open(os.devnull) as devnull:
            self.assertIsNone(socket_server.Console.kind(devnull))        # nothing to read
        read_end, write_end = os.pipe()
        with open(read_end) as pipe, open(write_end, "w"):
            self.assertEqual(socket_server.Console.kind(pipe), "stream")
        with tempfile.NamedTemporaryFile("w") as commands:
            with open(commands.name) as readable:
                self.assertEqual(socket_server.Console.kind(readable), "stream")


class ModerationTests(ChatTestCase):
    server_settings = {"admin_password": "op-secret", "failure_delay": 0.01}

    def console(self, line: str) -> List[str]:
        """Run a console line in the loop; return what the console printed."""
        out = WatchedOutput()
        console = socket_server.Console(self.server.server, -1, out)
        in_loop(self.server, lambda: console.run(line))
        return out.lines

    def operator(self, name: str = "alice") -> Peer:
        peer = self.peer(name)
        peer.send({"type": "op", "password": "op-secret"})
        self.assertEqual(peer.expect("notice")["code"], "op")
        return peer

    def moderate(self, peer: Peer, command: str, args: str = "") -> dict:
        """Run a moderation command as an operator; return the error or the first reply."""
        peer.send({"type": "moderate", "command": command, "args": args})
        while True:
            message = peer.receive()
            if message["type"] == "error" or message.get("code") == "moderation":
                return message

    def start_console(self, fd: int, out: "WatchedOutput") -> "socket_server.Console":
        """A console reading fd, stopped before fd is closed (cleanups run last first):
        a console thread left reading a closed descriptor reads whatever is given its
        number next, another test's pipe or a client's socket."""
        console = socket_server.Console(self.server.server, fd, out)
        self.addCleanup(os.close, fd)
        self.addCleanup(console.stop, TIMEOUT)
        console.start()
        return console

    def test_a_stopped_console_reads_nothing_more(self) -> None:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, write_end)
        console = self.start_console(read_end, WatchedOutput())
        os.write(write_end, b"/say before\n")
        alice = self.peer("alice")      # after the line: it may come in her welcome's history
        console.stop(0)
        os.write(write_end, b"/say after\n")   # wakes the thread's read; it must not run it
        console.stop(TIMEOUT)
        self.assertFalse(console._thread.is_alive())
        # Two round trips: a line run in the pass that answers the first ping could
        # be delivered after its pong, never after the second's.
        seen = alice.sync() + alice.sync()
        self.assertNotIn("after", [event["text"] for event in seen
                                   if event["type"] == "announcement"])

    def test_console_reads_lines_from_its_input_and_answers(self) -> None:
        read_end, write_end = os.pipe()
        out = WatchedOutput()
        self.start_console(read_end, out)
        os.write(write_end, "/help\nkick nobody\n".encode())
        out.wait_for("/kick [#ROOM] NAME [REASON]")
        out.wait_for('Nobody called "nobody" is here.')
        os.close(write_end)     # input ends: the server runs on
        alice = self.peer("alice")
        self.assertEqual(alice.welcome["name"], "alice")

    def test_kick_from_the_console(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        self.assertEqual(self.console("/kick bob spamming"), ["bob was kicked by server: spamming"])
        error = self.assert_rejected(bob, "kicked")
        self.assertEqual(error["text"], "bob was kicked by server: spamming")
        leave = alice.expect("leave")
        self.assertEqual(leave["text"], "bob was kicked by server: spamming")
        self.assertEqual(self.console("/kick bob"), ['! Nobody called "bob" is here.'])

    def test_operators(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        alice.send({"type": "op", "password": "wrong"})
        self.assertEqual(alice.expect("error")["code"], "bad_admin_password")
        self.assertEqual(self.moderate(bob, "kick", "carol")["code"], "not_operator")
        alice.send({"type": "op", "password": "op-secret"})
        self.assertEqual(alice.expect("notice")["code"], "op")
        self.assertEqual(bob.expect("notice")["text"], "alice is now an operator")
        bob.send({"type": "who"})
        self.assertEqual(bob.expect("users")["ops"], ["alice"])
        self.assertEqual(self.peer("dave").welcome["ops"], ["alice"])
        self.assertEqual(self.moderate(alice, "kick", "ghost")["code"], "unknown_user")
        alice.send({"type": "moderate", "command": "kick", "args": "bob flooding"})
        self.assertEqual(alice.expect("leave")["text"], "bob was kicked by alice: flooding")
        self.assertNotIn("notice", [m["type"] for m in alice.sync()])   # no echo of that
        self.assertEqual(self.assert_rejected(bob, "kicked")["text"],
                         "bob was kicked by alice: flooding")
        self.assertEqual(carol.expect("leave")["text"], "bob was kicked by alice: flooding")

    def test_command_errors_keep_the_operator_connected(self) -> None:
        alice = self.operator("alice")
        for command, args, code in (("ban", "no/such/name", "bad_name"),
                                    ("kick", "ghost", "unknown_user"),
                                    ("mute", "ghost", "unknown_user")):
            self.assertEqual(self.moderate(alice, command, args)["code"], code)
        alice.say("still connected")

    def test_operators_cannot_act_on_each_other_but_the_console_can(self) -> None:
        alice, bob = self.operator("alice"), self.operator("bob")
        for command in ("kick", "mute", "ban"):
            self.assertEqual(self.moderate(alice, command, "bob")["code"], "not_allowed")
        # Nor on themselves: a self-muted operator could not even /announce, nor undo it.
        for command, args in (("mute", "alice"), ("kick", "alice"), ("ban", "alice"),
                              ("ban", "127.0.0.1"), ("ban", "127.0.0.0/8")):
            error = self.moderate(alice, command, args)
            self.assertEqual(error["code"], "not_allowed", (command, args))
            self.assertIn("yourself" if args == "alice" else "your own address", error["text"])
        self.console("/mute bob")
        self.assertEqual(self.moderate(bob, "unmute", "bob")["code"], "not_allowed")   # not self
        self.console("/kick bob")
        self.assert_rejected(bob, "kicked")

    def test_ban_by_name_holds_across_reconnects_and_ends(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        lines = self.console("/ban bob 30 rude")
        self.assertIn("bob was banned by server for 30 minutes: rude", lines)
        self.assertEqual(self.assert_rejected(bob, "banned")["text"],
                         "bob was banned by server for 30 minutes: rude")
        again = self.peer()
        again.send({"type": "hello", "name": "BOB"})
        error = self.assert_rejected(again, "banned")
        self.assertIn("30 minutes more: rude", error["text"])
        self.assertTrue(any("bob (name)" in line for line in self.console("/bans")))

        def expire() -> None:
            for ban in self.server.server.core.moderation.bans:
                ban.until = time.time() - 1

        in_loop(self.server, expire)
        self.assertEqual(self.console("/bans"), ["nobody is banned"])
        self.assertEqual(self.peer("bob").welcome["name"], "bob")

    @unittest.skipUnless(have_extra_loopback(), "needs 127.0.0.2 and 127.0.0.3")
    def test_ban_by_address_removes_everyone_there_and_keeps_them_out(self) -> None:
        alice = loopback_peer(self.port, "127.0.0.2", "alice")
        alias = loopback_peer(self.port, "127.0.0.2", "alias")
        bob = loopback_peer(self.port, "127.0.0.3", "bob")
        for peer in (alice, alias, bob):
            self.addCleanup(peer.close)
        lines = self.console("/ban 127.0.0.2")
        self.assertEqual(lines[0], "banned 127.0.0.2 (address)")
        self.assert_rejected(alice, "banned")
        self.assert_rejected(alias, "banned")
        newcomer = loopback_peer(self.port, "127.0.0.2")
        self.addCleanup(newcomer.close)
        self.assertIn("banned from this chat", self.assert_rejected(newcomer, "banned")["text"])
        bob.say("unaffected")
        self.console("/unban 127.0.0.2")
        back = loopback_peer(self.port, "127.0.0.2", "alice")
        self.addCleanup(back.close)
        self.assertEqual(back.welcome["name"], "alice")
        self.console("/ban 127.0.0.0/29 5")
        self.assert_rejected(back, "banned")
        self.assert_rejected(bob, "banned")

    def test_banning_a_name_also_bans_its_address(self) -> None:
        bob = self.peer("bob")
        lines = self.console("/ban bob")
        self.assertEqual(lines[:2], ["banned bob (name)", "banned 127.0.0.1 (address)"])
        self.assert_rejected(bob, "banned")
        self.assert_rejected(self.peer(), "banned")     # even before any hello

    def test_banning_a_name_says_who_else_is_on_its_address(self) -> None:
        bob, carol = self.peer("bob"), self.peer("carol")
        lines = self.console("/ban bob")
        notes = [line for line in lines if line.startswith("note: ")]
        self.assertEqual(len(notes), 1, lines)
        self.assertIn("carol", notes[0])
        self.assertNotIn("bob", notes[0])
        self.assertIn("cannot come back once they leave", notes[0])
        self.assert_rejected(bob, "banned")
        carol.say("still here")     # not removed: only kept out once gone

    def test_something_like_an_address_that_is_not_one_is_no_name(self) -> None:
        for word in ("999.1.1.1", "10.0.0.0/99", "1.2.3"):
            with self.subTest(word=word):
                lines = self.console(f"/ban {word}")
                self.assertTrue(lines[0].startswith("!"), lines)
                self.assertIn("not a valid address", lines[0])
        self.assertEqual(self.console("/bans"), ["nobody is banned"])

    def test_a_name_banned_from_the_operators_own_address_is_banned_alone(self) -> None:
        # As a /ban of that address is refused: the operator could not come back.
        alice, bob = self.operator("alice"), self.peer("bob")
        replies = []
        alice.send({"type": "moderate", "command": "ban", "args": "bob"})
        for message in alice.sync():
            if message.get("code") == "moderation":
                replies.append(message["text"])
        self.assertEqual(replies[:2], ["banned bob (name)",
                                       "note: bob's address, 127.0.0.1, is yours too, so it is "
                                       "not banned: they can come back under another name"])
        self.assertEqual(self.console("/bans"), ["bob (name) until unbanned, by alice"])
        self.peer("carol").say("in from the same address")

    def test_bans_survive_a_restart(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        first = ServerThread(db=path)
        in_loop(first, lambda: first.server.run_command("/ban mallory 60 spam"))
        first.stop()
        second = ServerThread(db=path)
        self.addCleanup(second.stop)
        peer = Peer(second.port)
        self.addCleanup(peer.close)
        peer.send({"type": "hello", "name": "mallory"})
        self.assertIn("spam", self.assert_rejected(peer, "banned")["text"])

    def test_a_length_that_looks_like_a_number_must_be_a_good_one(self) -> None:
        bob = self.peer("bob")
        for length in ("0", "-5", "10m", "nan", "inf", "-inf", "1e400", "99999999"):
            for line in (f"/ban bob {length} reason", f"/ban 127.0.0.9 {length}",
                         f"/mute bob {length}"):
                with self.subTest(line=line):
                    replies = self.console(line)
                    self.assertEqual(len(replies), 1, replies)
                    self.assertRegex(replies[0], r"^! Usage: /(ban|mute) .*MINUTES: more than 0")
        self.assertEqual(self.console("/bans"), ["nobody is banned"])
        self.assertNotIn("notice", [m["type"] for m in bob.sync()])     # not muted either
        self.assertEqual(self.console("/ban bob 1.5 spam")[-1],
                         "bob was banned by server for 2 minutes: spam")
        self.assert_rejected(bob, "banned")
        self.console("/unban bob")
        self.peer("carol")
        self.assertEqual(self.console("/ban carol nancy said so")[-1],    # a reason, no length
                         "carol was banned by server: nancy said so")

    def test_mutes_hold_for_operators_and_never_trip_a_nameless_bye(self) -> None:
        alice = self.operator("alice")
        self.console("/mute alice")
        self.assertEqual(self.moderate(alice, "say", "loud anyway")["code"], "muted")
        early = self.peer()     # a bye before any hello, while someone is muted
        early.send({"type": "bye", "text": "see you"})
        self.assertNotIn("internal_error", [frame.get("code") for frame in
                                            early.read_until_closed()])

    def test_a_resumed_connection_keeps_what_its_name_was(self) -> None:
        # A client whose network dropped comes back with its resume token: it is still
        # a server operator, and an operator of the rooms it takes back (not of others).
        alice, watcher = self.peer("alice"), self.peer("watcher")
        alice.send({"type": "op", "password": "op-secret"})
        self.assertEqual(alice.expect("notice")["code"], "op")
        for room in ("dev", "ops"):
            enter(alice, room)
            enter(watcher, room)
        back = self.peer()
        back.send({"type": "hello", "name": "alice", "rooms": ["lobby", "dev"],
                   "resume": alice.welcome["resume"]})
        self.assertEqual(back.expect("welcome")["name"], "alice")
        rooms = {}
        for _ in range(2):
            room = back.expect("room")
            rooms[room["room"]] = room["ops"]
        self.assertEqual(rooms["dev"], ["alice"])
        self.assertEqual(back.expect("notice")["code"], "op")
        back.send({"type": "moderate", "command": "bans"})
        self.assertEqual(back.expect("notice")["code"], "moderation")
        back.send({"type": "bye"})
        watcher.expect_next_of("leave", name="alice")
        newcomer = self.peer("alice")   # the name is free: it is no operator of #ops
        self.assertEqual(enter(newcomer, "ops")["ops"], [])
        watcher.send({"type": "deop"})      # not an operator: said so, not ignored
        self.assertEqual(watcher.expect("error")["code"], "not_operator")

    def test_a_mute_may_say_why(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        self.assertEqual(self.console("/mute bob 10 flooding the lobby"),
                         ["bob was muted by server for 10 minutes: flooding the lobby"])
        self.assertEqual(alice.expect("notice")["text"],
                         "bob was muted by server for 10 minutes: flooding the lobby")
        self.assertEqual(bob.expect("notice")["text"], "You were muted by server for 10 "
                         "minutes (flooding the lobby): you can read, but not send.")
        self.console("/mute carol spam")      # no length: until unmuted, and why
        self.assertEqual(carol.expect("notice")["text"][:4], "bob ")    # (bob's, first)
        self.assertEqual(carol.expect("notice")["text"], "You were muted by server (spam): "
                         "you can read, but not send.")

    def test_mute_unmute_and_expiry(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        stamp = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"   # as joins have, so clients show it
        self.console("/mute bob 10")
        notice = alice.expect("notice")
        self.assertEqual(notice["text"], "bob was muted by server for 10 minutes")
        self.assertRegex(notice["ts"], stamp)
        notice = bob.expect("notice")
        self.assertEqual(notice["text"],
                         "You were muted by server for 10 minutes: you can read, but not send.")
        self.assertRegex(notice["ts"], stamp)
        bob.send({"type": "say", "text": "let me speak"})
        error = bob.expect("error")
        self.assertEqual(error["code"], "muted")
        self.assertIn("10 minutes more", error["text"])
        bob.send({"type": "whisper", "to": "alice", "text": "psst"})
        self.assertEqual(bob.expect("error")["code"], "muted")
        bob.send({"type": "away", "text": "talking anyway"})   # others would see it
        self.assertEqual(bob.expect("error")["code"], "muted")
        bob.send({"type": "away"})      # being back (as bob was) says nothing: no refusal
        self.assertIsNone(bob.expect("away")["text"])
        alice.say("you can still read")
        self.assertEqual(bob.expect("message")["text"], "you can still read")
        self.assertNotIn("message", [m["type"] for m in alice.sync()])
        self.console("/unmute bob")
        self.assertRegex(alice.expect("notice")["ts"], stamp)
        notice = bob.expect("notice")
        self.assertEqual(notice["text"], "You were unmuted by server.")
        self.assertRegex(notice["ts"], stamp)
        bob.say("free again")
        self.console("/mute bob 0.003")    # about 0.2 s
        self.assertEqual(bob.expect("notice")["code"], "muted")
        notice = bob.expect("notice")
        self.assertEqual(notice["code"], "unmuted")
        self.assertRegex(notice["ts"], stamp)
        bob.say("and again")

    def test_announcements_reach_everyone_and_stay_in_history(self) -> None:
        alice = self.operator("alice")
        self.assertEqual(self.console("/say coffee is ready"), ["announced: coffee is ready"])
        announcement = alice.expect("announcement")
        self.assertEqual((announcement["from"], announcement["text"]), ("server", "coffee is ready"))
        alice.send({"type": "moderate", "command": "say", "args": "meeting at 3"})
        self.assertEqual(alice.expect("announcement")["from"], "alice")
        newcomer = self.peer("newcomer")
        self.assertEqual([(m["kind"], m["text"]) for m in newcomer.replay if m["type"] == "history"],
                         [("announcement", "coffee is ready"), ("announcement", "meeting at 3")])

    def test_clients_listing(self) -> None:
        self.operator("alice")
        self.peer("bob").say("one")
        lines = self.console("/clients")
        self.assertRegex(lines[0], r"^alice +127\.0\.0\.1:\d+ +since \d\d:\d\d  0 sent  operator$")
        self.assertRegex(lines[1], r"^bob .* 1 sent$")
        self.assertEqual(lines[-1], "2 in the chat")

    def test_shutdown_by_an_operator(self) -> None:
        alice, bob = self.operator("alice"), self.peer("bob")
        alice.send({"type": "moderate", "command": "shutdown"})
        messages = bob.read_until_closed()
        self.assertEqual(messages[-1], {"type": "shutdown",
                                        "text": "The server is shutting down (alice)."})
        self.server.thread.join(TIMEOUT)
        self.assertFalse(self.server.thread.is_alive())

    def test_hostile_reasons_are_cleaned_and_cannot_crash_the_server(self) -> None:
        alice, mallory = self.operator("alice"), self.peer("mallory")
        alice.send_raw(ascii_frame({"type": "moderate", "command": "ban",
                                    "args": "mallory 30 bad \ud800 \x1b[41mreason" + "x" * 9000}))
        error = self.assert_rejected(mallory, "banned")
        self.assertNotIn("\x1b", error["text"])
        self.assertIn("bad [41mreason", error["text"])
        self.assertLess(len(error["text"]), socket_server.MAX_COMMAND_LENGTH + 100)
        again = self.peer()
        again.send({"type": "hello", "name": "mallory"})
        self.assert_rejected(again, "banned")
        self.assertTrue(any("mallory (name)" in line for line in self.console("/bans")))
        alice.say("the server is still here")     # (the ban covers 127.0.0.1: no newcomers)

    def test_unban_of_a_name_lifts_the_address_ban_made_with_it(self) -> None:
        self.peer("bob")
        self.console("/ban bob")
        self.assertEqual(self.console("/unban bob"),
                         ["unbanned bob (name)", "unbanned 127.0.0.1 (address)"])
        self.assertEqual(self.console("/bans"), ["nobody is banned"])

    def test_a_bug_in_a_command_costs_only_that_command(self) -> None:
        def broken(actor, args):
            raise RuntimeError("bug")

        in_loop(self.server, lambda: setattr(self.server.server.core.moderation, "cmd_bans", broken))
        with self.assertLogs("chat", "ERROR"):
            self.assertEqual(self.console("/bans"),
                             ["! that command failed (a bug: the log has the details)"])
        self.assertEqual(self.peer("alice").welcome["name"], "alice")

    def test_unknown_and_malformed_commands(self) -> None:
        self.assertEqual(self.console("/dance"),
                         ["! Unknown command /dance: /help lists the commands."])
        self.assertEqual(self.console("hello everyone"),    # chat, typed at the console
                         ["! Console commands start with /: /say TEXT speaks to everyone, "
                          "/help lists the rest."])
        self.assertEqual(self.console("bans"), ["nobody is banned"])    # the / may be left out
        for line in ("/ban", "/mute", "/kick", "/say", "/unban", "/unmute nobody"):
            self.assertTrue(self.console(line)[0].startswith("! "), line)

    @unittest.skipUnless(hasattr(os, "mkfifo"), "FIFOs are POSIX")
    def test_console_reads_a_fifo_again_after_each_writer(self) -> None:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        fifo = os.path.join(directory, "ctl")
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)     # as `server < ctl` has it, once
        os.set_blocking(fd, True)                           # a first writer came
        retry = socket_server.CONSOLE_RETRY
        socket_server.CONSOLE_RETRY = 0.02
        self.addCleanup(setattr, socket_server, "CONSOLE_RETRY", retry)
        out = WatchedOutput()
        self.start_console(fd, out)
        alice = self.peer("alice")
        for line in ("/say first writer", "/say second writer"):   # `echo LINE > ctl`, twice
            with open(fifo, "w") as writer:
                writer.write(line + "\n")
            self.assertEqual(alice.expect("announcement")["text"], line[len("/say "):])

    @unittest.skipUnless(POSIX, "a pseudo-terminal needs POSIX")
    def test_a_log_line_leaves_a_half_typed_console_command_whole(self) -> None:
        import pty
        import termios
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        modes = termios.tcgetattr(slave)
        proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, "--host", "127.0.0.1", "--port",
                                 "0", "--db", ":memory:", "--log-level", "info"],
                                stdin=slave, stdout=slave, stderr=slave, cwd=HERE,
                                env=dict(os.environ, TERM="xterm"))
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        screen = b""

        def read_until(pattern: bytes) -> "re.Match":
            nonlocal screen
            deadline = time.monotonic() + TIMEOUT
            while True:
                match = re.search(pattern, screen, re.S)
                if match:
                    screen = screen[match.end():]
                    return match
                ready, _, _ = select.select([master], [], [], max(0, deadline - time.monotonic()))
                if not ready:
                    self.fail(f"no {pattern!r} on the terminal; it shows {screen[-300:]!r}")
                screen += os.read(master, 65536)

        port = int(read_until(rb"listening on 127\.0\.0\.1:(\d+)").group(1))
        read_until(b"console> ")
        os.write(master, b"/say half typ")
        read_until(b"half typ")     # echoed by the line editor
        alice = Peer(port, "alice")
        self.addCleanup(alice.close)
        # The log line goes above, and the prompt comes back with what was typed.
        read_until(rb"\r\x1b\[K[^\r\n]*joined as alice\r?\nconsole> /say half typ")
        os.write(master, b"ed\r")
        self.assertEqual(alice.expect("announcement")["text"], "half typed")
        # A command's answer (and the log line it makes) comes before the next prompt,
        # which is drawn once: not once by the answer and again by the line editor.
        bob = Peer(port, "bob")
        self.addCleanup(bob.close)
        os.write(master, b"/kick alice testing\r")
        read_until(b"/kick alice testing")
        read_until(b"kicked by server: testing")
        read_until(b"console> ")
        os.write(master, b"/say done\r")
        self.assertEqual(bob.expect("announcement")["text"], "done")
        shown = read_until(rb"(.*)/say done").group(1)
        self.assertEqual(shown.count(b"console> "), 0, shown)   # the one prompt: read above
        os.write(master, b"/shutdown\r")
        self.assertEqual(bob.read_until_closed()[-1]["type"], "shutdown")
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertEqual(termios.tcgetattr(slave), modes)  # the terminal is as it was

    @unittest.skipUnless(POSIX, "a pseudo-terminal needs POSIX")
    def test_console_of_a_real_server_process_on_a_terminal(self) -> None:
        import pty
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, "--host", "127.0.0.1", "--port",
                                 "0", "--db", ":memory:"], stdin=slave, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=HERE)
        os.close(slave)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        lines: "queue.Queue[bytes]" = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [
            lines.put(b"")], daemon=True)
        reader.start()

        def next_line() -> str:
            try:
                line = lines.get(timeout=TIMEOUT).decode()
            except queue.Empty:
                self.fail("the server printed nothing in time")
            self.assertTrue(line, "the server ended")
            return line

        port = None
        while port is None:
            match = re.match(r"listening on 127\.0\.0\.1:(\d+)", next_line())
            port = int(match.group(1)) if match else None
        while "moderation console" not in next_line():
            pass
        alice = Peer(port, "alice")
        self.addCleanup(alice.close)
        os.write(master, b"/say hello from the console\n")
        self.assertEqual(alice.expect("announcement")["text"], "hello from the console")
        os.write(master, b"/shutdown\n")
        self.assertEqual(alice.read_until_closed()[-1]["type"], "shutdown")
        self.assertEqual(proc.wait(TIMEOUT), 0)
        reader.join(TIMEOUT)
        proc.stdout.close()
        errors = proc.stderr.read().decode()
        proc.stderr.close()
        self.assertNotIn("Fatal", errors)
        self.assertNotIn("Traceback", errors)


class MessageRuleTests(unittest.TestCase):
    def rules(self, action: str = "mask", words=("darn", "heck no", "c++")):
        return socket_server.MessageRules(list(words), action, no_links=True, no_whisper=False)

    def test_blocked_words_whole_words_any_case(self) -> None:
        rules = self.rules()
        self.assertEqual(rules.check("Darn it, HECK NO!"), "**** it, **** **!")
        self.assertEqual(rules.check("I like c++ a lot"), "I like *** a lot")
        self.assertEqual(rules.check("darning socks, checking"), "darning socks, checking")
        with self.assertRaises(socket_server.ModerationError) as caught:
            self.rules("reject").check("oh darn")
        self.assertEqual(caught.exception.code, "blocked_word")

    def test_links(self) -> None:
        rules = self.rules(words=())
        for text in ("see https://example.com", "ftp://host/x", "www.example.org",
                     "go to example.com/page", "mail.google.com"):
            with self.assertRaises(socket_server.ModerationError, msg=text):
                rules.check(text)
        for text in ("node.js is fine", "e.g. this", "version 1.2.3", "a.b", "dotted.name"):
            self.assertEqual(rules.check(text), text)

    def test_phrases_match_across_any_spaces(self) -> None:
        rules = self.rules()
        self.assertEqual(rules.check("oh heck   no"), "oh ****   **")
        self.assertEqual(rules.check("heck\tno"), "****\t**")

    def test_word_list_file(self) -> None:
        path = write_file(temp_dir(self), "words.txt", "# comment\nDarn\n\n  heck no \n")
        self.assertEqual(socket_server.read_word_list(path), ["Darn", "heck no"])


class MessageRuleServerTests(ChatTestCase):
    server_settings = {"blocked_words": ["darn"], "filter_action": "reject", "no_links": True,
                       "no_whisper": True, "max_length": 50}

    def test_refusals_name_the_rule_and_reach_the_sender_alone(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        for text, code in (("darn", "blocked_word"), ("see www.example.com", "no_links"),
                           ("x" * 51, "too_long")):
            alice.send({"type": "say", "text": text})
            error = alice.expect("error")
            self.assertEqual(error["code"], code)
            self.assertTrue(error["text"].startswith("Not sent"))
        alice.send({"type": "whisper", "to": "bob", "text": "hi"})
        self.assertEqual(alice.expect("error")["code"], "whispers_off")
        self.assertEqual([m["type"] for m in bob.sync()], [])

    def test_the_rules_hold_for_every_text_others_see(self) -> None:
        # An away text, a topic, a part's and a quit's words are seen by others too.
        alice, bob = self.peer("alice"), self.peer("bob")
        enter(alice, "dev")
        enter(bob, "dev")
        for request in ({"type": "away", "text": "darn it"},
                        {"type": "topic", "room": "dev", "text": "see www.example.com"}):
            alice.send(request)
            self.assertIn(alice.expect("error")["code"], ("blocked_word", "no_links"))
        alice.send({"type": "part", "room": "dev", "text": "darn you all"})
        self.assertNotIn("comment", bob.expect_next_of("leave", room="dev"))  # gone, unsaid
        alice.send({"type": "bye", "text": "www.example.com"})
        self.assertNotIn("comment", bob.expect_next_of("leave"))

    def test_masking(self) -> None:
        server = ServerThread(blocked_words=["darn"])
        self.addCleanup(server.stop)
        alice, bob = Peer(server.port, "alice"), Peer(server.port, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)
        self.assertEqual(alice.say("DARN it")["text"], "**** it")
        self.assertEqual(bob.expect("message")["text"], "**** it")
        alice.send({"type": "away", "text": "darn busy"})
        self.assertEqual(bob.expect("away")["text"], "**** busy")
        alice.send({"type": "bye", "text": "darn it all"})
        self.assertEqual(bob.expect_next_of("leave")["comment"], "**** it all")


# ---------------------------------------------------------------------------
# The terminal: rendering, keys, the line editor, reconnecting
# ---------------------------------------------------------------------------

class VirtualScreen:
    """Just enough of a VT100/xterm to see what a user would see.

    Printable characters (wide ones take two cells), CR, LF (scrolling at
    the bottom), BS, bell, and the CSI sequences the client uses: cursor
    up/down/forward/back, erase line and erase display; colours are
    ignored. Like xterm, a character written in the last column leaves the
    cursor there until the next character wraps it. LF also returns to the
    first column, as the terminal driver makes it (ONLCR, which the
    client's cbreak mode keeps).
    """

    def __init__(self, width: int = 40, height: int = 12) -> None:
        self.width, self.height = width, height
        self.rows = [[" "] * width for _ in range(height)]
        self.row = self.column = 0
        self.wrap_pending = False
        self._pending = ""

    def feed(self, text: str) -> None:
        text, self._pending = self._pending + text, ""
        index = 0
        while index < len(text):
            char = text[index]
            if char == "\x1b":
                match = re.match(r"\x1b\[([0-9;?]*)([@-~])", text[index:])
                if match is None:
                    if len(text) - index < 8:
                        self._pending = text[index:]
                        return
                    index += 1
                    continue
                self._control(match.group(1), match.group(2))
                index += match.end()
                continue
            self._put(char)
            index += 1

    def _control(self, params: str, final: str) -> None:
        numbers = [int(p) if p.isdigit() else 0 for p in params.split(";")] if params else []
        count = max(1, numbers[0]) if numbers else 1
        self.wrap_pending = False
        if final == "A":
            self.row = max(0, self.row - count)
        elif final == "B":
            self.row = min(self.height - 1, self.row + count)
        elif final == "C":
            self.column = min(self.width - 1, self.column + count)
        elif final == "D":
            self.column = max(0, self.column - count)
        elif final == "K":
            start = 0 if numbers[:1] == [2] else self.column
            self.rows[self.row][start:] = [" "] * (self.width - start)
        elif final == "J":
            if numbers[:1] in ([2], [3]):
                self.rows = [[" "] * self.width for _ in range(self.height)]
            else:
                self.rows[self.row][self.column:] = [" "] * (self.width - self.column)
                for row in range(self.row + 1, self.height):
                    self.rows[row] = [" "] * self.width
        elif final == "H":
            self.row = (numbers[0] - 1) if numbers else 0
            self.column = (numbers[1] - 1) if len(numbers) > 1 else 0

    def _line_feed(self) -> None:
        if self.row == self.height - 1:
            self.rows = self.rows[1:] + [[" "] * self.width]
        else:
            self.row += 1

    def _put(self, char: str) -> None:
        if char == "\r":
            self.column, self.wrap_pending = 0, False
        elif char == "\n":
            self.column, self.wrap_pending = 0, False
            self._line_feed()
        elif char == "\b":
            self.column = max(0, self.column - 1)
        elif char == "\x07":
            pass
        else:
            size = client.char_width(char)
            if size == 0:
                return
            if self.wrap_pending or self.column + size > self.width:
                self.column, self.wrap_pending = 0, False
                self._line_feed()
            self.rows[self.row][self.column] = char
            if size == 2:
                self.rows[self.row][self.column + 1] = ""
            if self.column + size >= self.width:
                self.column, self.wrap_pending = self.width - 1, True
            else:
                self.column += size

    @property
    def lines(self) -> List[str]:
        return ["".join(row).rstrip() for row in self.rows]

    @property
    def text(self) -> str:
        return "\n".join(line for line in self.lines if line)


class RenderingTests(unittest.TestCase):
    def test_widths(self) -> None:
        self.assertEqual(client.text_width("hello"), 5)
        self.assertEqual(client.text_width("日本"), 4)
        self.assertEqual(client.text_width("e\u0301"), 1)                  # combining accent
        self.assertEqual(client.text_width("🎉"), 2)
        self.assertEqual(client.text_width("👨\u200d👩\u200d👧"), 6)    # joiners take no column

    def test_name_colours_leave_out_notices_and_errors_and_spread_names(self) -> None:
        # Issue 14's trial: alice and carol both got bright cyan, next to the notices' cyan.
        trio = [client.name_colour(name) for name in ("alice", "bob", "carol")]
        self.assertEqual(len(set(trio)), 3, trio)
        taken = {"31", "91", "36", "96", "38;5;6", "38;5;14", "38;5;1", "38;5;9"}
        for palette in (client.NAME_COLOURS_256, client.NAME_COLOURS_16):
            with self.subTest(colours=len(palette)):
                self.assertFalse(taken & set(palette))
                self.assertNotIn(client.STYLES["notice"], palette)
                self.assertEqual(len(set(palette)), len(palette))
                self.assertEqual(len({client.name_colour(name, palette)
                                      for name in ("alice", "bob", "carol")}), 3)
                # The same everywhere: crc32 of the name in lower case picks the entry.
                self.assertEqual(client.name_colour("ALICE", palette), palette[
                    zlib.crc32(b"alice") % len(palette)])
        # On the 256-colour cube: far from red (0 degrees) and cyan (180), and apart.
        levels = (0, 95, 135, 175, 215, 255)
        hues = []
        for code in client.NAME_COLOURS_256:
            index = int(code.split(";")[-1]) - 16
            rgb = [levels[part] / 255 for part in (index // 36, index // 6 % 6, index % 6)]
            hue = colorsys.rgb_to_hls(*rgb)[0] * 360
            for avoided in (0, 180, 360):
                self.assertGreaterEqual(abs(hue - avoided), 25, code)
            hues.append(hue)
        hues.sort()
        self.assertGreaterEqual(min(b - a for a, b in zip(hues, hues[1:])), 10)

    @unittest.skipUnless(POSIX, "Windows consoles with ANSI have 256 colours")
    def test_256_colours_where_the_terminal_says_so(self) -> None:
        for environ, depth in (({"TERM": "xterm-256color"}, 256), ({"TERM": "xterm"}, 16),
                               ({"TERM": "xterm", "COLORTERM": "truecolor"}, 256),
                               ({"TERM": "linux"}, 16), ({}, 16)):
            self.assertEqual(client.colour_depth(environ), depth, environ)
        painted = client.paint([("bob", "name")], name_colours=client.NAME_COLOURS_16)
        self.assertEqual(painted, f"\x1b[{client.name_colour('bob', client.NAME_COLOURS_16)}mbob"
                                  "\x1b[0m")

    def test_paint_and_plain(self) -> None:
        line = client.chat_line("14:05", "bob", "hi alice", "alice")
        self.assertEqual(line.plain, "[14:05] bob: hi alice")
        painted = client.paint(line.head + line.body)
        self.assertIn("\x1b[2m[14:05] \x1b[0m", painted)                 # dim time
        self.assertIn(f"\x1b[{client.name_colour('bob')}mbob\x1b[0m", painted)
        self.assertIn("\x1b[1;7malice\x1b[0m", painted)                  # the mention
        self.assertTrue(line.ring)
        self.assertNotIn("\x1b", "".join(text for text, _ in line.head + line.body))

    def test_whispers_actions_and_history(self) -> None:
        to_bob = client.chat_line("14:05", "alice", "psst", "alice", "whisper", to="bob")
        self.assertEqual(to_bob.plain, "[14:05] [whisper to bob] psst")
        self.assertFalse(to_bob.ring)
        from_alice = client.chat_line("14:05", "alice", "psst", "bob", "whisper", to="bob")
        self.assertEqual(from_alice.plain, "[14:05] [whisper from alice] psst")
        self.assertTrue(from_alice.ring)
        [notice] = client.format_message({"type": "message", "from": "bot", "text": "built me",
                                          "notice": True, "ts": "2026-01-01T00:00:00Z"}, "me")
        self.assertTrue(notice.plain.endswith("] -bot- built me"), notice.plain)
        self.assertFalse(notice.ring)   # a notice asks for no answer, nor a bell
        [private] = client.format_message({"type": "whisper", "from": "bot", "to": "me",
                                           "text": "psst", "notice": True}, "me")
        self.assertTrue(private.plain.endswith("[notice from bot] psst"), private.plain)
        [back] = client.format_message({"type": "join", "name": "bob", "room": "dev",
                                        "op": True}, "me")
        self.assertTrue(back.plain.endswith("bob joined, an operator of #dev"), back.plain)
        rooms = client.RoomList()
        rooms.update({"type": "room", "room": "dev", "users": ["me"], "ops": []}, "me")
        rooms.update({"type": "join", "name": "Bob", "room": "dev", "op": True}, "me")
        self.assertEqual(rooms.get("dev").ops, {"bob"})
        [whois] = client.format_message({"type": "whois", "name": "bob",
                                         "rooms": ["dev", "lobby"], "room_operator": ["dev"]},
                                        "me")
        self.assertEqual(whois.plain, "-!- bob: in @#dev, #lobby")
        [whois] = client.format_message({"type": "whois", "name": "bob", "rooms": [],
                                         "realname": "Bob \x1b[2JBuilder"}, "me")
        self.assertEqual(whois.plain, "-!- bob (Bob [2JBuilder): in no room")
        for kick, shown in ((dict(name="me", text="me was kicked from #dev by carol: off topic"),
                             "-!- you were kicked from #dev by carol: off topic"),
                            (dict(name="Me", text="Me was kicked from #dev by carol"),
                             "-!- you were kicked from #dev by carol"),
                            (dict(name="bob", text="bob was kicked from #dev by carol"),
                             "-!- bob was kicked from #dev by carol"),
                            (dict(name="me", text="#dev was removed by server"),    # /droproom
                             "-!- #dev was removed by server")):
            [line] = client.format_message({"type": "leave", "room": "dev", "reason": "kicked",
                                            "by": "carol", **kick}, "me")
            self.assertTrue(line.plain.endswith(shown), line.plain)
        # Made a server operator, or no longer one: everyone is told so once; its rooms
        # say nothing more (one line a room, and to the operator after its own notice).
        as_operator = {"type": "room_op", "room": "dev", "name": "cat", "op": True,
                       "by": "server", "server_operator": True, "ts": "2026-01-01T00:00:00Z"}
        self.assertEqual(client.format_message(as_operator, "me"), [])
        self.assertEqual(client.format_message(dict(as_operator, op=False), "me"), [])
        for name, shown in (("cat", "cat runs"), ("Me", "you run")):
            [heir] = client.format_message(dict(as_operator, name=name, server_operator=False,
                                                heir=True), "me")
            self.assertTrue(heir.plain.endswith(f"-!- {shown} the room now, while here: none "
                                                "of its operators is here"), heir.plain)
        listed = client.format_message({"type": "rooms", "rooms": [
            {"room": "den", "count": 1, "topic": "", "keyed": True},
            {"room": "dev", "count": 2, "topic": "release"}]}, "me")
        self.assertEqual([line.plain for line in listed],
                         ["-!- #den (1 person, needs a key)", "-!- #dev (2 people): release"])
        [winks] = client.format_message({"type": "whisper", "from": "bob", "to": "me",
                                         "text": "winks", "action": True,
                                         "ts": "2026-01-01T00:00:00Z"}, "me")
        self.assertTrue(winks.plain.endswith("[whisper from bob] * bob winks"), winks.plain)
        [waves] = client.format_message({"type": "message", "from": "bob", "text": "waves",
                                       "action": True, "ts": "2026-01-01T00:00:00Z"}, "me")
        self.assertTrue(waves.plain.endswith("* bob waves"))
        [old] = client.format_message({"type": "history", "kind": "message", "from": "bob",
                                     "text": "hi me", "ts": "2020-01-02T03:04:05Z"}, "me")
        self.assertTrue(old.dim)
        for kind in ("message", "whisper"):     # an IRC NOTICE, then as now: no speech
            live = {"type": kind, "from": "bot", "to": "me", "text": "built", "notice": True,
                    "ts": "2020-01-02T03:04:05Z"}
            [then] = client.format_message(dict(live, type="history", kind=kind), "me")
            [now] = client.format_message(live, "me")
            self.assertEqual(then.plain.split("] ", 1)[1], now.plain.split("] ", 1)[1])
        self.assertFalse(old.ring)      # old news rings no bell
        self.assertRegex(old.plain, r"^\[Jan 0[12] \d\d:\d\d\] bob: hi me$")

    def test_wrap_keeps_the_name_column(self) -> None:
        line = client.chat_line("14:05", "alice", "one two three four five six seven eight",
                                "bob")
        rows = ["".join(text for text, _ in row) for row in client.wrap(line, 30)]
        self.assertEqual(rows, ["[14:05] alice: one two three",
                                "               four five six",
                                "               seven eight"])
        for row in rows:
            self.assertLessEqual(client.text_width(row), 30)

    def test_wrap_cuts_long_words_and_counts_wide_characters(self) -> None:
        line = client.chat_line("14:05", "bo", "x" * 40 + " 日本語のテキスト日本語のテキスト", "me")
        rows = ["".join(text for text, _ in row) for row in client.wrap(line, 24)]
        self.assertTrue(all(client.text_width(row) <= 24 for row in rows), rows)
        self.assertTrue(all(row.startswith(" " * 12) for row in rows[1:]), rows)
        self.assertEqual("".join(row.replace(" ", "") for row in rows),
                         "[14:05]bo:" + "x" * 40 + "日本語のテキスト日本語のテキスト")

    def test_screen_plain_and_coloured(self) -> None:
        out = WatchedOutput()
        line = client.chat_line("14:05", "bob", "hello", "me")
        client.Screen(out, terminal=False, colour=False).show(line)
        client.Screen(out, terminal=True, colour=False).show(line)
        client.Screen(out, terminal=True, colour=True, bell=True).show(
            client.chat_line("14:05", "bob", "hello me", "me"))
        self.assertEqual(out.lines[:2], ["[14:05] bob: hello", "[14:05] bob: hello"])
        self.assertIn("\x1b[", out.lines[2])
        self.assertTrue(out.lines[2].endswith("\a"))

    def test_colour_wishes(self) -> None:
        saved = os.environ.pop("NO_COLOR", None)
        try:
            self.assertTrue(client.wants_colour(False))
            self.assertFalse(client.wants_colour(True))
            os.environ["NO_COLOR"] = "1"
            self.assertFalse(client.wants_colour(False))
        finally:
            os.environ.pop("NO_COLOR", None)
            if saved is not None:
                os.environ["NO_COLOR"] = saved
        self.assertFalse(client.terminal_is_capable(WatchedOutput()))


class KeyParserTests(unittest.TestCase):
    def test_keys(self) -> None:
        parser = client.KeyParser()
        self.assertEqual(parser.feed("ab\x1b[D\x7f\r\n\t\x1b[3~\x1bOH\x1bb\x01\x04"),
                         ["a", "b", "left", "backspace", "enter", "tab", "delete", "home",
                          "word-left", "home", "eof"])

    def test_an_escape_sequence_split_across_reads(self) -> None:
        parser = client.KeyParser()
        self.assertEqual(parser.feed("x\x1b["), ["x"])
        self.assertEqual(parser.feed("1;5"), [])
        self.assertEqual(parser.feed("Cy"), ["word-right", "y"])
        self.assertEqual(parser.feed("\x1b[99~é"), ["ignore", "é"])


class ScriptedTerminal:
    """Keys for the line editor from a script, one batch per read."""

    def __init__(self, batches: List[List[str]]) -> None:
        self.batches = batches
        self.on_resume = lambda: None

    def __enter__(self) -> "ScriptedTerminal":     # as a real terminal is used
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def read_keys(self) -> List[str]:
        if not self.batches:
            return ["eof"]
        batch = self.batches.pop(0)
        return batch() if callable(batch) else batch


class ContendedLock:
    """An RLock that tells when some thread has had to wait for it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.waited = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if not blocking:
            return False
        self.waited.set()
        return self._lock.acquire(True, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "ContendedLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class LineEditorTests(unittest.TestCase):
    WIDTH = 30

    def editor(self, batches, complete=lambda word, first: []) -> "tuple":
        screen = VirtualScreen(self.WIDTH, 8)
        editor = client.LineEditor(ScriptedTerminal(batches), screen, complete=complete)
        screen.write = screen.feed      # the editor writes to the screen
        screen.flush = lambda: None
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = str(self.WIDTH)
        self.addCleanup(lambda: os.environ.__setitem__("COLUMNS", old) if old
                        else os.environ.pop("COLUMNS", None))
        return editor, screen

    def test_editing_keys(self) -> None:
        keys = [list("helo"), ["left", "l", "end", "!"], ["home", "delete", "H"],
                ["enter"]]
        editor, screen = self.editor(keys)
        self.assertEqual(editor.read_line(), "Hello!")
        self.assertEqual(screen.text, "")       # the typed line is cleared once sent

    def test_a_paste_of_several_lines_keeps_every_line(self) -> None:
        # One read brings them all, as a paste or fast typing ahead does.
        editor, _ = self.editor([list("one") + ["enter"] + list("two") + ["enter"] +
                                 list("three") + ["enter"] + list("fo"), list("ur"), ["enter"]])
        self.assertEqual([editor.read_line() for _ in range(4)], ["one", "two", "three", "four"])

    def test_after_a_resize_the_input_area_is_cleared_at_the_new_width(self) -> None:
        # Terminals re-wrap what they show when resized: 42 characters take two rows
        # at 30 columns and three at 15, and all three must be erased.
        written: List[str] = []

        def arrives_after_a_resize() -> List[str]:
            os.environ["COLUMNS"] = "15"
            del written[:]
            editor.print_above("a message")
            return ["enter"]

        editor, screen = self.editor([list("x" * 40), arrives_after_a_resize])
        screen.write = lambda text: (written.append(text), screen.feed(text))
        editor.read_line()
        self.assertTrue(written[0].startswith("\r\033[2A\033[J"), written)

    def test_kill_and_word_keys(self) -> None:
        keys = [list("one two three"), ["kill-word"], ["word-left", "kill-after"],
                list("2"), ["home", "kill-before"], list("x"), ["enter"],
                list("gone"), ["end", "kill-before"], list("y"), ["enter"]]
        editor, _ = self.editor(keys)
        self.assertEqual(editor.read_line(), "xone 2")
        self.assertEqual(editor.read_line(), "y")

    def test_history_recall(self) -> None:
        keys = [list("first"), ["enter"], list("second"), ["enter"],
                list("draft"), ["up"], ["up"], ["up"], ["down"], ["down"], ["enter"]]
        editor, _ = self.editor(keys)
        self.assertEqual([editor.read_line() for _ in range(3)], ["first", "second", "draft"])

    def test_tab_completion(self) -> None:
        names = ["alice", "alfred", "bob"]
        complete = lambda word, first: [n for n in names if n.startswith(word)]
        keys = [list("b"), ["tab"], ["enter"], list("hi a"), ["tab"], ["tab"],
                list("i"), ["tab"], ["enter"]]
        editor, screen = self.editor(keys, complete)
        self.assertEqual(editor.read_line(), "bob: ")
        self.assertEqual(editor.read_line(), "hi alice ")
        self.assertIn("alice  alfred", screen.text)     # the choices, shown on the second Tab

    def test_ctrl_d_and_ctrl_c(self) -> None:
        editor, _ = self.editor([["eof"]])
        with self.assertRaises(EOFError):
            editor.read_line()
        editor, _ = self.editor([list("x"), ["interrupt"]])
        with self.assertRaises(KeyboardInterrupt):
            editor.read_line()

    def test_messages_arrive_above_a_half_typed_wrapped_line(self) -> None:
        long_text = "a fairly long half-typed line wrapping past one row"

        def message_arrives() -> List[str]:
            editor.print_above("[14:05] bob: hello there")
            editor.print_above("[14:05] bob: and again")
            return ["left", "left", "left"]

        def check_then_finish() -> List[str]:
            lines = [line for line in screen.lines if line]
            self.assertEqual(lines[:2], ["[14:05] bob: hello there", "[14:05] bob: and again"])
            self.assertEqual("".join(lines[2:]), "> " + long_text)
            cursor = (screen.row, screen.column)
            self.assertEqual(screen.rows[cursor[0]][cursor[1]], "r")   # 3 left of the end
            return ["enter"]

        editor, screen = self.editor([list(long_text), message_arrives, check_then_finish])
        self.assertEqual(editor.read_line(), long_text)
        self.assertEqual([line for line in screen.lines if line],
                         ["[14:05] bob: hello there", "[14:05] bob: and again"])

    def test_a_burst_of_joins_as_the_prompt_first_appears(self) -> None:
        # Issue 14: once, during a burst of joins, the prompt stayed on the replay's
        # first line ("> --- earlier messages ---"). The receiver thread was writing
        # that line (the editor not yet there) when the main thread drew its prompt:
        # here the receiver waits, in mid-write, until the main thread has either
        # drawn the prompt or is waiting for the screen, whichever it does.
        vt = VirtualScreen(60, 40)
        screen = client.Screen(vt, terminal=True, colour=False)
        screen.lock = ContendedLock()
        main_moved = screen.lock.waited     # set when main waits for the screen, or writes
        receiver_writing = threading.Event()

        def write(text: str) -> None:
            if threading.current_thread() is threading.main_thread():
                main_moved.set()
            elif "earlier messages" in text and not receiver_writing.is_set():
                receiver_writing.set()
                self.assertTrue(main_moved.wait(TIMEOUT))
            vt.feed(text)

        vt.write, vt.flush = write, lambda: None
        os.environ["COLUMNS"] = "60"
        self.addCleanup(os.environ.pop, "COLUMNS", None)

        def receive() -> None:
            screen.show(client.plain_line("--- earlier messages ---", "marker"))
            for number in range(20):
                screen.show(client.notice_line(f"user{number} joined", "14:05"))

        receiver = threading.Thread(target=receive)
        seen: List[str] = []

        def after_the_burst() -> List[str]:
            receiver.join(TIMEOUT)
            seen.extend(line for line in vt.lines if line)
            return ["eof"]

        session = types.SimpleNamespace(complete=lambda word, first: [], lost_reason=None,
                                        handle_line=print, leave=lambda: None,
                                        prompt=lambda: client.PROMPT,
                                        switch_room=lambda step: None)
        receiver.start()
        self.assertTrue(receiver_writing.wait(TIMEOUT))
        with contextlib.redirect_stdout(vt):
            client.read_lines(session, screen, ScriptedTerminal([after_the_burst]), True)
        self.assertEqual(seen[0], "--- earlier messages ---")
        self.assertEqual(seen[1:-1], [f"[14:05] -!- user{number} joined" for number in range(20)])
        self.assertEqual(seen[-1], ">")     # the prompt, alone on the last line

    def test_wide_characters_and_an_exactly_full_row(self) -> None:
        text = "日本語" * 4 + "x" * 4      # 28 columns after the 2-column prompt: exactly full

        def check() -> List[str]:
            self.assertEqual(screen.lines[0], "> " + "日本語" * 4 + "xxxx")
            self.assertEqual((screen.row, screen.column), (1, 0))
            editor.print_above("news")
            self.assertEqual(screen.lines[:2], ["news", "> " + "日本語" * 4 + "xxxx"])
            return ["home", "right"]

        def cursor_after_first_wide_char() -> List[str]:
            self.assertEqual((screen.row, screen.column), (1, 4))   # below "news" now
            return ["enter"]

        editor, screen = self.editor([list(text), check, cursor_after_first_wide_char])
        self.assertEqual(editor.read_line(), text)


@unittest.skipUnless(POSIX, "pseudo-terminals are POSIX")
class TerminalClientTests(ChatTestCase):
    """client.py on a real pseudo-terminal, as a person would use it."""

    COLUMNS, ROWS = 60, 16

    def start_client(self, *args: str, sigint: Any = signal.SIG_DFL) -> "tuple":
        """client.py on a new pseudo-terminal; `sigint` is how it inherits SIGINT."""
        import fcntl
        import pty
        import struct
        import termios

        def become_a_terminal_session() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            signal.signal(signal.SIGINT, sigint)

        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", self.ROWS, self.COLUMNS, 0, 0))
        env = dict(os.environ, TERM="xterm", COLUMNS=str(self.COLUMNS), LINES=str(self.ROWS),
                   PYTHONIOENCODING="utf-8")
        env.pop("NO_COLOR", None)
        # A session of its own with the terminal as its controlling terminal, as in a
        # real terminal window: that is what makes Ctrl-C a signal.
        proc = subprocess.Popen([sys.executable, CLIENT_SCRIPT, "127.0.0.1", str(self.port),
                                 *args], stdin=slave, stdout=slave, stderr=slave, env=env,
                                close_fds=True, start_new_session=True,
                                preexec_fn=become_a_terminal_session)
        os.close(slave)
        self.addCleanup(os.close, master)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        screen = VirtualScreen(self.COLUMNS, self.ROWS)
        return proc, master, screen

    def wait_for(self, master: int, screen: VirtualScreen, condition) -> None:
        """Read the terminal until condition(screen) holds; fail after TIMEOUT."""
        import select
        deadline = time.monotonic() + TIMEOUT
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while not condition(screen):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail("the screen never showed it:\n" + screen.text)
            if select.select([master], [], [], remaining)[0]:
                try:
                    screen.feed(decoder.decode(os.read(master, 65536)))
                except OSError:     # the client exited
                    if not condition(screen):
                        self.fail("the client ended first:\n" + screen.text)

    def test_what_is_typed_while_a_password_is_checked_is_not_shown(self) -> None:
        owner = self.peer("dora")
        owner.send({"type": "register", "password": "correct horse"})
        owner.expect("notice")
        owner.close()
        checked = threading.Event()     # the server has the wrong password: it waits a second

        class Watch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if "failed password" in record.getMessage():
                    checked.set()

        watch = Watch()
        logging.getLogger("chat").addHandler(watch)
        self.addCleanup(logging.getLogger("chat").removeHandler, watch)
        proc, master, screen = self.start_client("--name", "dora")
        self.wait_for(master, screen, lambda s: "password for dora" in s.text)
        os.write(master, b"wrong horse\r")
        self.assertTrue(checked.wait(TIMEOUT))
        os.write(master, b"correct horse\r")   # typed again, at once, by a user in a hurry
        self.wait_for(master, screen, lambda s: s.text.count("password for dora") == 2)
        self.assertNotIn("correct horse", screen.text)
        os.write(master, b"correct horse\r")
        self.wait_for(master, screen, lambda s: "#lobby>" in s.lines)
        os.write(master, b"\x04")
        self.assertEqual(proc.wait(TIMEOUT), 0)

    def test_half_typed_text_survives_an_arriving_message(self) -> None:
        alice = self.peer("alice")
        proc, master, screen = self.start_client("--name", "bob")
        self.wait_for(master, screen, lambda s: "#lobby>" in s.lines)   # the prompt alone
        alice.expect("join")
        os.write(master, "hello wor".encode())
        self.wait_for(master, screen, lambda s: "#lobby> hello wor" in s.lines)
        alice.say("a message from alice arrives now")
        self.wait_for(master, screen, lambda s: "#lobby> hello wor" in s.lines and any(
            "alice: a message from alice" in line for line in s.lines))
        lines = [line for line in screen.lines if line]
        self.assertRegex(lines[-2], r"^\[\d\d:\d\d\] alice: a message from alice arrives now$")
        self.assertEqual(lines[-1], "#lobby> hello wor")
        self.assertEqual((screen.row, screen.column),
                         (screen.lines.index("#lobby> hello wor"), 17))
        os.write(master, b"ld\r")
        self.assertEqual(alice.expect("message")["text"], "hello world")
        self.wait_for(master, screen, lambda s: any("bob: hello world" in line
                                                    for line in s.lines))
        shown = [line for line in screen.lines if "hello world" in line]
        self.assertEqual(len(shown), 1, screen.text)    # once, with the server's time
        os.write(master, b"\x04")                       # Ctrl-D leaves
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertEqual(alice.expect("leave")["reason"], "quit")

    def test_the_prompt_names_the_room_and_counts_what_waits_in_the_others(self) -> None:
        alice = self.peer("alice")
        enter(alice, "dev")
        proc, master, screen = self.start_client("--name", "bob")
        self.wait_for(master, screen, lambda s: "#lobby>" in s.lines)
        os.write(master, b"/join #dev\r")
        self.wait_for(master, screen, lambda s: "#dev>" in s.lines)
        alice.expect_next_of("join", room="dev")
        alice.send({"type": "say", "room": "lobby", "text": "over in the lobby"})
        self.wait_for(master, screen, lambda s: "#dev (1 unread)>" in s.lines)
        alice.send({"type": "say", "room": "dev", "text": "right here"})
        self.wait_for(master, screen, lambda s: any("right here" in line for line in s.lines)
                      and "#dev (1 unread)>" in s.lines)
        lines = [line for line in screen.lines if line]
        self.assertRegex(lines[-3], r"^\[\d\d:\d\d\] #lobby alice: over in the lobby$")
        self.assertRegex(lines[-2], r"^\[\d\d:\d\d\] alice: right here$")   # the current room's
        self.assertEqual(lines[-1], "#dev (1 unread)>")
        os.write(master, b"\x0e")      # Ctrl-N: the next room, its unread count cleared
        self.wait_for(master, screen, lambda s: "#lobby>" in s.lines)
        self.assertIn("-!- now in #lobby; its 1 unread line above is marked #lobby", screen.lines)
        os.write(master, b"\x1b[A")    # Up still recalls earlier lines
        self.wait_for(master, screen, lambda s: "#lobby> /join #dev" in s.lines)
        os.write(master, b"\x15\x10")  # Ctrl-U, then Ctrl-P: back to #dev
        self.wait_for(master, screen, lambda s: "#dev>" in s.lines)
        os.write(master, b"hi dev\r")
        said = alice.expect("message")
        self.assertEqual((said["room"], said["text"]), ("dev", "hi dev"))
        os.write(master, b"\x04")
        self.assertEqual(proc.wait(TIMEOUT), 0)

    def test_ctrl_c_leaves_cleanly(self) -> None:
        # Also when started with SIGINT ignored, as a shell script's background job is.
        alice = self.peer("alice")
        for number, inherited in enumerate((signal.SIG_DFL, signal.SIG_IGN)):
            with self.subTest(sigint=inherited):
                name = f"bob{number}"
                proc, master, screen = self.start_client("--name", name, sigint=inherited)
                self.wait_for(master, screen, lambda s: "#lobby>" in s.lines)
                alice.expect("join")
                os.write(master, b"\x03")
                self.assertEqual(proc.wait(TIMEOUT), 0)
                leave = alice.expect("leave")
                self.assertEqual((leave["name"], leave["reason"]), (name, "quit"))
                self.wait_for(master, screen, lambda s: "you left the chat" in s.text)
                self.assertNotIn("Traceback", screen.text)


    def test_ctrl_c_at_a_password_prompt_cancels_the_command_only(self) -> None:
        alice = self.peer("alice")
        proc, master, screen = self.start_client("--name", "bob")
        self.wait_for(master, screen, lambda s: "#lobby>" in s.lines)
        alice.expect("join")
        os.write(master, b"/register\r")
        self.wait_for(master, screen, lambda s: "new password:" in s.text)
        os.write(master, b"\x03")
        self.wait_for(master, screen, lambda s: "-!- cancelled" in s.lines)
        self.assertIn("new password:", screen.lines)     # the next line began anew
        os.write(master, b"still here\r")
        self.assertEqual(alice.expect("message")["text"], "still here")
        os.write(master, b"\x04")
        self.assertEqual(proc.wait(TIMEOUT), 0)

class ReconnectTests(unittest.TestCase):
    def test_the_client_reconnects_to_a_restarted_server_and_sends_what_waited(self) -> None:
        server = ServerThread()
        self.addCleanup(server.stop)
        port = server.port      # the restarted server listens at the same place
        bot = Process(CLIENT_SCRIPT, "127.0.0.1", str(port), "--name", "bot", "--retries", "5",
                      "--show-chat")
        self.addCleanup(bot.kill)
        bot.wait_for_line("connected to")
        bot.proc.stdin.write(b"/away lunch\n")    # away on the old server; not on the new
        bot.proc.stdin.flush()
        bot.wait_for_line("you are away")
        server.stop()
        bot.wait_for_line("trying to reconnect", "stderr")
        bot.proc.stdin.write(b"typed while the server was down\n")
        bot.proc.stdin.flush()
        bot.wait_for_line("will be sent when the connection is back", "stderr")
        self.addCleanup(ServerThread(port=port).stop)
        alice = Peer(port, "alice")
        self.addCleanup(alice.close)
        bot.wait_for_line("reconnected to", "stderr")
        self.assertEqual(alice.expect("message")["text"], "typed while the server was down")
        bot.proc.stdin.write(b"and after\n")
        bot.proc.stdin.close()
        self.assertEqual(alice.expect("message")["text"], "and after")
        self.assertEqual(bot.finish(), 0)
        # A new session is not away: saying something did not tell it "back" again.
        self.assertNotIn("-!- you are back", bot.output("stdout").splitlines())

    def test_after_a_reconnect_only_missed_messages_are_shown(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        first = ServerThread(db=path)
        self.addCleanup(first.stop)
        port = first.port
        alice = Peer(port, "alice")
        alice.say("said before bot came")
        alice.close()
        bot = Process(CLIENT_SCRIPT, "127.0.0.1", str(port), "--name", "bot", "--show-chat")
        self.addCleanup(bot.kill)
        bot.wait_for_line("said before bot came")      # from the replay on joining
        first.stop()
        bot.wait_for_line("trying to reconnect", "stderr")
        self.addCleanup(ServerThread(port=port, db=path).stop)
        carol = Peer(port, "carol")
        self.addCleanup(carol.close)
        carol.say("said while bot was away")
        bot.wait_for_line("reconnected", "stderr")
        bot.wait_for_line("said while bot was away")
        bot.proc.stdin.close()
        self.assertEqual(bot.finish(), 0)
        self.assertEqual(bot.output().count("said before bot came"), 1)

    def client_losing_its_server(self, *args: str) -> Process:
        """client.py, joined to a server that then stops: it is now reconnecting."""
        server = ServerThread()
        bot = Process(CLIENT_SCRIPT, "127.0.0.1", str(server.port), "--name", "bot",
                      "--show-chat", *args)
        self.addCleanup(bot.kill)
        bot.wait_for_line("connected to")
        server.stop()
        bot.wait_for_line("trying to reconnect", "stderr")
        return bot

    def test_quitting_while_reconnecting_is_a_normal_exit(self) -> None:
        bot = self.client_losing_its_server()
        bot.proc.stdin.write(b"/quit\n")
        bot.proc.stdin.close()
        self.assertEqual(bot.finish(), 0)
        self.assertNotIn("could not reconnect", bot.output("stderr"))

    def test_gives_up_and_says_what_was_not_sent(self) -> None:
        bot = self.client_losing_its_server("--retries", "1")
        bot.proc.stdin.write(b"lost cause\n/w amy lost whisper\n")
        bot.proc.stdin.flush()
        self.assertEqual(bot.finish(), 1)
        lines = bot.output("stderr").splitlines()
        # Why it reconnects, and for how long; then why it stopped.
        self.assertEqual(lines[:2], ["-!- The server is shutting down.",
                                     "-!- the server shut down (it may be restarting); trying "
                                     "to reconnect for about 1 s"])
        attempts = [line for line in lines if line.startswith("-!- attempt")]
        self.assertEqual(len(attempts), 1, lines)
        self.assertRegex(attempts[0], r"^-!- attempt 1 of 1 failed: cannot connect to .*refused$")
        self.assertIn("! could not reconnect (1 attempt over about 1 s)", lines)
        self.assertIn("! not sent: lost cause", lines)
        self.assertIn("! not sent: [whisper to amy] lost whisper", lines)     # (to whom)

    def test_a_failed_attempt_is_shown_only_when_its_reason_is_new(self) -> None:
        self.addCleanup(setattr, client, "RECONNECT_FIRST_DELAY", client.RECONNECT_FIRST_DELAY)
        client.RECONNECT_FIRST_DELAY = 0.001    # six attempts in a moment
        server = ServerThread()
        self.addCleanup(server.stop)
        reasons = ["connection refused"] * 3 + ["timed out"] * 2 + ["connection refused"]

        def rejoin(name: str, resume: Optional[str], rooms: list):
            raise client.CannotConnect(f"cannot connect: {reasons.pop(0)}\nIs it running?")

        connection, welcome = client.join("127.0.0.1", server.port, "bot")
        lost = threading.Event()
        session = client.ChatSession(connection, welcome, "here", make_screen(),
                                     on_lost=lost.set, rejoin=rejoin, retries=6)
        self.addCleanup(session.leave)
        session.start()
        server.stop()
        self.assertTrue(lost.wait(TIMEOUT))
        self.assertEqual([line for line in session.screen.out.lines if "attempt" in line],
                         ["-!- attempt 1 of 6 failed: cannot connect: connection refused",
                          "-!- attempt 4 of 6 failed: cannot connect: timed out",
                          "-!- attempt 6 of 6 failed: cannot connect: connection refused",
                          "! could not reconnect (6 attempts over about 1 s)"])


# ---------------------------------------------------------------------------
# Rooms, and the habits of IRC users: /nick, /away
# ---------------------------------------------------------------------------

def heard_in_rooms(peer: Peer, kinds: Tuple[str, ...]) -> List[tuple]:
    """What peer was sent of these kinds, up to now: (kind, its text or its name)."""
    return [(m["type"], m.get("text") or m.get("name")) for m in peer.sync()
            if m["type"] in kinds]


def enter(peer: Peer, room: str, key: Optional[str] = None) -> dict:
    """Join a room: its `room` frame (the replay that follows lands in peer.replay)."""
    request = {"type": "join", "room": room}
    if key is not None:
        request["key"] = key
    peer.send(request)
    peer.room = None
    peer.replay = peer.collect_history()
    return peer.room


class RoomTests(ChatTestCase):
    server_settings = {"failure_delay": 0.01}

    def test_a_room_is_made_on_first_use_and_only_its_members_hear_it(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        self.assertEqual(alice.room["room"], "lobby")   # everyone starts in the lobby
        room = enter(alice, "#Dev")
        self.assertEqual((room["room"], room["users"], room["ops"], room["count"], room["topic"]),
                         ("Dev", ["alice"], ["alice"], 1, ""))
        self.assertEqual(alice.replay[-1], {"type": "history_end", "for": "join", "count": 0,
                                            "room": "Dev"})
        self.assertEqual(enter(bob, "dev")["users"], ["alice", "bob"])  # matched without case
        self.assertEqual(alice.expect_next_of("join", room="Dev")["name"], "bob")
        alice.send({"type": "say", "room": "dev", "text": "in dev"})
        self.assertEqual(alice.expect("sent")["room"], "Dev")
        said = bob.expect("message")
        self.assertEqual((said["room"], said["from"], said["text"]), ("Dev", "alice", "in dev"))
        self.assertNotIn("message", [m["type"] for m in carol.sync()])
        self.assertNotIn("join", [m["type"] for m in carol.sync()])

    def test_who_comes_in_a_pass_gets_only_what_is_said_after(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        enter(alice, "dev")
        enter(bob, "dev")
        for peer in (alice, bob, carol):
            peer.sync()
        server, core = self.server.server, self.server.server.core

        def one_pass() -> int:      # four requests, handled in one loop pass
            session = core.members
            for who, request in (("alice", {"type": "say", "room": "dev", "text": "before"}),
                                 ("carol", {"type": "join", "room": "dev"}),
                                 ("bob", {"type": "say", "room": "dev", "text": "after"}),
                                 ("carol", {"type": "say", "room": "dev", "text": "mine"})):
                core.receive(session[who], request)
                server.execute()
            return len(server._batches)
        # One batch for the room, grown by carol, not a new one at her join.
        self.assertEqual(in_loop(self.server, one_pass), 1)

        def heard(peer: Peer) -> List[tuple]:
            return heard_in_rooms(peer, ("message", "sent", "join"))
        self.assertEqual(heard(alice), [("sent", "before"), ("join", "carol"),
                                        ("message", "after"), ("message", "mine")])
        self.assertEqual(heard(bob), [("message", "before"), ("join", "carol"),
                                      ("sent", "after"), ("message", "mine")])
        self.assertEqual(heard(carol), [("message", "after"), ("sent", "mine")])

    def test_who_drop_in_a_pass_are_told_in_one_batch_in_order(self) -> None:
        # Connections of one room ending together (a network gone) must not cost a
        # batch each, each walking the room: that grows with the square of their number.
        alice, bob, erin, dave, carol, frank = (self.peer(name) for name in
                                                ("alice", "bob", "erin", "dave", "carol", "frank"))
        for peer in (alice, bob, erin, frank):
            enter(peer, "dev")
        for peer in (bob, erin, frank):     # only in dev: their leaves are told to dev
            peer.send({"type": "part", "room": "lobby"})
            peer.expect("leave")
        for peer in (alice, bob, erin, dave, carol, frank):
            peer.sync()
        server, core = self.server.server, self.server.server.core
        session = core.members
        steps = (("say", "alice", "before"), ("close", "bob", True), ("join", "dave", None),
                 ("close", "erin", False), ("say", "alice", "after"), ("say", "dave", "mine"),
                 ("join", "carol", None), ("close", "carol", True), ("say", "alice", "last"),
                 ("close", "frank", True))

        def one_pass() -> int:
            for step, who, detail in steps:
                if step == "close":     # as the end of a connection does, or a lost one
                    core.close(session[who], "connection closed", graceful=detail)
                elif step == "join":
                    core.receive(session[who], {"type": "join", "room": "dev"})
                else:
                    core.receive(session[who], {"type": "say", "room": "dev", "text": detail})
                server.execute()
            return len(server._batches)
        batches = in_loop(self.server, one_pass)

        def heard(peer: Peer) -> List[tuple]:
            return heard_in_rooms(peer, ("message", "sent", "join", "leave"))
        self.assertEqual(heard(alice), [
            ("sent", "before"), ("leave", "bob"), ("join", "dave"), ("leave", "erin"),
            ("sent", "after"), ("message", "mine"), ("join", "carol"), ("leave", "carol"),
            ("sent", "last"), ("leave", "frank")])
        self.assertEqual(heard(dave), [
            ("leave", "erin"), ("message", "after"), ("sent", "mine"), ("join", "carol"),
            ("leave", "carol"), ("message", "last"), ("leave", "frank")])
        # The room's batch went on through the leaves of those only there. Carol was
        # in the lobby too: her leave is told to both rooms' people, once each, in a
        # batch of its own, and what followed it comes after it.
        self.assertEqual(batches, 3)

    def test_who_drop_from_the_same_rooms_in_a_pass_share_a_batch(self) -> None:
        # With client.py, whoever joined a room is in the lobby too. When many such
        # connections end together, their leaves (each told once to both rooms'
        # people) must not cost a batch each, each walking both rooms.
        names = ("alice", "dave", "bob", "erin", "henry", "ivan", "frank", "grace")
        peers = {name: self.peer(name) for name in names}
        for name in names[:-1]:             # grace stays in the lobby alone
            enter(peers[name], "dev")
        for peer in peers.values():
            peer.sync()
        server, core = self.server.server, self.server.server.core
        session = core.members
        steps = (("close", "bob"), ("close", "erin"), ("close", "henry"), ("close", "ivan"),
                 ("say", "alice"), ("close", "frank"), ("close", "grace"))

        def one_pass() -> int:
            for step, who in steps:
                if step == "close":
                    core.close(session[who], "connection closed")
                else:
                    core.receive(session[who], {"type": "say", "room": "dev", "text": "mid"})
                server.execute()
            return len(server._batches)
        batches = in_loop(self.server, one_pass)
        told = [("leave", "bob"), ("leave", "erin"), ("leave", "henry"), ("leave", "ivan"),
                ("message", "mid"), ("leave", "frank"), ("leave", "grace")]
        self.assertEqual(heard_in_rooms(peers["dave"], ("message", "sent", "leave")), told)
        self.assertEqual(heard_in_rooms(peers["alice"], ("message", "sent", "leave")),
                         [("sent", "mid") if step == ("message", "mid") else step
                          for step in told])
        # Four leaves from the lobby and dev: one batch. Then dev's message, frank's
        # leave (after it, so a batch of its own) and grace's, told to the lobby.
        self.assertEqual(batches, 4)

    def test_who_came_silently_between_two_removals_is_told_the_second(self) -> None:
        # A removal is told in every room of the removed, however big; a join to a
        # room too big for comings and goings is not told. The second removal from
        # the same rooms must still reach whoever came between the two.
        server = ServerThread(join_notices_up_to=2)
        self.addCleanup(server.stop)
        peers = {name: Peer(server.port, name) for name in ("alice", "bob", "erin", "dave")}
        for peer in peers.values():
            self.addCleanup(peer.close)
        for name in ("alice", "bob", "erin"):
            enter(peers[name], "dev")
        enter(peers["dave"], "ops")
        peers["dave"].send({"type": "part", "room": "lobby"})
        peers["dave"].expect("leave")
        for peer in peers.values():
            peer.sync()
        core = server.server.core

        def one_pass() -> None:
            core.remove(core.members["bob"], "kicked", "bob was removed")
            server.server.execute()
            core.receive(core.members["dave"], {"type": "join", "room": "dev"})
            server.server.execute()
            core.remove(core.members["erin"], "kicked", "erin was removed")
            server.server.execute()
        in_loop(server, one_pass)
        self.assertEqual(heard_in_rooms(peers["dave"], ("leave",)),
                         [("leave", "erin was removed")])
        self.assertEqual(heard_in_rooms(peers["alice"], ("leave",)),
                         [("leave", "bob was removed"), ("leave", "erin was removed")])

    def test_random_passes_reach_each_member_once_in_each_rooms_order(self) -> None:
        # Says, joins, parts and closes in one loop pass, drawn at random: each event
        # reaches exactly those who shared its room when it happened, once, and each
        # room's events come in the order they happened (rooms may interleave).
        server, core = self.server.server, self.server.server.core
        for seed in range(6):
            with self.subTest(seed=seed):
                draw = random.Random(seed)
                peers = {f"s{seed}p{n}": self.peer(f"s{seed}p{n}") for n in range(8)}
                for name, peer in peers.items():
                    for room in ("dev", "ops"):
                        if draw.random() < 0.6:
                            enter(peer, room)
                    if draw.random() < 0.3 and len(core.members[name].rooms) > 1:
                        peer.send({"type": "part", "room": "lobby"})
                        peer.expect("leave")
                for peer in peers.values():
                    peer.sync()
                expected = self._random_pass(server, core, draw, list(peers))
                for name, peer in peers.items():
                    if name in core.members:
                        self._assert_heard(peer, expected[name])

    def _random_pass(self, server, core, draw: random.Random, names: List[str]) -> dict:
        """Forty random steps in one loop pass; what each session should hear."""
        def one_pass() -> dict:
            heard: Dict[str, list] = collections.defaultdict(list)   # earlier seeds' too
            for step in range(40):
                live = [name for name in names if name in core.members]
                who = core.members[draw.choice(live)]
                mine = {room.ident: room for room in who.rooms}
                others = [core.rooms.all[key] for key in ("lobby", "dev", "ops")
                          if key not in mine and key in core.rooms.all]
                kind = draw.choice(["say"] * 3 + ["join", "part", "close"])
                if kind == "join" and others:
                    room = draw.choice(others)
                    for member in room.members.values():
                        heard[member.name].append(("join", room.ident, who.name))
                    core.receive(who, {"type": "join", "room": room.name})
                elif kind == "part" and len(mine) > 1:
                    room = mine[draw.choice(sorted(mine))]
                    for member in room.members.values():
                        heard[member.name].append(("leave", room.ident, who.name))
                    core.receive(who, {"type": "part", "room": room.name})
                elif kind == "close" and len(live) > 2:
                    for member in {m for room in mine.values() for m in room.members.values()}:
                        if member is not who:
                            shared = frozenset(key for key, room in mine.items()
                                               if member in room)
                            heard[member.name].append(("quit", shared, who.name))
                    core.close(who, "connection closed", graceful=draw.random() < 0.5)
                else:
                    room = mine[draw.choice(sorted(mine))]
                    text = f"step {step}"
                    for member in room.members.values():
                        heard[member.name].append(
                            ("sent" if member is who else "message", room.ident, text))
                    core.receive(who, {"type": "say", "room": room.name, "text": text})
                server.execute()
            return heard
        return in_loop(self.server, one_pass)

    def _assert_heard(self, peer: Peer, expected: list) -> None:
        got = []
        for message in peer.sync():
            kind = message["type"]
            if kind in ("message", "sent"):
                got.append((kind, message["room"].lower(), message["text"]))
            elif kind in ("join", "leave") and "room" in message:
                got.append((kind, message["room"].lower(), message["name"]))
            elif kind == "leave":
                got.append(("quit", None, message["name"]))
        quits = {name: rooms for kind, rooms, name in expected if kind == "quit"}
        comparable = [("quit", None, name) if kind == "quit" else (kind, room, name)
                      for kind, room, name in expected]
        self.assertEqual(collections.Counter(got), collections.Counter(comparable))
        for room in ("lobby", "dev", "ops"):
            def in_room(event: tuple) -> bool:
                return event[1] == room or (event[0] == "quit" and room in quits[event[2]])
            self.assertEqual([e for e in got if in_room(e)],
                             [e for e in comparable if in_room(e)], room)

    def test_a_client_that_knows_nothing_of_rooms_lives_in_the_lobby(self) -> None:
        old, new = self.peer("old"), self.peer("new")
        enter(new, "dev")
        old.send({"type": "say", "text": "no room named"})
        heard = new.expect("message")
        self.assertEqual((heard["room"], heard["text"]), ("lobby", "no room named"))
        new.send({"type": "say", "room": "dev", "text": "elsewhere"})
        new.send({"type": "say", "text": "in the lobby"})
        self.assertEqual(old.expect("message")["text"], "in the lobby")

    def test_what_was_said_before_a_part_comes_before_the_leave(self) -> None:
        # Said, then parted, in one read: the part must not overtake the echo of
        # what was said (or anything else said in the room before the part).
        alice, bob = self.peer("alice"), self.peer("bob")
        enter(alice, "dev")
        enter(bob, "dev")
        alice.send({"type": "say", "room": "dev", "text": "first"})
        bob.expect("message")
        bob.sock.sendall(socket_server.encode_frame({"type": "say", "room": "dev", "text": "bye"})
                         + socket_server.encode_frame({"type": "part", "room": "dev"}))
        kinds = [message["type"] for message in bob.sync()]
        self.assertIn("leave", kinds)
        self.assertLess(kinds.index("sent"), kinds.index("leave"), kinds)

    def test_part_tells_the_room_and_the_one_who_left(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        enter(alice, "dev")
        enter(bob, "dev")
        bob.send({"type": "part", "room": "#dev", "text": "lunch"})
        mine = bob.expect("leave")
        self.assertEqual((mine["room"], mine["name"], mine["reason"], mine["comment"]),
                         ("dev", "bob", "part", "lunch"))
        theirs = alice.expect_next_of("leave", room="dev")
        self.assertEqual(theirs["name"], "bob")
        bob.send({"type": "say", "room": "dev", "text": "still here?"})
        self.assertEqual(bob.expect("error")["code"], "not_in_room")
        bob.send({"type": "part", "room": "lobby"})     # even the lobby, leaving none
        self.assertEqual(bob.expect("leave")["room"], "lobby")
        bob.send({"type": "whisper", "to": "alice", "text": "whispers still work"})
        self.assertEqual(alice.expect("whisper")["text"], "whispers still work")

    def test_bad_names_missing_rooms_and_rooms_not_joined(self) -> None:
        alice = self.peer("alice")
        for word in ("", "#", "...", "a b", "x" * 33, "d\u00e9v", "#-"):
            with self.subTest(word=word):
                alice.send({"type": "join", "room": word})
                self.assertEqual(alice.expect("error")["code"], "bad_room")
        for request in ({"type": "topic", "room": "nowhere"}, {"type": "part", "room": "x"},
                        {"type": "who", "room": "nowhere"}):
            alice.send(request)
            self.assertIn(alice.expect("error")["code"], ("no_such_room",))
        bob = self.peer("bob")
        enter(bob, "secret")
        for request in ({"type": "say", "room": "secret", "text": "hi"},
                        {"type": "get_history", "room": "secret"},
                        {"type": "search", "room": "secret", "text": "hi"}):
            alice.send(request)
            self.assertEqual(alice.expect("error")["code"], "not_in_room")

    def test_topics_are_set_by_operators_and_shown_to_newcomers(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        enter(alice, "dev")
        enter(bob, "dev")
        bob.send({"type": "topic", "room": "dev", "text": "mine now"})
        self.assertEqual(bob.expect("error")["code"], "not_room_operator")
        alice.send({"type": "topic", "room": "dev", "text": "  release\tfriday "})
        topic = bob.expect("topic")
        self.assertEqual((topic["room"], topic["topic"], topic["by"]), ("dev", "release friday",
                                                                        "alice"))
        carol = self.peer("carol")
        carol.send({"type": "topic", "room": "dev"})    # asking needs no membership
        self.assertEqual(carol.expect("topic")["topic"], "release friday")
        room = enter(carol, "dev")
        self.assertEqual((room["topic"], room["topic_by"]), ("release friday", "alice"))
        alice.send({"type": "topic", "room": "dev", "text": "x" * 350})
        error = alice.expect("error")
        self.assertEqual(error["code"], "too_long")
        self.assertIn("that one had 350", error["text"])
        carol.send({"type": "rooms"})
        listed = {entry["room"]: entry for entry in carol.expect("rooms")["rooms"]}
        self.assertEqual((listed["dev"]["count"], listed["dev"]["topic"]), (3, "release friday"))
        self.assertEqual(listed["lobby"]["count"], 3)

    def test_a_key_keeps_a_room_closed(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        enter(alice, "ops")
        alice.send({"type": "key", "room": "ops", "key": "s3cret"})
        self.assertEqual(alice.expect("key")["key"], "s3cret")
        bob.send({"type": "join", "room": "ops"})
        self.assertIn("needs a key", bob.expect("error")["text"])
        bob.send({"type": "join", "room": "ops", "key": "guess"})
        self.assertEqual(bob.expect("error")["code"], "bad_key")
        self.assertEqual(enter(bob, "ops", "s3cret")["key"], "s3cret")
        carol = self.peer("carol")      # outside: told that there is a key, not what it is
        carol.send({"type": "rooms"})
        listed = {entry["room"]: entry for entry in carol.expect("rooms")["rooms"]}
        self.assertEqual((listed["ops"].get("keyed"), listed["lobby"].get("keyed")), (True, None))
        carol.send({"type": "topic", "room": "ops"})
        topic = carol.expect("topic")
        self.assertEqual((topic.get("keyed"), topic.get("key")), (True, None))
        for key in ("nope", ""):    # said so to anyone, operator or not: no lobby key
            alice.send({"type": "key", "room": "lobby", "key": key})
            self.assertIn("The lobby is for everyone", alice.expect("error")["text"])
        alice.send({"type": "key", "room": "ops", "key": "has space"})
        self.assertEqual(alice.expect("error")["code"], "bad_key")
        alice.send({"type": "key", "room": "ops", "key": ""})
        self.assertEqual(bob.expect_next_of("key", room="ops")["key"], "")

    def test_operators_pass_their_status_on_and_kick(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        for peer in (alice, bob, carol):
            enter(peer, "dev")
        carol.send({"type": "kick", "room": "dev", "name": "bob"})
        self.assertEqual(carol.expect("error")["code"], "not_room_operator")
        alice.send({"type": "room_op", "room": "dev", "name": "carol"})
        self.assertEqual(bob.expect_next_of("room_op", room="dev")["name"], "carol")
        carol.send({"type": "kick", "room": "dev", "name": "BOB", "text": "off topic"})
        kicked = bob.expect_next_of("leave", room="dev")
        self.assertEqual((kicked["reason"], kicked["by"], kicked["comment"], kicked["text"]),
                         ("kicked", "carol", "off topic",
                          "bob was kicked from #dev by carol: off topic"))
        self.assertEqual(alice.expect_next_of("leave", room="dev")["name"], "bob")
        bob.say("still in the chat")    # a room kick is no disconnect
        alice.send({"type": "room_op", "room": "dev", "name": "carol", "op": False})
        alice.expect_next_of("room_op", room="dev")
        carol.send({"type": "topic", "room": "dev", "text": "no longer"})
        self.assertEqual(carol.expect("error")["code"], "not_room_operator")
        alice.send({"type": "kick", "room": "dev", "name": "nobody"})
        self.assertEqual(alice.expect("error")["code"], "unknown_user")

    def test_a_hello_asking_for_many_new_rooms_is_refused_some_not_cut_off(self) -> None:
        server = ServerThread(rate_limit=5, rate_burst=20)     # flood control as by default
        self.addCleanup(server.stop)
        watcher, many = Peer(server.port, "watcher"), Peer(server.port)
        self.addCleanup(watcher.close)
        self.addCleanup(many.close)
        enter(watcher, "there")
        many.send({"type": "hello", "name": "many",
                   "rooms": [f"new{number}" for number in range(45)] + ["there"]})
        frames = []
        while not (frames and frames[-1]["type"] == "room" and frames[-1]["room"] == "there"):
            frames.append(many.receive())
        refused = [frame for frame in frames if frame["type"] == "error"]
        self.assertTrue(refused and all(frame["code"] == "rate_limited" for frame in refused))
        self.assertEqual(watcher.expect_next_of("join", room="there")["name"], "many")
        watcher.send({"type": "who", "room": "there"})   # over the rate, not cut off
        self.assertEqual(watcher.expect("users")["users"], ["many", "watcher"])

    def test_the_first_into_a_room_nobody_runs_runs_it(self) -> None:
        # As on IRC: else a room whose maker left would have no operator ever again.
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        enter(alice, "dev")
        alice.send({"type": "part", "room": "dev"})
        alice.expect("leave")
        self.assertEqual(enter(bob, "dev")["ops"], ["bob"])
        self.assertEqual(enter(carol, "dev")["ops"], ["bob"])  # someone is there: no change
        self.assertEqual(enter(alice, "dev")["ops"], ["bob"])

    def test_a_room_whose_last_operator_leaves_is_run_by_who_was_there_longest(self) -> None:
        # Else nobody could set its topic, or kick, until it emptied (two trials hit it).
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        for person in (alice, bob, carol):
            enter(person, "dev")
        alice.send({"type": "part", "room": "dev"})
        frames = []
        while not frames or frames[-1]["type"] != "room_op":
            frames.append(carol.receive())
        self.assertEqual([frame["type"] for frame in frames if frame.get("room") == "dev"],
                         ["leave", "room_op"])      # told after the leaving, as it happened
        self.assertEqual({key: frames[-1][key] for key in ("room", "name", "op", "by", "heir")},
                         {"room": "dev", "name": "bob", "op": True, "by": "server",
                          "heir": True})
        bob.send({"type": "topic", "room": "dev", "text": "bob runs it"})
        self.assertEqual(carol.expect("topic")["topic"], "bob runs it")
        bob.close()                         # a lost connection hands it on too
        self.assertEqual(carol.expect_next_of("room_op", room="dev")["name"], "carol")
        carol.send({"type": "who", "room": "dev"})
        self.assertEqual(carol.expect("users")["ops"], ["carol"])
        carol.send({"type": "part", "room": "dev"})     # the last: nobody to hand it to
        carol.expect_next_of("leave", room="dev")
        self.assertEqual(enter(alice, "dev")["ops"], ["alice"])

    def test_history_is_per_room_and_search_can_span_them(self) -> None:
        alice = self.peer("alice")
        enter(alice, "dev")
        alice.send({"type": "say", "room": "dev", "text": "deploy at noon"})
        alice.send({"type": "say", "room": "lobby", "text": "lunch at noon"})
        alice.expect("sent")
        alice.expect("sent")
        bob = self.peer("bob")
        lobby_replay = [m["text"] for m in bob.replay if m["type"] == "history"]
        self.assertEqual(lobby_replay, ["lunch at noon"])
        enter(bob, "dev")
        self.assertEqual([(m["room"], m["text"]) for m in bob.replay if m["type"] == "history"],
                         [("dev", "deploy at noon")])
        bob.send({"type": "get_history", "room": "dev"})
        batch = bob.collect_history()
        self.assertEqual([m["text"] for m in batch[:-1]], ["deploy at noon"])
        self.assertEqual(batch[-1]["room"], "dev")
        bob.send({"type": "search", "text": "noon", "room": "dev"})
        self.assertEqual([m["text"] for m in bob.collect_history()[:-1]], ["deploy at noon"])
        bob.send({"type": "search", "text": "noon", "all": True})
        self.assertEqual(len(bob.collect_history()[:-1]), 2)

    def test_a_quit_is_one_leave_for_those_who_shared_a_room(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        for room in ("one", "two"):
            enter(alice, room)
            enter(bob, room)
        carol.send({"type": "part", "room": "lobby"})
        carol.expect("leave")
        bob.send({"type": "bye"})
        leaves = [m for m in alice.sync() + alice.sync()
                  if m["type"] == "leave" and m["name"] == "bob"]
        self.assertEqual(len(leaves), 1)
        self.assertEqual((leaves[0]["name"], leaves[0]["reason"]), ("bob", "quit"))
        self.assertNotIn("room", leaves[0])     # out of every room at once
        self.assertNotIn("leave", [m["type"] for m in carol.sync()])     # shared none

    def test_room_limits(self) -> None:
        server = ServerThread(max_rooms=2, max_room_size=1)
        self.addCleanup(server.stop)
        alice, bob = Peer(server.port, "alice"), Peer(server.port, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)
        enter(alice, "only")
        alice.send({"type": "join", "room": "another"})
        self.assertEqual(alice.expect("error")["code"], "too_many_rooms")
        bob.send({"type": "join", "room": "only"})
        self.assertEqual(bob.expect("error")["code"], "room_full")

    def test_hello_can_name_the_rooms_to_be_in(self) -> None:
        alice = self.peer("alice")
        enter(alice, "ops")
        alice.send({"type": "key", "room": "ops", "key": "k"})
        bob = self.peer()
        bob.send({"type": "hello", "name": "bob", "rooms": ["dev", {"room": "ops", "key": "k"},
                                                            {"room": "bad name"}, 7]})
        bob.expect("welcome")
        rooms = [m for m in bob.sync() if m["type"] in ("room", "error")]
        self.assertEqual([m.get("room") or m["code"] for m in rooms],
                         ["dev", "ops", "bad_room", "bad_message"])
        quiet = self.peer()
        quiet.send({"type": "hello", "name": "irc_like", "rooms": []})
        quiet.expect("welcome")
        self.assertEqual([m["type"] for m in quiet.sync()], [])    # in no room at all

    def test_rooms_topics_keys_and_operators_outlast_a_restart(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        first = ServerThread(db=path, failure_delay=0.01)
        owner, guest = Peer(first.port, "owner"), Peer(first.port, "guest")
        owner.send({"type": "register", "password": "correct horse"})
        owner.expect("notice")
        enter(owner, "dev")
        enter(guest, "dev")
        owner.send({"type": "room_op", "room": "dev", "name": "guest"})
        owner.send({"type": "topic", "room": "dev", "text": "kept"})
        owner.send({"type": "key", "room": "dev", "key": "k"})
        owner.send({"type": "say", "room": "dev", "text": "remember me"})
        owner.expect("sent")
        for peer in (owner, guest):
            peer.close()
        first.stop()
        second = ServerThread(db=path, failure_delay=0.01, port=first.port)
        self.addCleanup(second.stop)
        back = Peer(second.port)
        self.addCleanup(back.close)
        back.send({"type": "hello", "name": "owner", "name_password": "correct horse"})
        back.expect("welcome")
        back.collect_history()
        room = enter(back, "dev", "k")
        self.assertEqual((room["topic"], room["ops"]), ("kept", ["owner"]))
        self.assertIn("remember me", [m.get("text") for m in back.replay])
        guest = Peer(second.port, "guest")      # a name anyone may take: no lasting status
        self.addCleanup(guest.close)
        self.assertEqual(enter(guest, "dev", "k")["ops"], ["owner"])


class NickAndAwayTests(ChatTestCase):
    server_settings = {"failure_delay": 0.01}

    def test_nick_renames_and_the_rooms_hear_it(self) -> None:
        alice, bob, carol = self.peer("alice"), self.peer("bob"), self.peer("carol")
        enter(alice, "dev")
        enter(bob, "dev")
        carol.send({"type": "part", "room": "lobby"})
        carol.expect("leave")
        alice.send({"type": "nick", "name": "alicia"})
        change = bob.expect("nick")
        self.assertEqual((change["name"], change["new"]), ("alice", "alicia"))
        self.assertEqual(alice.expect("nick")["new"], "alicia")     # and she is told
        self.assertEqual([m["type"] for m in carol.sync()], [])     # shares no room
        bob.send({"type": "whisper", "to": "alicia", "text": "found you"})
        self.assertEqual(alice.expect("whisper")["text"], "found you")
        bob.send({"type": "nick", "name": "ALICIA"})
        self.assertEqual(bob.expect("error")["code"], "name_taken")
        alice.send({"type": "nick", "name": "Alicia"})     # her own, in other letters
        self.assertEqual(bob.expect("nick")["new"], "Alicia")
        for bad, code in (("no spaces", "bad_name"), ("...", "bad_name"),
                          ("Server", "name_reserved")):
            alice.send({"type": "nick", "name": bad})
            self.assertEqual(alice.expect("error")["code"], code)
        alice.send({"type": "who", "room": "dev"})
        self.assertEqual(alice.expect("users")["users"], ["Alicia", "bob"])

    def test_a_registered_name_needs_its_password(self) -> None:
        dave = self.peer("dave")
        dave.send({"type": "register", "password": "correct horse"})
        dave.expect("notice")
        dave.send({"type": "bye"})
        dave.read_until_closed()
        eve = self.peer("eve")
        eve.send({"type": "nick", "name": "dave"})
        self.assertEqual(eve.expect("error")["code"], "name_protected")
        eve.send({"type": "nick", "name": "dave", "name_password": "wrong horse"})
        self.assertEqual(eve.expect("error")["code"], "bad_name_password")
        eve.send({"type": "nick", "name": "dave", "name_password": "correct horse"})
        self.assertEqual(eve.expect("nick")["new"], "dave")

    def test_two_taking_the_same_name_at_once_one_gets_it(self) -> None:
        first, second = self.peer("first"), self.peer("second")
        both = encode_frame({"type": "nick", "name": "wanted"})
        first.send_raw(both)
        second.send_raw(both)
        outcomes = []
        for peer, own in ((first, "first"), (second, "second")):
            for message in peer.sync():
                if message["type"] == "nick" and message["name"] == own:
                    outcomes.append("renamed")
                elif message["type"] == "error":
                    outcomes.append(message["code"])
        self.assertEqual(sorted(outcomes), ["name_taken", "renamed"])
        names = set()
        for peer in (first, second):
            peer.send({"type": "who"})
            names.update(peer.expect("users")["users"])
        self.assertEqual(len(names), 2)
        self.assertIn("wanted", names)

    def test_away_is_shown_and_answers_whispers_until_you_say_you_are_back(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        bob.send({"type": "away", "text": "at lunch"})
        away = alice.expect("away")
        self.assertEqual(away, {"type": "away", "name": "bob", "text": "at lunch",
                                "ts": away.get("ts")})
        self.assertRegex(away["ts"], r"^\d{4}-\d\d-\d\dT")   # news has its time, as all do
        self.assertRegex(client.format_message(away, "alice")[0].plain,
                         r"^\[\d\d:\d\d\] -!- bob is away: at lunch$")
        bob.expect("away")
        for _ in range(3):      # the same again: bob hears it, the others nothing
            bob.send({"type": "away", "text": "at lunch"})
            self.assertEqual(bob.expect("away")["text"], "at lunch")
        self.assertNotIn("away", [frame["type"] for frame in alice.sync()])
        alice.send({"type": "who"})
        self.assertEqual(alice.expect("users")["away"], ["bob"])
        alice.send({"type": "whisper", "to": "bob", "text": "ping?"})
        alice.expect("sent")
        notice = alice.expect("notice")
        self.assertEqual((notice["code"], notice["name"], notice["away"], notice["text"]),
                         ("away", "bob", "at lunch", "bob is away: at lunch"))
        bob.say("typed by my away bot")    # speaking is no request to be back (IRC's rule)
        alice.expect("message")
        self.assertNotIn("away", [frame["type"] for frame in alice.sync()])
        bob.send({"type": "away"})
        self.assertEqual(alice.expect("away")["text"], None)
        alice.send({"type": "who"})
        self.assertEqual(alice.expect("users")["away"], [])


# ---------------------------------------------------------------------------
# IRC: any IRC client joins the same rooms
# ---------------------------------------------------------------------------

class IrcPeer:
    """A test IRC client: lines in and out over a blocking socket with a timeout."""

    def __init__(self, port: int, nick: Optional[str] = None, caps: str = "",
                 password: Optional[str] = None, tls: bool = False) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        if tls:     # the test certificates are self-signed: trusted as they come
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self.sock = context.wrap_socket(self.sock)
        self.buffer = b""
        self.syncs = 0
        if nick:
            self.register(nick, caps, password)

    def register(self, nick: str, caps: str = "", password: Optional[str] = None) -> List[str]:
        """Log in; the lines up to the end of the MOTD."""
        if caps:
            self.send("CAP LS 302")
            self.expect(r" CAP \* LS ")
            self.send(f"CAP REQ :{caps}")
            self.expect(r" CAP \S+ ACK ")
        if password is not None:
            self.send(f"PASS {password}")
        self.send(f"NICK {nick}")
        self.send(f"USER {nick} 0 * :{nick} the tester")
        if caps:
            self.send("CAP END")
        return self.until(r" 376 ")

    def send(self, line: str) -> None:
        self.sock.sendall(line.encode("utf-8") + b"\r\n")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> str:
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("connection closed while a line was expected")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        self.assertable(line)
        return line.decode("utf-8")

    @staticmethod
    def assertable(line: bytes) -> None:
        if len(line.split(b" ", 1)[1] if line.startswith(b"@") else line) + 2 > 512:
            raise AssertionError(f"a line of over 512 bytes: {line[:80]!r}...")

    def expect(self, pattern: str) -> re.Match:
        """Read until a line matches; the others are dropped."""
        while True:
            line = self.line()
            match = re.search(pattern, line)
            if match:
                return match

    def until(self, pattern: str) -> List[str]:
        """The lines up to and including the first that matches."""
        lines = []
        while True:
            lines.append(self.line())
            if re.search(pattern, lines[-1]):
                return lines

    def sync(self) -> List[str]:
        """Everything that arrives before the answer to a PING of ours."""
        self.syncs += 1
        self.send(f"PING :sync{self.syncs}")
        lines = self.until(rf"PONG \S+ :sync{self.syncs}$")
        return lines[:-1]

    def read_until_closed(self) -> List[str]:
        lines = []
        while True:
            try:
                lines.append(self.line())
            except (AssertionError, ConnectionResetError):
                return lines

    def close(self) -> None:
        self.sock.close()


class JsonCodecTests(unittest.TestCase):
    """The JSON codec alone, without a socket."""

    def test_a_message_and_its_answer_take_the_quick_way_to_the_same_frame(self) -> None:
        codec = socket_server.JsonCodec()
        texts = ["hi", 'say "quoted" \\ back\\slash /', "".join(map(chr, range(32))) + "\x7f",
                 "line\u2028sep\u2029", "naïve café 日本語", "\U0001f600" * 50, "x" * 4000]
        for text in texts:
            for room, sender in (("lobby", "bob"), ("Dev-Ops", "a.b_c-d"), ("r" * 32, "n" * 32)):
                # As ChatCore.on_say builds them.
                said = {"type": "message", "room": room, "from": sender, "text": text,
                        "ts": "2026-12-02T05:00:00.000Z"}
                ack = {"type": "sent", "room": room, "text": text, "ts": said["ts"]}
                for event in (said, ack):
                    self.assertIsNotNone(socket_server.quick_json(event))
                    self.assertEqual(codec.encode_shared(event), encode_frame(event))
                    self.assertEqual(codec.encode(event), encode_frame(event))
                    self.assertEqual(decode_payload(codec.encode(event)[10:]), event)
                # An action, an id, a whisper's answer, as many keys but another one:
                # the general way, to the same bytes.
                unlike = [{**event, **extra} for event in (said, ack)
                          for extra in ({"action": True}, {"id": "7"})]
                unlike += [{**{key: value for key, value in event.items() if key != gone},
                            **extra} for event in (said, ack) for gone in event if gone != "type"
                           for extra in ({"action": True}, {"to": "bob"})]
                for event in unlike:
                    self.assertIsNone(socket_server.quick_json(event), event)
                    self.assertEqual(codec.encode(event), encode_frame(event))
        for broken in ("lone \ud800 surrogate", "x" * socket_server.MAX_PAYLOAD):
            with self.assertRaises(ValueError):
                codec.encode_shared({**said, "text": broken})
            with self.assertRaises(ValueError):
                encode_frame({**said, "text": broken})

    def test_a_text_is_quoted_once_for_its_message_and_its_sent_if_short(self) -> None:
        codec, kept = socket_server.JsonCodec(), socket_server._quoted_text
        limit = socket_server.QUOTED_TEXT_LENGTH
        self.assertEqual(kept.cache_info().maxsize, socket_server.QUOTED_TEXTS)
        for text, is_kept in (("a short one " + "é" * 20, True), ("x" * (limit + 1), False)):
            said = {"type": "message", "room": "lobby", "from": "bob", "text": text,
                    "ts": "2026-12-07T02:00:00.000Z"}
            ack = {"type": "sent", "room": "lobby", "text": text, "ts": said["ts"]}
            kept.cache_clear()
            self.assertEqual([codec.encode_shared(said), codec.encode(ack)],
                             [encode_frame(said), encode_frame(ack)])
            info = kept.cache_info()
            self.assertEqual((info.currsize, info.hits), (1, 1) if is_kept else (0, 0))


    def test_a_listing_grown_name_by_name_writes_what_the_encoder_would(self) -> None:
        """Audience.add makes each newcomer's listing from the last one (with_name),
        joining kept JSON strings: it must be the same JSON, and the last one unchanged."""
        self.addCleanup(setattr, socket_server, "MAX_LISTED_NAMES",
                        socket_server.MAX_LISTED_NAMES)
        socket_server.MAX_LISTED_NAMES = 4
        codec = socket_server.JsonCodec()
        audience = socket_server.Audience()
        names = ["mia", 'say"q', "Zoë", "b\\s", "日本", "\U0001f600x", "aaron", "nina"]
        listings = []
        for number, name in enumerate(names):
            session = socket_server.Session(f"link{number}", "10.0.0.1", 0.0)
            session.name, session.key = name, name.lower()
            audience.add(session)
            listing = audience.listed()
            listings.append((listing, list(listing)))
            expected = sorted(names[:number + 1], key=str.lower)[:4]
            self.assertEqual(listing, expected)
            event = {"type": "room", "room": "dev", "users": listing, "count": number + 1}
            self.assertEqual(listing.json(), socket_server.to_json(expected))
            self.assertEqual(decode_payload(codec.encode(event)[10:]), {**event, "users": expected})
        for listing, names_then in listings:     # events made earlier still hold theirs
            self.assertEqual(listing, names_then)
            self.assertEqual(listing.json(), socket_server.to_json(names_then))

    def test_a_listing_kept_through_comings_goings_and_renames_is_what_the_encoder_writes(
            self) -> None:
        """A leave among the first names is noted, and taken out of the kept JSON
        when a listing is next asked for, with the next name put in (Listing.without),
        or after LISTING_LEAVES_KEPT of them the listing is made again; a join puts
        its name in (with_name). After each of 400 changes in a seeded order, with
        runs of leaves nobody asks between, the listing is the first names, sorted,
        and its JSON theirs; earlier ones are unchanged."""
        for name in ("MAX_LISTED_NAMES", "LISTING_LEAVES_KEPT"):
            self.addCleanup(setattr, socket_server, name, getattr(socket_server, name))
        # Names as people have them, whose listings are cut; names with commas, and
        # names no client can take, with quotes and backslashes, whose are encoded.
        usual = ["mia", "Zoe", "aaron", "nina", "zed", "Bo", "a", "ab", "abc", "a.b", "a-b",
                 "_x", "x_", "Mia2", "b", "ba", "n1", "n.1", "zz"]
        commas = usual[:12] + ["a,", ",b", "b,", "m,,n"]
        odd = ["mia", 'say"q', "Zoë", "b\\s", "日本", "\U0001f600x", "aaron", "nina", 'q",',
               ',"x', "zed", "Bo", "a", "ab", "abc", "c\\", "m i", '"a', 'x"ab', "a,"]
        for listed, pool, kept_leaves in itertools.product((1, 8), (usual, commas, odd),
                                                           (1, 8)):
            socket_server.MAX_LISTED_NAMES = listed
            socket_server.LISTING_LEAVES_KEPT = kept_leaves
            with self.subTest(listed=listed, pool=pool[-1], kept_leaves=kept_leaves):
                self._walk_listings(random.Random(7), pool, ask=0.3)

    def _walk_listings(self, chance: random.Random, pool: List[str], ask: float) -> None:
        audience, sessions, kept = socket_server.Audience(), {}, []
        for step in range(1000):
            absent = [name for name in pool if name.lower() not in sessions]
            move = chance.choice(["join"] * 3 + ["leave"] * 2 + ["rename"] if sessions
                                 else ["join"])
            if move == "join" and absent:
                session = socket_server.Session(f"link{step}", "10.0.0.1", 0.0)
                session.name = chance.choice(absent)
                session.key = session.name.lower()
                sessions[session.key] = session
                audience.add(session)
            elif move == "leave" or (move == "rename" and not absent):
                session = sessions.pop(chance.choice(sorted(sessions)))
                audience.discard(session)
            elif move == "rename":
                session = sessions.pop(chance.choice(sorted(sessions)))
                old_key = session.key
                session.name = chance.choice(absent)
                session.key = session.name.lower()
                sessions[session.key] = session
                audience.rename(old_key, session)
            if chance.random() < ask:   # not asked after every change: some go unasked
                listing = audience.listed()
                expected = sorted((each.name for each in sessions.values()),
                                  key=str.lower)[:socket_server.MAX_LISTED_NAMES]
                self.assertEqual(listing, expected, f"step {step}: {move}")
                self.assertEqual(listing.json(), socket_server.to_json(expected),
                                 f"step {step}: {move}")
                kept.append((listing, expected))
        for listing, names_then in kept:
            self.assertEqual(listing, names_then)
            self.assertEqual(listing.json(), socket_server.to_json(names_then))


class IrcCodecTests(unittest.TestCase):
    """The IRC codec alone, without a socket."""

    def test_only_the_ascii_space_separates_parameters(self) -> None:
        parse = socket_server.parse_irc_line
        self.assertEqual(parse(b"PRIVMSG bob tabs\there"), ("PRIVMSG", ["bob", "tabs\there"]))
        self.assertEqual(parse("privmsg  bob   héllo\u00a0world".encode()),
                         ("PRIVMSG", ["bob", "héllo\u00a0world"]))
        self.assertEqual(parse(b"PRIVMSG bob \x1funderlined\x1f"),
                         ("PRIVMSG", ["bob", "\x1funderlined\x1f"]))
        self.assertEqual(parse(b":me!u@h  NICK  new  "), ("NICK", ["new"]))
        self.assertEqual(parse(b"PRIVMSG #a :  two spaces "), ("PRIVMSG", ["#a", "  two spaces "]))
        self.assertIsNone(parse(b"   "))

    def test_a_plain_message_one_line_holds_takes_the_quick_way_to_the_same_line(self) -> None:
        name = "n" * 32
        # With the long names, a line has room for 326 bytes of text (317 for an
        # action); with the short ones, for about 450. Texts around both, in
        # characters of one, two and four bytes, and what the quick way leaves to the
        # general one.
        texts = ("hi", ":starts with a colon", "é" * 100, "w" * 100, "w" * 101,
                 "w" * 326, "w" * 327, "w" * 400, "w" * 401, "é" * 200, "é" * 199 + "ab",
                 "\U0001f600" * 81 + "ab", "\U0001f600" * 81 + "abc",
                 "\U0001f600" * 100, "\U0001f600" * 100 + "a", "tab\there", "\x02bold\x02",
                 "word " * 90, "line\nbreak", "carriage\rreturn", "nul\0byte")
        general_calls = []

        class Counted(socket_server.IrcCodec):
            """Counts what goes the general way."""
            __slots__ = ()

            def _said(self, *args: Any, **options: Any) -> List[bytes]:
                general_calls.append(args)
                return super()._said(*args, **options)

        for server_name, variant in itertools.product(("x" * 60 + ".lan", "chat.lan"),
                                                      ("irc", "irc+server-time")):
            codec = Counted(socket_server.IrcInfo(server_name))
            if variant != "irc":
                codec._cap("REQ", "server-time")    # as the client asks for it
            self.assertEqual(codec.variant, variant)
            for text in texts:
                for sender, action, stamped in itertools.product((name, "bob", "server"),
                                                                 (False, True), (True, False)):
                    event = {"type": "message", "room": "r" * 32, "from": sender,
                             "text": text, "ts": "2026-12-02T05:00:00.000Z"}
                    if action:
                        event["action"] = True
                    if not stamped:     # no message lacks one; if one did, no tag
                        del event["ts"]
                    general = codec._said(sender, "#" + event["room"], text, action,
                                          codec._tags(event))
                    del general_calls[:]
                    self.assertEqual(codec._show_message(event), general)
                    self.assertEqual(general[0].startswith(b"@time=2026-12-02T05:00:00.000Z "),
                                     variant != "irc" and stamped)
                    # Only what needs more than one line, or more than one line
                    # holds as it is, goes the general way.
                    plain = not (action or sender == "server" or
                                 socket_server.IRC_UNSAFE.search(text))
                    self.assertEqual(len(general_calls), 0 if plain and len(general) == 1
                                     else 1, (server_name, variant, text, sender, action))
                    for line in general:
                        line.decode("utf-8")    # never cut in the middle of a character
                        if line.startswith(b"@"):
                            line = line.split(b" ", 1)[1]   # the tags do not count
                        self.assertLessEqual(len(line), 512)

    def test_sasl_can_be_aborted_before_a_mechanism_is_named(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.feed(b"CAP REQ :sasl\r\nAUTHENTICATE *\r\n")
        self.assertIsNone(codec.next_request())
        self.assertEqual(codec.take_output().split(b"\r\n")[1],
                         b":chat.lan 906 * :SASL authentication aborted")
        self.assertIsNone(codec.sasl)

    def test_cap_end_in_the_middle_of_sasl_aborts_it_and_registers(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.feed(b"CAP LS 302\r\nNICK eve\r\nUSER e 0 * :e\r\nCAP REQ :sasl\r\n"
                   b"AUTHENTICATE PLAIN\r\nCAP END\r\n")
        self.assertEqual(codec.next_request()["type"], "hello")
        self.assertIn(b":chat.lan 906 * :SASL authentication aborted", codec.take_output())
        self.assertIsNone(codec.sasl)

    def test_sasl_pieces_are_kept_only_up_to_what_a_login_can_need(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.feed(b"CAP REQ :sasl\r\nAUTHENTICATE PLAIN\r\n")
        self.assertIsNone(codec.next_request())
        codec.take_output()
        piece = b"AUTHENTICATE " + b"A" * 400 + b"\r\n"
        for _ in range(socket_server.IRC_SASL_MAX // 400 + 1):
            codec.feed(piece)
            self.assertIsNone(codec.next_request())
            self.assertLessEqual(len(codec.sasl or ()) * 400, socket_server.IRC_SASL_MAX)
        self.assertEqual(codec.take_output(), b":chat.lan 904 * :SASL authentication failed\r\n")

    def test_user_modes_are_only_said_as_they_are(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.registered, codec.nick = True, "ann"
        for line, answer in ((b"MODE ann", b":chat.lan 221 ann :+i"),
                             (b"MODE ann +i", b""),        # irssi's, at every connection
                             (b"MODE ann +o", b":chat.lan 481 ann :Permission Denied: "
                                              b"use OPER"),
                             (b"MODE ann -i+B", b":chat.lan 501 ann :Unknown MODE flag: "
                                                b"only +i, which always holds here"),
                             (b"MODE bob +i", b":chat.lan 502 ann :Can't change mode for "
                                              b"other users")):
            with self.subTest(line=line):
                codec.feed(line + b"\r\n")
                self.assertIsNone(codec.next_request())
                self.assertEqual(codec.take_output(), answer + b"\r\n" if answer else b"")

    def test_a_refused_pass_name_password_is_tried_once(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.feed(b"PASS room:ann:wrong\r\nNICK ann\r\nUSER ann 0 * :Ann\r\n")
        hello = codec.next_request()
        self.assertEqual((hello["password"], hello["name_password"]), ("room", "wrong"))
        codec.encode({"type": "error", "code": "bad_name_password", "text": "Wrong password.",
                      "id": hello["id"]})
        codec.feed(b"NICK ann\r\n")     # a client retrying its nick: no second guess
        again = codec.next_request()
        self.assertEqual(again["password"], "room")     # the chat's password stays
        self.assertNotIn("name_password", again)

    def test_whois_of_nobody_ends_its_list_and_whowas_is_answered(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.registered, codec.nick = True, "ann"
        codec.feed(b"WHOIS nobody\r\n")
        error = {"type": "error", "code": "unknown_user", "text": "Nobody called nobody is here.",
                 "id": codec.next_request()["id"]}
        self.assertEqual(codec.encode(error),
                         b":chat.lan 401 ann nobody :Nobody called nobody is here.\r\n"
                         b":chat.lan 318 ann nobody :End of /WHOIS list\r\n")
        codec.feed(b"WHOWAS nobody\r\n")
        self.assertIsNone(codec.next_request())
        self.assertEqual(codec.take_output(),
                         b":chat.lan 406 ann nobody :There was no such nickname\r\n"
                         b":chat.lan 369 ann nobody :End of WHOWAS\r\n")
        codec.feed(b"KICK #dev bob :bye\r\n")   # bob is not in #dev
        error = {"type": "error", "code": "user_not_in_room", "text": "bob is not in #dev.",
                 "id": codec.next_request()["id"]}
        self.assertEqual(codec.encode(error), b":chat.lan 441 ann bob #dev :bob is not in #dev.\r\n")

    def test_empty_targets_and_parameters_are_no_names(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.registered, codec.nick = True, "ann"
        codec.feed(b"PRIVMSG ,,#dev,,,bob :x\r\n")
        targets = [codec.next_request(), codec.next_request()]
        self.assertEqual([(r.get("room"), r.get("to")) for r in targets],
                         [("#dev", None), (None, "bob")])
        self.assertEqual(codec.take_output(), b"")      # not 407: two targets
        codec.feed(b"PRIVMSG ,,, :x\r\nWHO :\r\n")
        self.assertIsNone(codec.next_request())
        self.assertEqual(codec.take_output(), b":chat.lan 411 ann :No recipient given (PRIVMSG)"
                                              b"\r\n:chat.lan 315 ann * :End of /WHO list\r\n")
        codec.feed(b"NICK :\r\n")
        error = {"type": "error", "code": "bad_name", "text": "Names are ...",
                 "id": codec.next_request()["id"]}
        self.assertEqual(codec.encode(error), b":chat.lan 432 ann * :Names are ...\r\n")
        codec.feed(b"PRIVMSG bob :\x01VERSION\x01\r\nNOTICE bob :\x01VERSION x\x01\r\n")
        self.assertIsNone(codec.next_request())
        self.assertEqual(codec.take_output(), b":chat.lan NOTICE ann :CTCP VERSION is not passed "
                                              b"on here: only ACTION (/me) is\r\n")

    def test_a_room_handed_over_says_why_after_its_mode(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.registered, codec.nick = True, "ann"
        self.assertEqual(codec.encode({"type": "room_op", "room": "den", "name": "bob",
                                       "op": True, "by": "server", "heir": True}),
                         b":chat.lan MODE #den +o :bob\r\n"
                         b":chat.lan NOTICE #den :bob runs #den now, while there: none of its "
                         b"operators is in it\r\n")

    def test_refusals_name_the_irc_clients_commands(self) -> None:
        # irssi's /op makes a channel operator, and /rooms is no command of it.
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.registered, codec.nick = True, "ann"
        for line, code, text, shown in (
                (b"KILL bob :spam", "not_operator", "Only operators can do that (see /op).",
                 b":chat.lan 481 ann :Only operators can do that (see /oper).\r\n"),
                (b"PRIVMSG NickServ :REGISTER again123", "already_registered",
                 '"ann" is already registered; /password changes its password.',
                 b':NickServ!NickServ@chat.lan NOTICE ann :"ann" is already registered; '
                 b'/msg NickServ SET PASSWORD changes its password.\r\n'),
                (b"TOPIC #nowhere :x", "no_such_room",
                 "There is no room #nowhere (/rooms lists them).",
                 b":chat.lan 403 ann #nowhere :There is no room #nowhere (/list lists them)."
                 b"\r\n")):
            codec.feed(line + b"\r\n")
            request = codec.next_request()
            self.assertEqual(codec.encode({"type": "error", "code": code, "text": text,
                                           "id": request["id"]}), shown)

    def test_a_refused_join_says_why_in_a_notice_too(self) -> None:
        # irssi shows 475 as "Cannot join to channel #ops (Bad channel key)" whatever its
        # text: a lockout, or how to get in, would go unsaid.
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.registered, codec.nick = True, "ann"
        codec.feed(b"JOIN #ops guess\r\n")
        request = codec.next_request()
        text = "Too many wrong keys for #ops from your address: try again in 5 minutes."
        self.assertEqual(codec.encode({"type": "error", "code": "bad_key", "text": text,
                                       "id": request["id"]}),
                         b":chat.lan NOTICE ann :" + text.encode() + b"\r\n"
                         b":chat.lan 475 ann #ops :" + text.encode() + b"\r\n")

    def test_a_replay_that_begins_with_what_was_missed_opens_in_its_channel(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.registered, codec.nick = True, "ann"
        self.assertEqual(codec.encode({"type": "notice", "code": "new_since", "room": "ops",
                                       "text": "New since you were last here"}),
                         b":chat.lan NOTICE #ops :--- new since you were last here ---\r\n")
        self.assertEqual(codec.encode({"type": "history_end", "for": "join", "room": "ops",
                                       "count": 1}),
                         b":chat.lan NOTICE #ops :--- end of new messages ---\r\n")
        # The next replay, of another kind, ends as its own.
        codec.encode({"type": "history", "kind": "message", "room": "dev", "from": "bob",
                      "text": "hi", "ts": "2026-12-08T01:00:00.000Z"})
        self.assertEqual(codec.encode({"type": "history_end", "for": "join", "room": "dev",
                                       "count": 1}),
                         b":chat.lan NOTICE #dev :--- end of earlier messages ---\r\n")

    def test_invite_both_ways(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.registered, codec.nick = True, "ann"
        codec.feed(b"INVITE bob #ops\r\n")
        request = codec.next_request()
        self.assertEqual((request["type"], request["name"], request["room"]),
                         ("invite", "bob", "#ops"))
        answer = {"type": "notice", "code": "invited", "name": "bob", "room": "ops",
                  "text": "bob is invited to #ops.", "id": request["id"]}
        self.assertEqual(codec.encode(answer), b":chat.lan 341 ann bob :#ops\r\n")
        self.assertEqual(codec.encode({"type": "invite", "room": "ops", "by": "bob"}),
                         b":bob!bob@chat.lan INVITE ann :#ops\r\n")
        codec.feed(b"INVITE ann #ops\r\n")
        error = {"type": "error", "code": "already_in_room", "text": "ann is in #ops already.",
                 "id": codec.next_request()["id"]}
        self.assertEqual(codec.encode(error),
                         b":chat.lan 443 ann ann #ops :ann is in #ops already.\r\n")
        [line] = client.format_message({"type": "invite", "room": "ops", "by": "bob"}, "ann")
        self.assertTrue(line.plain.endswith("-!- bob invites you to #ops: /join #ops"), line.plain)

    def test_what_the_latest_requests_were_for_is_remembered_in_bounded_room(self) -> None:
        codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
        codec.registered, codec.nick = True, "ann"
        kept, ids = socket_server.IRC_ASKED, []
        for number in range(10 * kept):
            codec.feed(f"PRIVMSG #r{number} :hi\r\n".encode())
            ids.append(codec.next_request()["id"])
            self.assertLessEqual(len(codec.asked), 2 * kept)
            # The oldest of the latest IRC_ASKED: an error about it names its channel.
            oldest = max(0, number + 1 - kept)
            error = {"type": "error", "code": "muted", "text": "You are muted", "id": ids[oldest]}
            self.assertEqual(codec.encode(error),
                             f":chat.lan 404 ann #r{oldest} :You are muted\r\n".encode())
        self.assertEqual(len(set(ids)), len(ids))


    def test_lines_split_anywhere_between_reads_give_the_same_requests(self) -> None:
        """A read's bytes are kept as they came until a line goes on in the next; a
        fed bytearray (a caller's, to be reused) is copied, never grown."""
        stream = (b"PRIVMSG #a :one\r\nPRIVMSG #b :two, \xc3\xa9\r\n"
                  b"PRIVMSG #c :three\nPRIVMSG #d :four\r\n")
        expected = [("#a", "one"), ("#b", "two, é"), ("#c", "three"), ("#d", "four")]

        def requests(chunks: List[Any]) -> List[Tuple[str, str]]:
            codec = socket_server.IrcCodec(socket_server.IrcInfo("chat.lan"))
            codec.registered, codec.nick = True, "ann"
            taken = []
            for chunk in chunks:
                codec.feed(chunk)
                if isinstance(chunk, bytearray):
                    fed = len(chunk)
                    chunk[:] = b"x" * fed       # the caller's next read, in the same buffer
                while True:
                    request = codec.next_request()
                    if request is None:
                        break
                    taken.append((request["room"], request["text"]))
                if isinstance(chunk, bytearray):
                    self.assertEqual(len(chunk), fed)
            self.assertEqual(codec.buffered, 0)
            return taken

        for cut in range(len(stream) + 1):
            for first in (stream[:cut], bytearray(stream[:cut])):
                with self.subTest(cut=cut, kind=type(first).__name__):
                    self.assertEqual(requests([first, stream[cut:]]), expected)
        for cut in range(0, len(stream) + 1, 4):     # and three reads, the middle one short
            self.assertEqual(requests([stream[:cut], stream[cut:cut + 3], stream[cut + 3:]]),
                             expected)


class IrcTests(ChatTestCase):
    server_settings = {"irc_port": 0, "server_name": "test.lan", "failure_delay": 0.01}

    def irc(self, nick: Optional[str] = None, **options: Any) -> IrcPeer:
        peer = IrcPeer(self.server.server.irc_address[1], nick, **options)
        self.addCleanup(peer.close)
        return peer

    def test_nickserv_registers_identifies_and_drops_a_nick(self) -> None:
        # IRC users know nick registration as messages to NickServ: here the IRC side.
        ira = self.irc("ira")
        served = r"^:NickServ!NickServ@test\.lan NOTICE ira :"
        ira.send("WHOIS nickserv")      # it is someone to irssi and WeeChat, not a 401
        self.assertIn(":test.lan 311 ira NickServ NickServ test.lan * :registers nicks: /msg "
                      "NickServ HELP", ira.until(" 318 "))
        ira.send("PRIVMSG NickServ :HELP")
        self.assertRegex(ira.expect(served + "Registered nicks here").string, "client.py")
        ira.until("Next time, log in as you connect")
        ira.send("PRIVMSG NickServ :set password")       # a verb without what it takes
        ira.expect(served + "Usage: SET PASSWORD OLD NEW - change its password")
        ira.send("PRIVMSG NickServ :REGISTER short")
        ira.expect(served + "Passwords need at least 8 characters.")
        ira.send("PRIVMSG NickServ :REGISTER correcthorse")
        self.assertRegex(ira.expect(served + '"ira" is registered').string, "your password")
        ira.send("PRIVMSG NickServ :SET PASSWORD correcthorse batterystaple")
        ira.expect(served + "Your password is changed.")
        ira.send("NICK other")
        ira.expect(" NICK :other")
        guest = self.irc("guest")           # another connection, for a nick it has not proved
        served = served.replace("ira", "guest")
        guest.send("PRIVMSG NickServ :IDENTIFY other batterystaple")     # held: how to get it
        self.assertRegex(guest.expect(served).string, r"is taken.* connect again with the "
                                                      r"server password NICK:PASSWORD")
        guest.send("PRIVMSG NickServ :IDENTIFY ira wrongwrong")
        self.assertRegex(guest.expect(served).string, "(?i)wrong password")
        guest.send("PRIVMSG NickServ :IDENTIFY ira batterystaple")
        guest.expect(":guest!guest@test.lan NICK :ira")
        # Once: the wrong password's IDENTIFY before it was answered, and is not counted.
        self.assertEqual(guest.until("You are now identified")[-1],
                         ":NickServ!NickServ@test.lan NOTICE ira :You are now identified as ira.")
        guest.send("PING :after")
        self.assertNotIn("identified", " ".join(guest.until("PONG")))
        served = served.replace("guest", "ira")
        guest.send("PRIVMSG NickServ :IDENTIFY batterystaple")      # the nick it has already
        guest.expect(served + "You are ira already")
        guest.send("PRIVMSG NickServ :DROP batterystaple")
        guest.expect(served + '"ira" is no longer registered')
        bob = self.peer()       # nobody may be NickServ
        bob.send({"type": "hello", "name": "NickServ"})
        self.assertEqual(bob.expect("error")["code"], "name_reserved")

    def test_an_event_that_cannot_be_encoded_costs_that_event_alone(self) -> None:
        alice, bob, irc = self.peer("alice"), self.peer("bob"), self.irc("ircy")
        irc.send("JOIN #lobby")
        irc.expect(" 366 ")
        server = self.server.server

        def in_the_loop() -> None:
            room = server.core.rooms.existing("lobby")
            for text in ("before", "a lone \ud800 surrogate", "after"):   # a bug upstream
                server.core.deliver(room, {"type": "message", "room": "lobby", "from": "alice",
                                           "text": text, "ts": "2026-12-07T13:00:00.000Z"})
            server.execute()
        with self.assertLogs("chat", "ERROR") as logged:
            in_loop(self.server, in_the_loop)
        self.assertEqual([bob.expect("message")["text"] for _ in range(2)], ["before", "after"])
        self.assertEqual([irc.expect(r" PRIVMSG #lobby :(.*)")[1] for _ in range(2)],
                         ["before", "after"])
        self.assertIn("cannot encode a 'message' event", logged.output[0])

    def test_registration_without_cap_and_what_comes_before_it(self) -> None:
        alice = self.irc()
        alice.send("JOIN :")    # irssi's probe while it negotiates
        self.assertEqual(alice.line(), ":test.lan 451 * JOIN :You have not registered")
        alice.send("PRIVMSG #lobby :too early")
        alice.expect(" 451 ")
        lines = alice.register("alice")
        self.assertTrue(lines[0].startswith(":test.lan 001 alice :Welcome"), lines[0])
        numerics = [line.split()[1] for line in lines]
        for numeric in ("002", "003", "004", "005", "375", "372", "376"):
            self.assertIn(numeric, numerics)
        isupport = " ".join(line for line in lines if " 005 " in line)
        for token in ("CHANTYPES=#", "PREFIX=(o)@", "CASEMAPPING=ascii", "NICKLEN=32",
                      "CHANNELLEN=33", "TOPICLEN=300", "NETWORK="):
            self.assertIn(token, isupport)
        self.assertEqual(alice.sync(), [])      # in no channel: nothing forced on it
        alice.send("NICK")
        alice.expect(r" 461 alice NICK ")
        alice.send("FROBNICATE now")
        alice.expect(r" 421 alice FROBNICATE ")

    def test_a_message_to_several_targets_goes_to_each_up_to_the_limit(self) -> None:
        bob = self.peer("bob")
        carl, alice = self.irc("carl"), self.irc()
        self.assertIn(f"TARGMAX=PRIVMSG:{socket_server.IRC_MESSAGE_TARGETS},",
                      " ".join(alice.register("alice")))
        for each in (alice, carl):
            each.send("JOIN #lobby")
            each.until(" 366 ")
        for each in (alice, bob, carl):
            each.sync()
        # Four targets are taken; the fifth (a channel alice is not in) gets nothing: 407.
        alice.send("PRIVMSG #lobby,bob,carl,#lobby,#nowhere :to all")
        self.assertEqual(alice.sync(), [":test.lan 407 alice #nowhere :Too many targets: "
                                        "4 at most"])
        told = [(event["type"], event["text"]) for event in bob.sync()]
        self.assertEqual(told, [("message", "to all"), ("whisper", "to all"),
                                ("message", "to all")])
        self.assertEqual([line.split(" ", 1)[1] for line in carl.sync()],
                         ["PRIVMSG #lobby :to all", "PRIVMSG carl :to all",
                          "PRIVMSG #lobby :to all"])

    def test_cap_negotiation_holds_registration_until_end(self) -> None:
        alice = self.irc()
        alice.send("CAP LS 302")
        offered = alice.expect(r" CAP \* LS :(.*)$").group(1).split()
        for cap in ("server-time", "echo-message", "away-notify", "multi-prefix", "batch",
                    "sasl=PLAIN"):
            self.assertIn(cap, offered)
        # Not message-tags: its TAGMSG and client tags (typing, reactions) are not
        # passed on, and offering it would promise they are.
        self.assertNotIn("message-tags", offered)
        alice.send("NICK alice")
        alice.send("USER alice 0 * :Alice")
        alice.send("CAP REQ :server-time bogus-cap")
        alice.expect(r" CAP \S+ NAK :server-time bogus-cap")
        alice.send("CAP REQ :server-time multi-prefix")
        alice.expect(r" CAP \S+ ACK :server-time multi-prefix")
        self.assertNotIn(" 001 ", " ".join(alice.sync()))   # still negotiating
        alice.send("CAP END")
        alice.expect(" 001 alice ")
        alice.send("CAP LIST")
        self.assertIn("multi-prefix server-time", alice.expect(" CAP alice LIST ").string)

    def test_a_refused_nick_can_be_replaced_on_the_same_connection(self) -> None:
        self.peer("alice")
        taken = self.irc()
        taken.send("NICK ALICE")
        taken.send("USER x 0 * :x")
        self.assertEqual(taken.line(), ':test.lan 433 * ALICE :The name "ALICE" is taken. '
                                       "Pick another.")
        taken.send("CAP LS 302")    # a refused nick is no nick: "*"
        self.assertTrue(taken.line().startswith(":test.lan CAP * LS "))
        taken.send("CAP END")
        taken.send("NICK bad!name")
        taken.expect(r" 432 \* bad!name ")
        taken.send("NICK test.lan")     # the server's own name
        taken.expect(r" 432 \* test.lan ")
        taken.send("NICK alice_")
        taken.expect(" 001 alice_ ")

    def test_a_wrong_name_password_lets_an_irc_client_try_another_nick(self) -> None:
        owner = self.peer("owner")
        owner.send({"type": "register", "password": "correct horse"})
        owner.expect("notice")
        guest = self.irc()
        guest.send("PASS owner:wrong horse")
        guest.send("NICK owner")
        guest.send("USER g 0 * :g")
        guest.expect(r" 433 \* owner :Wrong password")
        guest.send("NICK guest")
        guest.expect(" 001 guest ")

    def test_channels_are_rooms_and_both_sides_see_each_other(self) -> None:
        bob = self.peer("bob")          # a client.py user, in the lobby
        alice = self.irc("alice")
        alice.send("JOIN #lobby,#dev")
        lobby = alice.until(r" 366 alice #lobby ")
        self.assertEqual(lobby[0], ":alice!alice@test.lan JOIN :#lobby")
        names = next(line for line in lobby if " 353 " in line)
        self.assertEqual(names, ":test.lan 353 alice = #lobby :alice bob")
        dev = alice.until(r" 366 alice #dev ")
        self.assertIn(":test.lan 353 alice = #dev :@alice", dev)     # its maker is its op
        self.assertEqual(bob.expect("join")["name"], "alice")
        alice.send("PRIVMSG #lobby :hello \x02bold\x02 \x0304,02coloured\x03 world")
        said = bob.expect("message")
        self.assertEqual((said["room"], said["from"], said["text"]),
                         ("lobby", "alice", "hello bold coloured world"))
        for formatted, plain in (
                ("\x02bold\x02 \x16reversed\x16 \x11mono\x11\x0f end", "bold reversed mono end"),
                ("\x1funder\x1fline, \x1ditalic\x1d \x1estruck\x1e end",
                 "underline, italic struck end"),    # whitespace to isspace(): not spaces
                ("\x04ff0000,00ff00hex\x04 \x0312colour\x03 end", "hex colour end")):
            alice.send("PRIVMSG #lobby :" + formatted)
            self.assertEqual(bob.expect("message")["text"], plain, repr(formatted))
        bob.send({"type": "say", "text": "hi alice"})
        self.assertEqual(alice.expect(r"PRIVMSG #lobby").string,
                         ":bob!bob@test.lan PRIVMSG #lobby :hi alice")
        alice.send("PRIVMSG #lobby :\x01ACTION waves\x01")
        self.assertEqual((bob.expect("message")["text"]), "waves")
        bob.send({"type": "say", "text": "waves back", "action": True})
        alice.expect("PRIVMSG #lobby :\x01ACTION waves back\x01")
        alice.send("PRIVMSG bob :psst")
        self.assertEqual(bob.expect("whisper")["text"], "psst")
        bob.send({"type": "whisper", "to": "alice", "text": "psst back"})
        alice.expect(r"^:bob!bob@test.lan PRIVMSG alice :psst back$")
        # /me in a query is a private action, both ways, and stays one in the history.
        alice.send("PRIVMSG bob :\x01ACTION winks\x01")
        whisper = bob.expect("whisper")
        self.assertEqual((whisper["text"], whisper.get("action")), ("winks", True))
        bob.send({"type": "whisper", "to": "alice", "text": "winks back", "action": True})
        self.assertEqual(bob.expect("sent").get("action"), True)
        alice.expect(r"^:bob!bob@test.lan PRIVMSG alice :\x01ACTION winks back\x01$")
        bob.send({"type": "get_history", "limit": 2})
        told = [(m["kind"], m["from"], m["text"], m.get("action"))
                for m in bob.collect_history()[:-1]]
        self.assertEqual(told, [("whisper", "alice", "winks", True),
                                ("whisper", "bob", "winks back", True)])
        alice.send("PRIVMSG #dev :only dev")
        self.assertNotIn("message", [m["type"] for m in bob.sync()])

    def test_a_notice_stays_a_notice_live_and_in_the_history(self) -> None:
        # A bot's NOTICE must never become a PRIVMSG that other bots answer (RFC 2812).
        bob = self.peer("bob")
        bot, carol = self.irc("bot"), self.irc("carol")
        for each in (bot, carol):
            each.send("JOIN #lobby")
            each.until(" 366 ")
        bot.send("NOTICE #lobby :build passed")
        self.assertEqual(carol.expect(" NOTICE #lobby ").string,
                         ":bot!bot@test.lan NOTICE #lobby :build passed")
        said = bob.expect("message")
        self.assertEqual((said["text"], said.get("notice")), ("build passed", True))
        bot.send("NOTICE carol :just you")
        carol.expect(r"^:bot!bot@test.lan NOTICE carol :just you$")
        bob.send({"type": "say", "text": "a plain one"})
        carol.expect(r"PRIVMSG #lobby :a plain one$")
        dave = self.irc("dave")
        dave.send("JOIN #lobby")
        replay = [line for line in dave.until(" 366 ") + dave.sync() if "build passed" in line]
        self.assertEqual(len(replay), 1)
        self.assertIn(" NOTICE #lobby :", replay[0])

    def test_queries_and_their_numerics(self) -> None:
        bob = self.peer("bob")
        bob.send({"type": "away", "text": "lunch"})
        alice = self.irc("alice")
        alice.send("JOIN #dev")
        alice.until(" 366 ")
        alice.send("TOPIC #dev")
        alice.expect(r" 331 alice #dev :No topic is set")
        alice.send("TOPIC #dev :release friday")
        self.assertEqual(alice.line(), ":alice!alice@test.lan TOPIC #dev :release friday")
        alice.send("TOPIC #dev")
        alice.expect(r" 332 alice #dev :release friday")
        alice.expect(r" 333 alice #dev alice!alice@\S+ :\d+")
        alice.send("MODE #dev")
        alice.expect(r" 324 alice #dev :\+t")
        alice.expect(r" 329 alice #dev :\d+")
        alice.send("MODE #dev b")
        alice.expect(r" 368 alice #dev ")
        alice.send("MODE alice")
        alice.expect(r" 221 alice :\+i")
        alice.send("WHO #dev")
        alice.expect(r" 352 alice #dev alice test.lan test.lan alice H@ :0 alice")
        alice.expect(r" 315 alice #dev ")
        alice.send("NAMES #lobby")
        alice.expect(r" 353 alice = #lobby :bob")
        alice.expect(r" 366 alice #lobby ")
        alice.send("LIST")
        listed = alice.until(r" 323 ")
        self.assertIn(":test.lan 322 alice #dev 1 :[+t] release friday", listed)
        self.assertIn(":test.lan 322 alice #lobby 1 :[+t]", listed)
        alice.send("MODE #dev +k s3cret")   # a key shows as LIST's modes (client.py: /rooms)
        alice.expect(r" MODE #dev \+k")
        alice.send("LIST #dev")
        self.assertIn(":test.lan 322 alice #dev 1 :[+tk] release friday", alice.until(r" 323 "))
        self.assertTrue(any(" 321 " in line for line in listed))
        alice.send("WHOIS bob")
        whois = alice.until(r" 318 ")
        self.assertIn(":test.lan 319 alice bob :#lobby", whois)
        alice.send("WHOIS alice")   # "@" where one is an operator
        self.assertIn(":test.lan 319 alice alice :@#dev", alice.until(r" 318 "))
        self.assertIn(":test.lan 301 alice bob :lunch", whois)
        alice.send("WHOIS nobody")
        alice.expect(r" 401 alice nobody ")
        alice.send("PRIVMSG bob :are you there?")
        alice.expect(r" 301 alice bob :lunch")
        alice.send("ISON bob nobody alice")
        alice.expect(r" 303 alice :bob alice")
        alice.send("PART #nowhere")
        alice.expect(r" 403 alice #nowhere ")
        alice.send("PART #lobby")
        alice.expect(r" 442 alice #lobby ")
        alice.send("PRIVMSG #lobby :not in it")
        alice.expect(r" 404 alice #lobby ")     # cannot send to channel
        # Nothing to list: the end of the list alone.
        alice.send("NAMES #nowhere")
        self.assertEqual(alice.line(), ":test.lan 366 alice #nowhere :End of /NAMES list")
        for target in ("#nowhere", "nobody"):
            alice.send(f"WHO {target}")
            self.assertEqual(alice.line(), f":test.lan 315 alice {target} :End of /WHO list")

    def test_an_irc_users_realname_is_shown_by_whois_and_who(self) -> None:
        alice, bob = self.irc("alice"), self.peer("bob")
        bob.send({"type": "whois", "name": "alice"})
        self.assertEqual(bob.expect("whois")["realname"], "alice the tester")
        bob.send({"type": "whois", "name": "bob"})     # none given: none said
        self.assertNotIn("realname", bob.expect("whois"))
        alice.send("WHOIS alice")
        self.assertIn(":test.lan 311 alice alice alice test.lan * :alice the tester",
                      alice.until(r" 318 "))
        alice.send("WHOIS bob")     # none: the name, as before
        self.assertIn(":test.lan 311 alice bob bob test.lan * :bob", alice.until(r" 318 "))
        carol = IrcPeer(self.server.server.irc_address[1])
        self.addCleanup(carol.close)
        carol.send("NICK carol")    # controls cleaned, the length cut
        carol.send("USER carol 0 * :\x1b[31mCarol " + "x" * 100)
        carol.until(r" 376 ")
        alice.send("WHO carol")
        realname = alice.expect(r" 352 alice \* carol test.lan test.lan carol H :0 (.*)")[1]
        self.assertEqual(realname, ("[31mCarol " + "x" * 100)[:socket_server.REALNAME_MAX])
        # A channel's WHO too: HexChat and WeeChat show it in their lists of users.
        for irc_user in (alice, carol):
            irc_user.send("JOIN #den")
            irc_user.until(" 366 ")
        enter(bob, "den")
        alice.send("WHO #den")
        self.assertEqual([line for line in alice.until(r" 315 ") if " 352 " in line],
                         [":test.lan 352 alice #den alice test.lan test.lan alice H@ :0 alice "
                          "the tester",
                          ":test.lan 352 alice #den bob test.lan test.lan bob H :0 bob",
                          f":test.lan 352 alice #den carol test.lan test.lan carol H :0 {realname}"])
        bob.send({"type": "who", "room": "den"})    # asked for by WHO only: a list costs
        self.assertNotIn("realnames", bob.expect("users"))
        dan = self.peer()
        dan.send({"type": "hello", "name": "dan", "realname": 7})
        self.assertEqual(dan.expect("error")["code"], "bad_message")

    def test_operators_keys_kicks_and_modes_cross_over(self) -> None:
        alice = self.irc("alice")
        alice.send("JOIN #ops")
        alice.until(" 366 ")
        bob = self.peer("bob")
        enter(bob, "ops")
        alice.send("MODE #ops +k s3cret")
        self.assertEqual(alice.expect("MODE").string, ":alice!alice@test.lan MODE #ops +k :s3cret")
        self.assertEqual(bob.expect("key")["key"], "s3cret")
        carol = self.irc("carol")
        carol.send("JOIN #ops")
        carol.expect(r" 475 carol #ops ")
        carol.send("JOIN #ops wrong")
        carol.expect(r" 475 carol #ops ")
        carol.send("JOIN ,nothash,#ops x,y,s3cret")     # each key for the channel in its place
        carol.expect(r" 403 carol nothash ")
        carol.until(" 366 ")
        carol.send("KICK #ops bob :no")
        carol.expect(r" 482 carol #ops ")
        outsider = self.irc("dave")     # not on the channel: 442 first (RFC 2812, 3.2.8)
        outsider.send("MODE #ops")
        outsider.expect(r" 324 dave #ops :?\+tk$")     # a key, but not which
        for line in ("KICK #ops bob :no", "TOPIC #ops :mine now", "MODE #ops +k other"):
            outsider.send(line)
            outsider.expect(r" 442 dave #ops ")
        alice.send("MODE #ops +o carol")
        carol.expect(r":alice!alice@test.lan MODE #ops \+o :carol")
        self.assertEqual(bob.expect("room_op")["name"], "carol")
        carol.send("KICK #ops bob :out you go")
        kicked = bob.expect_next_of("leave", room="ops")
        self.assertEqual((kicked["reason"], kicked["by"], kicked["comment"]),
                         ("kicked", "carol", "out you go"))
        alice.expect(r":carol!carol@test.lan KICK #ops bob :out you go")
        bob.send({"type": "join", "room": "ops", "key": "s3cret"})
        carol.expect(r":bob!bob@test.lan JOIN :#ops")
        bob.send({"type": "kick", "room": "ops", "name": "carol"})
        self.assertEqual(bob.expect("error")["code"], "not_room_operator")
        alice.send("KICK #ops carol :bye")
        carol.expect(r":alice!alice@test.lan KICK #ops carol :bye")
        alice.send("MODE #ops +" + "x" * 400)
        alice.expect(r" 472 alice x ")
        alice.send("MODE #ops")     # the next answer is that of the next line
        alice.expect(r" 324 alice #ops ")
        for change in ("+o", "+k"):     # without the nick or the key: the key stays
            alice.send(f"MODE #ops {change}")
            alice.expect(r" 461 alice MODE ")
        alice.send("MODE #ops +o nobody")
        alice.expect(r" 401 alice nobody ")
        for line in ("MODE #ops +o carol", "KICK #ops carol :again"):    # here, not in #ops
            alice.send(line)
            alice.expect(r" 441 alice carol #ops :carol is not in #ops\.")
        for change in ("+b fred!*@*", "-b"):    # b is a list here, not a ban to set
            alice.send(f"MODE #ops {change}")
            alice.expect(r"NOTICE alice :Bans are for the whole chat here")
        alice.send("MODE #ops")
        alice.expect(r" 324 alice #ops \+tk :s3cret")
        alice.send("PART #ops")     # no reason: no empty one
        self.assertEqual(alice.expect(" PART ").string, ":alice!alice@test.lan PART :#ops")

    def test_history_on_join_with_server_time_and_without(self) -> None:
        bob = self.peer("bob")
        bob.say("said before")
        bob.say("long " * 199 + "end")   # pieces on IRC: each says when it was said
        tagged = self.irc("tagged", caps="server-time")
        tagged.send("JOIN #lobby")
        lines = tagged.until("end of earlier messages")
        replayed = next(line for line in lines if "said before" in line)
        self.assertRegex(replayed, r"^@time=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z "
                                   r":bob!bob@test.lan PRIVMSG #lobby :said before$")
        plain = self.irc("plain")
        plain.send("JOIN #lobby")
        lines = plain.until("end of earlier messages")
        replayed = next(line for line in lines if "said before" in line)
        self.assertRegex(replayed, r"^:bob!bob@test.lan PRIVMSG #lobby :\[\d{4}-\d\d-\d\d "
                                   r"\d\d:\d\d UTC\] said before$")
        pieces = [line for line in lines if "long long" in line or "long end" in line]
        self.assertGreater(len(pieces), 1)
        for piece in pieces:
            self.assertRegex(piece, r"PRIVMSG #lobby :\[\d{4}-\d\d-\d\d \d\d:\d\d UTC\] long")
        # With batch, the replay is a chathistory batch: bots and clients can tell it
        # from what is said live.
        batched = self.irc("batched", caps="server-time batch")
        batched.send("JOIN #lobby")
        opened = batched.expect(r"^:test.lan BATCH \+(\S+) chathistory :#lobby$")
        lines = batched.until(r"BATCH :-")
        self.assertEqual(lines[-1], f":test.lan BATCH :-{opened[1]}")
        self.assertGreater(len(lines), 2)
        for line in lines[:-1]:
            self.assertRegex(line, rf"^@batch={opened[1]};time=\S+ :bob!bob@test.lan PRIVMSG "
                                   r"#lobby :(said before|long)")
        bob.say("live")
        self.assertTrue(tagged.expect("live").string.startswith("@time="))
        self.assertEqual(plain.expect("live").string, ":bob!bob@test.lan PRIVMSG #lobby :live")
        self.assertTrue(batched.expect("live").string.startswith("@time="))

    def test_nick_away_part_and_quit_cross_over(self) -> None:
        bob = self.peer("bob")
        alice = self.irc("alice", caps="away-notify")
        alice.send("JOIN #lobby")
        alice.until(" 366 ")
        alice.send("NICK alicia")
        self.assertEqual(alice.line(), ":alice!alice@test.lan NICK :alicia")
        change = bob.expect("nick")
        self.assertEqual((change["name"], change["new"]), ("alice", "alicia"))
        bob.send({"type": "nick", "name": "robert"})
        alice.expect(r"^:bob!bob@test.lan NICK :robert$")
        alice.send("AWAY :gone fishing")
        alice.expect(r" 306 alicia ")
        self.assertEqual(bob.expect("away")["text"], "gone fishing")
        bob.send({"type": "away", "text": "me too"})
        alice.expect(r"^:robert!robert@test.lan AWAY :me too$")
        alice.send("AWAY")
        alice.expect(r" 305 alicia ")
        alice.send("PART #lobby :later")
        alice.expect(r"^:alicia!alicia@test.lan PART #lobby :later$")
        self.assertEqual(bob.expect_next_of("leave", room="lobby")["comment"], "later")
        alice.send("JOIN #lobby")
        alice.until(" 366 ")
        alice.send("QUIT :see you")
        self.assertEqual(alice.read_until_closed()[-1],
                         "ERROR :Closing Link: 127.0.0.1 (Quit: see you)")
        left = bob.expect_next_of("leave", name="alicia")
        self.assertEqual((left["reason"], left["comment"]), ("quit", "see you"))
        carol = self.irc("carol")
        carol.send("JOIN #lobby")
        carol.until(" 366 ")
        bob.send({"type": "bye"})
        carol.expect(r"^:robert!robert@test.lan QUIT :Quit$")

    def test_room_password_sasl_pass_and_oper(self) -> None:
        server = ServerThread(irc_port=0, server_name="test.lan", password="room pw",
                              admin_password="op pw", failure_delay=0.01, max_failures=0)
        self.addCleanup(server.stop)
        port = server.server.irc_address[1]
        owner = Peer(server.port)
        self.addCleanup(owner.close)
        owner.send({"type": "hello", "name": "dave", "password": "room pw"})
        owner.expect("welcome")
        owner.send({"type": "register", "password": "dave's secret"})
        owner.expect("notice")
        owner.send({"type": "bye"})
        owner.read_until_closed()
        wrong = IrcPeer(port)
        self.addCleanup(wrong.close)
        wrong.send("PASS nope")
        wrong.send("NICK eve")
        wrong.send("USER eve 0 * :Eve")
        closing = wrong.read_until_closed()
        # irssi shows the 464 and quits: it says how an IRC client gives the password.
        self.assertIn(":test.lan 464 * :Wrong password for this chat. Give it as the server's "
                      "password: /connect HOST PORT PASSWORD in irssi, -password=PASSWORD to "
                      "WeeChat's /server add.", closing)
        self.assertTrue(closing[-1].startswith("ERROR :Closing Link: 127.0.0.1"), closing)
        sasl = IrcPeer(port)
        self.addCleanup(sasl.close)
        sasl.send("CAP LS 302")
        sasl.send("CAP REQ :sasl")
        sasl.expect(" ACK ")
        sasl.send("AUTHENTICATE PLAIN")
        sasl.expect(r"^AUTHENTICATE \+|AUTHENTICATE :\+")
        sasl.send("AUTHENTICATE " + binascii_b64("dave\0dave\0wrong secret"))
        # why, in a notice: 904 says only that it failed, 433 only that the nick is taken
        self.assertRegex(sasl.until(" 904 ")[-2], r' NOTICE \* :Wrong password for "dave"')
        sasl.send("AUTHENTICATE PLAIN")
        sasl.expect("AUTHENTICATE")
        sasl.send("AUTHENTICATE " + binascii_b64("dave\0dave\0dave's secret"))
        sasl.expect(r" 900 \* dave!dave@test.lan dave ")
        sasl.expect(r" 903 ")
        sasl.send("PASS :room pw")
        sasl.send("NICK dave")
        sasl.send("USER dave 0 * :Dave")
        sasl.send("CAP END")
        sasl.expect(" 001 dave ")
        sasl.send("QUIT")
        sasl.read_until_closed()
        plain = IrcPeer(port)
        self.addCleanup(plain.close)
        plain.send("PASS :room pw:dave:dave's secret")
        plain.send("NICK dave")
        plain.send("USER dave 0 * :Dave")
        self.assertIn(":test.lan 372 dave :- Registered names log in with SASL PLAIN, or PASS "
                      "CHATPASSWORD:name:password.", plain.until(" 376 "))
        plain.send("OPER dave wrong")
        plain.expect(r" 464 dave ")
        plain.send("OPER dave :op pw")
        plain.expect(r" 381 dave ")
        self.assertEqual(plain.line(), ":dave MODE dave :+o")    # its user mode says it too
        plain.send("MODE dave -o")      # and gives it up, as client.py's /deop
        self.assertEqual(plain.until(" MODE dave ")[-2:],
                         [":test.lan NOTICE dave :You are no longer an operator.",
                          ":dave MODE dave :-o"])
        plain.send("KILL nobody :x")
        plain.expect(r" 481 dave ")
        protected = IrcPeer(port)
        self.addCleanup(protected.close)
        protected.send("PASS :room pw")
        protected.send("NICK dave")
        protected.send("USER x 0 * :x")
        lines = protected.until(r" 433 \* dave :.*registered.*SASL")
        self.assertRegex(lines[-2], r' NOTICE \* :"dave" is a registered name')
        # Once connected, SASL and PASS are past: NickServ's IDENTIFY is the way.
        protected.send("NICK x")
        protected.until(" 001 x ")
        plain.send("QUIT")
        plain.read_until_closed()
        protected.send("NICK dave")
        protected.expect(r" 433 x dave :.*\(/msg NickServ IDENTIFY NICK PASSWORD\)$")

    def test_bans_and_flood_control_apply_to_irc_users(self) -> None:
        server = ServerThread(irc_port=0, server_name="test.lan", rate_limit=5, rate_burst=3)
        self.addCleanup(server.stop)
        port = server.server.irc_address[1]
        flooder = IrcPeer(port, "flooder")
        self.addCleanup(flooder.close)
        flooder.send("JOIN #lobby")
        flooder.until(" 366 ")
        flooder.send_raw(b"".join(b"PRIVMSG #lobby :spam\r\n" for _ in range(60)))
        lines = flooder.read_until_closed()
        self.assertTrue(any(" 404 flooder #lobby :Slow down" in line for line in lines), lines)
        self.assertTrue(lines[-1].startswith("ERROR :Closing Link"), lines[-1])
        # Lines the IRC side answers itself cost as much, registered or not.
        for registered, line in ((True, b"PING :x"), (True, b"FROBNICATE"), (True, b"MOTD"),
                                 (False, b"PING :x"), (False, b"CAP LIST")):
            with self.subTest(line=line, registered=registered):
                pinger = IrcPeer(port, "pinger" if registered else None)
                self.addCleanup(pinger.close)
                pinger.send_raw((line + b"\r\n") * 3000)
                lines = pinger.read_until_closed()
                self.assertTrue(lines[-1].startswith("ERROR :Closing Link"), lines[-1])
                self.assertIn("Too many lines before registering" if not registered
                              else "sending too fast", lines[-1])
                self.assertLess(len(lines), 400 if registered else
                                socket_server.IRC_REGISTRATION_LINES + 5)
        in_loop(server, lambda: server.server.run_command("/ban 127.0.0.1 1 testing"))
        banned = IrcPeer(port)
        self.addCleanup(banned.close)
        lines = banned.read_until_closed()
        self.assertTrue(any(" 465 " in line for line in lines), lines)
        self.assertIn("ERROR :Closing Link", lines[-1])

    def test_a_tls_handshake_on_a_plain_port_is_answered_at_once(self) -> None:
        hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(40))
        peer = self.peer()
        peer.send_raw(hello)
        error = peer.read_until_closed()[-1]
        self.assertEqual((error["code"], error["closing"]), ("tls_not_offered", True))
        irc = self.irc()
        irc.send_raw(hello)
        lines = irc.read_until_closed()
        self.assertIn("a TLS handshake came", lines[-2])
        self.assertTrue(lines[-1].startswith("ERROR :Closing Link"), lines)

    def test_an_irc_client_on_the_chat_port_is_told_where_to_go(self) -> None:
        # irssi shows the refusal's frame as a line of text: it must say what went wrong.
        for opening in (b"CAP LS 302\r\n", b"NICK ira\r\nUSER ira 0 * :Ira\r\n"):
            peer = self.peer()
            peer.send_raw(opening)
            error = peer.read_until_closed()[-1]
            self.assertEqual((error["code"], error["text"]),
                             ("bad_header", socket_server.IRC_ON_CHAT_PORT))
        peer = self.peer()      # anything else: as it was
        peer.send_raw(b"GARBAGE!!!")
        self.assertIn("not a decimal length", peer.read_until_closed()[-1]["text"])

    def test_making_rooms_costs_a_token_each_even_from_one_line(self) -> None:
        server = ServerThread(irc_port=0, server_name="test.lan", rate_limit=0.01, rate_burst=3)
        self.addCleanup(server.stop)
        maker = IrcPeer(server.server.irc_address[1], "maker")
        self.addCleanup(maker.close)
        maker.send("JOIN " + ",".join(f"#r{number}" for number in range(10)))
        lines = maker.sync()
        joined = [line for line in lines if " JOIN " in line]
        self.assertEqual(len(joined), 2, lines)     # the line's token, then one a room
        self.assertIn("Slow down", " ".join(lines))
        self.assertEqual(len(server.server.core.rooms.all), 3)    # and the lobby

    def test_hostile_lines_cost_themselves_only(self) -> None:
        bob = self.peer("bob")
        alice = self.irc("alice")
        alice.send("JOIN #lobby")
        alice.until(" 366 ")
        alice.send("PRIVMSG #lobby :" + "x" * 600)
        alice.expect(r" 417 alice :Input line was too long")
        alice.send_raw(b"PRIVMSG #lobby :caf\xe9\r\n")
        alice.expect(r"NOTICE alice :Lines must be UTF-8")
        alice.send_raw(b"PRIVMSG #lobby :nul\x00byte\r\n")
        alice.expect(r"NOTICE alice :A line may not hold a NUL")
        alice.send_raw(b"PRIVMSG #lobby :lf only\n")
        self.assertEqual(bob.expect("message")["text"], "lf only")
        bob.send({"type": "say", "text": "nice\r\nQUIT :pwned\r\nPRIVMSG #lobby :x"})
        line = alice.expect("PRIVMSG #lobby :nice")
        self.assertEqual(line.string, ":bob!bob@test.lan PRIVMSG #lobby :nice  QUIT :pwned  "
                                      "PRIVMSG #lobby :x")      # one line: CR LF are spaces
        bob.send({"type": "say", "text": "long " * 399})
        pieces = [line for line in alice.sync() if "PRIVMSG #lobby :long" in line]
        self.assertEqual(len(pieces), 5)    # each under 512 bytes (IrcPeer.line checks)
        self.assertEqual(" ".join(line.split(" :", 1)[1] for line in pieces),
                         ("long " * 399).strip())
        alice.send("NOTICE nobody :no error for a notice")
        self.assertNotIn(" 401 ", " ".join(alice.sync()))
        alice.send_raw(b"x" * 9000)
        closing = alice.read_until_closed()
        self.assertIn("ERROR :Closing Link", closing[-1])
        bob.say("the others carry on")

    def test_long_texts_are_cut_between_characters_and_split_only_past_a_line(self) -> None:
        bob = self.peer("bob")
        enter(bob, "cjk")       # its maker: bob may set its topic
        alice, carol = self.irc("alice"), self.irc("carol")
        for each in (alice, carol):
            each.send("JOIN #cjk")
            each.until(" 366 ")
        topic = "a" + "話" * 295 + "END"   # 889 bytes: cut, never inside a character
        bob.send({"type": "topic", "room": "cjk", "text": topic})
        shown = alice.expect(r" TOPIC #cjk :(.*)")[1]     # line() decodes it as UTF-8
        self.assertTrue(topic.startswith(shown) and len(shown) > 150, len(shown))
        # A text that arrived in one line of a client goes on as one line, whole.
        text = "word " * 89 + "end"
        alice.send(f"PRIVMSG #cjk :{text}")
        self.assertEqual([line.split(" :", 1)[1] for line in carol.sync()
                          if " PRIVMSG #cjk :" in line], [text])
        self.assertEqual(bob.expect("message")["text"], text)

    def test_one_line_of_many_requests_is_answered_without_nesting(self) -> None:
        # Each channel of a JOIN is a request; each answer once asked for the connection's
        # next turn from inside the turn it was in, a call deeper each: a few hundred
        # failing names in one read ended in a RecursionError and a closed connection.
        bob = self.peer("bob")
        alice = self.irc("alice")
        line = "JOIN " + ",".join("#!" for _ in range(150)) + "\r\n"
        alice.send_raw(line.encode("ascii") * 6)     # one read of 900 requests
        refusals = [line for line in alice.sync() if " 403 alice #! :" in line]
        self.assertEqual(len(refusals), 900)
        bob.say("still here")
        alice.send("JOIN nochan")
        alice.expect(r" 403 alice nochan :No such channel")
        alice.send("JOIN ,,#lobby,")    # the empty places are no channels to refuse
        self.assertEqual([line.split()[1] for line in alice.until(" 366 ")],
                         ["JOIN", "353", "366"])
        alice.send("PART ,")
        alice.expect(r" 461 alice PART :Not enough parameters")
        bob.say("and talking")
        alice.expect(r":bob!bob@test.lan PRIVMSG #lobby :and talking")

    def test_an_irc_client_that_never_registers_is_dropped(self) -> None:
        server = ServerThread(irc_port=0, server_name="test.lan", hello_timeout=0.3)
        self.addCleanup(server.stop)
        silent = IrcPeer(server.server.irc_address[1])
        self.addCleanup(silent.close)
        silent.send("NICK halfway")
        lines = silent.read_until_closed()
        self.assertIn("ERROR :Closing Link: 127.0.0.1 (No hello within 0.3 seconds.)", lines)

    def test_the_server_pings_a_quiet_irc_client(self) -> None:
        server = ServerThread(irc_port=0, server_name="test.lan", ping_after=0.1,
                              drop_after=5)
        self.addCleanup(server.stop)
        alice = IrcPeer(server.server.irc_address[1], "alice")
        self.addCleanup(alice.close)
        self.assertEqual(alice.expect("PING").string, "PING :test.lan")
        alice.send("PONG :test.lan")


def binascii_b64(text: str) -> str:
    import base64
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


class ProtocolAdditionTests(ChatTestCase):
    def test_actions(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
        alice.send({"type": "say", "text": "waves", "action": True})
        self.assertTrue(alice.expect("sent")["action"])
        message = bob.expect("message")
        self.assertEqual((message["text"], message.get("action")), ("waves", True))
        self.assertEqual(self.peer("carol").replay[0]["kind"], "action")

    def test_only_sensible_ids_come_back(self) -> None:
        alice = self.peer("alice")
        alice.send({"type": "say", "text": "hi", "id": "x" * 65})
        self.assertNotIn("id", alice.expect("sent"))
        alice.send({"type": "say", "text": "hi", "id": "x" * socket_server.MAX_ID_LENGTH})
        self.assertEqual(alice.expect("sent")["id"], "x" * socket_server.MAX_ID_LENGTH)
        alice.send({"type": "search", "text": "", "id": "a\tb"})
        self.assertNotIn("id", alice.expect("error"))
        alice.send_raw(ascii_frame({"type": "who", "id": "\ud800"}))
        self.assertNotIn("id", alice.expect("users"))
        alice.say("still fine")

    def test_ids_come_back_with_acknowledgements_and_errors(self) -> None:
        alice = self.peer("alice")
        alice.send({"type": "say", "text": "hi", "id": "7"})
        self.assertEqual(alice.expect("sent")["id"], "7")
        alice.send({"type": "whisper", "to": "nobody", "text": "hi", "id": "8"})
        self.assertEqual(alice.expect("error")["id"], "8")
        alice.send({"type": "say", "text": "no id"})
        self.assertNotIn("id", alice.expect("sent"))

    def test_resume_token_takes_the_name_back(self) -> None:
        alice, watcher = self.peer("alice"), self.peer("watcher")
        token = alice.welcome["resume"]
        stranger = self.peer()
        stranger.send({"type": "hello", "name": "alice", "resume": "guess"})
        self.assert_rejected(stranger, "name_taken")
        back = self.peer()
        back.send({"type": "hello", "name": "alice", "resume": token})
        # The new session is not told of the old one's leaving, made in the same step.
        welcome = back.receive()
        self.assertEqual(welcome["type"], "welcome")
        self.assertNotEqual(welcome["resume"], token)
        self.assertNotIn("leave", [m["type"] for m in back.sync()])
        self.assertEqual(watcher.expect("leave")["reason"], "reconnected")


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------

class ClientUnitTests(unittest.TestCase):
    def test_the_marker_of_missed_messages_shows_only_before_one_shown(self) -> None:
        # After a crash, a returning name's replay may hold only what it saw already.
        marker = {"type": "notice", "code": "new_since", "text": "New since you were last here"}
        end = {"type": "history_end", "for": "join", "count": 1}
        seen, new = ({"type": "history", "kind": "message", "from": "bob", "text": text,
                      "ts": f"2026-12-07T{hour:02d}:00:00.000Z"} for text, hour in (("seen", 9),
                                                                                ("new", 11)))
        batches = client.HistoryBatches()
        # Where what was missed begins with what is shown after a reconnect, the
        # header says it already: one marker, not two.
        for frames, shown in (([seen], []), ([seen, new], ["--- in #lobby while you were away "
                                                           "---"])):
            batches.replay_coming("lobby", "2026-12-07T10:00:00.000Z")
            self.assertEqual(batches.frame(marker), (None, []))
            before = [line.plain for frame in frames for line in batches.frame(frame)[1]]
            self.assertEqual(before, shown)
            self.assertEqual(batches.frame(end)[1], [])
        # A first visit since: where all of the replay is new, the marker alone heads it.
        batches.replay_coming("lobby", None)
        self.assertEqual(batches.frame(marker), (None, []))
        self.assertEqual([line.plain for line in batches.frame(new)[1]],
                         ["--- new since you were last here ---"])

    def test_parse_line(self) -> None:
        cases = {
            "hello": ("say", "hello"),
            "/quit": ("quit", ""),
            "\\quit": ("quit", ""),
            "\\CLIENTS": ("clients", ""),
            "/w bob  hi there ": ("w", "bob  hi there"),
            "/msg bob hi": ("msg", "bob hi"),
            "//etc/passwd": ("say", "/etc/passwd"),
            "\\o/": ("say", "\\o/"),
            "/nope": ("nope", ""),
            "/": ("", ""),
            # A backslash and a word of letters is a command, known or not; anything
            # else after a backslash is chat, and a doubled one sends the rest as typed.
            "\\bogus": ("bogus", ""),
            "\\qiut now": ("qiut", "now"),
            "\\(^_^)/": ("say", "\\(^_^)/"),
            "\\o/ yay": ("say", "\\o/ yay"),
            "\\_x": ("say", "\\_x"),
            "\\\\quit": ("say", "\\quit"),
            "\\": ("say", "\\"),
        }
        for line, expected in cases.items():
            with self.subTest(line=line):
                self.assertEqual(client.parse_line(line), expected)

    def test_no_message_can_reach_the_terminal_with_a_control_character(self) -> None:
        controls = "".join(chr(c) for c in list(range(32)) + list(range(127, 160)))
        hostile = f"x{controls}\x1b]0;title\x07\u202e\ud800y"
        for kind, fields in client.SERVER_MESSAGES.items():
            message = {"type": kind}
            for field, expected in fields.items():
                field = field.rstrip("?")
                message[field] = {str: hostile, list: [hostile], dict: {}, bool: True,
                                  int: 1, object: hostile}[expected]
            line = " ".join(line.plain for line in client.format_message(message, "me"))
            with self.subTest(kind=kind):
                self.assertFalse([c for c in line
                                  if unicodedata.category(c) in ("Cc", "Cs") or c == "\u202e"],
                                 line)

    def test_lines_holding_passwords(self) -> None:
        for line in ("/op secret", "/register pw pw", "\\password a b", "/unregister x"):
            self.assertTrue(client.holds_password(line), line)
        for line in ("/op", "/register", "hello /op x", "/w bob /op x"):
            self.assertFalse(client.holds_password(line), line)

    def test_lines_wait_while_a_prompt_has_the_terminal(self) -> None:
        out = WatchedOutput()
        screen = client.Screen(out, terminal=False, colour=False)
        with screen.held():
            screen.show(client.plain_line("arrived during the prompt"))
            self.assertEqual(out.lines, [])
        self.assertEqual(out.lines, ["arrived during the prompt"])

    def test_names_are_checked_before_anything_is_sent(self) -> None:
        # Asked for at the terminal: asked again at once, with the server's rule.
        stderr = io.StringIO()
        answers = iter(["..", "two words", "-", "ok.name"])
        with contextlib.redirect_stderr(stderr):
            import builtins
            saved, builtins.input = builtins.input, lambda prompt: next(answers)
            try:
                self.assertEqual(client.read_name(), "ok.name")
            finally:
                builtins.input = saved
        self.assertEqual(stderr.getvalue().splitlines(),
                         [f"! Names are {client.NAME_RULES}."] * 3)
        # Given with --name: a usage error, like a bad port.
        with contextlib.redirect_stderr(io.StringIO()) as stderr, \
                self.assertRaises(SystemExit) as stopped:
            client.build_arg_parser().parse_args(["--name", "."])
        self.assertEqual(stopped.exception.code, 2)
        self.assertIn("'.' is not a name: names are 1 to 32", stderr.getvalue())

    def test_help_and_the_readme_name_every_command(self) -> None:
        helped = "\n".join(client.command_help_lines())
        with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
            text = readme.read()
        documented = text[text.index("## Using the client"):text.index("## Running the server")]
        operators = text[text.index("### Operators"):text.index("### Message rules")]
        for name, command in client.COMMANDS.items():
            readme_part = operators if command.audience == client.OPERATORS else documented
            self.assertTrue(f"/{name} {command.usage}".strip() in helped, f"/help: /{name}")
            self.assertTrue(f"`/{name}" in readme_part, f"README: /{name}")
        for alias in client.ALIASES:
            self.assertTrue(f"/{alias}" in helped, f"/help: /{alias}")
            self.assertTrue(f"`/{alias}`" in documented, f"README: /{alias}")
        self.assertIn("Ctrl-N", helped)
        # What a user who runs nothing sees fits a screen, and still names every command.
        everyday = client.command_help_lines(client.EVERYONE)
        self.assertLessEqual(len(everyday), 40)
        for name in client.COMMANDS:
            self.assertRegex("\n".join(everyday), rf"/{name}\b")
        self.assertEqual(client.command_help_lines(only="kick"),
                         ["for room operators (@ in that room; server operators too):",
                          "  /kick [#room] NAME [REASON] put someone out of the room"])
        self.assertLessEqual(max(len(line) for line in client.command_help_lines()), 79)

    def test_every_alias_points_at_a_command(self) -> None:
        for alias, target in client.ALIASES.items():
            self.assertIn(target, client.COMMANDS, alias)

    def test_split_address(self) -> None:
        cases = {("host", None): ("host", 5050, None), ("host", 7): ("host", 7, None),
                 ("1.2.3.4:6000", None): ("1.2.3.4", 6000, None),
                 ("[::1]:6000", None): ("::1", 6000, None), ("::1", None): ("::1", 5050, None),
                 ("[fe80::1]", 9): ("fe80::1", 9, None),
                 ("10.0.0.5:6000#AB:cd", None): ("10.0.0.5", 6000, "AB:cd"),
                 ("[::1]:6000#abcd", None): ("::1", 6000, "abcd"),
                 ("host:6000#", None): ("host", 6000, "")}     # a '#' with nothing after
        for (host, port), expected in cases.items():
            self.assertEqual(client.split_address(host, port), expected)
        for target in ("127.0.0.1:6211", "[::1]:6211"):
            with self.assertRaisesRegex(ValueError, "the port is given twice"):
                client.split_address(target, 6212)  # not a host called "127.0.0.1:6211"

    def test_formatting(self) -> None:
        stamp = "2026-01-02T03:04:05.000Z"
        local = datetime.fromisoformat("2026-01-02T03:04:05+00:00").astimezone().strftime("%H:%M")
        fmt = lambda message, me: "\n".join(line.plain for line in
                                             client.format_message(message, me))
        self.assertEqual(fmt({"type": "message", "from": "bob", "text": "hi", "ts": stamp}, "me"),
                         f"[{local}] bob: hi")
        self.assertEqual(fmt({"type": "sent", "text": "hi", "ts": stamp}, "me"),
                         f"[{local}] me: hi")
        self.assertEqual(fmt({"type": "sent", "to": "bob", "text": "hi", "ts": stamp}, "me"),
                         f"[{local}] [whisper to bob] hi")
        self.assertEqual(fmt({"type": "whisper", "from": "bob", "to": "me", "text": "hi",
                              "ts": stamp}, "me"), f"[{local}] [whisper from bob] hi")
        self.assertEqual(fmt({"type": "leave", "name": "bob", "reason": "quit", "ts": stamp},
                             "me"), f"[{local}] -!- bob left")
        self.assertEqual(fmt({"type": "users", "users": ["a", "b"]}, "me"), "-!- 2 here: a, b")
        self.assertEqual(fmt({"type": "notice", "code": "muted", "text": "bob was muted",
                              "ts": stamp}, "me"), f"[{local}] -!- bob was muted")
        self.assertEqual(fmt({"type": "notice", "code": "op", "text": "You are an operator"},
                             "me"), "-!- You are an operator")    # no time, none shown
        self.assertEqual(fmt({"type": "users", "users": ["a", "b"], "count": 1500}, "me"),
                         "-!- 1500 here: a, b and 1498 more")
        self.assertEqual(client.format_message({"type": "pong"}, "me"), [])
        # What the server sends is cleaned again before it reaches the terminal.
        self.assertEqual(fmt({"type": "message", "from": "x\x1b[2J", "text": "\x07hi",
                              "ts": stamp}, "me"), f"[{local}] x[2J: hi")

    def test_whoever_is_put_out_reads_it_in_the_second_person(self) -> None:
        shown = lambda message: [line.plain for line in client.format_message(message, "Me")]
        for code, text in (("kicked", "me was kicked by ann: bye"),
                           ("banned", "me was banned by ann for 5 minutes: spam")):
            self.assertEqual(shown({"type": "error", "code": code, "text": text}),
                             ["! you were " + text.split(" was ", 1)[1]])
        self.assertEqual(shown({"type": "leave", "name": "me", "room": "dev", "reason": "kicked",
                                "text": "me was kicked from #dev by ann",
                                "ts": "2026-01-02T03:04:05.000Z"})[0].split("] ", 1)[1],
                         "-!- you were kicked from #dev by ann")
        self.assertEqual(shown({"type": "error", "code": "kicked",      # someone else's name
                                "text": "mel was kicked by ann"}), ["! mel was kicked by ann"])

    def test_an_action_can_never_pass_for_a_notice(self) -> None:
        # Issue 11: "/me left" showed exactly as a real departure, and "/me was kicked by
        # server: spoofed" as a real kick. Notices carry "-!-" where an action has
        # "* NAME", and a name cannot hold "!".
        stamp = "2026-01-02T03:04:05.000Z"
        shown = lambda message: "\n".join(line.plain for line in
                                          client.format_message(message, "me"))
        real = {"left": {"type": "leave", "name": "bob", "reason": "quit", "ts": stamp},
                "was kicked by server: spoofed": {
                    "type": "leave", "name": "bob", "reason": "kicked", "ts": stamp,
                    "text": "bob was kicked by server: spoofed"}}
        notice = re.compile(r"^(\[[^\]]*\] )?(#\S+ )*-!- ")
        for text, event in real.items():
            with self.subTest(text=text):
                action = shown({"type": "message", "from": "bob", "text": text,
                                "action": True, "ts": stamp})
                self.assertRegex(shown(event), notice)
                self.assertNotRegex(action, notice)
                self.assertNotEqual(action.split("] ", 1)[1], shown(event).split("] ", 1)[1])
        for name in ("-", "a-b", "x.y", "_"):     # no name can end up as the mark
            line = shown({"type": "message", "from": name, "text": "-!- joined",
                          "action": True, "ts": stamp})
            self.assertNotRegex(line, notice)
            self.assertNotRegex(shown({"type": "message", "from": name, "text": "-!- x",
                                       "ts": stamp}), notice)
        self.assertEqual(client.notice_line("connected").plain, "-!- connected")

    @unittest.skipUnless(hasattr(time, "tzset"), "needs time.tzset")
    def test_local_time_of_a_stamp_at_the_edge_of_the_calendar(self) -> None:
        old = os.environ.get("TZ")
        os.environ["TZ"] = "Asia/Tokyo"     # 9999-12-31 23:59 UTC is past year 9999 there
        time.tzset()
        try:
            self.assertRegex(client.local_time("9999-12-31T23:59:59.000Z"), r"^\d\d:\d\d$")
        finally:
            if old is None:
                os.environ.pop("TZ")
            else:
                os.environ["TZ"] = old
            time.tzset()

    @unittest.skipUnless(hasattr(signal, "pthread_kill") and hasattr(signal, "SIGUSR1"),
                         "POSIX signals")
    def test_a_lost_connection_wakes_the_main_thread_even_if_a_signal_misses(self) -> None:
        self.addCleanup(signal.signal, signal.SIGUSR1, signal.getsignal(signal.SIGUSR1))
        waker = client.MainThreadWaker()
        waker.install()
        handler = signal.getsignal(signal.SIGUSR1)
        signals = []

        def first_one_missed(signum: int, frame: object) -> None:
            # As if the first signal had landed just before the read began: taken, and
            # nothing interrupted.
            signals.append(signum)
            if len(signals) > 1:
                handler(signum, frame)

        signal.signal(signal.SIGUSR1, first_one_missed)
        reader, writer = os.pipe()
        self.addCleanup(os.close, reader)
        self.addCleanup(os.close, writer)
        rescue = threading.Timer(TIMEOUT, os.write, (writer, b"!"))     # never hang the suite
        rescue.start()
        self.addCleanup(rescue.cancel)
        threading.Thread(target=waker.wake, daemon=True).start()
        with self.assertRaises(client.ConnectionLost):
            os.read(reader, 1)      # the main thread's blocking read of what you type
        self.assertEqual(len(signals), 2)
        handler(signal.SIGUSR1, None)   # a late signal must not break the exit that follows


class ClientProcessTests(ChatTestCase):
    """client.py as a user runs it, with its input piped in."""

    def run_client(self, *args: str, stdin_data: Optional[str] = None) -> Process:
        process = Process(CLIENT_SCRIPT, "127.0.0.1", str(self.port), *args,
                          stdin_data=stdin_data)
        self.addCleanup(process.kill)
        return process

    def test_output_to_a_pipe_closed_early_ends_quietly(self) -> None:
        alice = self.peer("alice")
        for number in range(15):        # the replay: more lines than the reader wants
            alice.say(f"line {number}")
        proc = subprocess.Popen([sys.executable, CLIENT_SCRIPT, "127.0.0.1", str(self.port),
                                 "--name", "bot", "--show-chat"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        proc.stdout.readline()
        proc.stdout.close()     # like "| head -1"
        proc.stdin.write(b"after the reader went\n")
        proc.stdin.close()
        errors = proc.stderr.read().decode()
        proc.stderr.close()
        self.assertEqual(proc.wait(TIMEOUT), 0)
        self.assertEqual(errors, "")
        self.assertEqual(alice.expect("message")["text"], "after the reader went")

    def test_piped_client_sends_everything_then_leaves(self) -> None:
        alice = self.peer("alice")
        lines = ["hello everyone", "/w alice psst", "/clients", "/nope", "//slash", "\\o/",
                 "/who", "", "last line"]
        bot = self.run_client("--name", "bot", "--show-chat",
                              stdin_data="\n".join(lines) + "\n")
        self.assertEqual(bot.finish(), 0)
        received = []
        while True:
            message = alice.receive()
            if message["type"] == "leave":
                break
            received.append(message)
        self.assertEqual(message["reason"], "quit")
        said = [(m["type"], m["text"]) for m in received if m["type"] in ("message", "whisper")]
        self.assertEqual(said, [("message", "hello everyone"), ("whisper", "psst"),
                                ("message", "/slash"), ("message", "\\o/"),
                                ("message", "last line")])
        output = bot.output()
        self.assertIn("connected to 127.0.0.1", output)
        self.assertIn("bot: hello everyone", output)
        self.assertIn("[whisper to alice] psst", output)
        self.assertIn("2 here: alice, bot", output)
        self.assertNotIn("unknown command", output)     # errors go to stderr
        self.assertEqual(bot.output("stderr").splitlines(),
                         ["! unknown command /nope: type /help for the list, or start with "
                          "// to send a line beginning with /"])

    def test_a_script_sees_only_the_answers_to_its_commands(self) -> None:
        alice = self.peer("alice")
        alice.say("the build is green")
        bot = self.run_client("--name", "bot",
                              stdin_data="/who\nbuild finished\n/nope\n/search green\n")
        self.assertEqual(bot.finish(), 0)
        self.assertEqual(alice.expect("message")["text"], "build finished")
        lines = bot.output().splitlines()   # no banner, replay, hints or chat: answers only
        self.assertEqual(lines[:2], ["-!- 2 here: alice, bot", "--- search: green ---"])
        self.assertRegex(lines[2], r"^\[\d\d:\d\d\] alice: the build is green$")
        self.assertEqual(lines[3:], ["--- 1 found ---"])
        self.assertEqual(bot.output("stderr").splitlines(),
                         ["! unknown command /nope: type /help for the list, or start with "
                          "// to send a line beginning with /"])

    def test_show_chat_prints_the_whole_chat_for_a_log(self) -> None:
        alice = self.peer("alice")
        alice.say("the build is green")
        bot = self.run_client("--name", "bot", "--show-chat",
                              stdin_data="build finished\n/whisper nobody x\n")
        self.assertEqual(bot.finish(), 0)
        output = bot.output()
        for expected in (f"-!- connected to 127.0.0.1:{self.port} as bot",
                         "-!- you are in #lobby with alice",
                         "--- earlier messages in #lobby ---", "alice: the build is green",
                         "bot: build finished"):
            self.assertIn(expected, output)
        self.assertNotIn("/help", output)       # hints are for people at a terminal
        self.assertEqual(bot.output("stderr").splitlines(),
                         ['! Nobody called "nobody" is here.'])

    def test_a_script_talks_in_the_room_it_joins_and_in_the_one_it_is_back_in(self) -> None:
        alice = self.peer("alice")
        enter(alice, "dev")
        bot = self.run_client("--name", "bot", stdin_data="/join #dev\nhello dev\n/names\n"
                                                          "/topic\n/part\nback in the lobby\n")
        self.assertEqual(bot.finish(), 0)
        heard = [(m["room"], m["text"]) for m in (alice.expect("message"),
                                                 alice.expect("message"))]
        self.assertEqual(heard, [("dev", "hello dev"), ("lobby", "back in the lobby")])
        self.assertEqual(bot.output().splitlines(), ["-!- 2 in #dev: @alice, bot",
                                                     "-!- #dev has no topic"])
        self.assertEqual(bot.output("stderr"), "")

    def test_piped_input_without_a_name_is_a_usage_error(self) -> None:
        alice = self.peer("alice")
        bot = self.run_client(stdin_data="build finished\nhi\n")
        self.assertEqual(bot.finish(), 2)
        self.assertEqual(bot.output("stderr").splitlines(),
                         ["client.py: error: with input piped in, give a name with --name "
                          "(there is nobody to ask)"])
        self.assertEqual(bot.output(), "")
        self.assertEqual(alice.sync(), [])      # it never joined: no line became a name

    def test_taken_name_from_flag_without_terminal_exits(self) -> None:
        self.peer("alice")
        bot = self.run_client("--name", "alice", stdin_data="hi\n")
        self.assertEqual(bot.finish(), 1)
        self.assertIn("taken", bot.output("stderr"))

    def test_log_file_gets_every_line_dated_under_a_session_header(self) -> None:
        log_path = os.path.join(temp_dir(self), "log.txt")
        alice = self.peer("alice")
        alice.say("the build is green")
        for number, script in enumerate(("hi there\n/search build\n", "again\n")):
            bot = self.run_client("--name", f"bot{number}", "--log", log_path,
                                  stdin_data=script)
            self.assertEqual(bot.finish(), 0)
        with open(log_path, encoding="utf-8") as log_file:
            first, second = log_file.read().split("\n\n")   # a blank line between sessions
        when = r"\d{4}-\d\d-\d\d \d\d:\d\d"
        for number, session in enumerate((first, second)):
            header, *lines = session.splitlines()
            self.assertRegex(header, rf"^Chat on 127\.0\.0\.1:{self.port} as bot{number}, "
                                     rf"from {when} \(local time\)$")
            for line in lines:
                self.assertRegex(line, rf"^{when}:\d\d ")    # each line dated, for grep
        logged = [line[20:] for line in first.splitlines()[1:]]
        self.assertIn(f"-!- connected to 127.0.0.1:{self.port} as bot0", logged)
        self.assertIn("--- 1 found ---", logged)    # the whole session, not only what is shown
        # Every line of a room names it, the current room's too.
        self.assertTrue(any(line.endswith("] #lobby alice: the build is green")
                            for line in logged))
        self.assertTrue(any(line.endswith("] #lobby bot0: hi there") for line in logged))

    def test_unwritable_log_is_a_one_line_error(self) -> None:
        bot = self.run_client("--name", "bot", "--log", os.path.join(HERE, "no", "dir", "x.log"),
                              stdin_data="")
        self.assertEqual(bot.finish(), 2)    # a usage error: the option cannot work
        self.assertEqual(len(bot.output("stderr").splitlines()), 1)
        self.assertIn("cannot write the log", bot.output("stderr"))
        reserved = self.run_client("--name", "Server", stdin_data="")
        self.assertEqual(reserved.finish(), 2)     # said before connecting
        self.assertIn("'Server' is reserved", reserved.output("stderr"))

    def test_lost_connection_is_one_message_and_exit_code_1(self) -> None:
        alice = self.peer("alice")
        bot = self.run_client("--name", "bot", "--retries", "0")   # stdin stays open: idle
        alice.expect("join")
        self.server.stop()
        self.assertEqual(bot.finish(), 1)
        self.assertEqual(bot.output(), "")
        self.assertEqual(bot.output("stderr"), "-!- The server is shutting down.\n! disconnected")

    def test_client_answers_pings(self) -> None:
        pong = threading.Event()

        class WatchedCore(socket_server.ChatCore):
            def on_pong(self, session, message):
                pong.set()

        class WatchedServer(socket_server.ChatServer):
            core_class = WatchedCore

        server = ServerThread(WatchedServer, ping_after=0.1, drop_after=10)
        self.addCleanup(server.stop)
        bot = Process(CLIENT_SCRIPT, "127.0.0.1", str(server.port), "--name", "bot")
        self.addCleanup(bot.kill)
        self.assertTrue(pong.wait(TIMEOUT), "the client never answered a ping")


class WatchedOutput:
    """A stand-in for stdout that lets a test wait for a line to be shown."""

    def __init__(self) -> None:
        self.lines: List[str] = []
        self._partial = ""
        self._changed = threading.Condition()

    def write(self, text: str) -> None:
        with self._changed:
            *complete, self._partial = (self._partial + text).split("\n")
            self.lines.extend(complete)
            self._changed.notify_all()

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def wait_for(self, fragment: str) -> str:
        """The first line holding fragment, waiting for it if need be."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: next((line for line in self.lines if fragment in line), None), TIMEOUT)
        if found is None:
            raise AssertionError(f"{fragment!r} never shown; saw {self.lines}")
        return found


def make_screen() -> "client.Screen":
    """A plain screen whose output a test can wait on."""
    return client.Screen(WatchedOutput(), terminal=False, colour=False)


class ClientSessionTests(ChatTestCase):
    """ChatSession in this process, against a real server: commands and output."""

    server_settings = {"failure_delay": 0.01}

    def session(self, name: str = "bot") -> "client.ChatSession":
        connection, welcome = client.join("127.0.0.1", self.port, name)
        self.lost = threading.Event()
        session = client.ChatSession(connection, welcome, f"127.0.0.1:{self.port}",
                                     make_screen(), on_lost=self.lost.set)
        session.out = session.screen.out
        self.addCleanup(session.leave)
        session.show_banner(welcome)
        session.start()
        return session

    def test_history_and_search_commands(self) -> None:
        alice = self.peer("alice")
        alice.say("the build is green")
        alice.say("lunch?")
        bot = self.session()
        out = bot.out
        out.wait_for("--- end of history ---")
        self.assertLess(out.lines.index("--- earlier messages in #lobby ---"),
                        out.lines.index(out.wait_for("alice: the build is green")))
        bot.handle_line("/search BUILD green")
        out.wait_for("--- 1 found ---")
        self.assertEqual(out.lines[-3:-1], ["--- search: BUILD green ---",
                                            out.wait_for("alice: the build is green")])
        bot.handle_line("/search nothing-like-it")
        out.wait_for("-!- no messages match")
        for bad in ("/history 0", "/history x", "/history \u00b2", "/search"):
            del out.lines[:]
            bot.handle_line(bad)
            out.wait_for("usage:")
        bot.handle_line("/history 1")
        out.wait_for("--- end of history ---")
        self.assertEqual(out.lines[-3], "--- history ---")
        self.assertIn("alice: lunch?", out.lines[-2])
        del out.lines[:]
        bot.handle_line("/history 9999")    # more than there can be: capped, not refused
        out.wait_for("--- end of history ---")
        self.assertEqual(out.lines[0], "--- history ---")

    def test_a_refused_search_does_not_label_the_next_answer(self) -> None:
        alice = self.peer("alice")
        alice.say("lunch?")
        bot = self.session()
        out = bot.out
        out.wait_for("--- end of history ---")
        bot.handle_line("/search " + " ".join(f"w{number}" for number in range(11)))
        out.wait_for("! Search for at most")
        del out.lines[:]
        bot.handle_line("/history 1")
        out.wait_for("--- end of history ---")
        self.assertEqual(out.lines[0], "--- history ---")

    def fragile_session(self, complaint: str) -> "client.ChatSession":
        """A session whose screen fails on any line holding "poison"."""
        class FragileScreen(client.Screen):
            def show(self, line: "client.Line") -> None:
                if "poison" in line.plain:
                    raise RuntimeError(complaint)
                super().show(line)

        connection, welcome = client.join("127.0.0.1", self.port, "bot")
        self.lost = threading.Event()
        session = client.ChatSession(connection, welcome, f"127.0.0.1:{self.port}",
                                     FragileScreen(WatchedOutput(), terminal=False,
                                                   colour=False), on_lost=self.lost.set)
        self.addCleanup(session.leave)
        session.start()
        return session

    def test_a_message_that_cannot_be_shown_costs_only_itself(self) -> None:
        alice = self.peer("alice")
        bot = self.fragile_session("cannot draw this")
        alice.expect("join")
        alice.say("poison")
        alice.say("and after")
        bot.screen.out.wait_for("could not show a 'message' message from the server "
                                "(RuntimeError: cannot draw this)")
        bot.screen.out.wait_for("alice: and after")
        self.assertFalse(self.lost.is_set())

    def test_a_receiver_that_fails_ends_the_session_instead_of_hanging(self) -> None:
        alice = self.peer("alice")
        bot = self.fragile_session("poison again")  # so that even the warning fails
        alice.expect("join")
        alice.say("poison")
        self.assertTrue(self.lost.wait(TIMEOUT), "the main thread was never told")
        self.assertEqual(bot.lost_reason, "internal error: RuntimeError: poison again")

    def test_save_never_overwrites_unless_asked(self) -> None:
        directory = temp_dir(self)
        path = os.path.join(directory, "session.txt")
        bot = self.session()
        bot.handle_line("hi there")
        bot.out.wait_for("bot: hi there")
        bot.handle_line(f"/save {path}")
        bot.out.wait_for("-!- saved")
        with open(path, encoding="utf-8") as saved:
            text = saved.read()
        self.assertTrue(text.startswith(f"Chat on 127.0.0.1:{self.port} as bot, "))
        self.assertRegex(text, r"\n\[\d\d:\d\d\] #lobby bot: hi there\n")
        self.assertIn("-!- connected to", text)
        bot.handle_line(f"/save {path}")
        bot.out.wait_for(f"{path} exists")
        with open(path, encoding="utf-8") as saved:
            self.assertEqual(saved.read(), text)
        bot.handle_line(f"/save -f {path}")
        self.assertEqual(len([line for line in bot.out.lines if "-!- saved" in line]), 2)
        bot.handle_line(f"/save {directory}/missing/dir/x.txt")
        bot.out.wait_for("cannot save to")

    def test_save_without_a_name_picks_a_new_dated_file(self) -> None:
        directory = temp_dir(self)
        bot = self.session()
        previous = os.getcwd()
        os.chdir(directory)
        try:
            bot.handle_line("/save")
            bot.handle_line("/save")
        finally:
            os.chdir(previous)
        names = sorted(os.listdir(directory))
        self.assertEqual(len(names), 2)
        self.assertRegex(names[0], r"^chat-\d{4}-\d\d-\d\d-\d{4}(-2)?\.txt$")

    def test_password_changes_are_kept_for_reconnecting(self) -> None:
        bot = self.session()
        bot.handle_line("/register first-password")
        bot.out.wait_for("is registered")
        self.assertEqual(bot.credentials.name_password, "first-password")
        bot.handle_line("/password nope nope-nope-nope")
        bot.out.wait_for("Wrong password")
        self.assertEqual(bot.credentials.name_password, "first-password")
        bot.handle_line("/password first-password second-password")
        bot.out.wait_for("password is changed")
        self.assertEqual(bot.credentials.name_password, "second-password")
        bot.handle_line("/unregister second-password")
        bot.out.wait_for("no longer registered")
        self.assertIsNone(bot.credentials.name_password)

    def test_lines_over_the_limit_and_save_without_a_file_are_refused_here(self) -> None:
        bot = self.session()
        bot.handle_line("x" * 2001)
        bot.out.wait_for("not sent: 2001 characters, and the limit here is 2000")
        bot.handle_line("/me " + "y" * 3000)
        bot.out.wait_for("not sent: 3000 characters")
        bot.handle_line("/save -f")
        bot.out.wait_for("usage: /save -f FILE")
        bot.handle_line(f"/save {temp_dir(self)}")
        bot.out.wait_for("is a folder")
        for command, usage in (("/announce", "usage: /announce TEXT"),
                               ("/msg", "usage: /w NAME TEXT"), ("/me  ", "usage: /me ACTION"),
                               ("/search", "usage: /search [--all] WORDS"),
                               ("/search --all", "usage: /search [--all] WORDS")):
            bot.handle_line(command)
            bot.out.wait_for(usage)

    def test_a_whisper_to_something_that_cannot_be_a_name_is_refused_here(self) -> None:
        alice = self.peer("alice")
        bot = self.session()
        alice.expect("join")
        del bot.out.lines[:]
        bot.handle_line('/whisper "bad name" x')
        self.assertEqual(bot.out.lines, [      # at once, before anything is sent
            f"! not sent: '\"bad' is not a name (names are {client.NAME_RULES})"])
        bot.handle_line("/w alice fine")
        self.assertEqual(alice.expect("whisper")["text"], "fine")   # nothing came before it

    def test_an_unknown_backslash_command_is_caught_like_a_slash_one(self) -> None:
        alice = self.peer("alice")
        bot = self.session()
        alice.expect("join")
        for typo in ("\\qiut", "\\bogus some words"):
            bot.handle_line(typo)
            bot.out.wait_for(f"unknown command {typo.split()[0]}: type /help for the list, "
                             "or start with \\\\ to send a line beginning with \\")
        bot.handle_line("\\o/")
        bot.handle_line("\\\\qiut")
        self.assertEqual(alice.expect("message")["text"], "\\o/")  # nothing came before it
        self.assertEqual(alice.expect("message")["text"], "\\qiut")

    def test_lost_connection_calls_the_hook_once(self) -> None:
        bot = self.session()
        self.server.stop()
        self.assertTrue(self.lost.wait(TIMEOUT))
        bot.out.wait_for("The server is shutting down.")
        bot.out.wait_for("! disconnected")


class RecordingScreen(client.Screen):
    """A plain screen that also keeps every Line shown, for what plain text hides."""

    def __init__(self) -> None:
        super().__init__(WatchedOutput(), terminal=False, colour=False)
        self.shown: List["client.Line"] = []

    def show(self, line: "client.Line") -> None:
        self.shown.append(line)
        super().show(line)


class ClientRoomTests(ChatTestCase):
    """Rooms and the habits of IRC users, as ChatSession does them, against a real server."""

    server_settings = {"failure_delay": 0.01}

    def session(self, name: str = "bot", answers: Optional[List[str]] = None,
                rejoin=None, port: Optional[int] = None) -> "client.ChatSession":
        port = port or self.port
        connection, welcome = client.join("127.0.0.1", port, name)
        session = client.ChatSession(
            connection, welcome, f"127.0.0.1:{port}", RecordingScreen(),
            on_lost=lambda: None, rejoin=rejoin,
            ask_secret=(lambda prompt: answers.pop(0)) if answers is not None else None)
        session.out = session.screen.out
        self.addCleanup(session.leave)
        session.show_banner(welcome)
        session.start()
        session.out.wait_for("you are in #lobby")
        return session

    def test_a_key_given_to_join_a_room_without_one_is_said_to_be_unset(self) -> None:
        bot = self.session()
        bot.handle_line("/join #new hunter2")   # made by the join: the key is not set
        self.assertEqual(bot.out.wait_for("has no key"),
                         "-!- #new has no key: a key given to /join only opens a room that "
                         "has one (set one with /key #new KEY)")
        bot.handle_line("/key #new hunter2")
        bot.out.wait_for("hunter2")
        bot.handle_line("/part #new")
        bot.out.wait_for("left #new")
        alice = self.peer("alice")      # a keyed room, opened with its key: nothing to say
        alice.send({"type": "join", "room": "den"})
        alice.expect("room")
        alice.send({"type": "key", "room": "den", "key": "k1"})
        alice.expect("key")
        bot.handle_line("/join #den k1")
        bot.out.wait_for("you are in #den")
        bot.handle_line("/join lobby")
        bot.out.wait_for("now in #lobby")
        self.assertFalse([line for line in bot.out.lines if "#den has no key" in line])

    def test_join_switch_part_and_the_prompt(self) -> None:
        alice = self.peer("alice")
        bot = self.session()
        self.assertEqual(bot.prompt(), "#lobby> ")
        bot.handle_line("/join #Dev")       # made on first use, and current at once
        self.assertTrue(bot.out.wait_for("you are in #Dev; nobody else is here yet")
                        .endswith("; you are its operator"))
        self.assertEqual(bot.prompt(), "#Dev> ")
        enter(alice, "dev")
        bot.out.wait_for("-!- alice joined")     # of the current room: no tag
        bot.handle_line("hello dev")
        said = alice.expect("message")
        self.assertEqual((said["room"], said["text"]), ("Dev", "hello dev"))
        alice.send({"type": "say", "room": "lobby", "text": "over here"})
        self.assertRegex(bot.out.wait_for("over here"), r"^\[\d\d:\d\d\] #lobby alice: over here$")
        self.assertEqual(bot.prompt(), "#Dev (1 unread)> ")
        bot.handle_line("/join lobby")      # in it already: it becomes current
        self.assertEqual(bot.out.lines[-1], "-!- now in #lobby; its 1 unread line above is marked "
                                            "#lobby")
        self.assertEqual(bot.prompt(), "#lobby> ")
        bot.handle_line("/join lobby")      # the current one: nothing changes, and it says so
        self.assertEqual(bot.out.lines[-1], "-!- you are in #lobby already")
        alice.send({"type": "say", "room": "dev", "text": "in dev"})
        self.assertRegex(bot.out.wait_for("in dev"), r"^\[\d\d:\d\d\] #Dev alice: in dev$")
        bot.handle_line("/part #lobby see you")     # the current one: back to #Dev
        left = alice.expect_next_of("leave", room="lobby")
        self.assertEqual((left["name"], left["comment"]), ("bot", "see you"))
        bot.out.wait_for("-!- you left #lobby: see you")
        self.assertEqual(bot.out.lines[-1], "-!- now in #Dev; its 1 unread line above is marked #Dev")
        self.assertEqual(bot.prompt(), "#Dev> ")
        bot.handle_line("/part")            # the last room: the client says no
        self.assertEqual(bot.out.lines[-1], "! #Dev is your last room: /join another before "
                                            "you leave it")
        self.assertNotIn("leave", [m["type"] for m in alice.sync()])
        with bot.screen.lock:   # a transcript names the room of every line, current or not
            transcript = list(bot.screen.transcript)
        self.assertTrue(any(re.fullmatch(r"\[\d\d:\d\d\] #Dev bot: hello dev", line)
                            for line in transcript), transcript)
        self.assertIn("-!- you are in #Dev; nobody else is here yet; you are its operator",
                      transcript)

    def test_room_operators_topics_keys_and_kicks(self) -> None:
        alice = self.peer("alice")
        bot = self.session()
        bot.handle_line("/join #ops")
        bot.handle_line("/topic release friday")
        self.assertRegex(bot.out.wait_for("set the topic"),
                         r"^\[\d\d:\d\d\] -!- bot set the topic: release friday$")
        bot.handle_line("/topic #ops")
        self.assertEqual(bot.out.wait_for("topic of"),
                         "-!- topic of #ops: release friday (set by bot)")
        bot.handle_line("/key #ops s3cret")
        bot.out.wait_for("bot set the key: s3cret")
        room = enter(alice, "ops", "s3cret")
        self.assertEqual(room["topic"], "release friday")
        bot.handle_line("/roomop alice")
        bot.out.wait_for("bot made alice an operator of the room")
        bot.handle_line("/names")
        self.assertEqual(bot.out.wait_for("in #ops:"), "-!- 2 in #ops: @alice, @bot")
        bot.handle_line("/roomdeop alice #ops")
        bot.out.wait_for("bot took operator status from alice")
        bot.handle_line("/rooms")
        bot.out.wait_for("-!- #ops (2 people, needs a key): release friday")
        bot.out.wait_for("-!- #lobby (2 people)")
        bot.handle_line("/kick #ops alice off topic")
        kicked = alice.expect_next_of("leave", room="ops")
        self.assertEqual((kicked["name"], kicked["comment"], kicked["by"]),
                         ("alice", "off topic", "bot"))
        bot.out.wait_for("-!- alice was kicked from #ops by bot: off topic")
        alice.send({"type": "nick", "name": "alicia"})   # shares only the lobby now
        self.assertRegex(bot.out.wait_for("is now known as"),
                         r"^\[\d\d:\d\d\] #lobby -!- alice is now known as alicia$")
        # Kicked from the current room: on to another.
        enter(alice, "den")
        bot.handle_line("/join #den")
        alice.send({"type": "kick", "room": "den", "name": "bot", "text": "out"})
        bot.out.wait_for("-!- you were kicked from #den by alicia: out")
        self.assertEqual(bot.out.wait_for("now in"), "-!- now in #ops")
        self.assertEqual(bot.prompt(), "#ops> ")
        bot.handle_line("/key s3cret")      # the room must be named
        self.assertEqual(bot.out.lines[-1], "! usage: /key #room [KEY]")

    def test_a_server_operator_kills_and_kicks_in_any_room(self) -> None:
        server = ServerThread(admin_password="op-secret", failure_delay=0.01)
        self.addCleanup(server.stop)
        self.port = server.port
        alice, carol = Peer(server.port, "alice"), Peer(server.port, "carol")
        self.addCleanup(alice.close)
        self.addCleanup(carol.close)
        enter(alice, "hers")
        bot = self.session()
        bot.handle_line("/op op-secret")
        bot.out.wait_for("operator")
        bot.handle_line("/kick #hers alice")    # not an operator of #hers, but of the server
        self.assertEqual(alice.expect_next_of("leave", room="hers")["by"], "bot")
        bot.handle_line("/kill carol spamming")     # out of the chat
        self.assertEqual(self.assert_rejected(carol, "kicked")["text"],
                         "carol was kicked by bot: spamming")
        bot.out.wait_for("-!- carol was kicked by bot: spamming")
        bot.handle_line("/droproom #hers")
        bot.out.wait_for("#hers removed")

    def test_nick_for_yourself_and_for_others(self) -> None:
        alice, carol = self.peer("alice"), self.peer("carol")
        bot = self.session()
        bot.handle_line("/nick robot")
        bot.out.wait_for("-!- you are now known as robot")
        self.assertEqual(bot.name, "robot")
        self.assertEqual(alice.expect("nick")["new"], "robot")
        alice.say("well done robot")    # a mention of the new name
        alice.say("and bot")            # the old one is nobody
        bot.out.wait_for("alice: and bot")
        rings = {line.plain.split("] ", 1)[1]: line.ring for line in bot.screen.shown
                 if "alice: " in line.plain}
        self.assertEqual(rings, {"alice: well done robot": True, "alice: and bot": False})
        self.assertIn("as robot,", bot.header())
        carol.send({"type": "nick", "name": "caroline"})
        self.assertRegex(bot.out.wait_for("caroline"),
                         r"^\[\d\d:\d\d\] -!- carol is now known as caroline$")  # shown once
        self.assertEqual(sorted(bot.link.names()), ["alice", "caroline", "robot"])
        for line, shown in (("/nick alice", '! The name "alice" is taken. Pick another.'),
                            ("/nick b@d", "! 'b@d' is not a name")):
            bot.handle_line(line)
            self.assertTrue(bot.out.wait_for(shown))

    def test_a_registered_name_is_taken_with_its_password_asked_or_inline(self) -> None:
        dave = self.peer("dave")
        dave.send({"type": "register", "password": "correct horse"})
        dave.expect("notice")
        dave.send({"type": "bye"})
        dave.read_until_closed()
        answers = ["correct horse"]
        bot = self.session(answers=answers)
        bot.handle_line("/nick dave")   # asked, without echo, once the server says so
        bot.out.wait_for("you are now known as dave")
        self.assertEqual(answers, [])
        self.assertFalse([line for line in bot.out.lines if "registered name" in line])
        self.assertEqual(bot.credentials.name_password, "correct horse")    # to reconnect with
        self.assertTrue(client.holds_password("/nick dave correct horse"))
        self.assertFalse(client.holds_password("/nick dave"))
        bot.handle_line("/nick someone")
        bot.out.wait_for("you are now known as someone")
        piped = self.session("piped")   # no terminal: the password comes inline
        piped.handle_line("/nick dave")
        piped.out.wait_for('"dave" is a registered name')
        piped.handle_line("/nick dave correct horse")
        piped.out.wait_for("you are now known as dave")

    def test_passwords_this_server_has_no_use_for(self) -> None:
        answers = ["never asked"]
        bot = self.session(answers=answers)
        bot.handle_line("/op")          # nobody can: no prompt for a password in vain
        bot.out.wait_for("this server has no operator password: nobody can /op here")
        self.assertEqual(answers, ["never asked"])
        # A chat password given to an open chat: it protects nothing, and the user is told.
        given = client.Credentials(password="sesame")
        connection, welcome = client.join("127.0.0.1", self.port, "carl", given)
        carl = client.ChatSession(connection, welcome, f"127.0.0.1:{self.port}",
                                  RecordingScreen(), credentials=given)
        self.addCleanup(carl.leave)
        carl.show_banner(welcome)
        carl.start()
        self.assertIn("-!- this chat has no password: anyone can join; the one you gave was "
                      "not needed", carl.screen.out.lines)

    def test_help_shows_what_this_user_has(self) -> None:
        bot = self.session()
        bot.handle_line("/help")
        bot.out.wait_for("(/help all says what each of those does)")
        self.assertFalse([line for line in bot.out.lines if "put someone out" in line])
        bot.handle_line("/help \\kick")
        bot.out.wait_for("put someone out of the room")
        bot.handle_line("/help dance")
        bot.out.wait_for("no command /dance: /help lists them")
        bot.handle_line("/join #mine")          # made it: runs it
        bot.out.wait_for("you are its operator")
        del bot.out.lines[:]
        bot.handle_line("/help")
        bot.out.wait_for("(/help all says")
        self.assertTrue([line for line in bot.out.lines if "/roomop NAME [#room]" in line])

    def test_away_notes_and_the_away_text_of_whom_you_whisper(self) -> None:
        alice = self.peer("alice")
        bot = self.session()
        bot.handle_line("/away")        # not away: nothing to come back from
        self.assertEqual(bot.out.wait_for("not away"),
                         "-!- you are not away: /away TEXT says you are, and why")
        bot.handle_line("/away lunch")
        self.assertEqual(bot.out.wait_for("you are away"),
                         "-!- you are away: lunch (/away alone when you are back)")
        self.assertEqual(alice.expect("away")["text"], "lunch")
        bot.handle_line("/away")
        bot.out.wait_for("-!- you are back")
        alice.send({"type": "away", "text": "in a meeting"})
        bot.out.wait_for("-!- alice is away: in a meeting")
        del bot.out.lines[:]
        bot.handle_line("/w alice ping?")
        bot.out.wait_for("-!- alice is away: in a meeting")
        bot.handle_line("/names #lobby")
        self.assertEqual(bot.out.wait_for("in #lobby:"), "-!- 2 in #lobby: alice (away), bot")
        bot.handle_line("/whois alice")
        self.assertRegex(bot.out.wait_for("alice: in"), r"^-!- alice: in #lobby; active in the "
                                                        r"last minute; here since \d\d:\d\d$")
        self.assertEqual(bot.out.lines[-1], "-!- alice is away: in a meeting")
        alice.send({"type": "away"})
        bot.out.wait_for("-!- alice is back")
        alice.sync()
        # client.py ends its user's away when they say something, as it always did; the
        # server leaves that to each client (an IRC client's user stays away).
        bot.handle_line("/away lunch again")
        self.assertEqual(alice.expect("away")["text"], "lunch again")
        bot.out.wait_for("you are away: lunch again")
        bot.handle_line("I am back after all")
        self.assertIsNone(alice.expect("away")["text"])
        self.assertEqual(alice.expect("message")["text"], "I am back after all")

    def test_an_away_the_server_refused_is_not_ended_by_talking(self) -> None:
        # client.py counts itself away once the server says so, not when it asks: an
        # away refused (here by a rule) must not be followed by a "back" on the next line.
        server = ServerThread(blocked_words=["darn"], filter_action="reject")
        self.addCleanup(server.stop)
        alice = Peer(server.port, "alice")
        self.addCleanup(alice.close)
        bot = self.session(port=server.port)
        alice.sync()
        bot.handle_line("/away darn meetings")
        self.assertEqual(bot.out.wait_for("blocked"), "! Not set: it contains a blocked word.")
        bot.handle_line("hello")
        self.assertEqual(alice.expect("message")["text"], "hello")
        bot.out.wait_for("bot: hello")     # the server's echo, after any answer to a "back"
        self.assertNotIn("-!- you are back", bot.out.lines)

    def test_kicking_yourself_is_parting(self) -> None:
        bot = self.session()
        bot.handle_line("/kick Bot bye")
        self.assertEqual(bot.out.wait_for("/part"), "! to leave #lobby yourself, /part it")

    def test_quit_with_a_parting_word(self) -> None:
        alice = self.peer("alice")
        bot = self.session()
        alice.sync()
        with self.assertRaises(EOFError):       # leaves as the end of input does
            bot.handle_line("/quit gone home")
        bot.leave()
        left = alice.expect("leave")
        self.assertEqual((left["name"], left["reason"], left["comment"]),
                         ("bot", "quit", "gone home"))
        self.assertEqual(client.format_message(left, "alice")[0].plain.split("] ", 1)[1],
                         "-!- bot left: gone home")

    def test_ignore_hides_messages_actions_and_whispers_here_only(self) -> None:
        alice, carol = self.peer("alice"), self.peer("carol")
        bot = self.session()
        alice.sync()
        bot.handle_line("/ignore alice")
        bot.out.wait_for("-!- ignoring alice: their messages, actions and whispers are hidden "
                         "here, until /unignore alice")
        self.assertEqual(alice.sync(), [])      # the server knows nothing of it
        alice.say("noise")
        alice.send({"type": "say", "text": "waves", "action": True})
        alice.send({"type": "whisper", "to": "bot", "text": "psst"})
        alice.send({"type": "nick", "name": "alicia"})  # an ignore follows its person
        enter(alice, "dev")
        alice.send({"type": "say", "room": "dev", "text": "noise in dev"})
        alice.say("more noise")
        carol.say("signal")
        bot.out.wait_for("carol: signal")
        shown = "\n".join(bot.out.lines)
        for hidden in ("noise", "waves", "psst"):
            self.assertNotIn(hidden, shown)
        self.assertIn("alice is now known as alicia", shown)    # news of them is not hidden
        self.assertEqual(bot.prompt(), "#lobby> ")
        bot.handle_line("/ignore")
        self.assertEqual(bot.out.lines[-1], "-!- ignoring alicia")
        for line, note in (("/ignore bot", "! you cannot ignore yourself"),
                           ("/unignore carol", "-!- carol was not ignored"),
                           ("/unignore alicia", "-!- showing alicia again")):
            bot.handle_line(line)
            self.assertEqual(bot.out.lines[-1], note)
        alice.say("heard again")
        bot.out.wait_for("alicia: heard again")
        bot.handle_line("/ignore alicia")
        bot.handle_line("/join #dev")   # a replay of only what is hidden shows nothing
        bot.out.wait_for("you are in #dev")
        self.assertNotIn("--- earlier messages in #dev ---", bot.out.lines)
        bot.handle_line("/join #lobby")
        del bot.out.lines[:]
        bot.handle_line("/history 1")   # an answer keeps its header and its end
        bot.out.wait_for("--- end of history ---")
        self.assertEqual(bot.out.lines, ["--- history ---", "--- end of history ---"])

    def test_history_and_search_follow_the_current_room(self) -> None:
        alice = self.peer("alice")
        enter(alice, "dev")
        alice.send({"type": "say", "room": "dev", "text": "deploy at noon"})
        alice.say("lunch at noon")
        bot = self.session()
        bot.handle_line("/join #dev")
        bot.out.wait_for("--- earlier messages in #dev ---")
        self.assertRegex(bot.out.wait_for("deploy at noon"),    # the current room's replay
                         r"^\[\d\d:\d\d\] alice: deploy at noon$")
        del bot.out.lines[:]
        bot.handle_line("/history")
        bot.out.wait_for("--- end of history ---")
        self.assertEqual([line for line in bot.out.lines if "noon" in line][-1:],
                         [bot.out.wait_for("deploy at noon")])
        self.assertNotIn("lunch", "\n".join(bot.out.lines))
        bot.handle_line("/search --all noon")
        bot.out.wait_for("--- 2 found ---")
        self.assertEqual(bot.out.lines[-4], "--- search in all your rooms: noon ---")
        self.assertRegex(bot.out.lines[-3], r"^\[\d\d:\d\d\] alice: deploy at noon$")
        self.assertRegex(bot.out.lines[-2], r"^\[\d\d:\d\d\] #lobby alice: lunch at noon$")
        self.assertEqual(bot.complete("#d", False), ["#dev"])
        self.addCleanup(setattr, socket_server, "ROOMS_PER_FRAME", socket_server.ROOMS_PER_FRAME)
        socket_server.ROOMS_PER_FRAME = 1     # a list that goes on over frames (more: true)
        del bot.out.lines[:]
        bot.handle_line("/rooms")
        bot.out.wait_for("-!- #lobby (2 people)")
        self.assertEqual(bot.out.lines, ["-!- #dev (2 people)", "-!- #lobby (2 people)"])
        self.assertEqual(bot.complete("#", False), ["#dev", "#lobby"])

    def test_a_reconnect_to_a_chat_that_now_has_a_password_says_what_to_do(self) -> None:
        self.addCleanup(setattr, client, "RECONNECT_FIRST_DELAY", client.RECONNECT_FIRST_DELAY)
        client.RECONNECT_FIRST_DELAY = 0.01
        first = ServerThread(failure_delay=0.01)
        self.addCleanup(first.stop)
        self.port = port = first.port
        bot = self.session(rejoin=lambda name, resume, rooms: client.join(
            "127.0.0.1", port, name, client.Credentials(resume=resume), rooms=rooms))
        first.stop()
        second = ServerThread(failure_delay=0.01, port=port, password="new one")
        self.addCleanup(second.stop)
        self.assertEqual(bot.out.wait_for("cannot rejoin"),
                         "! cannot rejoin: This chat needs a password. Start the client again "
                         "with the password (--password, or the CHAT_PASSWORD environment "
                         "variable).")

    def test_a_reconnect_rejoins_every_room_with_its_key_and_shows_only_what_was_missed(
            self) -> None:
        self.addCleanup(setattr, client, "RECONNECT_FIRST_DELAY", client.RECONNECT_FIRST_DELAY)
        client.RECONNECT_FIRST_DELAY = 0.01
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        first = ServerThread(db=path, failure_delay=0.01)
        self.addCleanup(first.stop)
        self.port = port = first.port
        alice = Peer(port, "alice")
        for room in ("dev", "ops", "den"):
            enter(alice, room)
        alice.send({"type": "key", "room": "ops", "key": "k1"})
        alice.send({"type": "say", "room": "dev", "text": "seen before"})
        alice.expect("sent")

        def rejoin(name: str, resume: Optional[str], rooms: list):
            self.assertTrue(back.wait(TIMEOUT))     # once the test has said what was missed
            hellos.append((name, rooms))
            return client.join("127.0.0.1", port, name, client.Credentials(resume=resume),
                               rooms=rooms)

        hellos: List[tuple] = []
        back = threading.Event()
        bot = self.session(rejoin=rejoin)
        for line in ("/join #dev", "/join #den", "/join #ops k1", "/nick robot"):
            bot.handle_line(line)
        bot.out.wait_for("you are now known as robot")
        alice.close()
        first.stop()
        bot.out.wait_for("trying to reconnect")
        second = ServerThread(db=path, failure_delay=0.01, port=port)
        self.addCleanup(second.stop)
        carol = Peer(port, "carol")
        self.addCleanup(carol.close)
        enter(carol, "dev")
        carol.send({"type": "say", "room": "dev", "text": "said while away"})
        carol.expect("sent")
        rooms = second.server.core.rooms     # a new key keeps us out of #den now
        in_loop(second, lambda: rooms.set_key(None, rooms.all["den"], "new"))
        back.set()
        bot.out.wait_for("reconnected to")
        bot.out.wait_for("! could not rejoin #den")
        self.assertEqual(hellos, [("robot", ["lobby", "dev", "den",
                                             {"room": "ops", "key": "k1"}])])
        self.assertEqual(carol.expect_next_of("join", room="dev")["name"], "robot")
        lines = bot.out.lines
        self.assertEqual(lines.count("--- in #dev while you were away ---"), 1, lines)
        self.assertEqual(len([line for line in lines if "said while away" in line]), 1)
        self.assertEqual(len([line for line in lines if "seen before" in line]), 1)
        self.assertFalse([line for line in lines if "in #ops while you were away" in line])
        self.assertEqual(bot.prompt(), "#ops (1 unread)> ")    # still where it was; missed: 1
        bot.handle_line("still here")
        self.assertEqual(len([m for m in carol.sync() if m.get("text") == "still here"]), 0)
        bot.handle_line("/join #dev")
        bot.handle_line("back in dev")
        self.assertEqual(carol.expect_next_of("message", room="dev")["text"], "back in dev")


class ClientAccountCommandTests(ChatTestCase):
    """/register, /password and /unregister, with the password prompts answered."""

    def session(self, answers: List[str]) -> "client.ChatSession":
        connection, welcome = client.join("127.0.0.1", self.port, "bot")
        session = client.ChatSession(connection, welcome, f"127.0.0.1:{self.port}",
                                     make_screen(), on_lost=lambda: None,
                                     ask_secret=lambda prompt: answers.pop(0))
        session.out = session.screen.out
        self.addCleanup(session.leave)
        session.start()
        return session

    def test_register_change_and_unregister_with_prompts(self) -> None:
        answers = ["first pass", "first pass typo"]
        bot = self.session(answers)
        for command in ("/password", "/unregister"):    # not registered: said, nothing asked
            bot.handle_line(command)
            self.assertEqual(bot.out.lines[-1], "! bot is not registered: /register PASSWORD "
                                                "first")
        self.assertEqual(len(answers), 2)
        bot.handle_line("/register")
        bot.out.wait_for("the two passwords differ")
        answers += ["first pass", "first pass"]
        bot.handle_line("/register")
        bot.out.wait_for("is registered")
        answers += ["first pass", "second pass", "second pass"]
        bot.handle_line("/password")
        bot.out.wait_for("password is changed")
        answers += ["second pass"]
        bot.handle_line("/unregister")
        bot.out.wait_for("no longer registered")
        self.assertEqual(answers, [])

    def test_a_short_new_password_is_refused_after_the_first_prompt(self) -> None:
        answers = ["short", "first pass", "first pass", "first pass", "short", "short"]
        bot = self.session(answers)
        bot.handle_line("/register")
        bot.out.wait_for("Passwords need at least 8 characters.")
        self.assertEqual(len(answers), 5)   # asked once
        bot.handle_line("/register")
        bot.out.wait_for("is registered")
        bot.handle_line("/password")     # the current password, then the new one, once
        self.assertIn("! Passwords need at least 8 characters.", bot.out.lines[-1:])
        self.assertEqual(answers, ["short"])

    def test_a_short_inline_password_is_refused_before_sending(self) -> None:
        bot = self.session([])
        bot.handle_line("/register first-password")
        bot.out.wait_for("is registered")
        for line in ("/register short", "/password first-password short"):
            del bot.out.lines[:]
            bot.handle_line(line)   # refused here, at once: no answer from the server needed
            self.assertEqual(bot.out.lines, ["! Passwords need at least 8 characters."])
        bot.handle_line("/register " + "x" * (client.MAX_PASSWORD_LENGTH + 1))
        self.assertEqual(bot.out.lines[-1], "! Passwords may have at most 1024 characters.")

    def test_without_a_terminal_passwords_come_as_arguments(self) -> None:
        connection, welcome = client.join("127.0.0.1", self.port, "bot")
        bot = client.ChatSession(connection, welcome, "x", make_screen(), on_lost=lambda: None)
        bot.out = bot.screen.out
        self.addCleanup(bot.leave)
        bot.start()
        bot.handle_line("/register")
        bot.out.wait_for("usage: /register PASSWORD")
        bot.handle_line("/register piped password")
        bot.out.wait_for("is registered")
        bot.handle_line("/password piped")
        bot.out.wait_for("usage: /password OLD NEW")


class ClientConnectErrorTests(unittest.TestCase):
    def test_errors_before_joining_start_with_an_exclamation_mark(self) -> None:
        for text, shown in (("not connecting: the certificate was not trusted",
                             ["! not connecting: the certificate was not trusted"]),
                            ("cannot connect to x: refused\nIs the server running?",
                             ["! cannot connect to x: refused", "  Is the server running?"])):
            def run(text: str = text) -> None:
                raise client.CannotConnect(text)

            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                self.assertIsNone(client.first_join(types.SimpleNamespace(run=run)))
            self.assertEqual(stderr.getvalue().splitlines(), shown)

    def test_port_out_of_range(self) -> None:
        result = subprocess.run([sys.executable, CLIENT_SCRIPT, "127.0.0.1", "99999"],
                                capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 2)
        self.assertIn("not a port number", result.stderr)

    def test_connection_refused(self) -> None:
        port = free_port()
        process = Process(CLIENT_SCRIPT, "127.0.0.1", str(port), "--name", "x", stdin_data="")
        self.addCleanup(process.kill)
        self.assertEqual(process.finish(), 1)
        lines = process.output("stderr").splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertTrue(lines[0].startswith(f"! cannot connect to 127.0.0.1:{port}: "), lines)
        self.assertIn("refused", lines[0])
        self.assertIn("  Is the server running?", lines[1])

    def answered_by(self, reply: bytes) -> str:
        """What client.py says (its stderr) when a server answers its hello with reply;
        it must exit with 1."""
        with socket.socket() as fake:
            fake.bind(("127.0.0.1", 0))
            fake.listen()
            port = fake.getsockname()[1]
            process = Process(CLIENT_SCRIPT, "127.0.0.1", str(port), "--name", "x",
                              stdin_data="")
            self.addCleanup(process.kill)
            conn, _ = fake.accept()
            conn.recv(1024)
            conn.sendall(reply)
            self.assertEqual(process.finish(), 1)
            conn.close()
        return process.output("stderr")

    def test_not_a_chat_server(self) -> None:
        said = self.answered_by(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.assertIn("chat protocol", said)
        self.assertNotIn("Traceback", said)

    def test_a_welcome_it_cannot_read_is_said_as_such(self) -> None:
        said = self.answered_by(encode_frame({"type": "welcome", "name": 5}))
        self.assertIn("sent a welcome this client cannot read", said)


class PerformanceTests(ChatTestCase):
    """What bench_chat.py needs and measures: it runs, big rooms scale, the fast paths agree.

    Performance numbers come from bench_chat.py itself, never from here.
    """

    def set_constant(self, name: str, value: object) -> None:
        """Change a socket_server constant for this test only."""
        self.addCleanup(setattr, socket_server, name, getattr(socket_server, name))
        setattr(socket_server, name, value)

    @long_test
    def test_benchmark_quick_run_gives_sane_numbers(self) -> None:
        bench = subprocess.run(
            [sys.executable, os.path.join(HERE, "bench_chat.py"), "--quick", "--json", "-"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=HERE, timeout=120)
        self.assertEqual(bench.returncode, 0, bench.stderr.decode("utf-8", "replace"))
        results = json.loads(bench.stdout)
        for run in results["fanout"]:
            messages, clients = run["messages"], run["clients"]
            self.assertEqual(run["deliveries"], messages * (clients - 1), run)
            self.assertEqual((run["lost"], run["errors"]), (0, 0), run)
            self.assertGreater(run["deliveries_per_s"], 0)
            for share in (run["server_cpu_pct"], run["loadgen_cpu_pct"]):
                self.assertTrue(share is None or share >= 0, run)
        latency = results["latency"]
        self.assertEqual(latency["lost"], 0)
        self.assertEqual(latency["deliveries"], latency["messages"] * (latency["clients"] - 1))
        self.assertTrue(0 < latency["p50_ms"] <= latency["p99_ms"] <= latency["max_ms"], latency)
        # Each message's first arrival comes no later than a typical one; its spread
        # to the last is within the worst sample.
        self.assertTrue(0 < latency["first_p50_ms"] <= latency["p50_ms"], latency)
        self.assertTrue(0 <= latency["spread_p99_ms"] <= latency["max_ms"], latency)
        idle = results["idle"]
        self.assertEqual(idle["held"], idle["requested"], idle)
        self.assertEqual(idle["floor"]["held"], idle["requested"], idle)   # the same clients
        self.assertGreater(idle["join_vs_floor"], 0)
        # Each size (QUICK: 5, 20) in its room alone, then in the lobby too.
        self.assertEqual([(drop["clients"], drop["rooms"]) for drop in results["drop"]],
                         [(4, 1), (19, 1), (4, 2), (19, 2)])
        for drop in results["drop"]:
            self.assertEqual(drop["told"], drop["clients"], drop)
        self.assertTrue(0 < results["startup"]["median_ms"] < 10_000)
        self.assertEqual(results["slow"]["lost"], 0)
        self.assertGreater(results["slow"]["with_stalled"], 0)
        self.assertGreater(results["history"]["without_history"], 0)
        # A busy load generator is about speed, which this test does not judge.
        self.assertEqual([w for w in results["warnings"] if "load generator" not in w], [])

    def test_benchmark_reads_instruction_totals_from_callgrind(self) -> None:
        import bench_chat
        path = write_file(temp_dir(self), "callgrind.out",
                          "version: 1\ncmd: python socket_server.py\nevents: Ir\n"
                          "fn=main\n3 7\nsummary: 1234567\ntotals: 1234567\n")
        self.assertEqual(bench_chat.callgrind_total(path), 1234567)
        with self.assertRaises(RuntimeError):
            bench_chat.callgrind_total(write_file(temp_dir(self), "empty.out", "events: Ir\n"))

    def test_latency_receivers_find_the_texts_the_server_wrote(self) -> None:
        import bench_chat
        message = {"type": "message", "room": "bench", "from": "l7", "text": "1733 abc",
                   "ts": "2026-12-07T01:00:00.000Z"}
        stream = (socket_server.encode_event({"type": "ping"}) + socket_server.encode_event(
            message) + socket_server.encode_event(dict(message, text="1734 de")))
        splitter = bench_chat.FrameSplitter()
        texts = [bench_chat.texts_of("json", stream[:15], splitter),    # a header and a bit
                 bench_chat.texts_of("json", stream[15:40], splitter),
                 bench_chat.texts_of("json", stream[40:], splitter)]
        self.assertEqual(texts, [[], [], ["1733 abc", "1734 de"]])
        line = b":l7!l7@127.0.0.1 PRIVMSG #bench :1733 abc\r\n"
        self.assertEqual(bench_chat.texts_of("irc", line, bench_chat.LineSplitter()),
                         ["1733 abc"])

    def test_joins_and_leaves_are_announced_only_in_a_small_room(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        server = ServerThread(join_notices_up_to=2, db=path)
        self.addCleanup(server.stop)
        alice, bob = Peer(server.port, "alice"), Peer(server.port, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)
        self.assertEqual(alice.expect("join")["name"], "bob")   # two people: announced
        carol = Peer(server.port, "carol")
        self.addCleanup(carol.close)
        carol.send({"type": "bye"})
        carol.read_until_closed()
        self.assertEqual(alice.sync(), [])      # three people: neither join nor leave
        server.stop()
        db = sqlite3.connect(path)
        self.addCleanup(db.close)
        events = db.execute("SELECT kind FROM events WHERE sender = 'carol'").fetchall()
        self.assertEqual(events, [("join",), ("leave",)])   # the history still has them

    def test_name_lists_are_capped_alphabetically_and_counted(self) -> None:
        self.set_constant("MAX_LISTED_NAMES", 2)
        self.peer("carl")
        self.peer("Bob")
        alice = self.peer("alice")
        self.assertEqual(alice.welcome["users"], ["alice", "Bob"])
        self.assertEqual(alice.welcome["count"], 3)
        alice.send({"type": "who"})
        users = alice.expect("users")
        self.assertEqual((users["users"], users["count"]), (["alice", "Bob"], 3))

    def test_clean_text_keeps_its_rules_for_every_character(self) -> None:
        """Its two character classes are the rules in its docstring, and its fast path
        (printable text) skips nothing they would change."""
        bidi = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
        every = "".join(map(chr, range(sys.maxunicode + 1)))
        # The rules, character by character (C-level maps: a Python loop over 1.1
        # million characters took a second): whitespace becomes a space, controls,
        # lone surrogates and bidi controls go, the rest stays.
        spaces = set(filter(str.isspace, every))
        controls = set(itertools.compress(every, map(("Cc", "Cs").__contains__,
                                                     map(unicodedata.category, every))))
        dropped = (controls | bidi) - spaces
        rules = {ord(char): " " for char in spaces}
        rules.update((ord(char), None) for char in dropped)
        self.assertEqual(socket_server.clean_text("a" + every + "z"),
                         "a" + every.translate(rules) + "z")
        changed = [char for char in spaces | dropped
                   if char.isprintable() and char.translate(rules) != char]
        self.assertEqual(changed, [])

    def test_checkpoints_run_on_their_own_thread(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        store = socket_server.ChatStore(path)
        self.set_constant("CHECKPOINT_EVERY", 3)
        for number in range(3):
            store.record("2024-01-01T00:00:00.000Z", "message", "alice", None, str(number))
            store.commit()
        self.assertTrue(store._checkpointer.checkpointed.wait(TIMEOUT))
        autocheckpoint = store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        self.assertEqual(autocheckpoint, socket_server.WAL_BACKSTOP)
        store.close()
        self.assertFalse(os.path.exists(path + "-wal"))
        db = sqlite3.connect(path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("SELECT COUNT(*) FROM events").fetchone()[0], 3)


if __name__ == "__main__":
    unittest.main()
