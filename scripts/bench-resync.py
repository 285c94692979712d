#!/usr/bin/env python3
"""How fast a cut-off backup is protecting the VM again: quick resync vs full sync.

One protected VM (`vmatrix primary`) and one backup (`vmatrix backup`, on 127.0.0.1:7100), both
in a fresh network namespace vmxbench<N> (N in 50..59, scripts/netns.sh). The client side runs in
the root namespace and talks to the guest's KV service at 10.77.<N>.2:7000.

  1. setup: certificates, a --disk-mib disk (with --fill-disk: random data from 16 MiB to the
     end, 4 MiB blocks; the first 16 MiB stay zero: the guest's KV log starts at its
     superblock, sector 0, and a zero superblock is an empty log that the guest formats at
     boot), backup, primary; wait for the KV port (with --fill-disk the console must show an
     empty replay); the initial sync is reported like a full sync (below);
  2. data: 500 SETs, then CHURN over --churn-mib of guest RAM (default half of it) for one pass
     (one byte per page: those pages are non-zero but encode to almost nothing), then idle;
  3. quick resync runs (--runs): with two client connections open, the replication link is cut
     (nftables drops UDP ports 7100 and 7101, the data port, both ways) for --blip-s seconds; a SET is sent during the cut
     (its reply is held: output commit); the link heals. Measured from the heal: (a) the held
     SET's OK, (b) a SET sent right at the heal on the other (already open) connection,
     (c) a SET on a brand-new TCP connection opened at the heal. The primary's log must show
     "quick resync from checkpoint ..." (its size and pause are captured);
  4. full sync runs (--runs): with --rate-mbps R > 0 the replication link is first limited to
     R MB/s (nftables table vmxslow in the namespace: UDP to port 7100 over R*1024 kbytes/s is
     dropped); the backup is killed (SIGKILL), its image directory deleted and the backup
     started again (same flags, log appended); a SET sent right after the restart is timed
     until its OK, from the restart and from the moment the primary's log shows the new
     backup's Welcome ("backup ... ready (protocol vN); it holds nothing"). From the primary's
     log, for the session that synced (its Welcome up to "protected: checkpoint N
     acknowledged"): the sync duration (Welcome -> protected, log timestamps), the pre-copy
     slices of round 0 ("pre-copy round 0, slice k of n (checkpoint c): ...") and later rounds
     ("pre-copy round r (checkpoint c): ..."), the MiB queued (sum over them), the final pause
     ("full sync: final pause X µs, ..."). Then "stays protected": 100 SETs, each must be
     answered OK, then --stay-s seconds of one SET a second, and no new "replication lost" (nor
     a new session) in the primary's log since "protected"; the rate limit is removed after
     that (end of the run);
  5. cleanup (processes, nftables tables, namespace, temporary directory), also on errors and
     signals.

Usage (as root, /dev/kvm, nft installed; the binaries must be built):
  python3 scripts/bench-resync.py [--mem-mib 256] [--churn-mib MEM/2] [--disk-mib 256] [--fill-disk]
                                  [--rate-mbps 0] [--runs 3] [--blip-s 2] [--stay-s 30]
                                  [--out summary.json] [--index 50..59] [--timeout-s 120]
                                  [--keep-logs DIR]
Python 3 standard library only.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (VMATRIX_BIN: another build, for same-run A/B comparisons.)
VMX = os.environ.get("VMATRIX_BIN") or os.path.join(ROOT, "target", "release", "vmatrix")
GUEST = os.path.join(ROOT, "guest", "target", "x86_64-unknown-linux-gnu", "release", "vmatrix-guest")
NETNS = os.path.join(ROOT, "scripts", "netns.sh")
BACKUP_PORT = 7100
# The backup's data socket (the primary's second connection): link faults cover it too.
DATA_PORT = 7101
LINK_PORTS = f"{{ {BACKUP_PORT}, {DATA_PORT} }}"
KV_PORT = 7000
PAGE = 4096
BLIP_TABLE = "vmxblip"
BLIP_RULES = (
    "table inet vmxblip {\n"
    "  chain input {\n"
    "    type filter hook input priority 0; policy accept;\n"
    f"    udp dport {LINK_PORTS} drop\n"
    f"    udp sport {LINK_PORTS} drop\n"
    "  }\n"
    "}\n"
)
SLOW_TABLE = "vmxslow"
# The first bytes of the disk that --fill-disk leaves zero: the KV log's superblock (sector 0;
# zero = an empty log, formatted at boot) and its first records (from byte 4096).
FILL_ZERO_MIB = 16
FILL_BLOCK = 4 << 20


def slow_rules(rate_mbps):
    return (
        f"table inet {SLOW_TABLE} {{\n"
        "  chain input {\n"
        "    type filter hook input priority 0; policy accept;\n"
        f"    udp dport {LINK_PORTS} limit rate over {int(round(rate_mbps * 1024))} kbytes/second counter drop\n"
        "  }\n"
        "}\n"
    )


T0 = time.monotonic()


def say(msg):
    print(f"[bench-resync {time.monotonic() - T0:7.2f}s] {msg}", flush=True)


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


def run(cmd, check=True, input_text=None, quiet=False):
    """Runs a short command; returns its CompletedProcess."""
    r = subprocess.run(cmd, input=input_text, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    if not quiet and r.stderr.strip() and r.returncode != 0:
        say(f"  ({' '.join(cmd)}: {r.stderr.strip()})")
    return r


# ---------------------------------------------------------------------------------------------
# KV client


class Kv:
    """One TCP connection to the guest's KV service: one request per line."""

    def __init__(self, addr, timeout):
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rb")

    def settimeout(self, t):
        self.sock.settimeout(t)

    def send(self, line):
        self.sock.sendall((line + "\n").encode())

    def recv(self):
        line = self.file.readline()
        if not line:
            raise BenchError("KV connection closed by the guest")
        return line.decode(errors="replace").strip()

    def cmd(self, line):
        self.send(line)
        return self.recv()

    def close(self):
        try:
            self.file.close()
            self.sock.close()
        except OSError:
            pass


class Waiter(threading.Thread):
    """Waits (in the background) for one reply; records when it arrived (monotonic and wall)."""

    def __init__(self, kv=None, line=None, connect=None, timeout=120.0):
        super().__init__(daemon=True)
        self.kv, self.line, self.connect, self.timeout = kv, line, connect, timeout
        self.reply = self.error = None
        self.t_mono = self.t_wall = None
        self.t_sent = None

    def run(self):
        try:
            if self.connect is not None:  # a brand-new connection, then the request
                self.kv = Kv(self.connect, self.timeout)
            self.kv.settimeout(self.timeout)
            if self.line is not None:
                self.t_sent = time.monotonic()
                self.kv.send(self.line)
            self.reply = self.kv.recv()
            self.t_mono, self.t_wall = time.monotonic(), time.time()
        except Exception as e:  # reported by the caller
            self.error = f"{type(e).__name__}: {e}"

    def result(self, timeout):
        self.join(timeout)
        if self.is_alive():
            return None
        return self


# ---------------------------------------------------------------------------------------------
# Logs


LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")


def log_time(line):
    """The wall-clock time (epoch seconds) of a tracing log line, or None."""
    m = LOG_TS.match(line)
    if not m:
        return None
    frac = (m.group(2) or ".0")[1:7].ljust(6, "0")
    dt = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc, microsecond=int(frac)
    )
    return dt.timestamp()


def read_from(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def size_of(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def find_lines(text, needle):
    return [l for l in text.splitlines() if needle in l]


def excerpt(text, n=40):
    lines = text.splitlines()
    return "\n".join(lines[-n:])


RESYNC_RE = re.compile(
    r"joins at checkpoint (\d+): quick resync from checkpoint (\d+) of (\d+) pages, "
    r"([\d.]+) MiB, in a (\d+) µs pause"
)
FULLJOIN_RE = re.compile(r"joins at checkpoint (\d+): full sync of (\d+) pages, ([\d.]+) MiB, in a (\d+) µs pause")
FINAL_RE = re.compile(r"full sync: final pause (\d+) µs, (\d+) pages(?:, checkpoint (\d+) carries the state)?")
# "pre-copy round 0, slice 3 of 32 (checkpoint 4892): 16384 pages, 0 disk bytes, 0.1 MiB queued,
# 477 ms into the sync" (round 0 of a guest bigger than one slice) or "pre-copy round 1
# (checkpoint 4922): 496 pages, 0 disk bytes, 0.0 MiB queued, 1702 ms into the sync".
PRECOPY_RE = re.compile(
    r"pre-copy round (\d+)(?:, slice (\d+) of (\d+))? \(checkpoint (\d+)\): (\d+) pages, (\d+) disk bytes, "
    r"([\d.]+) MiB queued(?:, (\d+) ms into the sync)?"
)
PROTECTED_RE = re.compile(r"protected: checkpoint (\d+) acknowledged")
READY_RE = re.compile(r"ready \(protocol v\d+\); it holds (.*)$")
LOST_RE = re.compile(r"replication lost| lost: ")


def sessions_of(text, since_wall=None):
    """The sessions in a primary log excerpt: each begins with a backup's Welcome ("... ready
    (protocol vN); it holds ...") at or after `since_wall` and holds the lines up to the next."""
    sessions = []
    for l in text.splitlines():
        m = READY_RE.search(l)
        lt = log_time(l)
        if m and lt is not None and (since_wall is None or lt >= since_wall):
            sessions.append({"t": lt, "holds": m.group(1), "lines": [l]})
        elif sessions:
            sessions[-1]["lines"].append(l)
    return sessions


def sync_of(session):
    """What the primary's log says about one session's sync: duration (Welcome -> "protected"),
    pre-copy slices and rounds, MiB queued, final pause."""
    out = {"sync_ms": None, "protected_checkpoint": None, "precopy_slices": 0, "precopy_rounds": 0,
           "round0_slices": 0, "round0_pages": None, "precopy_pages": 0, "precopy_disk_mib": 0.0,
           "precopy_mib": 0.0, "last_precopy_into_sync_ms": None, "final_pause_us": None,
           "final_pages": None, "final_checkpoint": None, "join_full_mib": None, "sync_mib": None}
    if session is None:
        return out
    rounds = set()
    t_prot = None
    for l in session["lines"]:
        m = PRECOPY_RE.search(l)
        if m:
            rnd = int(m.group(1))
            rounds.add(rnd)
            out["precopy_slices"] += 1
            if rnd == 0:
                out["round0_slices"] += 1
                out["round0_pages"] = (out["round0_pages"] or 0) + int(m.group(5))
            out["precopy_pages"] += int(m.group(5))
            out["precopy_disk_mib"] += int(m.group(6)) / (1 << 20)
            out["precopy_mib"] += float(m.group(7))
            if m.group(8) is not None:
                out["last_precopy_into_sync_ms"] = int(m.group(8))
            continue
        m = FINAL_RE.search(l)
        if m and out["final_pause_us"] is None:
            out["final_pause_us"], out["final_pages"] = int(m.group(1)), int(m.group(2))
            out["final_checkpoint"] = int(m.group(3)) if m.group(3) else None
            continue
        m = FULLJOIN_RE.search(l)
        if m and out["join_full_mib"] is None:
            out["join_full_mib"] = float(m.group(3))
            out["final_pause_us"] = out["final_pause_us"] or int(m.group(4))
            continue
        m = PROTECTED_RE.search(l)
        if m and t_prot is None:
            t_prot = log_time(l)
            out["protected_checkpoint"] = int(m.group(1))
    out["precopy_rounds"] = len(rounds)
    out["precopy_mib"] = round(out["precopy_mib"], 1)
    out["precopy_disk_mib"] = round(out["precopy_disk_mib"], 1)
    out["sync_mib"] = round(out["precopy_mib"] + (out["join_full_mib"] or 0.0), 1)
    if t_prot is not None:
        out["sync_ms"] = round((t_prot - session["t"]) * 1e3, 1)
        out["protected_wall"] = t_prot
    return out


def sync_line(x):
    return (f"sync {fmt(x.get('sync_ms'))} ms (Welcome -> protected), {fmt(x.get('sync_mib'))} MiB queued "
            f"(disk {fmt(x.get('precopy_disk_mib'))} MiB), {x.get('precopy_slices')} pre-copy slices/rounds "
            f"({x.get('round0_slices')} slices of round 0, {x.get('precopy_rounds')} rounds), final pause "
            f"{fmt(x.get('final_pause_us'))} µs ({fmt(x.get('final_pages'))} pages)")


def unexpected(line):
    """A log line worth reporting: errors other than the expected loss of the backup, panics,
    refusals, warnings other than the expected end of a session."""
    if "panicked" in line or "refus" in line:
        return True
    if " ERROR " in line:
        return not ("lost" in line)
    if " WARN " in line:
        return not ("session ended" in line or "session closed" in line)
    return False


# ---------------------------------------------------------------------------------------------
# The bench


class Bench:
    def __init__(self, args):
        self.a = args
        self.index = None
        self.ns = None
        self.tmp = None
        self.primary = None
        self.backup = None
        self.backup_log_f = None
        self.primary_log_f = None
        self.conns = []
        self.blip_installed = False
        self.slow_installed = False
        self.results = {"quick": [], "full": []}
        self.initial = None  # the initial sync (primary start), from the primary's log
        self.anomalies = []
        self.notes = []  # unexpected warnings in the logs (not failures of a run)

    # -- setup -----------------------------------------------------------------------------

    def pick_index(self):
        existing = run(["ip", "netns", "list"]).stdout
        used = run(["ip", "-o", "-4", "addr", "show"]).stdout
        candidates = [self.a.index] if self.a.index is not None else list(range(50, 60))
        for i in candidates:
            name = f"vmxbench{i}"
            if re.search(rf"^{name}\b", existing, re.M):
                continue
            if f" 10.77.{i}." in used:
                continue
            return i
        raise BenchError(f"no free namespace/index among {candidates} (vmxbench<N>, 10.77.<N>.0/24)")

    def paths(self):
        t = self.tmp
        return {
            "pki": os.path.join(t, "pki"),
            "disk": os.path.join(t, "disk.img"),
            "image": os.path.join(t, "image"),
            "plog": os.path.join(t, "primary.log"),
            "pout": os.path.join(t, "primary.out"),
            "blog": os.path.join(t, "backup.log"),
            "console": os.path.join(t, "console.log"),
        }

    def backup_cmd(self):
        p = self.paths()
        return ["ip", "netns", "exec", self.ns, VMX, "backup", "--listen", f"127.0.0.1:{BACKUP_PORT}",
                "--image-dir", p["image"], "--certs", p["pki"], "--host", "backup",
                "--idle-timeout-ms", "500", "--log", "info"] + (
                    ["--data-ports", str(DATA_PORT)] if self.a.data_socket else ["--data-sockets", "0"])

    def primary_cmd(self):
        p, i = self.paths(), self.index
        return ["ip", "netns", "exec", self.ns, VMX, "--log", "info", "primary", "--guest", GUEST,
                "--disk", p["disk"], "--tap", "tap0", "--mem-mib", str(self.a.mem_mib),
                "--guest-config", f"ip=10.77.{i}.2/24,gw=10.77.{i}.1,port={KV_PORT}",
                "--backup", f"backup@127.0.0.1:{BACKUP_PORT}", "--certs", p["pki"],
                "--host", "primary", "--idle-timeout-ms", "500", "--console-log", p["console"]]

    def start_backup(self):
        p = self.paths()
        if self.backup_log_f is None:
            self.backup_log_f = open(p["blog"], "ab")
        self.backup = subprocess.Popen(self.backup_cmd(), stdin=subprocess.DEVNULL,
                                       stdout=self.backup_log_f, stderr=self.backup_log_f)
        return self.backup

    def setup(self):
        for f in (VMX, GUEST):
            if not os.path.exists(f):
                raise BenchError(f"missing {f} (build it first)")
        if os.geteuid() != 0:
            raise BenchError("run as root (namespaces, KVM, nftables)")
        self.index = self.pick_index()
        self.ns = f"vmxbench{self.index}"
        self.tmp = tempfile.mkdtemp(prefix=f"{self.ns}-")
        p = self.paths()
        say(f"namespace {self.ns}, guest 10.77.{self.index}.2:{KV_PORT}, temp dir {self.tmp}")
        run([NETNS, "up", self.ns, str(self.index)])
        run([VMX, "certs", "init", p["pki"]])
        for h in ("primary", "backup"):
            run([VMX, "certs", "issue", p["pki"], "--host", h])
        run([VMX, "disk", "create", p["disk"], "--size-mib", str(self.a.disk_mib)])
        if self.a.fill_disk:
            self.fill_disk(p["disk"])
        say("starting the backup: " + " ".join(self.backup_cmd()))
        self.start_backup()
        time.sleep(0.3)
        self.check_alive()
        say("starting the primary: " + " ".join(self.primary_cmd()))
        self.primary_log_f = open(p["plog"], "ab")
        pout = open(p["pout"], "ab")
        t_start = time.monotonic()
        self.primary = subprocess.Popen(self.primary_cmd(), stdin=subprocess.DEVNULL,
                                        stdout=pout, stderr=self.primary_log_f)
        pout.close()
        kv = self.wait_kv(self.a.timeout_s)
        say(f"KV answers {time.monotonic() - t_start:.2f} s after the primary started")
        st = kv.cmd("STATS")
        say(f"guest: {st}")
        time.sleep(0.3)
        replay = [l for l in read_from(p["console"], 0).splitlines() if "log replayed" in l]
        say("guest console: " + (replay[0].strip() if replay else "(no 'log replayed' line)"))
        m = re.search(r"log_tail=(\d+)", st)
        if self.a.fill_disk and not (m and int(m.group(1)) == 4096 and re.search(r"keys=0\b", st)):
            self.anomalies.append(f"filled disk: the guest's KV log is not empty at boot: {st}; "
                                  + (replay[0] if replay else ""))
        log = read_from(p["plog"], 0)
        ss = sessions_of(log)
        good = next((x for x in ss if any(PROTECTED_RE.search(l) for l in x["lines"])), None)
        self.initial = sync_of(good)
        self.initial["sessions"] = len(ss)
        self.initial.pop("protected_wall", None)
        say(f"initial sync (no rate limit): {sync_line(self.initial)}; {len(ss)} session(s)")
        m = re.search(r"protected after (\d+) ms \((\d+) sync rounds, ([\d.]+) MiB\)", log)
        lost = [l for l in log.splitlines() if "replication lost" in l and "ERROR" in l]
        if lost:
            self.notes.append(f"initial sync: {len(lost)} failed session(s) before the VM was protected; "
                              "primary log:\n" + excerpt(log))
            say(f"initial sync: {len(lost)} failed session(s) first: {lost[0]}")
        if m:
            say(f"initial sync: protected after {m.group(1)} ms ({m.group(2)} rounds, {m.group(3)} MiB)")
        return kv

    def fill_disk(self, path):
        """Random data from FILL_ZERO_MIB to the end of the disk; the first MiBs stay zero (the
        KV log's superblock and records)."""
        if self.a.disk_mib <= FILL_ZERO_MIB:
            raise BenchError(f"--fill-disk needs --disk-mib > {FILL_ZERO_MIB} (the first {FILL_ZERO_MIB} MiB stay zero)")
        t = time.monotonic()
        size = self.a.disk_mib << 20
        with open(path, "r+b") as f:
            f.seek(FILL_ZERO_MIB << 20)
            left = size - (FILL_ZERO_MIB << 20)
            while left > 0:
                n = min(FILL_BLOCK, left)
                f.write(os.urandom(n))
                left -= n
            f.flush()
            os.fsync(f.fileno())
        if os.path.getsize(path) != size:
            raise BenchError(f"{path}: size {os.path.getsize(path)} after the fill, expected {size}")
        say(f"disk filled with random data from {FILL_ZERO_MIB} MiB to {self.a.disk_mib} MiB "
            f"in {time.monotonic() - t:.1f} s (first {FILL_ZERO_MIB} MiB zero: empty KV log)")

    def addr(self):
        return (f"10.77.{self.index}.2", KV_PORT)

    def wait_kv(self, timeout):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                kv = Kv(self.addr(), timeout=3)
                kv.settimeout(max(1.0, deadline - time.monotonic()))
                r = kv.cmd("GET __ready")
                if r.startswith("VALUE") or r == "NOTFOUND":
                    kv.settimeout(self.a.timeout_s)
                    self.conns.append(kv)
                    return kv
                last = f"unexpected reply {r!r}"
                kv.close()
            except (OSError, BenchError) as e:
                last = e
                time.sleep(0.2)
        raise BenchError(f"KV port {self.addr()} did not answer within {timeout} s ({last})")

    def check_alive(self):
        p = self.paths()
        for name, proc, log in (("backup", self.backup, p["blog"]), ("primary", self.primary, p["plog"])):
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"the {name} exited ({proc.returncode}); its log:\n"
                                 + excerpt(read_from(log, 0)))

    def connect(self):
        kv = Kv(self.addr(), timeout=self.a.timeout_s)
        self.conns.append(kv)
        r = kv.cmd("GET __probe")
        if r not in ("NOTFOUND",) and not r.startswith("VALUE"):
            raise BenchError(f"probe on a new connection: {r!r}")
        return kv

    # -- data ------------------------------------------------------------------------------

    def fill(self, kv):
        t = time.monotonic()
        for i in range(500):
            r = kv.cmd(f"SET key{i} value{i}")
            if r != "OK":
                raise BenchError(f"SET key{i}: {r!r}")
        say(f"500 SETs in {time.monotonic() - t:.2f} s")
        churn_mib = self.a.churn_mib if self.a.churn_mib is not None else self.a.mem_mib // 2
        pages = churn_mib * (1 << 20) // PAGE
        rate = 2000
        t = time.monotonic()
        r = kv.cmd(f"CHURN {pages} {rate}")
        if r != "OK":
            raise BenchError(f"CHURN {pages} {rate}: {r!r}")
        say(f"CHURN {pages} {rate} ({pages * PAGE >> 20} MiB region) answered in {time.monotonic() - t:.2f} s")
        # One pass takes pages/rate ms of guest time, but a replicated guest that dirties this
        # fast is slowed down (checkpoint pauses, backpressure) and dirties at most 100 ms worth
        # of pages per step: wait that long plus a margin, then ask STATS until `churned` covers
        # one pass. The last STATS and CHURN 0 0 go together (the guest reads both at once; only
        # its replies wait for their checkpoint).
        time.sleep(pages / rate / 1000 + 1.0)
        deadline = time.monotonic() + self.a.timeout_s
        churned = 0
        while True:
            st = kv.cmd("STATS")
            m = re.search(r"churned=(\d+)", st)
            churned = int(m.group(1)) if m else 0
            if churned >= pages:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"one CHURN pass not done after {self.a.timeout_s} s more: {st}")
            say(f"  churned {churned} of {pages} pages so far "
                f"({time.monotonic() - t:.1f} s after the CHURN was sent)")
            time.sleep(0.5)
        kv.send("STATS")
        kv.send("CHURN 0 0")
        st, r = kv.recv(), kv.recv()
        m = re.search(r"churned=(\d+)", st)
        churned = int(m.group(1)) if m else churned
        if r != "OK":
            raise BenchError(f"CHURN 0 0: {r!r}")
        say(f"one pass done (churned={churned} pages when stopped), churn stopped; "
            f"replies back {time.monotonic() - t:.2f} s after the CHURN was sent")
        st = kv.cmd("STATS")
        say(f"guest: {st}")
        time.sleep(1.0)

    def settle(self, kv):
        """Waits ~1 s and checks that a SET is answered quickly (replication idle, protected)."""
        time.sleep(1.0)
        t = time.monotonic()
        r = kv.cmd("SET __settle 1")
        dt = time.monotonic() - t
        if r != "OK":
            raise BenchError(f"settle SET: {r!r}")
        if dt > 0.05:
            say(f"  (settle SET took {dt * 1e3:.1f} ms; waiting 1 s more)")
            time.sleep(1.0)

    # -- quick resync ----------------------------------------------------------------------

    def blip_on(self):
        run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input_text=BLIP_RULES)
        self.blip_installed = True

    def blip_off(self):
        run(["ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", BLIP_TABLE])
        self.blip_installed = False

    def slow_on(self):
        run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input_text=slow_rules(self.a.rate_mbps))
        self.slow_installed = True

    def slow_off(self):
        r = run(["ip", "netns", "exec", self.ns, "nft", "list", "table", "inet", SLOW_TABLE], check=False)
        run(["ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", SLOW_TABLE])
        self.slow_installed = False
        c = re.search(r"counter packets (\d+) bytes (\d+)", r.stdout)
        return (int(c.group(1)), int(c.group(2))) if c else (None, None)

    def quick_run(self, r, kv_main):
        p = self.paths()
        held_kv = self.connect()
        fresh_kv = self.connect()
        off = size_of(p["plog"])
        t_cut_wall = time.time()
        self.blip_on()
        t_cut = time.monotonic()
        time.sleep(min(0.5, self.a.blip_s / 4))
        held = Waiter(kv=held_kv, line=f"SET during{r} x", timeout=self.a.timeout_s)
        held.start()
        time.sleep(max(0.0, self.a.blip_s - (time.monotonic() - t_cut)))
        t_heal0 = time.monotonic()
        self.blip_off()
        t_heal, t_heal_wall = time.monotonic(), time.time()
        fresh = Waiter(kv=fresh_kv, line=f"SET after{r} y", timeout=self.a.timeout_s)
        fresh.start()
        newc = Waiter(connect=self.addr(), line=f"SET new{r} z", timeout=self.a.timeout_s)
        newc.start()
        out = {"run": r, "blip_s": round(t_heal0 - t_cut, 3), "nft_delete_ms": round((t_heal - t_heal0) * 1e3, 1)}
        for name, w in (("held", held), ("fresh", fresh), ("newconn", newc)):
            res = w.result(self.a.timeout_s + 5)
            if res is None or w.error or w.reply != "OK":
                why = "timeout" if res is None else (w.error or f"reply {w.reply!r}")
                self.anomalies.append(f"quick run {r}: {name} SET: {why}")
                out[f"{name}_ms"] = None
                say(f"  quick run {r}: {name} SET failed: {why}")
            else:
                out[f"{name}_ms"] = round((w.t_mono - t_heal) * 1e3, 1)
        if newc.kv is not None:
            self.conns.append(newc.kv)
        time.sleep(0.3)  # let the log lines land
        text = read_from(p["plog"], off)
        m = RESYNC_RE.search(text)
        if m:
            out.update(joins_at=int(m.group(1)), resync_from=int(m.group(2)), resync_pages=int(m.group(3)),
                       resync_mib=float(m.group(4)), resync_pause_us=int(m.group(5)))
        else:
            out.update(resync_mib=None, resync_pause_us=None)
            self.anomalies.append(f"quick run {r}: no 'quick resync from checkpoint' in the primary log; excerpt:\n"
                                  + excerpt(text))
        if FINAL_RE.search(text) or FULLJOIN_RE.search(text):
            self.anomalies.append(f"quick run {r}: a full sync happened instead/as well:\n" + excerpt(text))
        lost = [l for l in text.splitlines() if "replication lost" in l or " lost: " in l]
        out["lost_after_cut_ms"] = None
        for l in lost:
            lt = log_time(l)
            if lt is not None:
                out["lost_after_cut_ms"] = round((lt - t_cut_wall) * 1e3, 1)
                break
        ready = [l for l in text.splitlines() if READY_RE.search(l)]
        out["ready_after_heal_ms"] = None
        for l in ready:
            lt = log_time(l)
            if lt is not None and lt >= t_heal_wall - 0.5:
                out["ready_after_heal_ms"] = round((lt - t_heal_wall) * 1e3, 1)
                out["ready_holds"] = READY_RE.search(l).group(1)
                if held.t_wall:
                    out["held_after_ready_ms"] = round((held.t_wall - lt) * 1e3, 1)
                break
        qs = [x for x in sessions_of(text, t_heal_wall - 0.5) if any(PROTECTED_RE.search(l) for l in x["lines"])]
        out["resync_sync_ms"] = sync_of(qs[0])["sync_ms"] if qs else None
        out["sessions_after_heal"] = sum(
            1 for l in text.splitlines()
            if READY_RE.search(l) and (log_time(l) or 0) >= t_heal_wall - 0.5)
        if out["sessions_after_heal"] > 1:
            self.notes.append(f"quick run {r}: {out['sessions_after_heal']} sessions after the heal; "
                              "primary log:\n" + excerpt(text))
        for l in text.splitlines():
            if unexpected(l):
                self.notes.append(f"quick run {r}: primary log: {l}")
        g = kv_main.cmd(f"GET during{r}")
        if g != "VALUE x":
            self.anomalies.append(f"quick run {r}: GET during{r} -> {g!r}")
        say(f"quick run {r}: held SET OK {fmt(out['held_ms'])} ms after heal, fresh SET {fmt(out['fresh_ms'])} ms, "
            f"new-connection SET {fmt(out['newconn_ms'])} ms; backup Welcome {fmt(out['ready_after_heal_ms'])} ms "
            f"after heal; resync {fmt(out.get('resync_mib'))} MiB ({out.get('resync_pages', '?')} pages) "
            f"in a {fmt(out.get('resync_pause_us'))} µs pause; connection lost "
            f"{fmt(out['lost_after_cut_ms'])} ms after the cut")
        for kv in (held_kv, fresh_kv, newc.kv):
            if kv is not None:
                kv.close()
        self.results["quick"].append(out)

    # -- full sync -------------------------------------------------------------------------

    def full_run(self, r, kv_main):
        p = self.paths()
        kv = self.connect()
        off_p, off_b = size_of(p["plog"]), size_of(p["blog"])
        out = {"run": r, "rate_mbps": self.a.rate_mbps or None}
        if self.a.rate_mbps:
            self.slow_on()
            say(f"full run {r}: replication link limited to {self.a.rate_mbps} MB/s "
                f"(nft table inet {SLOW_TABLE}: udp dport {LINK_PORTS} limit rate over "
                f"{int(round(self.a.rate_mbps * 1024))} kbytes/second drop)")
        try:
            return self.full_run_limited(r, kv_main, kv, off_p, off_b, out)
        finally:
            if self.slow_installed:
                pk, by = self.slow_off()
                out["rate_limit_dropped_packets"] = pk
                out["rate_limit_dropped_mib"] = round(by / (1 << 20), 1) if by is not None else None
                say(f"full run {r}: rate limit removed; it dropped {fmt(pk)} packets, "
                    f"{fmt(out['rate_limit_dropped_mib'])} MiB")

    def full_run_limited(self, r, kv_main, kv, off_p, off_b, out):
        p = self.paths()
        t_kill = time.monotonic()
        t_kill_wall = time.time()
        self.backup.kill()
        self.backup.wait()
        shutil.rmtree(p["image"])
        self.backup_log_f.write(f"==== bench-resync: full run {r}: backup restarted ====\n".encode())
        self.backup_log_f.flush()
        self.start_backup()
        t_restart, t_restart_wall = time.monotonic(), time.time()
        w = Waiter(kv=kv, line=f"SET full{r} x", timeout=self.a.timeout_s)
        w.start()
        out["kill_to_restart_ms"] = round((t_restart - t_kill) * 1e3, 1)
        res = w.result(self.a.timeout_s + 5)
        if res is None or w.error or w.reply != "OK":
            why = "timeout" if res is None else (w.error or f"reply {w.reply!r}")
            self.anomalies.append(f"full run {r}: SET: {why}")
            out["from_restart_ms"] = None
            say(f"  full run {r}: SET failed: {why}")
        else:
            out["from_restart_ms"] = round((w.t_mono - t_restart) * 1e3, 1)
        time.sleep(0.3)
        text = read_from(p["plog"], off_p)
        btext = read_from(p["blog"], off_b)
        out["from_ready_ms"] = out["ready_after_restart_ms"] = out["lost_after_kill_ms"] = None
        out["from_last_ready_ms"] = None
        for l in text.splitlines():
            if LOST_RE.search(l):
                lt = log_time(l)
                if lt is not None:
                    out["lost_after_kill_ms"] = round((lt - t_kill_wall) * 1e3, 1)
                    break
        # Sessions after the restart: each begins with the backup's Welcome ("ready"); the one
        # that reached "protected" is the successful full sync, earlier ones failed.
        sessions = sessions_of(text, t_restart_wall - 0.05)
        out["sessions_after_restart"] = len(sessions)
        if sessions:
            first = sessions[0]
            out["ready_holds"] = first["holds"]
            out["ready_after_restart_ms"] = round((first["t"] - t_restart_wall) * 1e3, 1)
            if w.t_wall:
                out["from_ready_ms"] = round((w.t_wall - first["t"]) * 1e3, 1)
        ok = [x for x in sessions if any(PROTECTED_RE.search(l) for l in x["lines"])]
        good = ok[0] if ok else None
        failed = [x for x in sessions if x is not good and (good is None or x["t"] < good["t"])]
        out["failed_sessions"] = len(failed)
        if failed:
            why = [l for x in failed for l in x["lines"] if "lost" in l or "ERROR" in l]
            shown = failed if len(failed) <= 3 else failed[:2] + failed[-1:]
            head = (f"{len(failed)} full-sync session(s) failed before the one that protected the VM"
                    if good else f"{len(failed)} full-sync session(s) after the restart, none protected the VM")
            self.notes.append(f"full run {r}: {head}; primary log of "
                              + ("them" if shown is failed else "the first two and the last")
                              + ":\n" + "\n".join(l for x in shown for l in x["lines"]))
            out["failed_session_reasons"] = why
        for l in btext.splitlines():
            if "accepted replication connection" in l:
                lt = log_time(l)
                if lt is not None:
                    out["backup_accepted_after_restart_ms"] = round((lt - t_restart_wall) * 1e3, 1)
                break
        if good and w.t_wall:
            out["from_last_ready_ms"] = round((w.t_wall - good["t"]) * 1e3, 1)
            out["good_ready_after_restart_ms"] = round((good["t"] - t_restart_wall) * 1e3, 1)
        sync = sync_of(good)
        t_prot_wall = sync.pop("protected_wall", None)
        out.update(sync)
        if good and good["holds"] != "nothing":
            self.anomalies.append(f"full run {r}: the backup that synced held {good['holds']!r}, not nothing")
        gtext = "\n".join(good["lines"]) if good else ""
        if RESYNC_RE.search(text):
            self.anomalies.append(f"full run {r}: a quick resync instead of a full sync:\n" + excerpt(text))
        if good and not FINAL_RE.search(gtext) and not FULLJOIN_RE.search(gtext):
            self.anomalies.append(f"full run {r}: no 'full sync: final pause' in the session that synced; "
                                  "excerpt:\n" + excerpt(gtext))
        if good is None and out["from_restart_ms"] is not None:
            self.anomalies.append(f"full run {r}: the SET was answered but no session after the restart "
                                  "reached 'protected: checkpoint N acknowledged'; excerpt:\n" + excerpt(text))
        if out["from_restart_ms"] is not None:  # otherwise every reply is held
            g = kv_main.cmd(f"GET full{r}")
            if g != "VALUE x":
                self.anomalies.append(f"full run {r}: GET full{r} -> {g!r}")
            self.stay_check(r, kv_main, off_p, t_prot_wall or w.t_wall, out)
        text = read_from(p["plog"], off_p)
        btext = read_from(p["blog"], off_b)
        for l in text.splitlines():
            if unexpected(l):
                self.notes.append(f"full run {r}: primary log: {l}")
        for l in btext.splitlines():
            if unexpected(l):
                self.notes.append(f"full run {r}: backup log: {l}")
        say(f"full run {r}: SET OK {fmt(out['from_restart_ms'])} ms after the backup restart, "
            f"{fmt(out['from_ready_ms'])} ms after the primary logged the first Welcome "
            f"({fmt(out['ready_after_restart_ms'])} ms after the restart), {fmt(out['from_last_ready_ms'])} ms after "
            f"the Welcome of the session that synced ({out['failed_sessions']} failed session(s) before); "
            f"{sync_line(out)}; connection lost {fmt(out['lost_after_kill_ms'])} ms after the kill")
        out["reprotected"] = out["from_restart_ms"] is not None
        kv.close()
        self.results["full"].append(out)
        return out["reprotected"]

    def stay_check(self, r, kv_main, off_p, t_prot_wall, out):
        """After the full sync: 100 SETs, each must be answered OK; then --stay-s seconds of one
        SET a second; no "replication lost" nor a new Welcome in the primary's log since
        "protected"."""
        p = self.paths()
        lat, fails = [], []

        def one(key):
            t = time.monotonic()
            try:
                rep = kv_main.cmd(f"SET {key} v")
            except (OSError, BenchError) as e:
                rep = f"{type(e).__name__}: {e}"
            dt = (time.monotonic() - t) * 1e3
            if rep != "OK":
                fails.append(f"SET {key}: {rep!r} after {dt:.0f} ms")
                return False
            lat.append(dt)
            return True

        t0 = time.monotonic()
        n_ok = 0
        for i in range(100):
            if not one(f"stay{r}_{i}"):
                break
            n_ok += 1
        out["stay_sets_ok"] = n_ok
        out["stay_100_sets_s"] = round(time.monotonic() - t0, 2)
        out["stay_set_median_ms"] = round(statistics.median(lat), 2) if lat else None
        out["stay_set_max_ms"] = round(max(lat), 1) if lat else None
        say(f"full run {r}: stays protected? {n_ok}/100 SETs answered OK in {out['stay_100_sets_s']} s "
            f"(median {fmt(out['stay_set_median_ms'])} ms, max {fmt(out['stay_set_max_ms'])} ms); "
            f"watching {self.a.stay_s} s more")
        t_end = time.monotonic() + self.a.stay_s
        n_win = n_win_ok = 0
        lat_win_from = len(lat)
        while not fails and time.monotonic() < t_end:
            n_win += 1
            if one(f"staywin{r}_{n_win}"):
                n_win_ok += 1
            time.sleep(max(0.0, min(1.0, t_end - time.monotonic())))
        out["stay_window_s"] = self.a.stay_s
        out["stay_window_sets"] = n_win
        out["stay_window_sets_ok"] = n_win_ok
        wl = lat[lat_win_from:]
        out["stay_window_set_max_ms"] = round(max(wl), 1) if wl else None
        time.sleep(0.3)
        text = read_from(p["plog"], off_p)
        since = t_prot_wall or 0
        lost, welcomes = [], []
        for l in text.splitlines():
            lt = log_time(l)
            if lt is None or lt < since:
                continue
            if LOST_RE.search(l):
                lost.append(l)
            elif READY_RE.search(l):
                welcomes.append(l)
        out["stay_lost_lines"] = lost
        out["stay_new_sessions"] = len(welcomes)
        out["stayed_protected"] = (not fails and n_ok == 100 and n_win_ok == n_win and not lost and not welcomes)
        if fails:
            out["stay_failures"] = fails
        if not out["stayed_protected"]:
            self.anomalies.append(
                f"full run {r}: did not stay protected: {n_ok}/100 SETs OK, {n_win_ok}/{n_win} window SETs OK, "
                f"{len(lost)} 'replication lost' line(s), {len(welcomes)} new Welcome(s) since 'protected'"
                + ("; " + "; ".join(fails) if fails else "")
                + ("; primary log:\n" + "\n".join((lost + welcomes)[:10]) if lost or welcomes else ""))
        say(f"full run {r}: {'stayed protected' if out['stayed_protected'] else 'did NOT stay protected'}: "
            f"{n_win_ok}/{n_win} SETs OK in the {self.a.stay_s} s window (max {fmt(out['stay_window_set_max_ms'])} ms), "
            f"{len(lost)} 'replication lost', {len(welcomes)} new Welcome(s) in the primary log since 'protected'")

    # -- cleanup ---------------------------------------------------------------------------

    def cleanup(self):
        for kv in self.conns:
            kv.close()
        if self.blip_installed and self.ns:
            run(["ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", BLIP_TABLE], check=False)
        if self.slow_installed and self.ns:
            run(["ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", SLOW_TABLE], check=False)
        if self.primary is not None and self.primary.poll() is None:
            self.primary.terminate()
            try:
                self.primary.wait(10)
            except subprocess.TimeoutExpired:
                self.primary.kill()
                self.primary.wait()
        if self.backup is not None and self.backup.poll() is None:
            self.backup.kill()
            self.backup.wait()
        for f in (self.backup_log_f, self.primary_log_f):
            if f:
                f.close()
        if self.ns:
            run([NETNS, "down", self.ns], check=False)
        if self.tmp:
            if self.a.keep_logs:
                os.makedirs(self.a.keep_logs, exist_ok=True)
                for n in ("primary.log", "primary.out", "backup.log", "console.log"):
                    src = os.path.join(self.tmp, n)
                    if os.path.exists(src):
                        shutil.copy(src, os.path.join(self.a.keep_logs, n))
                say(f"logs kept in {self.a.keep_logs}")
            shutil.rmtree(self.tmp, ignore_errors=True)
        say("cleaned up")


def uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def fmt(x):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.1f}"
    return str(x)


def stats(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"min": min(v), "median": statistics.median(v), "max": max(v), "n": len(v)}


def mmm(s):
    if s is None:
        return "—"
    return f"{fmt(s['min'])} / {fmt(s['median'])} / {fmt(s['max'])}"


def summarize(b, meta):
    q, f = b.results["quick"], b.results["full"]
    s = {
        "quick_held_ms": stats([x.get("held_ms") for x in q]),
        "quick_fresh_ms": stats([x.get("fresh_ms") for x in q]),
        "quick_newconn_ms": stats([x.get("newconn_ms") for x in q]),
        "quick_ready_after_heal_ms": stats([x.get("ready_after_heal_ms") for x in q]),
        "quick_held_after_ready_ms": stats([x.get("held_after_ready_ms") for x in q]),
        "quick_resync_mib": stats([x.get("resync_mib") for x in q]),
        "quick_resync_pages": stats([x.get("resync_pages") for x in q]),
        "quick_resync_pause_us": stats([x.get("resync_pause_us") for x in q]),
        "quick_sync_ms": stats([x.get("resync_sync_ms") for x in q]),
        "full_from_restart_ms": stats([x.get("from_restart_ms") for x in f]),
        "full_from_ready_ms": stats([x.get("from_ready_ms") for x in f]),
        "full_ready_after_restart_ms": stats([x.get("ready_after_restart_ms") for x in f]),
        "full_from_last_ready_ms": stats([x.get("from_last_ready_ms") for x in f]),
        "full_failed_sessions": stats([x.get("failed_sessions") for x in f]),
        "full_sync_ms": stats([x.get("sync_ms") for x in f]),
        "full_sync_mib": stats([x.get("sync_mib") for x in f]),
        "full_precopy_disk_mib": stats([x.get("precopy_disk_mib") for x in f]),
        "full_precopy_slices": stats([x.get("precopy_slices") for x in f]),
        "full_round0_slices": stats([x.get("round0_slices") for x in f]),
        "full_precopy_rounds": stats([x.get("precopy_rounds") for x in f]),
        "full_round0_pages": stats([x.get("round0_pages") for x in f]),
        "full_final_pause_us": stats([x.get("final_pause_us") for x in f]),
        "full_final_pages": stats([x.get("final_pages") for x in f]),
        "full_rate_limit_dropped_mib": stats([x.get("rate_limit_dropped_mib") for x in f]),
        "stay_set_median_ms": stats([x.get("stay_set_median_ms") for x in f]),
        "stay_set_max_ms": stats([x.get("stay_set_max_ms") for x in f]),
    }
    ratio = None
    if s["full_from_restart_ms"] and s["quick_held_ms"]:
        ratio = s["full_from_restart_ms"]["median"] / s["quick_held_ms"]["median"]
    ratio_ready = None
    if s["full_from_ready_ms"] and s["quick_held_ms"]:
        ratio_ready = s["full_from_ready_ms"]["median"] / s["quick_held_ms"]["median"]
    print()
    print(f"## Reprotection after a cut-off: {meta['mem_mib']} MiB guest ({meta['churn_mib']} MiB churned), "
          f"{meta['disk_mib']} MiB disk{' filled with random data' if meta['fill_disk'] else ''}, "
          f"full syncs {'limited to ' + str(meta['rate_mbps']) + ' MB/s' if meta['rate_mbps'] else 'without rate limit'}, "
          f"{meta['runs']} runs, {meta['blip_s']} s blip (min / median / max)")
    print()
    print("| measure | min / median / max |")
    print("|---|---|")
    rows = [
        ("quick: held SET (sent during the cut) → OK, from heal, ms", "quick_held_ms"),
        ("quick: SET sent at heal (open connection) → OK, ms", "quick_fresh_ms"),
        ("quick: SET on a new connection opened at heal → OK, ms", "quick_newconn_ms"),
        ("quick: heal → backup's Welcome in primary log, ms", "quick_ready_after_heal_ms"),
        ("quick: Welcome → held SET OK, ms", "quick_held_after_ready_ms"),
        ("quick: resync size, MiB", "quick_resync_mib"),
        ("quick: resync pages", "quick_resync_pages"),
        ("quick: resync pause, µs", "quick_resync_pause_us"),
        ("quick: Welcome → 'protected' (primary log), ms", "quick_sync_ms"),
        ("full: backup restart → SET OK, ms", "full_from_restart_ms"),
        ("full: primary logs the new backup's first Welcome → SET OK, ms", "full_from_ready_ms"),
        ("full: backup restart → first Welcome in primary log, ms", "full_ready_after_restart_ms"),
        ("full: Welcome of the session that synced → SET OK, ms", "full_from_last_ready_ms"),
        ("full: failed full-sync sessions before the one that synced (or in all, if none did)", "full_failed_sessions"),
        ("full: sync duration, Welcome of the session that synced → 'protected' (primary log), ms", "full_sync_ms"),
        ("full: MiB queued (sum of 'MiB queued' of the session that synced; encoded size)", "full_sync_mib"),
        ("full: disk MiB in the pre-copy (non-zero disk chunks sent)", "full_precopy_disk_mib"),
        ("full: pre-copy slices/rounds (log lines)", "full_precopy_slices"),
        ("full: slices of pre-copy round 0", "full_round0_slices"),
        ("full: pre-copy rounds (round 0 counts once)", "full_precopy_rounds"),
        ("full: pre-copy round 0 pages", "full_round0_pages"),
        ("full: final pause, µs", "full_final_pause_us"),
        ("full: final pause pages", "full_final_pages"),
        ("full: MiB dropped by the rate limit (nft counter)", "full_rate_limit_dropped_mib"),
        ("after the full sync: 100 SETs, median latency, ms", "stay_set_median_ms"),
        ("after the full sync: 100 SETs + window, max latency, ms", "stay_set_max_ms"),
    ]
    for label, k in rows:
        print(f"| {label} | {mmm(s[k])} |")
    stayed = [x.get("stayed_protected") for x in f if "stayed_protected" in x]
    s["full_stayed_protected"] = f"{sum(1 for x in stayed if x)} of {len(f)}"
    print(f"| full: stayed protected (100 SETs OK, {meta['stay_s']} s of SETs OK, no 'replication lost' "
          f"nor new session) | {s['full_stayed_protected']} |")
    ini = b.initial
    if ini:
        s["initial_sync"] = ini
        print(f"| initial sync (primary start, no rate limit): Welcome → protected, ms | {fmt(ini.get('sync_ms'))} |")
        print(f"| initial sync: MiB queued / disk MiB / slices+rounds / final pause µs | "
              f"{fmt(ini.get('sync_mib'))} / {fmt(ini.get('precopy_disk_mib'))} / {fmt(ini.get('precopy_slices'))} / "
              f"{fmt(ini.get('final_pause_us'))} |")
    never = [x["run"] for x in f if not x.get("reprotected")]
    s["full_never_reprotected_runs"] = never
    if never:
        print(f"| full: runs never protected again within {meta['timeout_s']} s | {len(never)} of {len(f)} |")
    print()
    if ratio is not None:
        print(f"ratio full/quick (medians: restart→OK over heal→held OK): {ratio:.1f}x")
    if ratio_ready is not None:
        print(f"ratio full/quick (medians: Welcome→OK over heal→held OK): {ratio_ready:.1f}x")
    ratio_sync = None
    if s["full_from_last_ready_ms"] and s["quick_held_after_ready_ms"]:
        ratio_sync = s["full_from_last_ready_ms"]["median"] / s["quick_held_after_ready_ms"]["median"]
        print(f"ratio full/quick (medians: Welcome of the session that synced → OK, over Welcome → held OK; "
              f"the sync itself, without failure detection and reconnect delays): {ratio_sync:.0f}x")
    s["ratio_sync_only"] = ratio_sync
    s["ratio_full_over_quick"] = ratio
    s["ratio_full_from_ready_over_quick"] = ratio_ready
    return s


def main():
    ap = argparse.ArgumentParser(description="Benchmark: quick resync vs full sync after a backup is cut off")
    ap.add_argument("--mem-mib", type=int, default=256, help="guest RAM, MiB (default 256)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each kind (default 3)")
    ap.add_argument("--blip-s", type=float, default=2.0, help="how long the replication link is cut, s (default 2)")
    ap.add_argument("--out", help="write a JSON summary here")
    ap.add_argument("--index", type=int, choices=range(50, 60), metavar="50..59",
                    help="network index (namespace vmxbench<N>, 10.77.<N>.0/24); default: first free")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="timeout of each wait, s (default 120)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the primary/backup logs here before cleanup")
    ap.add_argument("--no-data-socket", dest="data_socket", action="store_false",
                    help="run the backup without its data socket (one connection)")
    ap.add_argument("--disk-mib", type=int, default=256, help="disk size, MiB (default 256)")
    ap.add_argument("--fill-disk", action="store_true",
                    help=f"fill the disk with random data before the VM starts (the first {FILL_ZERO_MIB} MiB, "
                         "the KV log, stay zero)")
    ap.add_argument("--rate-mbps", type=float, default=0.0,
                    help="limit the replication link to this many MB/s during the full-sync runs "
                         "(nftables in the namespace; 0: no limit, the default)")
    ap.add_argument("--churn-mib", type=int, default=None,
                    help="guest memory made non-zero by one CHURN pass, MiB (default: half of --mem-mib)")
    ap.add_argument("--stay-s", type=float, default=30.0,
                    help="after each full sync: 100 SETs, then this many seconds of one SET a second "
                         "with no 'replication lost' (default 30)")
    a = ap.parse_args()
    if a.rate_mbps < 0:
        ap.error("--rate-mbps must be >= 0")
    if a.churn_mib is not None and not 0 < a.churn_mib < a.mem_mib:
        ap.error("--churn-mib must be > 0 and below --mem-mib")
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mem_mib": a.mem_mib, "runs": a.runs, "blip_s": a.blip_s, "timeout_s": a.timeout_s,
        "disk_mib": a.disk_mib, "fill_disk": a.fill_disk, "rate_mbps": a.rate_mbps,
        "churn_mib": a.churn_mib if a.churn_mib is not None else a.mem_mib // 2, "stay_s": a.stay_s,
        "command": " ".join(sys.argv),
        "nproc": os.cpu_count(), "loadavg_before": os.getloadavg(), "uptime_before": uptime(),
    }
    try:
        with open("/proc/meminfo") as f:
            meta["mem_total_mib"] = int(f.readline().split()[1]) // 1024
    except OSError:
        pass
    say(f"uptime: {meta['uptime_before']}")
    say(f"{a.mem_mib} MiB guest ({meta['churn_mib']} MiB churned), {a.disk_mib} MiB disk"
        f"{' filled' if a.fill_disk else ''}, full syncs "
        f"{'at ' + str(a.rate_mbps) + ' MB/s' if a.rate_mbps else 'unlimited'}, {a.runs} runs, {a.blip_s} s blip; "
        f"load {meta['loadavg_before']}, "
        f"{meta['nproc']} CPUs, {meta.get('mem_total_mib')} MiB RAM")
    b = Bench(a)
    rc = 0
    summary = None
    try:
        kv = b.setup()
        b.fill(kv)
        for r in range(a.runs):
            b.settle(kv)
            say(f"quick run {r}: cutting the replication link for {a.blip_s} s")
            b.quick_run(r, kv)
        for r in range(a.runs):
            b.settle(kv)
            say(f"full run {r}: killing the backup, deleting its image, starting it again")
            if not b.full_run(r, kv):
                say(f"full run {r}: the VM was not protected again within {a.timeout_s} s; "
                    "no further full runs (its output stays held)")
                b.anomalies.append(f"full run {r}: never protected again within {a.timeout_s} s "
                                   "(the held SET got no reply)")
                break
        else:
            b.settle(kv)
    except (BenchError, Interrupted, OSError) as e:
        say(f"FAILED: {e}")
        b.anomalies.append(f"aborted: {e}")
        rc = 1
    finally:
        b.cleanup()
    meta["loadavg_after"] = os.getloadavg()
    meta["uptime_after"] = uptime()
    if b.results["quick"] or b.results["full"]:
        summary = summarize(b, meta)
    if b.anomalies:
        print()
        print("### Anomalies")
        for x in b.anomalies:
            print("- " + x)
        rc = rc or 2
    if b.notes:
        print()
        print("### Log lines worth a look (warnings/errors other than the expected loss of the backup)")
        seen = {}
        for x in b.notes:
            # the same message at another time or from another port counts once
            key = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z|127\.0\.0\.1:\d+", "…", x)
            if key in seen:
                seen[key][1] += 1
            else:
                seen[key] = [x, 1]
        for x, n in seen.values():
            print("- " + x + (f"  (×{n}, same message at other times)" if n > 1 else ""))
    say(f"load before {meta['loadavg_before']}, after {meta['loadavg_after']}; uptime now: {meta['uptime_after']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "summary": summary, "initial_sync": b.initial, "runs": b.results,
                       "anomalies": b.anomalies,
                       "log_notes": b.notes}, f, indent=2)
        say(f"summary written to {a.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
