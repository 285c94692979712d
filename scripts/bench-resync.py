#!/usr/bin/env python3
"""How fast a cut-off backup is protecting the VM again: quick resync vs full sync.

One protected VM (`vmatrix primary`) and one backup (`vmatrix backup`, on 127.0.0.1:7100), both
in a fresh network namespace vmxbench<N> (N in 50..59, scripts/netns.sh). The client side runs in
the root namespace and talks to the guest's KV service at 10.77.<N>.2:7000.

  1. setup: certificates, a 256 MiB disk, backup, primary; wait for the KV port;
  2. data: 500 SETs, then CHURN over half of guest RAM for one pass (RAM is non-zero), then idle;
  3. quick resync runs (--runs): with two client connections open, the replication link is cut
     (nftables drops UDP port 7100 both ways) for --blip-s seconds; a SET is sent during the cut
     (its reply is held: output commit); the link heals. Measured from the heal: (a) the held
     SET's OK, (b) a SET sent right at the heal on the other (already open) connection,
     (c) a SET on a brand-new TCP connection opened at the heal. The primary's log must show
     "quick resync from checkpoint ..." (its size and pause are captured);
  4. full sync runs (--runs): the backup is killed (SIGKILL), its image directory deleted and
     the backup started again (same flags, log appended); a SET sent right after the restart
     is timed until its OK, from the restart and from the moment the primary's log shows the
     new backup's Welcome ("backup ... ready (protocol vN); it holds nothing");
  5. cleanup (processes, namespace, temporary directory), also on errors and signals.

Usage (as root, /dev/kvm, nft installed; the binaries must be built):
  python3 scripts/bench-resync.py [--mem-mib 256] [--runs 3] [--blip-s 2] [--out summary.json]
                                  [--index 50..59] [--timeout-s 120] [--keep-logs DIR]
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
VMX = os.path.join(ROOT, "target", "release", "vmatrix")
GUEST = os.path.join(ROOT, "guest", "target", "x86_64-unknown-linux-gnu", "release", "vmatrix-guest")
NETNS = os.path.join(ROOT, "scripts", "netns.sh")
BACKUP_PORT = 7100
KV_PORT = 7000
PAGE = 4096
BLIP_TABLE = "vmxblip"
BLIP_RULES = (
    "table inet vmxblip {\n"
    "  chain input {\n"
    "    type filter hook input priority 0; policy accept;\n"
    f"    udp dport {BACKUP_PORT} drop\n"
    f"    udp sport {BACKUP_PORT} drop\n"
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
FINAL_RE = re.compile(r"full sync: final pause (\d+) µs, (\d+) pages")
PRECOPY_RE = re.compile(r"pre-copy round (\d+) \(checkpoint \d+\): (\d+) pages, \d+ disk bytes, ([\d.]+) MiB queued")
PROTECTED_RE = re.compile(r"protected: checkpoint (\d+) acknowledged (\d+) ms after the session's sync began")
READY_RE = re.compile(r"ready \(protocol v\d+\); it holds (.*)$")


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
        self.results = {"quick": [], "full": []}
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
                "--idle-timeout-ms", "500", "--log", "info"]

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
        run([VMX, "disk", "create", p["disk"], "--size-mib", "256"])
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
        log = read_from(p["plog"], 0)
        m = re.search(r"protected after (\d+) ms \((\d+) sync rounds, ([\d.]+) MiB\)", log)
        lost = [l for l in log.splitlines() if "replication lost" in l and "ERROR" in l]
        if lost:
            self.notes.append(f"initial sync: {len(lost)} failed session(s) before the VM was protected; "
                              "primary log:\n" + excerpt(log))
            say(f"initial sync: {len(lost)} failed session(s) first: {lost[0]}")
        if m:
            say(f"initial sync: protected after {m.group(1)} ms ({m.group(2)} rounds, {m.group(3)} MiB)")
        return kv

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
        pages = self.a.mem_mib * (1 << 20) // 2 // PAGE
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
        pm = PROTECTED_RE.search(text)
        out["session_protected_ms"] = int(pm.group(2)) if pm else None
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
        out = {"run": r, "kill_to_restart_ms": round((t_restart - t_kill) * 1e3, 1)}
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
            if "replication lost" in l or " lost: " in l:
                lt = log_time(l)
                if lt is not None:
                    out["lost_after_kill_ms"] = round((lt - t_kill_wall) * 1e3, 1)
                    break
        # Sessions after the restart: each begins with the backup's Welcome ("ready"); the one
        # that reached "protected" is the successful full sync, earlier ones failed.
        sessions = []
        for l in text.splitlines():
            m = READY_RE.search(l)
            lt = log_time(l)
            if m and lt is not None and lt >= t_restart_wall - 0.05:
                sessions.append({"t": lt, "holds": m.group(1), "lines": [l]})
            elif sessions:
                sessions[-1]["lines"].append(l)
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
        gtext = "\n".join(good["lines"]) if good else ""
        if good and w.t_wall:
            out["from_last_ready_ms"] = round((w.t_wall - good["t"]) * 1e3, 1)
            out["good_ready_after_restart_ms"] = round((good["t"] - t_restart_wall) * 1e3, 1)
        rounds = PRECOPY_RE.findall(gtext)
        out["precopy_rounds"] = len(rounds)
        out["precopy_round0_pages"] = int(rounds[0][1]) if rounds else None
        out["precopy_mib"] = round(sum(float(x[2]) for x in rounds), 1)
        fm = FINAL_RE.search(gtext)
        out["final_pause_us"] = int(fm.group(1)) if fm else None
        out["final_pages"] = int(fm.group(2)) if fm else None
        pm = PROTECTED_RE.search(text)
        out["session_protected_ms"] = int(pm.group(2)) if pm else None
        if RESYNC_RE.search(text):
            self.anomalies.append(f"full run {r}: a quick resync instead of a full sync:\n" + excerpt(text))
        if not fm and not FULLJOIN_RE.search(text):
            self.anomalies.append(f"full run {r}: no 'full sync: final pause' in the primary log; excerpt:\n"
                                  + excerpt(text))
        for l in text.splitlines():
            if unexpected(l):
                self.notes.append(f"full run {r}: primary log: {l}")
        for l in btext.splitlines():
            if unexpected(l):
                self.notes.append(f"full run {r}: backup log: {l}")
        if out["from_restart_ms"] is not None:  # otherwise every reply is held
            g = kv_main.cmd(f"GET full{r}")
            if g != "VALUE x":
                self.anomalies.append(f"full run {r}: GET full{r} -> {g!r}")
        say(f"full run {r}: SET OK {fmt(out['from_restart_ms'])} ms after the backup restart, "
            f"{fmt(out['from_ready_ms'])} ms after the primary logged the first Welcome "
            f"({fmt(out['ready_after_restart_ms'])} ms after the restart), {fmt(out['from_last_ready_ms'])} ms after "
            f"the Welcome of the session that synced ({out['failed_sessions']} failed session(s) before); "
            f"{out['precopy_rounds']} pre-copy rounds (round 0: {fmt(out['precopy_round0_pages'])} pages), "
            f"{out['precopy_mib']} MiB; final pause {fmt(out['final_pause_us'])} µs; connection lost "
            f"{fmt(out['lost_after_kill_ms'])} ms after the kill")
        out["reprotected"] = out["from_restart_ms"] is not None
        kv.close()
        self.results["full"].append(out)
        return out["reprotected"]

    # -- cleanup ---------------------------------------------------------------------------

    def cleanup(self):
        for kv in self.conns:
            kv.close()
        if self.blip_installed and self.ns:
            run(["ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", BLIP_TABLE], check=False)
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
        "full_from_restart_ms": stats([x.get("from_restart_ms") for x in f]),
        "full_from_ready_ms": stats([x.get("from_ready_ms") for x in f]),
        "full_ready_after_restart_ms": stats([x.get("ready_after_restart_ms") for x in f]),
        "full_from_last_ready_ms": stats([x.get("from_last_ready_ms") for x in f]),
        "full_failed_sessions": stats([x.get("failed_sessions") for x in f]),
        "full_round0_pages": stats([x.get("precopy_round0_pages") for x in f]),
        "full_precopy_mib": stats([x.get("precopy_mib") for x in f]),
        "full_final_pause_us": stats([x.get("final_pause_us") for x in f]),
        "full_session_protected_ms": stats([x.get("session_protected_ms") for x in f]),
    }
    ratio = None
    if s["full_from_restart_ms"] and s["quick_held_ms"]:
        ratio = s["full_from_restart_ms"]["median"] / s["quick_held_ms"]["median"]
    ratio_ready = None
    if s["full_from_ready_ms"] and s["quick_held_ms"]:
        ratio_ready = s["full_from_ready_ms"]["median"] / s["quick_held_ms"]["median"]
    print()
    print(f"## Reprotection after a cut-off: {meta['mem_mib']} MiB guest, {meta['runs']} runs, "
          f"{meta['blip_s']} s blip (min / median / max)")
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
        ("full: backup restart → SET OK, ms", "full_from_restart_ms"),
        ("full: primary logs the new backup's first Welcome → SET OK, ms", "full_from_ready_ms"),
        ("full: backup restart → first Welcome in primary log, ms", "full_ready_after_restart_ms"),
        ("full: Welcome of the session that synced → SET OK, ms", "full_from_last_ready_ms"),
        ("full: failed full-sync sessions before the one that synced (or in all, if none did)", "full_failed_sessions"),
        ("full: pre-copy round 0 pages", "full_round0_pages"),
        ("full: pre-copy MiB queued (all rounds of the session that synced; encoded size)", "full_precopy_mib"),
        ("full: final pause, µs", "full_final_pause_us"),
        ("full: 'protected' ms after session's sync began (primary log)", "full_session_protected_ms"),
    ]
    for label, k in rows:
        print(f"| {label} | {mmm(s[k])} |")
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
    a = ap.parse_args()
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mem_mib": a.mem_mib, "runs": a.runs, "blip_s": a.blip_s, "timeout_s": a.timeout_s,
        "nproc": os.cpu_count(), "loadavg_before": os.getloadavg(),
    }
    try:
        with open("/proc/meminfo") as f:
            meta["mem_total_mib"] = int(f.readline().split()[1]) // 1024
    except OSError:
        pass
    say(f"{a.mem_mib} MiB guest, {a.runs} runs, {a.blip_s} s blip; load {meta['loadavg_before']}, "
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
    say(f"load before {meta['loadavg_before']}, after {meta['loadavg_after']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "summary": summary, "runs": b.results, "anomalies": b.anomalies,
                       "log_notes": b.notes}, f, indent=2)
        say(f"summary written to {a.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
