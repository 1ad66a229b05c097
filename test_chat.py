"""Tests for the chat: run with ``python -m unittest test_chat``.

Everything runs over loopback against real sockets: servers run in a thread
of this process (fast, and their state can be inspected) or as subprocesses
(for start-up, signals and the command line). Waiting is done with reads
that time out and with events, never with fixed sleeps.
"""

import ipaddress
import json
import logging
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from datetime import datetime
from typing import List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import client  # noqa: E402
import socket_server  # noqa: E402
from socket_server import FrameDecoder, ProtocolError, decode_payload, encode_frame  # noqa: E402

SERVER_SCRIPT = os.path.join(HERE, "socket_server.py")
CLIENT_SCRIPT = os.path.join(HERE, "client.py")
TIMEOUT = 5.0       # longest wait for anything that should happen
POSIX = os.name == "posix"

# The server under test logs through "chat"; keep test output clean.
logging.getLogger("chat").addHandler(logging.NullHandler())
logging.getLogger("chat").propagate = False


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

class ServerThread:
    """A ChatServer on 127.0.0.1, on a free port, running in a thread."""

    def __init__(self, server_class=socket_server.ChatServer, **settings) -> None:
        self.server = server_class(socket_server.Settings(host="127.0.0.1", port=0, **settings))
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
        self.replay: List[dict] = []    # history sent after the welcome
        if name:
            self.send({"type": "hello", "name": name})
            self.welcome = self.expect("welcome")
            self.replay = self.collect_history()

    def collect_history(self) -> List[dict]:
        """The history frames up to and including the closing history_end."""
        frames = []
        while True:
            frames.append(self.receive())
            if frames[-1]["type"] == "history_end":
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    """A script run as a subprocess, its output read by threads into queues."""

    def __init__(self, *args: str, stdin_data: Optional[str] = None) -> None:
        env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONUNBUFFERED="1")
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

    def test_every_split_into_two_and_three_chunks(self) -> None:
        stream = b"".join(encode_frame(m) for m in self.MESSAGES)
        for i in range(len(stream) + 1):
            self.assertEqual(self.decode_chunks([stream[:i], stream[i:]]), self.MESSAGES)
        for i in range(0, len(stream) + 1, 3):
            for j in range(i, len(stream) + 1, 2):
                self.assertEqual(self.decode_chunks([stream[:i], stream[i:j], stream[j:]]),
                                 self.MESSAGES)

    def test_one_byte_at_a_time(self) -> None:
        stream = b"".join(encode_frame(m) for m in self.MESSAGES)
        chunks = [stream[i:i + 1] for i in range(len(stream))]
        self.assertEqual(self.decode_chunks(chunks), self.MESSAGES)

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
        decoder = FrameDecoder(max_payload=5)
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
                 b"null": "bad_message"}
        for payload, code in cases.items():
            with self.subTest(payload=payload[:20]):
                with self.assertRaises(ProtocolError) as caught:
                    decode_payload(payload)
                self.assertEqual(caught.exception.code, code)
        self.assertEqual(decode_payload(b'{"type": "x", "extra": [1]}'),
                         {"type": "x", "extra": [1]})

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
        fields = {"name": str, "password?": str}
        self.assertIsNone(socket_server.check_fields({"type": "t", "name": "a"}, fields))
        self.assertIn("needs", socket_server.check_fields({"type": "t"}, fields))
        self.assertIn("must be", socket_server.check_fields({"type": "t", "name": 1}, fields))
        self.assertIn("must be", socket_server.check_fields(
            {"type": "t", "name": "a", "password": None}, fields))


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
        for name in ["", "x" * 33, "two words", "ünïcode", "tab\t", "esc\x1b[2J", "a/b"]:
            with self.subTest(name=name):
                peer = self.peer()
                peer.send({"type": "hello", "name": name})
                error = self.assert_rejected(peer, "bad_name")
                self.assertIn("1 to 32", error["text"])

    def test_edge_names_are_accepted(self) -> None:
        for name in ["a", "x" * 32, "A.b-c_9"]:
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


class BadInputTests(ChatTestCase):
    """Each bad input costs its sender the connection and nobody else anything."""

    CASES = [
        ("bad_header", b"hello server\r\n"),
        ("bad_header", b"12x       {}"),
        ("too_large", b"99999999  "),
        ("bad_utf8", b"4         \xff\xfe\xfd\xfc"),
        ("bad_json", b"5         {nope"),
        ("bad_message", b"7         [1,2,3]"),
        ("bad_message", b"2         {}"),
        ("bad_message", b'10        {"type":1}'),
    ]

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

    def test_client_vanishing_mid_frame(self) -> None:
        alice, mallory = self.peer("alice"), self.peer("mallory")
        frame = encode_frame({"type": "say", "text": "never finished"})
        mallory.send_raw(frame[:15])
        mallory.close()
        leave = alice.expect("leave")
        self.assertEqual(leave["name"], "mallory")
        self.assertIn("middle of a message", leave["reason"])
        self.assertNotIn("message", [m["type"] for m in alice.sync()])

    def test_half_closed_client_is_seen_leaving(self) -> None:
        alice, mallory = self.peer("alice"), self.peer("mallory")
        mallory.sock.shutdown(socket.SHUT_WR)
        self.assertEqual(alice.expect("leave")["name"], "mallory")
        mallory.read_until_closed()

    def test_bug_in_a_handler_costs_one_message(self) -> None:
        class BrokenServer(socket_server.ChatServer):
            def on_who(self, conn, message):
                raise RuntimeError("bug")

        server = ServerThread(BrokenServer)
        self.addCleanup(server.stop)
        alice, bob = Peer(server.port, "alice"), Peer(server.port, "bob")
        alice.send({"type": "who"})
        self.assertEqual(alice.expect("error")["code"], "internal_error")
        alice.say("after the bug")
        self.assertEqual(bob.expect("message")["text"], "after the bug")
        alice.close()
        bob.close()


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

    def test_port_in_use_is_one_clear_line(self) -> None:
        _, port = self.start()
        second = Process(SERVER_SCRIPT, "--host", "127.0.0.1", "--port", str(port), "--no-history")
        self.addCleanup(second.kill)
        self.assertEqual(second.finish(), 1)
        errors = second.output("stderr").splitlines()
        self.assertEqual(len(errors), 1, errors)
        self.assertIn(str(port), errors[0])
        self.assertIn("--port", errors[0])

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


# ---------------------------------------------------------------------------
# History: the sqlite store, replay, /history, /search, --export
# ---------------------------------------------------------------------------

T0 = "2026-01-01T10:00:00.000Z"
T1 = "2026-01-01T11:00:00.000Z"
T2 = "2026-01-01T12:00:00.000Z"


class HistoryStoreTests(unittest.TestCase):
    def store(self, path: str = ":memory:") -> socket_server.HistoryStore:
        store = socket_server.HistoryStore(path)
        self.addCleanup(store.db.close)
        return store

    def test_recent_public_messages_in_order(self) -> None:
        store = self.store()
        for number in range(10):
            store.record(T0, "message", "alice", None, f"m{number}")
        store.record(T0, "whisper", "alice", "bob", "secret")
        store.record(T0, "join", "carol")
        rows = store.recent_public(3)
        self.assertEqual([row[5] for row in rows], ["m7", "m8", "m9"])

    def test_whispers_only_for_their_parties_and_only_after_joining(self) -> None:
        store = self.store()
        store.record(T0, "whisper", "alice", "bob", "old, to the previous bob")
        store.record(T1, "message", "alice", None, "public")
        store.record(T2, "whisper", "alice", "BOB", "to this bob")
        store.record(T2, "whisper", "bob", "alice", "from this bob")
        store.record(T2, "whisper", "alice", "carol", "to carol")
        texts = [row[5] for row in store.recent_for("bob", 50, whispers_after=2)]
        self.assertEqual(texts, ["public", "to this bob", "from this bob"])
        texts = [row[5] for row in store.recent_for("dave", 50, whispers_after=0)]
        self.assertEqual(texts, ["public"])

    def test_search_needs_every_word_in_any_case_and_wildcards_are_literal(self) -> None:
        store = self.store()
        store.record(T0, "message", "alice", None, "Lunch at noon?")
        store.record(T0, "message", "bob", None, "no lunch today")
        store.record(T0, "message", "bob", None, "100% sure")
        store.record(T0, "message", "bob", None, "1000 sure")
        store.record(T0, "whisper", "bob", "carol", "lunch secret")
        search = lambda *words: [row[5] for row in store.search_for("alice", list(words), 50, 0)]
        self.assertEqual(search("LUNCH"), ["Lunch at noon?", "no lunch today"])
        self.assertEqual(search("lunch", "noon"), ["Lunch at noon?"])
        self.assertEqual(search("0%"), ["100% sure"])
        self.assertEqual(search("_"), [])
        self.assertEqual(search("secret"), [])

    def test_migrates_every_older_schema(self) -> None:
        latest = len(socket_server.HistoryStore.MIGRATIONS)
        for version in range(latest):
            with self.subTest(version=version):
                path = os.path.join(temp_dir(self), "old.sqlite3")

                class OldStore(socket_server.HistoryStore):
                    MIGRATIONS = socket_server.HistoryStore.MIGRATIONS[:version]

                old = OldStore(path)
                if version >= 1:
                    old.record(T0, "message", "alice", None, "from an old server")
                old.close()
                store = self.store(path)
                self.assertEqual(store.db.execute("PRAGMA user_version").fetchone()[0], latest)
                if version >= 1:
                    self.assertEqual(store.recent_public(5)[0][5], "from an old server")

    def test_database_from_a_newer_server_is_refused(self) -> None:
        path = os.path.join(temp_dir(self), "new.sqlite3")
        with sqlite3.connect(path) as db:
            db.execute("PRAGMA user_version = 999")
        db.close()
        with self.assertRaisesRegex(socket_server.StoreError, "newer server"):
            socket_server.HistoryStore(path)

    def test_unusable_files_are_clear_errors(self) -> None:
        directory = temp_dir(self)
        garbage = os.path.join(directory, "garbage.sqlite3")
        with open(garbage, "wb") as out:
            out.write(b"this is not a database at all" * 100)
        with self.assertRaisesRegex(socket_server.StoreError, "garbage.sqlite3"):
            socket_server.HistoryStore(garbage)
        with self.assertRaises(socket_server.StoreError):
            socket_server.HistoryStore(os.path.join(directory, "no", "such", "dir.sqlite3"))

    def test_locked_database_at_start_up(self) -> None:
        path = os.path.join(temp_dir(self), "locked.sqlite3")
        holder = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("BEGIN EXCLUSIVE")
        with self.assertRaisesRegex(socket_server.StoreError, "locked"):
            socket_server.HistoryStore(path)
        holder.execute("ROLLBACK")

    def test_full_disk_stops_history_not_the_store_user(self) -> None:
        store = self.store(os.path.join(temp_dir(self), "full.sqlite3"))
        page_count = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {page_count + 2}")
        with self.assertLogs("chat", "ERROR") as logs:
            for _ in range(20):
                for number in range(200):
                    store.record(T0, "message", "alice", None, "x" * 1000)
                store.commit()
        self.assertFalse(store.working)
        self.assertIn("without history", logs.output[0])
        self.assertEqual(store.recent_public(5), [])
        store.record(T0, "message", "alice", None, "ignored")   # no error, no growth
        self.assertEqual(store._pending, [])


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
        self.assertEqual(carol.replay[-1], {"type": "history_end", "for": "join", "count": 3})

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

    def test_whispers_are_not_inherited_with_a_name(self) -> None:
        alice, bob = self.peer("alice"), self.peer("bob")
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
        store = self.server.server.store
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

    def test_chat_goes_on_when_the_disk_fills(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        server = ServerThread(db=path)
        self.addCleanup(server.stop)
        alice, bob = Peer(server.port, "alice"), Peer(server.port, "bob")
        self.addCleanup(alice.close)
        self.addCleanup(bob.close)
        filled = threading.Event()

        def fill_the_disk() -> None:
            db = server.server.store.db
            db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
            filled.set()

        server.server.call_soon(fill_the_disk)
        self.assertTrue(filled.wait(TIMEOUT))
        with self.assertLogs("chat", "ERROR"):
            for number in range(300):
                alice.send({"type": "say", "text": f"{number} " + "x" * 1900})
            for number in range(300):
                self.assertEqual(bob.expect("message")["text"].split()[0], str(number))
        self.assertFalse(server.server.store.working)
        alice.say("still chatting")
        self.assertEqual(bob.expect("message")["text"], "still chatting")


class HistoryProcessTests(unittest.TestCase):
    def test_kill_9_loses_no_delivered_message(self) -> None:
        path = os.path.join(temp_dir(self), "chat.sqlite3")
        process, port = start_server_process("--db", path)
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
        alice.close()
        bob.expect("leave")
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
        self.assertRegex(text, r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC  \* alice joined")
        self.assertIn("alice: hello bob", text)
        self.assertIn("[whisper alice -> bob] psst", text)
        self.assertIn("* alice left (connection closed)", text)
        result = subprocess.run([sys.executable, SERVER_SCRIPT, "--db", out + ".missing",
                                 "--export", "-"], capture_output=True, text=True, timeout=TIMEOUT)
        self.assertEqual(result.returncode, 1)
        self.assertIn("no history database", result.stderr)

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
# The client
# ---------------------------------------------------------------------------

class ClientUnitTests(unittest.TestCase):
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
        }
        for line, expected in cases.items():
            with self.subTest(line=line):
                self.assertEqual(client.parse_line(line), expected)

    def test_every_alias_points_at_a_command(self) -> None:
        for alias, target in client.ALIASES.items():
            self.assertIn(target, client.COMMANDS, alias)

    def test_split_address(self) -> None:
        cases = {("host", None): ("host", 5050), ("host", 7): ("host", 7),
                 ("1.2.3.4:6000", None): ("1.2.3.4", 6000), ("[::1]:6000", None): ("::1", 6000),
                 ("::1", None): ("::1", 5050), ("[fe80::1]", 9): ("fe80::1", 9)}
        for (host, port), expected in cases.items():
            self.assertEqual(client.split_address(host, port), expected)

    def test_formatting(self) -> None:
        stamp = "2026-01-02T03:04:05.000Z"
        local = datetime.fromisoformat("2026-01-02T03:04:05+00:00").astimezone().strftime("%H:%M")
        fmt = client.format_message
        self.assertEqual(fmt({"type": "message", "from": "bob", "text": "hi", "ts": stamp}, "me"),
                         f"[{local}] bob: hi")
        self.assertEqual(fmt({"type": "sent", "text": "hi", "ts": stamp}, "me"),
                         f"[{local}] me: hi")
        self.assertEqual(fmt({"type": "sent", "to": "bob", "text": "hi", "ts": stamp}, "me"),
                         f"[{local}] [whisper to bob] hi")
        self.assertEqual(fmt({"type": "whisper", "from": "bob", "to": "me", "text": "hi",
                              "ts": stamp}, "me"), f"[{local}] [whisper from bob] hi")
        self.assertEqual(fmt({"type": "leave", "name": "bob", "reason": "quit", "ts": stamp},
                             "me"), f"[{local}] * bob left")
        self.assertEqual(fmt({"type": "users", "users": ["a", "b"]}, "me"), "* 2 here: a, b")
        self.assertIsNone(fmt({"type": "pong"}, "me"))
        # What the server sends is cleaned again before it reaches the terminal.
        self.assertEqual(fmt({"type": "message", "from": "x\x1b[2J", "text": "\x07hi",
                              "ts": stamp}, "me"), f"[{local}] x[2J: hi")


class ClientProcessTests(ChatTestCase):
    """client.py as a user runs it, with its input piped in."""

    def run_client(self, *args: str, stdin_data: Optional[str] = None) -> Process:
        process = Process(CLIENT_SCRIPT, "127.0.0.1", str(self.port), *args,
                          stdin_data=stdin_data)
        self.addCleanup(process.kill)
        return process

    def test_piped_client_sends_everything_then_leaves(self) -> None:
        alice = self.peer("alice")
        lines = ["hello everyone", "/w alice psst", "/clients", "/nope", "//slash", "\\o/",
                 "/who", "", "last line"]
        bot = self.run_client("--name", "bot", stdin_data="\n".join(lines) + "\n")
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
        self.assertIn("unknown command /nope", output)
        self.assertEqual(bot.output("stderr"), "")

    def test_name_from_first_line_and_asked_again_when_taken(self) -> None:
        alice = self.peer("alice")
        bot = self.run_client(stdin_data="alice\nbad name\nalice2\nhi\n")
        self.assertEqual(bot.finish(), 0)
        self.assertIn("taken", bot.output("stderr"))
        self.assertIn("1 to 32", bot.output("stderr"))
        message = alice.expect("message")
        self.assertEqual((message["from"], message["text"]), ("alice2", "hi"))

    def test_taken_name_from_flag_without_terminal_exits(self) -> None:
        self.peer("alice")
        bot = self.run_client("--name", "alice", stdin_data="hi\n")
        self.assertEqual(bot.finish(), 1)
        self.assertIn("taken", bot.output("stderr"))

    def test_log_file_gets_every_line(self) -> None:
        log_path = os.path.join(temp_dir(self), "log.txt")
        alice = self.peer("alice")
        alice.say("the build is green")
        bot = self.run_client("--name", "bot", "--log", log_path,
                              stdin_data="hi there\n/search build\n")
        self.assertEqual(bot.finish(), 0)
        with open(log_path, encoding="utf-8") as log_file:
            logged = log_file.read()
        self.assertEqual(logged.splitlines(), bot.output().splitlines())
        self.assertIn("alice: the build is green", logged)
        self.assertIn("bot: hi there", logged)
        self.assertIn("--- 1 found ---", logged)

    def test_unwritable_log_is_a_one_line_error(self) -> None:
        bot = self.run_client("--name", "bot", "--log", os.path.join(HERE, "no", "dir", "x.log"),
                              stdin_data="")
        self.assertEqual(bot.finish(), 1)
        self.assertEqual(len(bot.output("stderr").splitlines()), 1)
        self.assertIn("cannot write the log", bot.output("stderr"))

    def test_lost_connection_is_one_message_and_exit_code_1(self) -> None:
        alice = self.peer("alice")
        bot = self.run_client("--name", "bot")     # stdin stays open: the user is idle
        alice.expect("join")
        self.server.stop()
        self.assertEqual(bot.finish(), 1)
        self.assertIn("disconnected: the server shut down", bot.output())
        self.assertNotIn("Traceback", bot.output("stderr"))

    def test_client_answers_pings(self) -> None:
        pong = threading.Event()

        class WatchedServer(socket_server.ChatServer):
            def on_pong(self, conn, message):
                pong.set()

        server = ServerThread(WatchedServer, ping_after=0.1, drop_after=10)
        self.addCleanup(server.stop)
        bot = Process(CLIENT_SCRIPT, "127.0.0.1", str(server.port), "--name", "bot")
        self.addCleanup(bot.kill)
        self.assertTrue(pong.wait(TIMEOUT), "the client never answered a ping")


class WatchedOutput:
    """A stand-in for stdout that lets a test wait for a line to be shown."""

    def __init__(self) -> None:
        self.lines: List[str] = []
        self._changed = threading.Condition()

    def write(self, text: str) -> None:
        with self._changed:
            self.lines.extend(text.splitlines())
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


class ClientSessionTests(ChatTestCase):
    """ChatSession in this process, against a real server: commands and output."""

    def session(self, name: str = "bot") -> "client.ChatSession":
        connection, welcome = client.join("127.0.0.1", self.port, name)
        self.lost = threading.Event()
        session = client.ChatSession(connection, welcome["name"], f"127.0.0.1:{self.port}",
                                     out=WatchedOutput(), on_lost=self.lost.set)
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
        self.assertLess(out.lines.index("--- earlier messages ---"),
                        out.lines.index(out.wait_for("alice: the build is green")))
        bot.handle_line("/search BUILD green")
        out.wait_for("--- 1 found ---")
        self.assertEqual(out.lines[-3:-1], ["--- search: BUILD green ---",
                                            out.wait_for("alice: the build is green")])
        bot.handle_line("/search nothing-like-it")
        out.wait_for("* no messages match")
        for bad in ("/history 0", "/history x", "/history 999", "/search"):
            del out.lines[:]
            bot.handle_line(bad)
            out.wait_for("usage:")
        bot.handle_line("/history 1")
        out.wait_for("--- end of history ---")
        self.assertEqual(out.lines[-3], "--- history ---")
        self.assertIn("alice: lunch?", out.lines[-2])

    def test_save_never_overwrites_unless_asked(self) -> None:
        directory = temp_dir(self)
        path = os.path.join(directory, "session.txt")
        bot = self.session()
        bot.handle_line("hi there")
        bot.out.wait_for("bot: hi there")
        bot.handle_line(f"/save {path}")
        bot.out.wait_for("* saved")
        with open(path, encoding="utf-8") as saved:
            text = saved.read()
        self.assertTrue(text.startswith(f"Chat on 127.0.0.1:{self.port} as bot, "))
        self.assertRegex(text, r"\n\[\d\d:\d\d\] bot: hi there\n")
        self.assertIn("* connected to", text)
        bot.handle_line(f"/save {path}")
        bot.out.wait_for(f"{path} exists")
        with open(path, encoding="utf-8") as saved:
            self.assertEqual(saved.read(), text)
        bot.handle_line(f"/save -f {path}")
        self.assertEqual(len([line for line in bot.out.lines if "* saved" in line]), 2)
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

    def test_lost_connection_calls_the_hook_once(self) -> None:
        bot = self.session()
        self.server.stop()
        self.assertTrue(self.lost.wait(TIMEOUT))
        bot.out.wait_for("disconnected: the server shut down")


class ClientConnectErrorTests(unittest.TestCase):
    def test_connection_refused(self) -> None:
        port = free_port()
        process = Process(CLIENT_SCRIPT, "127.0.0.1", str(port), "--name", "x", stdin_data="")
        self.addCleanup(process.kill)
        self.assertEqual(process.finish(), 1)
        lines = process.output("stderr").splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn(f"127.0.0.1:{port}", lines[0])
        self.assertIn("refused", lines[0])
        self.assertIn("server running", lines[1])

    def test_not_a_chat_server(self) -> None:
        with socket.socket() as fake:
            fake.bind(("127.0.0.1", 0))
            fake.listen()
            port = fake.getsockname()[1]
            process = Process(CLIENT_SCRIPT, "127.0.0.1", str(port), "--name", "x",
                              stdin_data="")
            self.addCleanup(process.kill)
            conn, _ = fake.accept()
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            self.assertEqual(process.finish(), 1)
            conn.close()
        self.assertIn("chat protocol", process.output("stderr"))
        self.assertNotIn("Traceback", process.output("stderr"))


if __name__ == "__main__":
    unittest.main()
