#!/usr/bin/env python3
"""Benchmark socket_server.py on this machine: standard library only.

Usage::

    python bench_chat.py                      # every scenario, about a minute
    python bench_chat.py --quick              # a smoke run of a few seconds
    python bench_chat.py --json results.json  # the table, and the numbers as JSON
    python bench_chat.py --scenarios fanout,latency --fanout 50x5,200x2
    python bench_chat.py --help               # every size and flag

What it measures
----------------
- startup: process spawn to the server's ``listening on`` line.
- fanout: C clients, S of them sending 100-byte messages as fast as the
  server takes them; deliveries/s is every ``message`` frame received,
  summed over all receivers, per second. "lost" counts the frames a
  receiver should have got and did not; "errors" counts ``error`` frames
  (a ``rate_limited`` would be a loss the benchmark caused).
- latency: clients take turns sending at a fixed rate; each message carries
  its send time, and every receiver's arrival time gives one sample (the
  kernel's time of arrival where it gives one: Linux). Each message's first
  arrival shows the server's work before it sends anything; the spread to
  its last arrival, what sending to every receiver costs.
- idle: many clients connect, join, and then only read and answer pings;
  the server's resident memory growth is divided among them. Then the
  same clients join the floor, a server that only answers each hello
  (``--serve-floor``): the kernel's and the load generator's share of
  joining, which no server can go under here.
- drop: a room's people all close their connections at once (their
  network went), but one who stays: the time until the one who stays was
  told of every leave, divided among the leaves, in a room of 250 and one
  of 1000 (more are not told: JOIN_NOTICES_UP_TO), and the server's CPU;
  then the same with everyone in the lobby too, as with client.py, so that
  each leave is told to two rooms' people.
- slow: the first fanout run again, plus one client that joins and never
  reads: the others' throughput, and the server's peak memory, compared.
- history: the first fanout run again with ``--no-history``: what writing
  every message to sqlite costs.
- mixed: the first fanout run with half the clients on the IRC port.
- rooms: 1000 rooms of 10 with 100 senders, one a room, against one room of
  the first fanout run's size.
- hostile: the latency run while 18 clients each send 5 messages a second
  of 60,000 characters with a tab in it (far over the length limit, and
  not printable), against the latency run alone.
- peers (with ``--peers ngircd,ncat``): the fanout and latency runs against
  those C servers too, in turns with ours, and the ratios.
- instructions (not run by default: it needs valgrind and takes minutes):
  the history cost and the mixed room's again, and what a join costs,
  counted in instructions under valgrind's callgrind, which a busy or
  throttled machine does not change.

Every run starts its own server on 127.0.0.1 with ``--port 0``, a temporary
database and every feature on, rate limits set high rather than off. CPU
shares (100% = one core) show whether the load generator, not the server,
was the bottleneck.

Design
------
The load generator must be cheaper than the server it loads. Its clients
live in a few worker processes (multiprocessing, "spawn", so it works the
same on Windows and macOS). A receiver never parses frames: it reads big
chunks into one buffer and counts its messages by their bytes, as every
message it gets in a run has the same size (one room, one text, names of
one length, timestamps of one length), learnt from the first one; any
byte left over at the end is reported (something else came). A sender,
which gets answers too, counts ``{"type":"message"`` (or `` PRIVMSG #``)
with ``bytearray.count`` (the JSON encoder escapes every quote inside a
string, so that marker can only start a payload). Senders send batches of
pre-encoded frames, but only while fewer than ``--window`` messages are
in flight (sent, and not yet received by the slowest receiver): the
workers share their counts in a small shared-memory array. That keeps the
server's queues below the backlog limit, so the benchmark measures the
throughput the server sustains, never a backlog it builds up and then
has to cut off.

Everything is bounded in count and time, talks only to 127.0.0.1, and ends
its own children (server and workers, by handle) on error or Ctrl-C.
Server CPU and memory come from /proc (Linux); elsewhere the report says
they could not be measured.
"""

import argparse
import json
import multiprocessing
import os
import platform
import queue
import re
import selectors
import signal
import socket
import statistics
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# The server's own framing code, from the file next to this one: no third-party
# package, and no third copy of the framing block to keep in step. (Receivers
# read frames by their headers alone: see FrameSplitter.)
from socket_server import (  # noqa: E402
    ACCEPTS_PER_PASS, HEADER_LENGTH, JOIN_NOTICES_UP_TO, encode_frame)

SERVER_SCRIPT = os.path.join(HERE, "socket_server.py")

# ---------------------------------------------------------------------------
# Defaults and limits
# ---------------------------------------------------------------------------

LOOPBACK = "127.0.0.1"          # the only address this program talks to
TEXT_SIZE = 100                 # characters per chat message
FANOUT_RUNS = "50x5,200x2"      # CLIENTSxSENDERS, one run each
DEFAULT_SCENARIOS = "startup,fanout,latency,idle,drop,slow,history,mixed,rooms,hostile"
ROOM_COUNT = 1000               # the 'rooms' run: rooms ...
ROOM_SIZE = 10                  # ... of this many clients ...
ROOM_SENDERS = 100              # ... with this many senders, one a room
MESSAGES_PER_SENDER = 20_000
WINDOW = 2_000                  # messages in flight, all senders: ~360 KB, under the backlog limit
SEND_BATCH = 50                 # frames per send() of a sender
STALLED_RCVBUF = 4096           # the slow reader's socket buffer: it fills at once
STALLED_WAIT = 1.0              # seconds to read what is left of it after a run
LATENCY_CLIENTS = 100
LATENCY_RATE = 200.0            # messages a second, all senders together
LATENCY_SECONDS = 5.0
HOSTILE_CLIENTS = 18            # the 'hostile' run: clients sending, each ...
HOSTILE_RATE = 5.0              # ... this many messages a second (the default flood limit) ...
HOSTILE_TEXT_SIZE = 60_000      # ... of this many characters, one of them a tab
IDLE_CLIENTS = 10_000
IDLE_HOLD = 2.0                 # seconds the idle clients stay before they are counted
IDLE_CONNECTING = 400           # idle clients connecting at once, per worker (backlog: 1024)
# The 'drop' run: rooms of these sizes whose people all close at once, but a watcher.
# The bigger is the largest whose leaves are told (the server's JOIN_NOTICES_UP_TO,
# the watcher included): a cost that grows with the square shows as a per-leave
# cost 4 times the smaller room's.
DROP_SIZES = f"{JOIN_NOTICES_UP_TO // 4},{JOIN_NOTICES_UP_TO}"
LEAVE_MARK = b'{"type":"leave"'
WORKERS = 2                     # load generator processes for fanout and idle runs
REPEAT = 2                      # runs of each fanout setting; the best one counts
PAIRS = 3                       # plain and variant runs in turn for 'slow' and 'history'
STARTUP_RUNS = 5
SATURATED = 75                  # % of its cores past which the load generator may be the limit
RUN_TIMEOUT = 120.0             # seconds any one run may take before it is abandoned
QUIET_ALLOWED = 600.0           # seconds a client may be silent before a server pings it:
                                # longer than any run, so that receivers need not look for pings
SETUP_TIMEOUT = 10.0            # seconds for a server to start or a client to join
CALLGRIND_SIZES = (1_000, 5_000)    # messages per sender; the difference cancels start-up
CALLGRIND_TIMEOUT = 600.0       # seconds for a run or a start under callgrind (~50x slower)
CALLGRIND_JOINS = (1_000, 3_000)    # clients joining; the difference cancels start-up

# Server flags for every run: everything on, limits out of the benchmark's way.
RATE_LIMIT = "1000000"          # high, not 0: the token bucket still runs
MAX_BACKLOG_KIB = 512           # the server's default
FD_SPARE = 200                  # descriptors beyond one per client, per process

# --quick: a smoke run for test_chat.py, a few seconds on any machine.
QUICK = dict(fanout="10x2", messages=300, latency_clients=10, latency_seconds=0.5,
             idle_clients=200, idle_hold=0.2, repeat=1, pairs=1, startup_runs=2, workers=1,
             room_count=20, room_size=3, room_senders=5, drop_sizes="5,20")

RECV_SIZE = 256 * 1024
SYNC_LINE_SIZE = 6              # b"SYNC0\n": one digit, so at most 10 workers with ncat
QUICKACK = getattr(socket, "TCP_QUICKACK", None)   # Linux only; elsewhere ACKs may be delayed
# The kernel's arrival time of what a recvmsg() returns (Linux): a latency sample
# then leaves out the time the load generator took to come to that socket.
ARRIVAL_STAMPS = getattr(socket, "SO_TIMESTAMPNS", None)
TIMESPEC = struct.Struct("@ll")     # struct timespec: seconds, nanoseconds
MESSAGE_MARK = b'{"type":"message"'
ERROR_MARK = b'{"type":"error"'
HISTORY_END_MARK = b'{"type":"history_end"'
PING_MARK = b'{"type":"ping"'
PONG_MARK = b'{"type":"pong"'
PONG_FRAME = encode_frame({"type": "pong"})

# ---------------------------------------------------------------------------
# Measuring other processes: /proc where there is one, else nothing
# ---------------------------------------------------------------------------

def cpu_seconds(pid: int) -> Optional[float]:
    """User plus system CPU time a process has used; None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def resident_kib(pid: int) -> Optional[int]:
    """A process's resident memory in KiB; None without /proc."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def raise_fd_limit(wanted: int) -> Tuple[Optional[int], Optional[int]]:
    """Raise this process's open-file limit towards `wanted` (children inherit it).

    Returns (limit before, limit now); (None, None) where the resource
    module does not exist (Windows), which has no such per-process limit.
    """
    try:
        import resource     # POSIX only
    except ImportError:
        return None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def split_cpus() -> Optional[Tuple[Set[int], Set[int]]]:
    """One core for the server, the others for the load generator (Linux).

    Pinned, the two never fight over a core, and runs vary far less. None
    where affinity cannot be set or there is only one core.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[0]}, set(cpus[1:])) if len(cpus) >= 2 else None


class MemorySampler:
    """Samples a process's resident memory in a thread, to find its peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval = pid, interval
        self.peak: Optional[int] = resident_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = resident_kib(self.pid)
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

# ---------------------------------------------------------------------------
# The server under test
# ---------------------------------------------------------------------------

class Launched:
    """A server program in a subprocess on 127.0.0.1, pinned like ours (see split_cpus).

    Use as a context manager: it is stopped (SIGTERM, then kill) however the
    block ends. Subclasses say what to run and how they tell they are ready.
    """

    cpus: Optional[Set[int]] = None     # cores to pin servers to (see split_cpus)
    name = "server"

    def __init__(self, setup_timeout: float = SETUP_TIMEOUT) -> None:
        self.setup_timeout = setup_timeout  # also how long it may take to stop
        self.command: List[str] = []
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.startup = 0.0      # seconds from spawn to ready
        self.stderr: List[str] = []

    def __enter__(self) -> "Launched":
        lines: "queue.Queue[Optional[str]]" = queue.Queue()
        spawned = time.perf_counter()
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        threading.Thread(target=self._pump, args=(self.proc.stdout, lines.put),
                         daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append),
                         daemon=True).start()
        try:
            self.wait_until_ready(lines)
            self.startup = time.perf_counter() - spawned
        except BaseException:
            self.stop()
            raise
        return self

    def wait_until_ready(self, lines: "queue.Queue[Optional[str]]") -> None:
        raise NotImplementedError

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @staticmethod
    def _pump(stream: Any, put: Any) -> None:
        for raw in stream:
            put(raw.decode("utf-8", "replace").rstrip("\r\n"))
        put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> Optional[float]:
        return cpu_seconds(self.proc.pid)

    def memory(self) -> Optional[int]:
        return resident_kib(self.proc.pid)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(self.setup_timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def listening_port(first: Optional[str], stderr: List[str]) -> int:
    """The port in a server's first line, "listening on 127.0.0.1:PORT"."""
    match = re.match(r"listening on 127\.0\.0\.1:(\d+)$", first or "")
    if not match:
        raise RuntimeError(f"the server did not start: {first!r} {stderr}")
    return int(match.group(1))


class ServerUnderTest(Launched):
    """socket_server.py on 127.0.0.1 and a free port (with irc: an IRC port too)."""

    profile_dir: Optional[str] = None  # --profile: run each server under cProfile
    name = "ours"

    def __init__(self, db_dir: str, history: bool = True, max_clients: int = 1000,
                 wrapper: Tuple[str, ...] = (), setup_timeout: float = SETUP_TIMEOUT,
                 irc: bool = False) -> None:
        super().__init__(setup_timeout)
        store = ["--db", os.path.join(db_dir, f"bench-{time.monotonic_ns()}.sqlite3")] \
            if history else ["--no-history"]
        profiler = [] if self.profile_dir is None else [
            "-m", "cProfile", "-o",
            os.path.join(self.profile_dir, f"server-{time.monotonic_ns()}.prof")]
        self.command = [*wrapper, sys.executable, *profiler, SERVER_SCRIPT,
                        "--host", LOOPBACK, "--port", "0",
                        "--log-level", "warning", "--rate-limit", RATE_LIMIT,
                        "--rate-burst", RATE_LIMIT, "--max-per-address", "0",
                        "--max-clients", str(max_clients), "--max-rooms", str(max_clients + 10),
                        "--max-backlog", str(MAX_BACKLOG_KIB),
                        "--ping-after", str(QUIET_ALLOWED),
                        "--drop-after", str(QUIET_ALLOWED * 2)] + store + \
            (["--irc-port", "0", "--server-name", "bench.lan"] if irc else [])
        self.irc = irc
        self.irc_port = 0

    def wait_until_ready(self, lines: "queue.Queue[Optional[str]]") -> None:
        self.port = listening_port(lines.get(timeout=self.setup_timeout), self.stderr)
        if self.irc:
            second = lines.get(timeout=self.setup_timeout)
            match = re.match(r"IRC listening on 127\.0\.0\.1:(\d+),", second or "")
            if not match:
                raise RuntimeError(f"no IRC port: {second!r} {self.stderr}")
            self.irc_port = int(match.group(1))


def free_port() -> int:
    """A port nobody listens on now, on 127.0.0.1 (for a peer that needs one named)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"it exited with status {proc.returncode}")
        try:
            socket.create_connection((LOOPBACK, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:g} s")


class Ngircd(Launched):
    """ngIRCd, the C IRC server, configured as ours is for the benchmark: no flood
    penalty (as ours has its rate limit out of the way), no DNS or ident lookups,
    no connection limits, listening on 127.0.0.1 only."""

    name = "ngircd"
    protocol = "irc"

    def __init__(self, work_dir: str) -> None:
        super().__init__()
        self.port = free_port()
        config = os.path.join(work_dir, f"ngircd-{self.port}.conf")     # its pid file: none
        with open(config, "w", encoding="ascii") as out:
            pid_file = os.path.join(work_dir, "ngircd.pid")
            out.write(NGIRCD_CONFIG.format(port=self.port, pid=pid_file,
                                           quiet=round(QUIET_ALLOWED)))
        self.command = [shutil.which("ngircd") or "ngircd", "--nodaemon", "--config", config]

    def wait_until_ready(self, lines: "queue.Queue[Optional[str]]") -> None:
        try:
            wait_for_port(self.port, self.proc, self.setup_timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"ngircd did not start: {exc}; {self.stderr[-3:]}") from None


NGIRCD_CONFIG = """[Global]
\tName = bench.lan
\tInfo = bench_chat.py peer
\tListen = 127.0.0.1
\tPorts = {port}
\tMotdPhrase = bench
\tPidFile = {pid}
[Limits]
\tMaxConnections = 0
\tMaxConnectionsIP = 0
\tMaxJoins = 0
\tMaxNickLength = 30
\tMaxPenaltyTime = 0
\tPingTimeout = {quiet}
\tPongTimeout = {quiet}
[Options]
\tDNS = no
\tIdent = no
\tPAM = no
"""


class NcatBroker(Launched):
    """ncat --broker: every byte one client sends goes to all the others; no
    parsing, no names, no rooms. What copying bytes alone costs."""

    name = "ncat"
    protocol = "raw"

    def __init__(self, work_dir: str) -> None:
        super().__init__()
        self.port = free_port()
        self.command = [shutil.which("ncat") or "ncat", "--broker", "--listen",
                        "--max-conns", "10000", LOOPBACK, str(self.port)]

    def wait_until_ready(self, lines: "queue.Queue[Optional[str]]") -> None:
        try:
            wait_for_port(self.port, self.proc, self.setup_timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"ncat did not start: {exc}; {self.stderr[-3:]}") from None


PEERS = {"ngircd": Ngircd, "ncat": NcatBroker}


class FloorServer(Launched):
    """The idle run's floor: a server that does only what a join needs of it
    (see serve_floor). No server joins the same clients faster with this load
    generator on this machine; what it takes is the kernel's and the load
    generator's share of joining."""

    name = "floor"

    def __init__(self) -> None:
        super().__init__()
        self.command = [sys.executable, os.path.abspath(__file__), "--serve-floor"]

    def wait_until_ready(self, lines: "queue.Queue[Optional[str]]") -> None:
        self.port = listening_port(lines.get(timeout=self.setup_timeout), self.stderr)


def serve_floor() -> None:
    """--serve-floor: on 127.0.0.1, a free port, as our server listens: accept,
    answer a connection's first bytes (its hello) with a welcome and the end of
    an empty history, then read and drop whatever comes. Until killed."""
    listener = socket.create_server((LOOPBACK, 0), backlog=min(socket.SOMAXCONN, 1024))
    listener.setblocking(False)
    print(f"listening on {LOOPBACK}:{listener.getsockname()[1]}", flush=True)
    answer = encode_frame({"type": "welcome", "name": "floor", "count": 1}) + \
        encode_frame({"type": "history_end", "room": "lobby"})
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    answered: Set[socket.socket] = set()
    while True:
        for key, _ in selector.select():
            if key.fileobj is listener:
                for _ in range(ACCEPTS_PER_PASS):   # as many a pass as our server takes
                    try:
                        sock, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    selector.register(sock, selectors.EVENT_READ)
                continue
            sock = key.fileobj
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                selector.unregister(sock)
                answered.discard(sock)
                sock.close()
            elif sock not in answered:
                answered.add(sock)
                try:
                    sock.send(answer)
                except OSError:
                    pass    # gone: its end of file comes next

# ---------------------------------------------------------------------------
# The load generator's clients (they run in worker processes)
# ---------------------------------------------------------------------------

class FrameCounter:
    """Counts frames of one type in a byte stream without parsing it.

    Every frame's payload begins with '{"type":"KIND"'. A marker split over
    two reads is caught by looking at the last len(marker)-1 bytes of the
    previous read joined to the first ones of this read: no marker fits
    wholly in either part, so whatever is found there straddles the two.
    """

    __slots__ = ("marker", "count", "_tail")

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.count = 0
        self._tail = b""

    def feed(self, buffer: bytearray, size: int) -> int:
        """Count the markers in buffer[:size]; return how many were new."""
        keep = len(self.marker) - 1
        found = buffer.count(self.marker, 0, size)
        if self._tail:
            found += (self._tail + buffer[:min(size, keep)]).count(self.marker)
        self._tail = (self._tail + buffer[:size])[-keep:] if size < keep else \
            bytes(buffer[size - keep:size])
        self.count += found
        return found


class ByteCounter:
    """Counts fixed-size messages by their bytes: for ncat, which passes on what it
    reads as it reads it, so that the lines of two senders can be cut into each
    other and no marker can be trusted. Sync lines still on their way when the
    run begins (see sync_raw) are taken off."""

    __slots__ = ("size", "count", "_bytes")

    def __init__(self, size: int) -> None:
        self.size = size
        self.count = 0
        self._bytes = 0

    def feed(self, buffer: bytearray, size: int) -> int:
        self._bytes += size - SYNC_LINE_SIZE * buffer.count(b"SYNC", 0, size)
        before, self.count = self.count, max(0, self._bytes) // self.size
        return self.count - before


class SizedCounter:
    """Counts a receiver's messages by their bytes, as ByteCounter does, having
    learnt their size from the first one.

    In a fanout run every message a receiver gets has the same size: one
    room, one text, names of one length, timestamps of one length. Looking
    for a marker costs the load generator a scan of every byte, which makes
    it slower than the servers it loads; a byte count costs nothing. What
    comes before the first message (join notices) is parsed and skipped.
    At the end, `stray` says how many bytes were not whole messages: any
    but 0 means something else came (an error, a notice) and the count is
    not to be trusted.
    """

    __slots__ = ("protocol", "size", "count", "_bytes", "_lead")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.size = 0               # of each message, once the first has come
        self.count = 0
        self._bytes = 0             # from the first message's first byte on
        self._lead = b""            # what came before the first message was whole

    def feed(self, buffer: bytearray, size: int) -> int:
        if self.size:
            self._bytes += size
        else:
            self._lead += bytes(buffer[:size])
            found = first_message(self.protocol, self._lead)
            if found is None:
                return 0
            offset, self.size = found
            self._bytes, self._lead = len(self._lead) - offset, b""
        before, self.count = self.count, self._bytes // self.size
        return self.count - before

    @property
    def stray(self) -> int:
        return self._bytes - self.count * self.size


def first_message(protocol: str, data: bytes) -> Optional[Tuple[int, int]]:
    """Where the first whole message in data begins, and its size; None before one."""
    offset = 0
    while True:
        if protocol == "json":
            header = data[offset:offset + HEADER_LENGTH]
            if len(header) < HEADER_LENGTH:
                return None
            end = offset + HEADER_LENGTH + int(header)
        else:
            end = data.find(b"\n", offset) + 1
            if not end:
                return None
        if end > len(data):
            return None
        if PROTOCOLS[protocol].message in data[offset:end]:
            return offset, end - offset
        offset = end


class Protocol(NamedTuple):
    """How the load generator speaks to one kind of server."""

    joined: bytes               # seen once a client is in its room
    message: bytes              # begins every message a receiver gets
    error: bytes                # begins a refusal
    ping: bytes                 # a ping to answer with `pong` (see QUIET_ALLOWED)
    pong: bytes


PROTOCOLS: Dict[str, Protocol] = {
    # Ours: JSON frames. The encoder escapes every quote inside a string, so the
    # message marker can only start a payload.
    "json": Protocol(HISTORY_END_MARK, MESSAGE_MARK, ERROR_MARK, PING_MARK, PONG_FRAME),
    # IRC, to ngircd or to our IRC port: a message is a PRIVMSG to a channel; a
    # refusal that matters ends the connection.
    "irc": Protocol(b" 366 ", b" PRIVMSG #", b"ERROR :", b"PING ", b"PONG :bench\r\n"),
    # ncat --broker: lines of bytes, nothing else; in once a sync line came through.
    "raw": Protocol(b"SYNC", b"MSG ", b"", b"\0never", b""),
}


def hello_bytes(protocol: str, name: str, room: str) -> bytes:
    """What a client sends to be in `room` (or rooms, "lobby,dev") under `name`."""
    rooms = room.split(",")
    if protocol == "json":
        return encode_frame({"type": "hello", "name": name, "rooms": rooms})
    if protocol == "irc":
        channels = ",".join(f"#{room}" for room in rooms)
        return f"NICK {name}\r\nUSER {name} 0 * :{name}\r\nJOIN {channels}\r\n".encode("ascii")
    return b""


def say_bytes(protocol: str, room: str, text: str) -> bytes:
    """One message to `room`."""
    if protocol == "json":
        return encode_frame({"type": "say", "room": room, "text": text})
    if protocol == "irc":
        return f"PRIVMSG #{room} :{text}\r\n".encode("utf-8")
    return f"MSG {text}\n".encode("utf-8")


class LineSplitter:
    """Lines out of a byte stream (IRC, raw), as FrameDecoder cuts frames."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> None:
        self._rest += data

    def __iter__(self) -> Iterator[bytes]:
        *lines, self._rest = self._rest.split(b"\n")
        return iter([line.rstrip(b"\r") for line in lines])


class FrameSplitter:
    """Frames out of a byte stream as cheaply as LineSplitter cuts lines: by their
    headers, trusted (the tests check what the server writes), not through
    FrameDecoder's checks. A latency receiver must spend no more on a JSON frame
    than on an IRC line: a busier load generator slows the server it measures
    (through FrameDecoder and json, reading JSON had taken 60% of its core where
    IRC took 40%, and each message's spread to its last receiver grew by a fifth)."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> None:
        self._rest += data

    def __iter__(self) -> Iterator[bytes]:
        rest, frames, start = self._rest, [], 0
        while len(rest) - start >= HEADER_LENGTH:
            end = start + HEADER_LENGTH + int(rest[start:start + HEADER_LENGTH])
            if end > len(rest):
                break
            frames.append(rest[start + HEADER_LENGTH:end])
            start = end
        self._rest = rest[start:]
        return iter(frames)


TEXT_MARK = b',"text":"'    # where a message frame's text begins (the benchmark's have no escapes)


def texts_of(protocol: str, data: bytes, decoder: Any) -> List[str]:
    """The texts of the messages in what a latency receiver got (it parses: few)."""
    decoder.feed(data)
    texts = []
    if protocol == "json":
        for payload in decoder:
            if payload.startswith(MESSAGE_MARK):
                begin = payload.index(TEXT_MARK) + len(TEXT_MARK)
                texts.append(payload[begin:payload.index(b'"', begin)].decode("utf-8"))
        return texts
    for line in decoder:
        if protocol == "irc" and b" PRIVMSG #" in line:
            texts.append(line.split(b" :", 1)[1].decode("utf-8", "replace"))
        elif protocol == "raw" and line.startswith(b"MSG "):
            texts.append(line[4:].decode("utf-8", "replace"))
    return texts


class Client:
    """One socket of a run: who it is, where, and what it counts of what comes."""

    __slots__ = ("sock", "name", "protocol", "room", "expected", "messages", "errors",
                 "own_sent", "closed")

    def __init__(self, sock: socket.socket, name: str, protocol: str, room: str) -> None:
        self.sock, self.name, self.protocol, self.room = sock, name, protocol, room
        marks = PROTOCOLS[protocol]
        self.expected = 0               # messages it should get
        self.messages = FrameCounter(marks.message)
        self.errors = FrameCounter(marks.error) if marks.error else None
        self.own_sent = 0               # its own messages, which it does not get back
        self.closed = False

    @property
    def accounted(self) -> int:
        """How far along it is: messages received plus its own."""
        return self.messages.count + self.own_sent

    def count(self, buffer: bytearray, size: int) -> None:
        """Count what came in. Pings are not looked for: every server is told to
        allow a longer silence than a run lasts (QUIET_ALLOWED), and a scan of
        every buffer for them would cost as much as the counting itself."""
        self.messages.feed(buffer, size)
        if self.errors is not None:
            self.errors.feed(buffer, size)


Target = Tuple[str, str, int, str]      # (name, protocol, port, room or "room,room")


def join(targets: List[Target], rcvbuf: Optional[int] = None) -> List[Client]:
    """Connect and join each target; return once all are in.

    Everyone says hello first, then the answers are read, so that joining a
    few hundred clients takes one round trip, not hundreds. Raw clients
    (ncat) are in as soon as they are connected: sync_raw() then makes sure.
    """
    clients = []
    for name, protocol, port, room in targets:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(SETUP_TIMEOUT)
        sock.connect((LOOPBACK, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(hello_bytes(protocol, name, room))
        clients.append(Client(sock, name, protocol, room))
    for client in clients:
        if client.protocol == "raw":
            continue
        mark, seen = PROTOCOLS[client.protocol].joined, b""
        while mark not in seen:
            data = client.sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError(f"the server closed {client.name} while it joined")
            if client.protocol == "json" and ERROR_MARK in data and mark not in data:
                raise ConnectionError(f"join refused: {data[:200]!r}")
            seen = seen[-len(mark):] + data
    return clients


def sync_raw(clients: List[Client], index: int, workers: int, deadline: float,
             ready: Callable[[], None], start: Any) -> None:
    """ncat keeps no list of who is there, and says nothing when it has someone:
    every worker sends a sync line of its own, again and again, until each of its
    clients has seen the lines of every worker (its own but from the client that
    sent it); then it is ready(), and goes on sending until the run starts, for
    the workers that are not ready yet. After that, all that is sent reaches all."""
    own = f"SYNC{index}".encode("ascii")
    assert len(own) + 1 == SYNC_LINE_SIZE, "ByteCounter takes sync lines off by their size"
    wanted = {f"SYNC{number}".encode("ascii") for number in range(workers)}
    seen: Dict[Client, Set[bytes]] = {client: set() for client in clients}
    for client in clients:
        client.sock.settimeout(0.02)
    said_ready = False
    while time.monotonic() < deadline:
        clients[0].sock.sendall(own + b"\n")
        for client in clients:
            try:
                data = client.sock.recv(RECV_SIZE)
            except socket.timeout:
                continue
            seen[client].update(mark for mark in wanted if mark in data)
            # Counted: once a worker is ready, the run may begin for the others.
            client.count(data, len(data))
        if not said_ready and all(wanted - ({own} if client is clients[0] else set()) <= got
                                  for client, got in seen.items()):
            ready()
            said_ready = True
        if said_ready and start.wait(0.02):
            return
    raise ConnectionError("ncat did not pass the sync lines on to every client")


def chat_text(size: int, lead: str = "") -> str:
    return (lead + " " + "m" * size)[:size] if lead else "m" * size


def worker_main(job: Any, index: int, results: Any, *args: Any) -> None:
    """A worker process: run job(index, results, *args) and report how it ended.

    The job's result goes to the coordinator as ("done", index, result); an
    exception as ("failed", index, text), so that the coordinator can say
    what went wrong. Ctrl-C reaches every process in the terminal's group:
    the coordinator reports it, the workers just stop.
    """
    try:
        results.put(("done", index, job(index, results, *args)))
    except KeyboardInterrupt:
        pass
    except Exception as exc:
        results.put(("failed", index, f"{type(exc).__name__}: {exc}"))


def worker_share(plan: Dict[str, Any], index: int) -> List[Target]:
    """The clients this worker runs: every nth of one room (spread over the workers),
    or, with many rooms, whole rooms (so that a room's window is one worker's)."""
    if len(plan["rooms"]) == 1:
        return plan["clients"][index::plan["workers"]]
    numbers = plan["room_number"]
    return [client for client in plan["clients"] if numbers[client[3]] % plan["workers"] == index]


def fanout_worker(index: int, results: Any, plan: Dict[str, Any], board: Any,
                  start: Any, all_done: Any) -> Dict[str, Any]:
    """Run this worker's share of a fanout: join, wait for start, send and count.

    board, shared by the workers: board[r] is how many messages have been sent
    to room number r; board[rooms * (1 + w) + r] the least that worker w's
    clients in room r have accounted for. A sender sends a batch only while
    its room has fewer than its window of messages in flight.
    """
    workers, per_sender, rooms = plan["workers"], plan["per_sender"], len(plan["rooms"])
    numbers = plan["room_number"]
    clients = join(worker_share(plan, index))
    senders = [client for client in clients if client.name in plan["senders"]]
    for client in clients:
        client.sock.setblocking(False)
        if client.protocol == "raw":
            client.messages = ByteCounter(len(say_bytes("raw", client.room,
                                                        chat_text(plan["text_size"]))))
        elif client.name not in plan["senders"]:   # senders get acks too: they look for marks
            client.messages = SizedCounter(client.protocol)
        client.expected = per_sender * (plan["senders_in"][client.room] -
                                        (client.name in plan["senders"]))
    batches = {client: say_bytes(client.protocol, client.room, chat_text(plan["text_size"]))
               * SEND_BATCH for client in senders}
    stalled = None
    if plan.get("stalled") and index == 0:     # the slow-reader run: joins, then never reads
        stalled = join([plan["stalled"]], rcvbuf=STALLED_RCVBUF)[0].sock
    selector = selectors.DefaultSelector()
    by_room: Dict[int, List[Client]] = {}
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
        by_room.setdefault(numbers[client.room], []).append(client)
    for number in range(rooms):     # rooms it has no clients in: never hold their senders back
        if number not in by_room:
            board[rooms * (1 + index) + number] = 10 ** 15
    buffer = bytearray(RECV_SIZE)
    ready = lambda: results.put(("ready", index, None))
    if any(client.protocol == "raw" for client in clients):
        sync_raw(clients, index, workers, time.monotonic() + SETUP_TIMEOUT * 3, ready, start)
        for client in clients:
            client.sock.setblocking(False)
    else:
        ready()
        start.wait(SETUP_TIMEOUT * 3)

    cpu_start = time.process_time()
    deadline = time.monotonic() + plan["timeout"]
    pending: Dict[Client, memoryview] = {}      # a sender's batch the socket did not take
    to_send = {sender: per_sender for sender in senders}
    turn = 0
    finished = None
    while time.monotonic() < deadline:
        for sender, rest in list(pending.items()):     # finish a batch begun
            try:
                sent = sender.sock.send(rest)
            except BlockingIOError:
                continue
            if sent == len(rest):
                del pending[sender]
            else:
                pending[sender] = rest[sent:]
        can_send = False
        waiting = [sender for sender in senders if to_send[sender] and sender not in pending]
        if waiting:     # one batch, from the next sender, if its room's window allows it
            sender = waiting[turn % len(waiting)]
            turn += 1
            number = numbers[sender.room]
            in_flight = board[number] - min(board[rooms * (1 + worker) + number]
                                            for worker in range(workers))
            can_send = in_flight + SEND_BATCH <= plan["window"]
        if can_send:
            count = min(SEND_BATCH, to_send[sender])
            data = memoryview(batches[sender])[:len(batches[sender]) // SEND_BATCH * count]
            to_send[sender] -= count
            sender.own_sent += count
            board[number] += count
            try:
                sent = sender.sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                pending[sender] = data[sent:]
        for key, _ in selector.select(0 if can_send else 0.002):     # read what has come
            client = key.data
            try:
                size = client.sock.recv_into(buffer)
            except BlockingIOError:
                continue
            except OSError:
                size = 0
            if not size:
                client.closed = True
                selector.unregister(client.sock)
                continue
            client.count(buffer, size)
        for number, members in by_room.items():
            board[rooms * (1 + index) + number] = min(
                (client.accounted for client in members if not client.closed), default=10 ** 15)
        if not pending and not any(to_send.values()) and all(
                client.messages.count >= client.expected for client in clients
                if not client.closed):
            finished = time.monotonic()
            break
    cpu = time.process_time() - cpu_start
    result = {
        "finished": finished, "cpu": cpu,
        "received": sum(client.messages.count for client in clients),
        "expected": sum(client.expected for client in clients),
        "errors": sum(client.errors.count for client in clients if client.errors),
        "stray_bytes": sum(client.messages.stray for client in clients
                           if isinstance(client.messages, SizedCounter)),
        "cut_off": sum(client.closed for client in clients),
    }
    if stalled is not None:
        result["stalled_cut_off"] = _was_cut_off(stalled)
    for number in by_room:      # never hold the other workers' senders back
        board[rooms * (1 + index) + number] = 10 ** 15
    try:    # leave when every worker is done: a leaving client is news to the others' clients
        all_done.wait(plan["timeout"])
    except threading.BrokenBarrierError:
        pass
    for client in clients:
        client.sock.close()
    return result


def _was_cut_off(sock: socket.socket) -> bool:
    """Read a stalled client's socket to its end: did the server close it?

    A cut-off came during the run, so its end is already here, behind the
    bytes the socket buffer held: a short wait is enough.
    """
    sock.settimeout(STALLED_WAIT)
    try:
        while sock.recv(RECV_SIZE):
            pass
        return True
    except ConnectionResetError:
        return True
    except OSError:
        return False
    finally:
        sock.close()


def arrival_clock() -> Callable[[], int]:
    """The clock a latency run stamps its messages with: the one the kernel stamps
    arrivals with when it can (the wall clock), else a monotonic one."""
    return time.time_ns if ARRIVAL_STAMPS is not None else time.perf_counter_ns


def receive_stamped(sock: socket.socket) -> Tuple[bytes, Optional[int]]:
    """What came, and when the kernel had it (ns, wall clock), where it says."""
    if ARRIVAL_STAMPS is None:
        return sock.recv(RECV_SIZE), None
    data, ancillary, _, _ = sock.recvmsg(RECV_SIZE, socket.CMSG_SPACE(TIMESPEC.size))
    for level, kind, value in ancillary:
        if level == socket.SOL_SOCKET and kind == ARRIVAL_STAMPS and len(value) >= TIMESPEC.size:
            seconds, nanoseconds = TIMESPEC.unpack_from(value)
            return data, seconds * 1_000_000_000 + nanoseconds
    return data, None


def latency_worker(index: int, results: Any, plan: Dict[str, Any]) -> Dict[str, Any]:
    """Clients take turns sending at a fixed rate; every arrival is timed, by the
    kernel where it can (see receive_stamped), else when select() returned."""
    clients = join(plan["clients"])
    clock = arrival_clock()
    deadline = time.monotonic() + plan["seconds"] + plan["timeout"]
    if any(client.protocol == "raw" for client in clients):
        started = threading.Event()
        sync_raw(clients, 0, 1, deadline, started.set, started)
    selector = selectors.DefaultSelector()
    for client in clients:
        client.sock.settimeout(None)
        if ARRIVAL_STAMPS is not None:
            client.sock.setsockopt(socket.SOL_SOCKET, ARRIVAL_STAMPS, 1)
        decoder = FrameSplitter() if client.protocol == "json" else LineSplitter()
        selector.register(client.sock, selectors.EVENT_READ, (client, decoder))
    results.put(("ready", index, None))     # the server's CPU is counted from here
    total = max(1, int(plan["rate"] * plan["seconds"]))
    expected = total * (len(clients) - 1)
    samples: List[int] = []     # nanoseconds from send to arrival
    reach: Dict[int, List[int]] = {}    # send time -> [first, last] arrival
    cpu_start = time.process_time()
    started = time.perf_counter()
    sent = 0
    while len(samples) < expected and time.monotonic() < deadline:
        now = time.perf_counter()
        if sent < total and now >= started + sent / plan["rate"]:
            client = clients[sent % len(clients)]
            text = chat_text(plan["text_size"], str(clock()))
            client.sock.sendall(say_bytes(client.protocol, client.room, text))
            sent += 1
            continue
        wait = started + sent / plan["rate"] - now if sent < total else 0.05
        ready = selector.select(max(0.0, wait))
        selected = clock()      # without kernel stamps: once, before the sockets are read
        for key, _ in ready:
            client, decoder = key.data
            data, stamped = receive_stamped(client.sock)
            arrived = stamped or selected
            if not data:
                raise ConnectionError("the server closed a connection during the latency run")
            if QUICKACK is not None:
                # Acknowledge at once: a server that leaves Nagle on would
                # otherwise wait for our delayed ACK (40 ms on Linux) before its
                # next small write, and we would time TCP, not the server.
                client.sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            if PROTOCOLS[client.protocol].ping in data:
                client.sock.sendall(PROTOCOLS[client.protocol].pong)
            for text in texts_of(client.protocol, data, decoder):
                lead = text.split(" ", 1)[0]
                if lead.isdigit():
                    stamp = int(lead)
                    samples.append(arrived - stamp)
                    seen = reach.setdefault(stamp, [arrived, arrived])
                    seen[0], seen[1] = min(seen[0], arrived), max(seen[1], arrived)
    cpu = time.process_time() - cpu_start
    for client in clients:
        client.sock.close()
    firsts = [first - stamp for stamp, (first, _) in reach.items()]
    spreads = [last - first for first, last in reach.values()]
    return {"samples": quantiles(samples, (0.5, 0.99, 1.0)),
            "first": quantiles(firsts, (0.5, 0.99)), "spread": quantiles(spreads, (0.5, 0.99)),
            "received": len(samples), "expected": expected, "cpu": cpu, "messages": total}


def quantiles(values: List[int], points: Tuple[float, ...]) -> List[int]:
    """The values at these points of their sorted order (none if there are none)."""
    values = sorted(values)
    return [values[int(q * (len(values) - 1))] for q in points] if values else []


def hostile_worker(index: int, results: Any, plan: Dict[str, Any], stop: Any) -> Dict[str, Any]:
    """Clients that each send, at a steady rate, a message far over the length limit
    with a character to clean in it (a tab, which takes it off clean_text's quick
    path), until `stop`: what the chat's latency is measured under in the
    'hostile' run."""
    clients = join(plan["clients"])
    half = "x" * (plan["text_size"] // 2)
    frame = say_bytes("json", clients[0].room, half + "\t" + half)   # one tab: not printable
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
    results.put(("attacking", index, None))
    started, sent, refused = time.monotonic(), 0, 0
    while not stop.is_set():
        due = int((time.monotonic() - started) * plan["rate"])   # frames per client so far
        while sent < due:
            for client in clients:
                client.sock.sendall(frame)
            sent += 1
        for key, _ in selector.select(0.01):    # the refusals: read, so nobody is cut off
            data = key.data.sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionError("the server closed an attacker: it was not to")
            refused += data.count(ERROR_MARK)
    for client in clients:
        client.sock.close()
    return {"sent": sent * len(clients), "refused": refused}


def idle_worker(index: int, results: Any, port: int, names: List[str], start: Any,
                hold: Any) -> Dict[str, Any]:
    """Join clients many at a time, then only read and answer pings until `hold` is set.

    Connections are opened without waiting for each (non-blocking connect), up
    to IDLE_CONNECTING at once, each saying hello as soon as it is connected:
    what is timed is the server taking them in, not this process dialling.
    """
    selector = selectors.DefaultSelector()
    buffer = bytearray(RECV_SIZE)
    counters: Dict[socket.socket, Tuple[FrameCounter, FrameCounter, FrameCounter]] = {}
    hellos: Dict[socket.socket, bytes] = {}     # connecting: the hello to send once connected
    connecting = joined = closed = 0
    waiting = list(reversed(names))
    results.put(("ready", index, None))
    start.wait(SETUP_TIMEOUT * 3)
    cpu_start = time.process_time()
    deadline = time.monotonic() + RUN_TIMEOUT

    def drop(sock: socket.socket) -> None:
        nonlocal closed, connecting
        closed += 1     # a refused join, or the server hung up
        welcome = counters.pop(sock)[0]
        connecting -= 0 if welcome.count else 1
        hellos.pop(sock, None)
        selector.unregister(sock)
        sock.close()

    def read(sock: socket.socket) -> None:
        nonlocal joined, connecting
        if sock in hellos:      # connected (or refused): say hello, then only read
            try:
                sock.send(hellos.pop(sock))
            except OSError:
                drop(sock)
                return
            selector.modify(sock, selectors.EVENT_READ)
            return
        welcome, pings, errors = counters[sock]
        try:
            size = sock.recv_into(buffer)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if not size or (errors.feed(buffer, size) and not welcome.count):
            drop(sock)
            return
        if welcome.feed(buffer, size) and welcome.count == 1:
            joined += 1
            connecting -= 1
        for _ in range(pings.feed(buffer, size)):
            sock.send(PONG_FRAME)

    while (waiting or connecting) and time.monotonic() < deadline:
        while waiting and connecting < IDLE_CONNECTING:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex((LOOPBACK, port))
            hellos[sock] = encode_frame({"type": "hello", "name": waiting.pop(),
                                         "rooms": ["lobby"]})     # as client.py says it
            counters[sock] = (FrameCounter(HISTORY_END_MARK), FrameCounter(PING_MARK),
                              FrameCounter(ERROR_MARK))
            selector.register(sock, selectors.EVENT_WRITE)
            connecting += 1
        for key, _ in selector.select(0.01):
            read(key.fileobj)
    results.put(("joined", index, {"joined": joined, "closed": closed,
                                   "cpu": time.process_time() - cpu_start}))
    while not hold.is_set():
        for key, _ in selector.select(0.05):
            read(key.fileobj)
    held = len(selector.get_map())
    for sock in list(counters):
        sock.close()
    return {"held": held, "closed": closed}

# ---------------------------------------------------------------------------
# Scenarios: each starts a server and workers, and returns its numbers
# ---------------------------------------------------------------------------

class Workers:
    """Worker processes and the queue they report on; all ended on exit."""

    def __init__(self) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.results = self.context.Queue()
        self.processes: List[Any] = []

    def start(self, job: Any, index: int, *args: Any) -> None:
        """Run job(index, results, *args) in a new process (see worker_main)."""
        process = self.context.Process(target=worker_main, args=(job, index, self.results) + args,
                                       daemon=True)
        process.start()
        self.processes.append(process)

    def collect(self, kind: str, count: int, timeout: float) -> List[Any]:
        """Wait for `count` reports of `kind`; a failure report is raised."""
        reports: List[Any] = []
        deadline = time.monotonic() + timeout
        while len(reports) < count:
            try:
                got, index, value = self.results.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                dead = [p.exitcode for p in self.processes if not p.is_alive()]
                raise RuntimeError(f"load generator: no {kind} report in {timeout:g} s"
                                   + (f" (workers exited: {dead})" if dead else "")) from None
            if got == "failed":
                raise RuntimeError(f"load generator worker {index} failed: {value}")
            if got == kind:
                reports.append(value)
        return reports

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for process in self.processes:
            process.join(1.0 if exc_info[0] is None else 0)
            if process.is_alive():
                process.terminate()
                process.join(2.0)
            if process.is_alive():
                process.kill()
                process.join()
        self.results.close()
        self.results.join_thread()


def percent(part: Optional[float], whole: float) -> Optional[float]:
    return None if part is None or whole <= 0 else round(100.0 * part / whole, 1)


def fanout_plan(options: argparse.Namespace, clients: int, senders: int, rooms: int,
                protocols: Tuple[str, ...], ports: Dict[str, int],
                per_sender: int) -> Dict[str, Any]:
    """Who is who in a fanout run: client n is in room n % rooms and speaks
    protocols[n % len(protocols)]; the first `senders` clients send."""
    width = len(str(clients - 1))   # names of one length: messages of one size (SizedCounter)
    names = [f"c{number:0{width}d}" for number in range(clients)]
    room_names = ["bench"] if rooms == 1 else [f"r{number}" for number in range(rooms)]
    targets = [(name, protocols[number % len(protocols)],
                ports[protocols[number % len(protocols)]], room_names[number % rooms])
               for number, name in enumerate(names)]
    sending = set(names[:senders])
    senders_in = {room: 0 for room in room_names}
    for name, _, _, room in targets:
        senders_in[room] += name in sending
    active = sum(1 for count in senders_in.values() if count)
    workers = max(1, min(options.workers, clients))
    return {"workers": workers, "per_sender": per_sender, "text_size": options.text_size,
            "clients": targets, "senders": sending, "senders_in": senders_in,
            "rooms": room_names, "room_number": {room: n for n, room in enumerate(room_names)},
            # The in-flight window is shared out among the rooms that have a sender.
            "window": max(2 * SEND_BATCH, options.window // active),
            "timeout": options.timeout}


def run_fanout(options: argparse.Namespace, db_dir: str, clients: int, senders: int,
               history: bool = True, stalled: bool = False,
               wrapper: Tuple[str, ...] = (), setup_timeout: float = SETUP_TIMEOUT,
               rooms: int = 1, protocols: Tuple[str, ...] = ("json",),
               peer: Optional[str] = None, per_sender: Optional[int] = None
               ) -> Dict[str, Any]:
    """One fanout run; see the module docstring. wrapper: a command the server runs
    under; peer: "ngircd" or "ncat" instead of ours, spoken to in its protocol."""
    if peer is not None:
        server: Launched = PEERS[peer](db_dir)
        protocols = (PEERS[peer].protocol,)
    else:
        server = ServerUnderTest(db_dir, history=history, wrapper=wrapper, irc="irc" in protocols,
                                 setup_timeout=setup_timeout, max_clients=clients + 10)
    per_sender = per_sender or options.messages
    with server, Workers() as pool:
        ports = {"json": server.port, "raw": server.port,
                 "irc": server.irc_port if isinstance(server, ServerUnderTest) else server.port}
        plan = fanout_plan(options, clients, senders, rooms, protocols, ports, per_sender)
        if stalled:
            plan["stalled"] = ("stalled", protocols[0], ports[protocols[0]], plan["rooms"][0])
        workers = plan["workers"]
        board = pool.context.RawArray("q", len(plan["rooms"]) * (1 + workers))
        start, all_done = pool.context.Event(), pool.context.Barrier(workers)
        for index in range(workers):
            pool.start(fanout_worker, index, plan, board, start, all_done)
        pool.collect("ready", workers, setup_timeout * 3 + clients / 1000)
        server_cpu = server.cpu()
        with MemorySampler(server.pid) as memory:
            began = time.monotonic()
            start.set()
            reports = pool.collect("done", workers, options.timeout + SETUP_TIMEOUT)
        ended = max((report["finished"] or time.monotonic()) for report in reports)
        wall = ended - began
        used = server.cpu()
        server_cpu = None if used is None or server_cpu is None else used - server_cpu
        received = sum(report["received"] for report in reports)
        expected = sum(report["expected"] for report in reports)
        result = {
            "server": server.name, "protocols": list(protocols), "rooms": rooms,
            "clients": clients, "senders": senders, "messages": senders * per_sender,
            "history": history, "seconds": round(wall, 3),
            "deliveries": received, "lost": expected - received,
            "errors": sum(report["errors"] for report in reports),
            "stray_bytes": sum(report["stray_bytes"] for report in reports),
            "receivers_cut_off": sum(report["cut_off"] for report in reports),
            "deliveries_per_s": round(received / wall) if wall > 0 else 0,
            "messages_per_s": round(senders * per_sender / wall) if wall > 0 else 0,
            "server_cpu_pct": percent(server_cpu, wall),
            "loadgen_cpu_pct": percent(sum(report["cpu"] for report in reports), wall),
            "server_peak_rss_kib": memory.peak,
            "finished": all(report["finished"] for report in reports),
        }
        if stalled:
            result["stalled_cut_off"] = any(report.get("stalled_cut_off") for report in reports)
    return result


def best_fanout(options: argparse.Namespace, db_dir: str, clients: int, senders: int,
                **variant: Any) -> Dict[str, Any]:
    """The fastest of --repeat runs (runs share a noisy machine with their load generator)."""
    return best_of([run_fanout(options, db_dir, clients, senders, **variant)
                    for _ in range(options.repeat)])


def in_turns(options: argparse.Namespace, runs: Dict[str, Callable[[], Dict[str, Any]]]
             ) -> Dict[str, Dict[str, Any]]:
    """Each kind of run once per --pairs round, the kinds taking turns; the best of
    each kind. Taking turns spreads the machine's slow moments over every kind, so
    that their ratios are theirs, not the moment's."""
    done: Dict[str, List[Dict[str, Any]]] = {name: [] for name in runs}
    for _ in range(options.pairs):
        for name, run in runs.items():
            done[name].append(run())
    return {name: best_of(results) for name, results in done.items()}


def compare_fanout(options: argparse.Namespace, db_dir: str, clients: int, senders: int,
                   **variant: Any) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The best plain run and the best variant run of --pairs pairs run in turn."""
    best = in_turns(options, {
        "plain": lambda: run_fanout(options, db_dir, clients, senders),
        "variant": lambda: run_fanout(options, db_dir, clients, senders, **variant)})
    return best["plain"], best["variant"]


def best_of(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    best = max(runs, key=lambda run: run.get("deliveries_per_s", 0) or
               -(run.get("p99_ms") or 0))
    if "deliveries_per_s" in best:
        best["runs_deliveries_per_s"] = [run["deliveries_per_s"] for run in runs]
    if "p99_ms" in best:
        best = min(runs, key=lambda run: run["p99_ms"] if run["p99_ms"] is not None
                   else float("inf"))
        best["runs_p99_ms"] = [run["p99_ms"] for run in runs]
    best["lost"] = max(run["lost"] for run in runs)         # a loss in any run counts
    best["errors"] = max(run.get("errors", 0) for run in runs)
    return best


def run_latency(options: argparse.Namespace, db_dir: str, peer: Optional[str] = None,
                hostile: bool = False) -> Dict[str, Any]:
    """The latency run; hostile: while HOSTILE_CLIENTS send huge texts to clean."""
    clients = options.latency_clients
    server: Launched = PEERS[peer](db_dir) if peer else ServerUnderTest(db_dir)
    protocol = PEERS[peer].protocol if peer else "json"
    with server, Workers() as pool:
        plan = {"clients": [(f"l{number}", protocol, server.port, "bench")
                            for number in range(clients)],
                "rate": options.latency_rate, "seconds": options.latency_seconds,
                "text_size": options.text_size, "timeout": options.timeout}
        stop = pool.context.Event()
        if hostile:
            pool.start(hostile_worker, 1, {
                "clients": [(f"h{number:02d}", "json", server.port, "bench")
                            for number in range(HOSTILE_CLIENTS)],
                "rate": HOSTILE_RATE, "text_size": HOSTILE_TEXT_SIZE}, stop)
            pool.collect("attacking", 1, SETUP_TIMEOUT * 3)
        pool.start(latency_worker, 0, plan)
        # The server's CPU share is that of the timed run alone: ngircd, whose
        # registration of 100 clients takes seconds, read as 14% where it used 30.
        pool.collect("ready", 1, SETUP_TIMEOUT * 3)
        before = server.cpu()
        began = time.monotonic()
        report = pool.collect("done", 1, options.latency_seconds + options.timeout)[0]
        wall = time.monotonic() - began
        after = server.cpu()
        stop.set()
    p50, p99, worst = milliseconds(report["samples"], 3)
    first_p50, first_p99 = milliseconds(report["first"], 2)
    spread_p50, spread_p99 = milliseconds(report["spread"], 2)
    return {"server": server.name, "clients": clients, "rate": options.latency_rate,
            "messages": report["messages"], "deliveries": report["received"],
            "lost": report["expected"] - report["received"],
            "p50_ms": p50, "p99_ms": p99, "max_ms": worst,
            "first_p50_ms": first_p50, "first_p99_ms": first_p99,
            "spread_p50_ms": spread_p50, "spread_p99_ms": spread_p99,
            "server_cpu_pct": percent(None if before is None or after is None
                                      else after - before, wall),
            "loadgen_cpu_pct": percent(report["cpu"], wall)}


def milliseconds(nanoseconds: List[int], count: int) -> List[Optional[float]]:
    """Nanoseconds as milliseconds; `count` Nones when there are none."""
    return [round(ns / 1e6, 3) for ns in nanoseconds] if nanoseconds else [None] * count


def available_peers(options: argparse.Namespace, warnings: List[str]) -> List[str]:
    """The --peers that are installed; a warning for each that is not."""
    peers = []
    for name in options.peers:
        if shutil.which(name) is None:
            warnings.append(f"{name} is not installed (apt-get install {name}): not compared")
        else:
            peers.append(name)
    return peers


def run_peers(options: argparse.Namespace, db_dir: str, sizes: List[Tuple[int, int]],
              peers: List[str]) -> Dict[str, Any]:
    """Ours and each peer on the same fanout and latency runs, in turns."""
    compared: Dict[str, Any] = {"fanout": [], "latency": None}
    for clients, senders in sizes:
        runs: Dict[str, Callable[[], Dict[str, Any]]] = {
            "ours": lambda: run_fanout(options, db_dir, clients, senders)}
        for name in peers:
            runs[name] = lambda name=name: run_fanout(options, db_dir, clients, senders,
                                                      peer=name)
        best = in_turns(options, runs)
        compared["fanout"].append({"clients": clients, "senders": senders, "runs": best,
                                   "ratios": {name: ratio(best["ours"], best[name])
                                              for name in peers}})
    runs = {"ours": lambda: run_latency(options, db_dir)}
    for name in peers:
        runs[name] = lambda name=name: run_latency(options, db_dir, peer=name)
    compared["latency"] = in_turns(options, runs)
    return compared


def ratio(ours: Dict[str, Any], other: Dict[str, Any]) -> Optional[float]:
    theirs = other.get("deliveries_per_s")
    return round(ours["deliveries_per_s"] / theirs, 2) if theirs else None


def run_idle(options: argparse.Namespace, db_dir: str) -> Dict[str, Any]:
    """Ours, then the floor (FloorServer), each joining and holding the same clients."""
    wanted = options.idle_clients
    workers = max(1, min(options.workers, wanted))
    fd_before, fd_now = raise_fd_limit(wanted + FD_SPARE)
    note = None
    if fd_now is not None and fd_now < wanted + FD_SPARE:
        wanted = max(0, fd_now - FD_SPARE)
        note = (f"open-file limit {fd_before} (hard limit reached at {fd_now}): "
                f"measured {wanted} clients, not {options.idle_clients}")
    names = [f"i{number}" for number in range(wanted)]
    with ServerUnderTest(db_dir, max_clients=wanted + 10) as server:
        ours = idle_run(options, server, names, workers)
    with FloorServer() as floor:
        ours["floor"] = idle_run(options, floor, names, workers)
    floor_seconds = ours["floor"]["join_seconds"]
    ours["join_vs_floor"] = round(ours["join_seconds"] / floor_seconds, 2) \
        if floor_seconds else None
    return {"requested": options.idle_clients, **ours,
            "fd_limit_before": fd_before, "fd_limit": fd_now, "note": note}


def idle_run(options: argparse.Namespace, server: Launched, names: List[str],
             workers: int) -> Dict[str, Any]:
    with Workers() as pool:
        before = server.memory()
        hold, start = pool.context.Event(), pool.context.Event()
        for index in range(workers):
            pool.start(idle_worker, index, server.port, names[index::workers], start, hold)
        pool.collect("ready", workers, SETUP_TIMEOUT * 3)
        cpu_before = server.cpu()
        began = time.monotonic()
        start.set()
        joins = pool.collect("joined", workers, RUN_TIMEOUT + SETUP_TIMEOUT)
        join_seconds = time.monotonic() - began
        cpu_after = server.cpu()
        time.sleep(options.idle_hold)   # the clients stay idle for a while: is anyone dropped?
        after = server.memory()
        hold.set()
        ends = pool.collect("done", workers, SETUP_TIMEOUT)
    held = sum(end["held"] for end in ends)
    joined = sum(report["joined"] for report in joins)
    grown = None if before is None or after is None else after - before
    join_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return {"joined": joined, "held": held,
            "join_seconds": round(join_seconds, 2),
            "join_server_cpu_pct": percent(join_cpu, join_seconds),
            "join_loadgen_cpu_pct": percent(sum(report["cpu"] for report in joins),
                                            join_seconds),
            "server_rss_kib_before": before, "server_rss_kib_after": after,
            "kib_per_client": round(grown / held, 2) if grown is not None and held else None}


def run_drop(options: argparse.Namespace, db_dir: str) -> List[Dict[str, Any]]:
    """For each of --drop-sizes, a room whose people all close at once but a watcher;
    then the same with all in the lobby too (as with client.py)."""
    sizes = [int(size) for size in options.drop_sizes.split(",")]
    raise_fd_limit(max(sizes) + FD_SPARE)
    return [drop_run(db_dir, size, rooms) for rooms in ("drop", "lobby,drop")
            for size in sizes]


def drop_run(db_dir: str, size: int, rooms: str) -> Dict[str, Any]:
    leaving = size - 1
    with ServerUnderTest(db_dir, max_clients=size + 10) as server:
        names = ["watcher"] + [f"d{number}" for number in range(leaving)]
        watcher, *others = join([(name, "json", server.port, rooms) for name in names])
        # The watcher was told of every join: read them all, up to the pong.
        watcher.sock.sendall(encode_frame({"type": "ping"}))
        pongs, buffer = FrameCounter(PONG_MARK), bytearray(RECV_SIZE)
        while not pongs.count:
            got = watcher.sock.recv_into(buffer)    # within SETUP_TIMEOUT (see join)
            if not got:
                raise ConnectionError("the server closed the watcher of the drop run")
            pongs.feed(buffer, got)
        leaves = FrameCounter(LEAVE_MARK)
        cpu_before, began = server.cpu(), time.monotonic()
        for client in others:
            client.sock.close()
        try:    # a leave not told ends it after SETUP_TIMEOUT; the report warns
            while leaves.count < leaving:
                got = watcher.sock.recv_into(buffer)
                if not got:
                    break
                leaves.feed(buffer, got)
        except socket.timeout:
            pass
        seconds, cpu_after = time.monotonic() - began, server.cpu()
        watcher.sock.close()
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return {"clients": leaving, "rooms": rooms.count(",") + 1, "told": leaves.count,
            "seconds": round(seconds, 3),
            "server_cpu_s": None if cpu is None else round(cpu, 3),
            "us_per_leave": round(seconds / leaving * 1e6)}    # CPU ticks are too coarse


def run_instructions(options: argparse.Namespace, db_dir: str,
                     clients: int, senders: int) -> Dict[str, Any]:
    """The cost of history, and of a room half on IRC, in instructions, which a
    noisy machine does not change.

    The fanout run goes under valgrind's callgrind with and without history,
    and with half the clients on IRC, each at two numbers of messages: the
    difference between the two cancels start-up and shutdown, leaving the
    instructions one message costs. User space only: the kernel's share of
    writing the database and of sending is not counted.
    """
    if shutil.which("valgrind") is None:
        return {"note": "valgrind is not installed: not measured"}
    small, large = CALLGRIND_SIZES
    per_message = {}
    for history, protocols in ((True, ("json",)), (False, ("json",)),
                               (True, ("json", "irc"))):
        totals = []
        for messages in (small, large):
            out = os.path.join(db_dir, f"callgrind-{history}-{len(protocols)}-{messages}.out")
            sized = argparse.Namespace(**{**vars(options), "messages": messages,
                                          "timeout": CALLGRIND_TIMEOUT})
            run = run_fanout(sized, db_dir, clients, senders, history=history,
                             protocols=protocols,
                             wrapper=("valgrind", "--tool=callgrind",
                                      f"--callgrind-out-file={out}"),
                             setup_timeout=CALLGRIND_TIMEOUT)
            if run["lost"] or not run["finished"]:
                raise RuntimeError(f"a run under callgrind lost {run['lost']} deliveries")
            totals.append(callgrind_total(out))
        per_message[history, protocols] = (totals[1] - totals[0]) / ((large - small) * senders)
    stored, bare = per_message[True, ("json",)], per_message[False, ("json",)]
    mixed = per_message[True, ("json", "irc")]
    return {"clients": clients, "senders": senders, "with_history": round(stored),
            "without_history": round(bare), "overhead_pct": impact(1 / bare, 1 / stored),
            "mixed": round(mixed), "mixed_pct": impact(1 / stored, 1 / mixed),
            "join": round(join_instructions(options, db_dir)), "note": None}


def join_instructions(options: argparse.Namespace, db_dir: str) -> float:
    """What a client costs in instructions, its join and its leave: the idle run
    under callgrind, CALLGRIND_JOINS clients into the lobby, the difference
    divided by the extra clients. So these are joins to a room of over a
    thousand, not announced (JOIN_NOTICES_UP_TO), each listed among the first
    thousand names or not, as it sorts; and their leaves, not announced
    either. The server is stopped only once it has handled every leave: the
    last thousand are announced, and a stop in the middle of them made the
    totals swing by a billion."""
    small, large = CALLGRIND_JOINS
    totals = []
    for clients in (small, large):
        out = os.path.join(db_dir, f"callgrind-join-{clients}.out")
        names = [f"i{number}" for number in range(clients)]
        with ServerUnderTest(db_dir, max_clients=clients + 10, setup_timeout=CALLGRIND_TIMEOUT,
                             wrapper=("valgrind", "--tool=callgrind",
                                      f"--callgrind-out-file={out}")) as server:
            run = idle_run(options, server, names, max(1, min(options.workers, clients)))
            wait_until_idle(server, CALLGRIND_TIMEOUT)
        if run["held"] != clients:
            raise RuntimeError(f"under callgrind, {run['held']} of {clients} clients were held")
        totals.append(callgrind_total(out))
    return (totals[1] - totals[0]) / (large - small)


def wait_until_idle(server: Launched, timeout: float) -> None:
    """Until the server uses under 5% of a core for a second (its timers, under
    callgrind, take a little), or timeout."""
    deadline = time.monotonic() + timeout
    last = server.cpu()
    while last is not None and time.monotonic() < deadline:
        time.sleep(1.0)
        now = server.cpu()
        if now is None or now - last < 0.05:
            return
        last = now


def callgrind_total(path: str) -> int:
    """Instructions a program ran, from the summary line of its callgrind output."""
    with open(path, encoding="utf-8", errors="replace") as out:
        for line in out:
            match = re.match(r"(?:summary|totals): (\d+)", line)
            if match:
                return int(match.group(1))
    raise RuntimeError(f"no instruction total in {path}")


def run_startup(options: argparse.Namespace, db_dir: str) -> Dict[str, Any]:
    times = []
    for _ in range(options.startup_runs):
        with ServerUnderTest(db_dir) as server:
            times.append(round(server.startup * 1000, 1))
    return {"median_ms": statistics.median(times), "runs_ms": times}

# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

def shown(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        value = f"{value:g}"
    elif isinstance(value, int):
        value = f"{value:,}"
    return f"{value}{unit}"


def difference(pct: Optional[float], less: str = "lower", more: str = "higher") -> str:
    """A percentage that says which way it goes: '12.5% lower', '3.1% higher'."""
    if pct is None:
        return "n/a"
    return f"{shown(abs(pct), '%')} {less if pct >= 0 else more}"


def report_lines(results: Dict[str, Any]) -> List[str]:
    lines = [f"machine: {results['machine']['summary']}"]
    if "startup" in results:
        startup = results["startup"]
        lines.append(f"start-up to 'listening on': {shown(startup['median_ms'], ' ms')} median "
                     f"of {startup['runs_ms']}")
    for run in results.get("fanout", []):
        lines.append(
            f"fanout {run['clients']} clients, {run['senders']} senders: "
            f"{shown(run['deliveries_per_s'])} deliveries/s, lost {shown(run['lost'])}, "
            f"errors {shown(run['errors'])}, {shown(run['deliveries'])} in {run['seconds']} s; "
            f"CPU server {shown(run['server_cpu_pct'], '%')}, "
            f"load generator {shown(run['loadgen_cpu_pct'], '%')}")
    if "latency" in results:
        lat = results["latency"]
        lines.append(
            f"latency {lat['clients']} clients at {lat['rate']:g} msg/s: p50 "
            f"{shown(lat['p50_ms'], ' ms')}, p99 {shown(lat['p99_ms'], ' ms')}, max "
            f"{shown(lat['max_ms'], ' ms')}, lost {shown(lat['lost'])}; {reach_of(lat)}; CPU server "
            f"{shown(lat['server_cpu_pct'], '%')}, load generator "
            f"{shown(lat['loadgen_cpu_pct'], '%')}")
    if "idle" in results:
        idle = results["idle"]
        lines.append(
            f"idle clients: {shown(idle['held'])} of {shown(idle['requested'])} held "
            f"(joined in {idle['join_seconds']} s; CPU server "
            f"{shown(idle['join_server_cpu_pct'], '%')}, load generator "
            f"{shown(idle['join_loadgen_cpu_pct'], '%')}), "
            f"{shown(idle['kib_per_client'], ' KiB')} "
            f"of server memory each; open-file limit {shown(idle['fd_limit_before'])}"
            f" -> {shown(idle['fd_limit'])}")
        floor = idle["floor"]
        lines.append(
            f"  the floor, a server that only answers each hello: joined in "
            f"{floor['join_seconds']} s (CPU server {shown(floor['join_server_cpu_pct'], '%')}, "
            f"load generator {shown(floor['join_loadgen_cpu_pct'], '%')}); ours took "
            f"{shown(idle['join_vs_floor'], 'x')} as long")
        if idle["note"]:
            lines.append(f"  note: {idle['note']}")
    for drop in results.get("drop", []):
        lines.append(
            f"a room's {shown(drop['clients'])} people closing at once"
            f"{' (in the lobby too)' if drop['rooms'] > 1 else ''}: the one who stays "
            f"was told of {shown(drop['told'])} leaves in {drop['seconds']} s, "
            f"{shown(drop['us_per_leave'], ' us')} a leave; server CPU "
            f"{shown(drop['server_cpu_s'], ' s')}")
    if "slow" in results:
        slow = results["slow"]
        lines.append(
            f"one client that stops reading: others' throughput {difference(slow['impact_pct'])}"
            f" ({shown(slow['with_stalled'])} vs {shown(slow['baseline'])} deliveries/s), "
            f"cut off: {'yes' if slow['cut_off'] else 'NO'}, lost {shown(slow['lost'])}; server "
            f"peak memory {shown(slow['peak_rss_kib'], ' KiB')} vs "
            f"{shown(slow['baseline_peak_rss_kib'], ' KiB')}")
    if "history" in results:
        history = results["history"]
        lines.append(
            f"history in sqlite: fan-out throughput {difference(history['overhead_pct'])} "
            f"({shown(history['with_history'])} vs {shown(history['without_history'])} "
            "deliveries/s without)")
    if "instructions" in results:
        counted = results["instructions"]
        if counted["note"]:
            lines.append(f"history in instructions: {counted['note']}")
        else:
            # Both are shares of the costlier run (what the same CPU loses in messages),
            # not how much more it costs: 100 against 90 instructions is 10% here, not 11%.
            lines.append(
                f"history in sqlite: {shown(counted['overhead_pct'], '%')} of a message's "
                f"instructions under callgrind ({shown(counted['with_history'])} a message, "
                f"{shown(counted['without_history'])} without; user space only)")
            lines.append(
                f"a room of {counted['clients']}, half IRC: "
                f"{difference(counted['mixed_pct'], 'fewer', 'more')} messages than JSON only "
                f"for the same instructions under callgrind ({shown(counted['mixed'])} vs "
                f"{shown(counted['with_history'])} a message)")
            lines.append(f"a client joining and leaving a room of {CALLGRIND_JOINS[0]:,} to "
                         f"{CALLGRIND_JOINS[1]:,}: {shown(counted['join'])} instructions "
                         "under callgrind")
    if "mixed" in results:
        mixed = results["mixed"]
        lines.append(
            f"a room of {mixed['clients']}, half IRC and half JSON: "
            f"{shown(mixed['mixed']['deliveries_per_s'])} deliveries/s vs "
            f"{shown(mixed['json']['deliveries_per_s'])} with JSON only "
            f"({difference(mixed['impact_pct'])}), lost "
            f"{shown(max(mixed['mixed']['lost'], mixed['json']['lost']))}")
    if "hostile" in results:
        quiet, hostile = results["hostile"]["quiet"], results["hostile"]["hostile"]
        lines.append(
            f"latency while {HOSTILE_CLIENTS} clients send {HOSTILE_RATE:g} messages a second "
            f"each of {HOSTILE_TEXT_SIZE:,} characters with a tab: "
            f"p50 {shown(hostile['p50_ms'], ' ms')}, "
            f"p99 {shown(hostile['p99_ms'], ' ms')}; quiet p50 {shown(quiet['p50_ms'], ' ms')}, "
            f"p99 {shown(quiet['p99_ms'], ' ms')} ({shown(results['hostile']['p50_ratio'])}x, "
            f"{shown(results['hostile']['p99_ratio'])}x), lost {shown(hostile['lost'])}")
    if "rooms" in results:
        rooms, many = results["rooms"], results["rooms"]["many rooms"]
        lines.append(
            f"{shown(many['rooms'])} rooms of {many['clients'] // many['rooms']} with "
            f"{many['senders']} senders: {shown(many['deliveries_per_s'])} deliveries/s, "
            f"{shown(rooms['ratio'])}x one room of {rooms['one room']['clients']} "
            f"({shown(rooms['one room']['deliveries_per_s'])}); messages/s "
            f"{shown(many['messages_per_s'])}, {shown(rooms['messages_ratio'])}x the one room's "
            f"(each reaches {many['clients'] // many['rooms'] - 1} people, not "
            f"{rooms['one room']['clients'] - 1}), lost {shown(many['lost'])}")
    if "peers" in results:
        for compared in results["peers"]["fanout"]:
            others = ", ".join(
                f"{name} {shown(run['deliveries_per_s'])}/s "
                f"(ours {shown(compared['ratios'][name])}x)"
                for name, run in compared["runs"].items() if name != "ours")
            lines.append(f"side by side, {compared['clients']} clients, {compared['senders']} "
                         f"senders: ours {shown(compared['runs']['ours']['deliveries_per_s'])}/s; "
                         f"{others}")
        latency = results["peers"]["latency"]
        lines.append("side by side, latency p99: " + ", ".join(
            f"{name} {shown(run['p99_ms'], ' ms')}" for name, run in latency.items()))
        lines.append("side by side, each message: " + "; ".join(
            f"{name} {reach_of(run)}" for name, run in latency.items()))
    for warning in results.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    return lines


def reach_of(run: Dict[str, Any]) -> str:
    """A latency run's first arrivals and spreads, in a few words."""
    return (f"first arrival p50 {shown(run['first_p50_ms'], ' ms')}, p99 "
            f"{shown(run['first_p99_ms'], ' ms')}, first to last p50 "
            f"{shown(run['spread_p50_ms'], ' ms')}, p99 {shown(run['spread_p99_ms'], ' ms')}")


def machine_summary() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    cores = os.cpu_count()
    return {"python": platform.python_version(), "system": platform.platform(), "cpu": cpu,
            "cores": cores,
            "summary": f"{cores} cores, {cpu}, {platform.system()}, "
                       f"Python {platform.python_version()}"}


def ratio_of(best: Dict[str, Dict[str, Any]], key: str) -> Optional[float]:
    """How many times the quiet run's `key` the hostile run's is."""
    quiet, hostile = best["quiet"].get(key), best["hostile"].get(key)
    return round(hostile / quiet, 2) if quiet and hostile is not None else None


def impact(baseline: float, other: float) -> Optional[float]:
    return round(100.0 * (baseline - other) / baseline, 1) if baseline else None


def run_scenarios(options: argparse.Namespace) -> Dict[str, Any]:
    results: Dict[str, Any] = {"machine": machine_summary(), "settings": {
        "fanout": options.fanout, "messages_per_sender": options.messages,
        "text_size": options.text_size, "window": options.window, "workers": options.workers,
        "repeat": options.repeat, "pairs": options.pairs,
        "pinned": Launched.cpus is not None, "peers": options.peers}}
    warnings: List[str] = []
    loadgen_cores = min(options.workers, options.loadgen_cores)
    with tempfile.TemporaryDirectory(prefix="bench_chat-") as db_dir:
        if "startup" in options.scenarios:
            results["startup"] = run_startup(options, db_dir)
        runs = [tuple(int(n) for n in size.split("x")) for size in options.fanout.split(",")]
        if "fanout" in options.scenarios:
            results["fanout"] = [best_fanout(options, db_dir, *size) for size in runs]
        if "latency" in options.scenarios:
            results["latency"] = run_latency(options, db_dir)
        if "idle" in options.scenarios:
            results["idle"] = run_idle(options, db_dir)
        if "drop" in options.scenarios:
            results["drop"] = run_drop(options, db_dir)
        if "slow" in options.scenarios:
            plain, slow = compare_fanout(options, db_dir, *runs[0], stalled=True)
            results["slow"] = {
                "clients": runs[0][0], "baseline": plain["deliveries_per_s"],
                "with_stalled": slow["deliveries_per_s"],
                "impact_pct": impact(plain["deliveries_per_s"], slow["deliveries_per_s"]),
                "cut_off": slow["stalled_cut_off"], "lost": slow["lost"],
                "peak_rss_kib": slow["server_peak_rss_kib"],
                "baseline_peak_rss_kib": plain["server_peak_rss_kib"]}
        if "history" in options.scenarios:
            stored, bare = compare_fanout(options, db_dir, *runs[0], history=False)
            results["history"] = {
                "clients": runs[0][0], "with_history": stored["deliveries_per_s"],
                "without_history": bare["deliveries_per_s"],
                "overhead_pct": impact(bare["deliveries_per_s"], stored["deliveries_per_s"])}
        if "instructions" in options.scenarios:
            results["instructions"] = run_instructions(options, db_dir, *runs[0])
        if "peers" in options.scenarios:
            peers = available_peers(options, warnings)
            if peers:
                results["peers"] = run_peers(options, db_dir, runs, peers)
        if "mixed" in options.scenarios:
            clients, senders = runs[0]
            best = in_turns(options, {
                "json": lambda: run_fanout(options, db_dir, clients, senders),
                "mixed": lambda: run_fanout(options, db_dir, clients, senders,
                                            protocols=("json", "irc"))})
            results["mixed"] = {"clients": clients, "senders": senders, **best,
                                "impact_pct": impact(best["json"]["deliveries_per_s"],
                                                     best["mixed"]["deliveries_per_s"])}
        if "hostile" in options.scenarios:
            best = in_turns(options, {
                "quiet": lambda: run_latency(options, db_dir),
                "hostile": lambda: run_latency(options, db_dir, hostile=True)})
            results["hostile"] = {**best, "p50_ratio": ratio_of(best, "p50_ms"),
                                  "p99_ratio": ratio_of(best, "p99_ms")}
        if "rooms" in options.scenarios:
            raise_fd_limit(options.room_count * options.room_size + FD_SPARE)
            clients, senders = runs[0]
            many = options.room_count * options.room_size
            spread = max(1, options.messages * senders // options.room_senders)
            best = in_turns(options, {
                "one room": lambda: run_fanout(options, db_dir, clients, senders),
                "many rooms": lambda: run_fanout(options, db_dir, many, options.room_senders,
                                                 rooms=options.room_count,
                                                 per_sender=spread)})
            results["rooms"] = {**best, "ratio": ratio(best["many rooms"], best["one room"]),
                                "messages_ratio": round(best["many rooms"]["messages_per_s"] /
                                                        best["one room"]["messages_per_s"], 2)
                                if best["one room"]["messages_per_s"] else None}
    checked = list(results.get("fanout", []))
    for compared in results.get("peers", {}).get("fanout", []):
        checked.extend(compared["runs"].values())
    for name in ("mixed", "rooms"):
        checked.extend(run for run in results.get(name, {}).values() if isinstance(run, dict))
    for run in checked:
        if run["lost"] or run["errors"]:
            warnings.append(f"fanout {run['clients']}x{run['senders']} ({run['server']}): "
                            f"{run['lost']} lost, {run['errors']} error frames")
        if run["stray_bytes"]:
            warnings.append(f"fanout {run['clients']}x{run['senders']} ({run['server']}): "
                            f"receivers got {run['stray_bytes']} bytes that were no message "
                            "(an error or a notice?): the counts are not to be trusted")
        if (run["loadgen_cpu_pct"] or 0) > SATURATED * loadgen_cores:
            warnings.append(f"fanout {run['clients']}x{run['senders']} ({run['server']}): "
                            "the load generator "
                            f"used {run['loadgen_cpu_pct']}% of its {loadgen_cores} core(s); "
                            "the server may be faster than measured")
    for drop in results.get("drop", []):
        if drop["told"] < drop["clients"]:
            warnings.append(f"the room of {drop['clients'] + 1} closing at once "
                            f"({drop['rooms']} rooms): the one who "
                            f"stayed was told of {drop['told']} leaves of {drop['clients']}")
    if results.get("idle", {}).get("held", 0) < results.get("idle", {}).get("requested", 0):
        warnings.append("not every idle client was held")
    floor = results.get("idle", {}).get("floor", {})
    if floor.get("held", 0) < results.get("idle", {}).get("requested", 0):
        warnings.append("the floor did not hold every idle client")
    results["warnings"] = warnings
    return results


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark socket_server.py on loopback: fan-out throughput, latency, "
                    "idle clients, a slow reader, the cost of history, start-up time.")
    parser.add_argument("--scenarios", default=DEFAULT_SCENARIOS,
                        help="comma-separated scenarios to run: startup, fanout, latency, "
                             "idle, drop, slow, history, mixed, rooms, hostile, peers, "
                             "instructions "
                             f"(default: {DEFAULT_SCENARIOS}; 'instructions' needs valgrind "
                             "and takes minutes; 'peers' comes with --peers)")
    parser.add_argument("--peers", default="", metavar="NAME,...",
                        help="also run the same fanout and latency runs against these C "
                             "servers, started on 127.0.0.1 when installed, in turns with "
                             "ours, and print the ratios: ngircd (over IRC), ncat (--broker, "
                             "raw bytes); adds the 'peers' scenario (default: none)")
    parser.add_argument("--room-count", type=int, default=ROOM_COUNT, metavar="N",
                        help=f"rooms in the 'rooms' run (default: {ROOM_COUNT})")
    parser.add_argument("--room-size", type=int, default=ROOM_SIZE, metavar="N",
                        help=f"clients in each of them (default: {ROOM_SIZE})")
    parser.add_argument("--room-senders", type=int, default=ROOM_SENDERS, metavar="N",
                        help=f"senders in the 'rooms' run, one a room (default: {ROOM_SENDERS})")
    parser.add_argument("--fanout", default=FANOUT_RUNS, metavar="CxS,...",
                        help=f"fanout runs as CLIENTSxSENDERS; the first is also used by "
                             f"'slow' and 'history' (default: {FANOUT_RUNS})")
    parser.add_argument("--messages", type=int, default=MESSAGES_PER_SENDER, metavar="N",
                        help=f"messages per sender in a fanout run "
                             f"(default: {MESSAGES_PER_SENDER})")
    parser.add_argument("--text-size", type=int, default=TEXT_SIZE, metavar="CHARS",
                        help=f"characters per message (default: {TEXT_SIZE})")
    parser.add_argument("--window", type=int, default=WINDOW, metavar="N",
                        help=f"messages in flight at once in a fanout run (default: {WINDOW})")
    parser.add_argument("--workers", type=int, default=WORKERS, metavar="N",
                        help=f"load generator processes (default: {WORKERS})")
    parser.add_argument("--repeat", type=int, default=REPEAT, metavar="N",
                        help=f"runs of each fanout setting, the best counts (default: {REPEAT})")
    parser.add_argument("--pairs", type=int, default=PAIRS, metavar="N",
                        help=f"pairs of runs, plain and variant in turn, for 'slow' and "
                             f"'history'; the best of each side counts (default: {PAIRS})")
    parser.add_argument("--latency-clients", type=int, default=LATENCY_CLIENTS, metavar="N",
                        help=f"clients in the latency run (default: {LATENCY_CLIENTS})")
    parser.add_argument("--latency-rate", type=float, default=LATENCY_RATE, metavar="N",
                        help=f"messages a second in the latency run (default: {LATENCY_RATE:g})")
    parser.add_argument("--latency-seconds", type=float, default=LATENCY_SECONDS,
                        metavar="S", help=f"length of the latency run (default: "
                                          f"{LATENCY_SECONDS:g})")
    parser.add_argument("--idle-clients", type=int, default=IDLE_CLIENTS, metavar="N",
                        help=f"clients in the idle run (default: {IDLE_CLIENTS})")
    parser.add_argument("--idle-hold", type=float, default=IDLE_HOLD, metavar="S",
                        help=f"seconds the idle clients stay (default: {IDLE_HOLD:g})")
    parser.add_argument("--drop-sizes", default=DROP_SIZES, metavar="N,...",
                        help="rooms in the 'drop' run, by their people, the one who stays "
                             f"included; past {JOIN_NOTICES_UP_TO:,}, leaves are not told; "
                             "each size runs twice, the second time with everyone in the "
                             f"lobby too (default: {DROP_SIZES})")
    parser.add_argument("--startup-runs", type=int, default=STARTUP_RUNS, metavar="N",
                        help=f"server starts timed (default: {STARTUP_RUNS})")
    parser.add_argument("--timeout", type=float, default=RUN_TIMEOUT, metavar="S",
                        help=f"seconds one run may take before it is abandoned and its "
                             f"missing deliveries count as lost (default: {RUN_TIMEOUT:g})")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the system place server and load generator on any core "
                             "(default: the server gets one core, the load generator the rest)")
    parser.add_argument("--profile", metavar="DIR",
                        help="run each server under cProfile, writing DIR/server-*.prof "
                             "(slower: compare profiles, not numbers)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: a smoke run of a few seconds")
    parser.add_argument("--json", metavar="FILE",
                        help="also write the results as JSON to FILE ('-': stdout, instead "
                             "of the table)")
    parser.add_argument("--serve-floor", action="store_true",
                        help="only serve the idle run's floor on 127.0.0.1 (a server that "
                             "answers each hello and does nothing else; the idle run "
                             "starts it itself) until killed")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_arg_parser()
    options = parser.parse_args(argv)
    if options.serve_floor:
        try:
            serve_floor()
        except KeyboardInterrupt:   # by hand, Ctrl-C: no traceback
            return 0
    if options.quick:
        for name, value in QUICK.items():
            if getattr(options, name) == parser.get_default(name):
                setattr(options, name, value)
    options.scenarios = [name.strip() for name in options.scenarios.split(",") if name.strip()]
    options.peers = [name.strip() for name in options.peers.split(",") if name.strip()]
    if set(options.peers) - set(PEERS):
        parser.error(f"--peers takes {', '.join(sorted(PEERS))}")
    if options.peers and "peers" not in options.scenarios:
        options.scenarios.append("peers")
    if not re.fullmatch(r"\d+(,\d+)*", options.drop_sizes) or not all(
            2 <= int(size) <= JOIN_NOTICES_UP_TO for size in options.drop_sizes.split(",")):
        parser.error(f"--drop-sizes takes sizes from 2 to {JOIN_NOTICES_UP_TO}, "
                     "separated by commas")
    unknown = set(options.scenarios) - {"startup", "fanout", "latency", "idle", "drop",
                                        "slow", "history", "instructions", "peers", "mixed",
                                        "rooms", "hostile"}
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if not re.fullmatch(r"\d+x\d+(,\d+x\d+)*", options.fanout) or any(
            not 0 < int(s) < int(c) for c, s in (size.split("x")
                                                 for size in options.fanout.split(","))):
        parser.error("--fanout takes CLIENTSxSENDERS,..., with 0 < SENDERS < CLIENTS")
    for name in ("messages", "text_size", "window", "workers", "repeat", "pairs",
                 "latency_clients", "idle_clients", "startup_runs", "room_count", "room_size",
                 "room_senders"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < options.timeout < QUIET_ALLOWED:
        parser.error(f"--timeout must be above 0 and below {QUIET_ALLOWED:g}")
    if "ncat" in options.peers and options.workers > 10:
        parser.error("with ncat, at most 10 --workers (their sync lines have one digit)")
    if options.latency_clients < 2 or options.latency_rate <= 0:
        parser.error("the latency run needs at least 2 clients and a rate above 0")
    cpus = None if options.no_pin else split_cpus()
    options.loadgen_cores = len(cpus[1]) if cpus else os.cpu_count() or 1
    if cpus:
        Launched.cpus = cpus[0]
        os.sched_setaffinity(0, cpus[1])    # the workers inherit it
    if options.profile:
        os.makedirs(options.profile, exist_ok=True)
        ServerUnderTest.profile_dir = os.path.abspath(options.profile)
    if hasattr(signal, "SIGTERM"):     # stop as on Ctrl-C: every child is ended on the way out
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        results = run_scenarios(options)
    except KeyboardInterrupt:
        print("interrupted; every server and worker started is stopped", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if options.json == "-":
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(report_lines(results)))
        if options.json:
            with open(options.json, "w", encoding="utf-8") as out:
                json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
