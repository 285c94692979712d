#!/usr/bin/env python3
"""Failover figures of the manager and its agents, on one cluster of three hosts.

One cluster (scripts/cluster.sh: hosts <name>a/b/c as network namespaces, default name vmxb,
index 240: replication network 10.78.<index>.0/24, clients' LAN 10.77.<index>.0/24), the
manager in the root namespace (`vmatrix manager`, API on a free loopback port), an agent per
host (`ip netns exec <ns> vmatrix agent ...`, as scripts/demo.sh), one protected VM `web`
(64 MiB, --disk-mib 64, one backup). A client written here (one TCP connection to the guest
10.77.<index>.2:7000; `SET w<n> v<n>` -> `OK`, closed loop, one write every --every-ms) writes
for the whole run; it records the time of each send and the kernel's receive time of each reply
(SO_TIMESTAMPNS, CLOCK_REALTIME: comparable with the manager's event times). Event times come
from the manager's event log (its --events file, RFC 3339 `time` of each line).

  1. crash (--crashes N, --seed S): when every host is up, the VM protected and writes flow,
     wait a random moment (uniform in --crash-delay-s; the only random choice), then crash the
     primary's host (`cluster.sh kill <name> <host>`: its links go down, then every process in
     it gets SIGKILL). The crash instant is when both of its links are seen down (the root-side
     veths' IFF_UP flag, polled every 0.5 ms). Measured: crash -> `detected` (detection),
     `detected` -> `promoting` (decision), `promoting` -> `primary_running` (promotion), crash ->
     the first reply the client receives on its connection (client-visible), crash ->
     `protected` at the new term (re-protection), and the client's longest wait for one write
     across it. Then `cluster.sh revive` and a new agent on that host (its old processes are
     dead; it keeps its state directory), so the next crash has three hosts again. At the end,
     every acknowledged write is read back (GET each, pipelined, on the same connection).
  2. migration (--migrations N): `vmatrix vm migrate web --to <host>` while the client writes,
     alternating between the host of the backup (already synced) and the spare host (a backup
     syncs there first); measured: the client's longest wait for one write from the command to
     the VM protected at the new term, the longest gap between two replies, and the manager's
     phases. Every acknowledged write is read back.
  3. hog (--hog-minutes M for each of --detect-values, default "default,100,200"): the
     manager is restarted with that --detect-ms ("default": no flag); with the VM protected
     and a light client load (one write every --hog-every-ms), --hogs N processes spin
     (`python3 -c 'while True: pass'`, nice 0) in the primary host's namespace (or the root
     namespace with --hog-ns root; CPU scheduling ignores namespaces) for M minutes; nothing
     fails, so every `detected` event is a false failover. Counted: detected, host_down,
     term_changed, backup_lost; failovers per hour (and a 95 % Poisson upper bound); the largest
     `silent_ms` of any host seen in /v1/hosts (sampled every 100 ms); the client's longest
     wait. Optionally the same without hogs first (--baseline-minutes). The windows are split
     into --hog-rounds rounds (default 5), each value in turn in every round (the order
     rotates), so a change of the machine's background load falls on every value alike. Every
     acknowledged write is read back.

Conditions are recorded along the way: the 1-minute load average and the machine's CPU busy
share (/proc/stat, every second), and the other cargo/rustc/vmatrix/bench processes running on
the machine at the start of each part (other people's tests on a shared machine).

Output: progress lines, then a Markdown block for docs/BENCHMARKS.md (command, date, machine:
`nproc`, `uname -r`, conditions); --out writes every measurement as JSON.

Usage (as root, /dev/kvm; builds target/release/vmatrix with cargo if it is missing; the guest
ELF must be built: scripts/build-guest.sh):
  python3 scripts/bench-failover.py [--crashes 30] [--seed S] [--migrations 10]
      [--hog-minutes 5] [--detect-values default,100,200] [--hogs 2] [--hog-ns primary|root]
      [--hog-rounds 5] [--baseline-minutes 0] [--every-ms 2] [--hog-every-ms 20] [--parts crash,migrate,hog]
      [--crash-delay-s 1,3] [--name vmxb] [--index 240] [--timeout-s 60] [--vmx PATH]
      [--out results.json] [--md table.md] [--keep-logs DIR]
The binary is copied into the run's temporary directory first, so a concurrent `cargo build`
cannot change it halfway. The cluster is always torn down (`cluster.sh down <name>`), also on
errors and signals. Python 3 standard library only.
"""

import argparse
import calendar
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMX_BUILT = os.path.join(ROOT, "target", "release", "vmatrix")
GUEST = os.path.join(ROOT, "guest", "target", "x86_64-unknown-linux-gnu", "release", "vmatrix-guest")
CLUSTER = os.path.join(ROOT, "scripts", "cluster.sh")
HOSTS = ["a", "b", "c"]
VM = "web"
KV_PORT = 7000
BACKUP_PORT = 7100
MGR_PORT = 7700
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux: SO_TIMESTAMPNS_OLD = SCM_TIMESTAMPNS
IFF_UP = 0x1

T0 = time.monotonic()


def say(msg):
    print(f"[bench-failover {time.monotonic() - T0:7.1f}s] {msg}", flush=True)


class BenchError(Exception):
    pass


class Interrupted(BaseException):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


def run(cmd, check=True, timeout=120, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()}")
    return r


# ---------------------------------------------------------------------------------------------
# Figures


def pct(values, p):
    """Nearest-rank percentile (with fewer than 100 values, p99 is the maximum)."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    k = max(0, min(len(v) - 1, math.ceil(p / 100.0 * len(v)) - 1))
    return v[k]


def summary(values):
    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99), "max": max(v), "min": min(v),
            "mean": statistics.mean(v)}


def poisson_upper(k, conf=0.95):
    """One-sided upper confidence bound of a Poisson mean after observing k events."""
    def cdf(lam):
        term, acc = math.exp(-lam), 0.0
        for i in range(k + 1):
            if i:
                term *= lam / i
            acc += term
        return acc
    lo, hi = 0.0, k + 10.0 * math.sqrt(k + 1) + 10
    for _ in range(100):
        mid = (lo + hi) / 2
        if cdf(mid) > 1 - conf:
            lo = mid
        else:
            hi = mid
    return hi


def ms(x):
    return None if x is None else round(x * 1e3, 1)


def fmt(x, unit=""):
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.0f}{unit}" if abs(x) >= 10 else f"{x:.1f}{unit}"
    return f"{x}{unit}"


# ---------------------------------------------------------------------------------------------
# The client: one TCP connection, closed loop, kernel receive timestamps


class Client:
    """Writes `SET <prefix><n> v<n>` on one connection, one at a time, one every `every` s.
    For write n: sends[n] (wall clock just before the send), replies[n] (kernel receive time of
    the reply's last segment), oks[n]."""

    def __init__(self, addr, every_ms, prefix="w", timeout=180.0):
        self.addr = addr
        self.prefix = prefix
        self.every = every_ms / 1000.0
        self.sock = socket.create_connection(addr, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.sends, self.replies, self.oks, self.answers = [], [], [], []
        self.go = threading.Event()
        self.idle = threading.Event()
        self.stop = False
        self.error = None
        self.thread = threading.Thread(target=self.loop, name="client", daemon=True)

    def start(self):
        self.go.set()
        self.thread.start()

    def readline(self):
        """One reply line and the kernel receive time of the segment that completed it."""
        ts = None
        while b"\n" not in self.buf:
            data, anc, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(16))
            if not data:
                raise BenchError("the guest closed the client's connection")
            ts = None
            for lvl, typ, d in anc:
                if lvl == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(d) >= 16:
                    sec, nsec = struct.unpack("qq", d[:16])
                    ts = sec + nsec / 1e9
            if ts is None:
                ts = time.time()
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace").strip(), (ts if ts is not None else time.time())

    def loop(self):
        try:
            while not self.stop:
                if not self.go.is_set():
                    self.idle.set()
                    self.go.wait()
                    continue
                n = len(self.sends)
                t = time.time()
                self.sock.sendall(f"SET {self.prefix}{n} v{n}\n".encode())
                self.sends.append(t)
                line, tr = self.readline()
                self.answers.append(line)
                self.oks.append(line == "OK")
                self.replies.append(tr)
                left = t + self.every - time.time()
                if left > 0:
                    time.sleep(left)
        except Exception as e:  # reported by the bench
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.idle.set()

    def last_reply(self):
        return self.replies[-1] if self.replies else None

    def pause(self, timeout=120):
        self.idle.clear()
        self.go.clear()
        if not self.idle.wait(timeout):
            raise BenchError("the client did not pause (a reply is overdue)")

    def resume(self):
        self.idle.clear()
        self.go.set()

    def verify(self, batch=100):
        """With the writer paused: GET every acknowledged key on the same connection
        (pipelined); returns (acknowledged, present, wrong examples)."""
        acked = [n for n, ok in enumerate(self.oks) if ok]
        wrong = []
        present = 0
        for i in range(0, len(acked), batch):
            part = acked[i:i + batch]
            self.sock.sendall("".join(f"GET {self.prefix}{n}\n" for n in part).encode())
            for n in part:
                line, _ = self.readline()
                if line == f"VALUE v{n}":
                    present += 1
                elif len(wrong) < 10:
                    wrong.append(f"GET {self.prefix}{n} -> {line!r}")
        return len(acked), present, wrong

    def window(self, t_from, t_to):
        """Writes sent in [t_from, t_to]: the longest wait (send -> reply), and the longest gap
        between two consecutive replies received in [t_from, t_to + longest wait]."""
        n = len(self.replies)
        idx = [i for i in range(n) if t_from <= self.sends[i] <= t_to]
        if not idx:
            return None
        waits = [(self.replies[i] - self.sends[i], i) for i in idx]
        w, wi = max(waits)
        lo, hi = idx[0], idx[-1]
        gaps = [self.replies[i] - self.replies[i - 1] for i in range(max(1, lo), min(n, hi + 2))]
        return {"writes": len(idx), "longest_wait": w, "longest_wait_write": wi,
                "longest_gap": max(gaps) if gaps else None}

    def first_reply_after(self, t):
        for i in range(max(0, len(self.replies) - 20000), len(self.replies)):
            if self.replies[i] > t:
                return i, self.replies[i]
        return None, None

    def close(self):
        self.stop = True
        self.go.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)


# ---------------------------------------------------------------------------------------------
# The manager's event log


TIME_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z$")


def rfc3339(s):
    m = TIME_RE.match(s or "")
    if not m:
        return None
    base = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
    return base + (float("0." + m.group(2)) if m.group(2) else 0.0)


class Events:
    """The manager's --events file, read incrementally (a torn last line waits for its end)."""

    def __init__(self, path):
        self.path = path
        self.off = 0
        self.partial = b""
        self.items = []

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.off)
                data = f.read()
        except FileNotFoundError:
            return self.items
        self.off += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for l in lines:
            try:
                e = json.loads(l)
            except ValueError:
                continue
            e["t"] = rfc3339(e.get("time")) or (e.get("unix_ms", 0) / 1e3)
            self.items.append(e)
        return self.items

    def since(self, i, kind=None, vm=VM, term=None):
        """Events from index i on, of `kind`, about `vm` (host events: any), at `term`."""
        out = []
        for e in self.poll()[i:]:
            if kind and e.get("kind") != kind:
                continue
            if vm and e.get("kind") not in ("host_down", "host_up") and e.get("vm") != vm:
                continue
            if term is not None and e.get("term") != term:
                continue
            out.append(e)
        return out


# ---------------------------------------------------------------------------------------------
# Conditions: load, CPU busy, other people's processes


def cpu_times():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]), idle


class Monitor(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True, name="monitor")
        self.samples = []  # (wall, load1, busy share of the last second)
        self.stop = False

    def run(self):
        last = cpu_times()
        while not self.stop:
            time.sleep(1.0)
            cur = cpu_times()
            dt, di = cur[0] - last[0], cur[1] - last[1]
            last = cur
            busy = (dt - di) / dt if dt > 0 else None
            self.samples.append((time.time(), os.getloadavg()[0], busy))

    def between(self, a, b):
        s = [x for x in self.samples if a <= x[0] <= b]
        if not s:
            return None
        loads = [x[1] for x in s]
        busy = [x[2] for x in s if x[2] is not None]
        return {"load1_min": min(loads), "load1_mean": statistics.mean(loads), "load1_max": max(loads),
                "cpu_busy_mean": statistics.mean(busy) if busy else None, "samples": len(s)}


OTHER_RE = re.compile(r"(^|/)(cargo|rustc|vmatrix|vmatrix-[\w-]+|[\w-]+-[0-9a-f]{16})\b|bench-|test\.sh")


def netns_inodes(names):
    out = set()
    for n in names:
        try:
            out.add(os.stat(f"/run/netns/{n}").st_ino)
        except OSError:
            pass
    return out


def other_processes(own_ns, own_pids):
    """Other people's cargo/rustc/vmatrix/bench processes (not ours: not in our namespaces, not
    our children): a count and a few distinct command lines."""
    found = {}
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        pid = int(d)
        if pid == me or pid in own_pids:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            ns = os.stat(f"/proc/{pid}/ns/net").st_ino
        except (OSError, ValueError, IndexError):
            continue
        if not args or ppid == me or ns in own_ns:
            continue
        if not OTHER_RE.search(" ".join(args[:3])):
            continue
        short = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(args[:6]))
        short = re.sub(r"-[0-9a-f]{16}\b", "", short)[:90]
        found[short] = found.get(short, 0) + 1
    return {"count": sum(found.values()), "commands": sorted(found, key=lambda k: -found[k])[:8]}


# ---------------------------------------------------------------------------------------------
# The cluster


def watch_links(devs, deadline, out):
    """Records (in out[dev]) when each device's IFF_UP flag is first seen clear."""
    while time.time() < deadline and len(out) < len(devs):
        for d in devs:
            if d in out:
                continue
            try:
                with open(f"/sys/class/net/{d}/flags") as f:
                    flags = int(f.read().strip(), 16)
            except (OSError, ValueError):
                out[d] = time.time()
                continue
            if not flags & IFF_UP:
                out[d] = time.time()
        time.sleep(0.0005)


class Cluster:
    def __init__(self, a, tmp):
        self.a = a
        self.name = a.name
        self.idx = a.index
        self.tmp = tmp
        self.vmx = os.path.join(tmp, "vmatrix")
        self.pki = os.path.join(tmp, "pki")
        self.api = None
        self.env = dict(os.environ)
        self.manager = None
        self.manager_log = None
        self.detect = None  # --detect-ms of the running manager (None: its default)
        self.agents = {}
        self.logs = []
        self.up = False
        self.events = Events(os.path.join(tmp, "events.jsonl"))

    def ns(self, h):
        return f"{self.name}{h}"

    def repl_ip(self, h):
        return f"10.78.{self.idx}.{HOSTS.index(h) + 1}"

    def mgr_addr(self):
        return f"10.78.{self.idx}.254:{MGR_PORT}"

    def guest_addr(self):
        return (f"10.77.{self.idx}.2", KV_PORT)

    def own_pids(self):
        p = {x.pid for x in self.agents.values()}
        if self.manager:
            p.add(self.manager.pid)
        return p

    def vmx_run(self, *args, check=True):
        return run([self.vmx, *args], check=check, env=self.env)

    def setup(self):
        shutil.copy2(self.a.vmx, self.vmx)
        existing = run(["ip", "netns", "list"]).stdout
        for h in HOSTS:
            if re.search(rf"^{self.ns(h)}\b", existing, re.M):
                raise BenchError(f"namespace {self.ns(h)} exists already (someone else's cluster?): "
                                 f"pick another --name")
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.api = f"127.0.0.1:{s.getsockname()[1]}"
        s.close()
        self.env["VMATRIX_MANAGER"] = self.api
        say(f"cluster {self.name} (index {self.idx}): hosts {', '.join(self.ns(h) for h in HOSTS)}; "
            f"manager {self.mgr_addr()}, API {self.api}; guest {self.guest_addr()[0]}:{KV_PORT}; temp {self.tmp}")
        self.up = True
        run([CLUSTER, "up", self.name, str(self.idx), "3"])
        self.vmx_run("certs", "init", self.pki)
        self.vmx_run("certs", "issue", self.pki, "--host", "manager", "--role", "manager")
        for h in HOSTS:
            self.vmx_run("certs", "issue", self.pki, "--host", h, "--role", "agent", "--role", "primary",
                         "--role", "backup")
        self.start_manager(None)
        for h in HOSTS:
            self.start_agent(h)
        self.wait(lambda: self.hosts_up() == len(HOSTS), 30, "three hosts up")
        self.vmx_run("vm", "create", VM, "--mem-mib", "64", "--disk-mib", "64", "--backups", "1",
                     "--port", str(BACKUP_PORT), "--guest-config",
                     f"ip=10.77.{self.idx}.2/24,gw=10.77.{self.idx}.1,port={KV_PORT}")
        v = self.wait(lambda: (lambda v: v if v and v["status"] == "protected" else None)(self.vm()), 60,
                      "the VM protected")
        say(f"VM {VM}: primary {v['primary']}, backups {[b['host'] for b in v['backups']]}, term {v['term']}")

    def start_manager(self, detect_ms):
        if self.manager_log is None:
            self.manager_log = open(os.path.join(self.tmp, "manager.log"), "ab")
        cmd = [self.vmx, "--log", "info", "manager", "--listen", self.mgr_addr(), "--api", self.api,
               "--state", os.path.join(self.tmp, "manager.state"),
               "--events", os.path.join(self.tmp, "events.jsonl"), "--certs", self.pki, "--host", "manager"]
        if detect_ms is not None:
            cmd += ["--detect-ms", str(detect_ms)]
        self.manager_log.write(f"==== bench-failover: {' '.join(cmd)}\n".encode())
        self.manager_log.flush()
        self.manager = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.manager_log,
                                        stderr=self.manager_log)
        self.detect = detect_ms
        self.wait(lambda: self.api_get("/v1/hosts") is not None, 20, "the manager's API")

    def stop_manager(self):
        if self.manager is None:
            return
        if self.manager.poll() is None:
            self.manager.terminate()
            try:
                self.manager.wait(15)
            except subprocess.TimeoutExpired:
                self.manager.kill()
                self.manager.wait()
        self.manager = None

    def start_agent(self, h):
        log = open(os.path.join(self.tmp, f"agent-{h}.log"), "ab")
        self.logs.append(log)
        cmd = ["ip", "netns", "exec", self.ns(h), self.vmx, "--log", "info", "agent",
               "--manager", self.mgr_addr(), "--certs", self.pki, "--host", h,
               "--repl-ip", self.repl_ip(h), "--state-dir", os.path.join(self.tmp, f"host-{h}"),
               "--guest", GUEST]
        log.write(f"==== bench-failover: {' '.join(cmd)}\n".encode())
        log.flush()
        self.agents[h] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def kill_host(self, h):
        """cluster.sh kill; returns (t_start, t_links_down, t_end, per-link down times)."""
        devs = [f"{self.name}{h}l", f"{self.name}{h}r"]
        seen = {}
        w = threading.Thread(target=watch_links, args=(devs, time.time() + 10, seen), daemon=True)
        w.start()
        t0 = time.time()
        r = run([CLUSTER, "kill", self.name, h], check=False)
        t1 = time.time()
        w.join(10)
        if r.returncode != 0:
            raise BenchError(f"cluster.sh kill {self.name} {h}: {r.stderr.strip()}")
        ag = self.agents.pop(h, None)
        if ag is not None:
            try:
                ag.wait(10)
            except subprocess.TimeoutExpired:
                pass
        t_down = max(seen.values()) if len(seen) == len(devs) else None
        return t0, t_down, t1, {d: seen.get(d) for d in devs}

    def revive(self, h):
        run([CLUSTER, "revive", self.name, h])
        self.start_agent(h)

    def api_get(self, path):
        try:
            with urllib.request.urlopen(f"http://{self.api}{path}", timeout=3) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def vm(self):
        return self.api_get(f"/v1/vms/{VM}")

    def hosts(self):
        return self.api_get("/v1/hosts") or []

    def hosts_up(self):
        return sum(1 for x in self.hosts() if x.get("status") == "up" and x.get("connected"))

    def check_alive(self):
        if self.manager is not None and self.manager.poll() is not None:
            raise BenchError(f"the manager exited ({self.manager.returncode}); see manager.log")

    def wait(self, cond, timeout, what, every=0.05):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.check_alive()
            v = cond()
            if v:
                return v
            time.sleep(every)
        raise BenchError(f"timed out after {timeout} s waiting for {what}; VM: {self.vm()}; "
                         f"hosts: {[(x['name'], x['status']) for x in self.hosts()]}")

    def teardown(self):
        self.stop_manager()
        if self.up:
            run([CLUSTER, "down", self.name], check=False)
            self.up = False
        for p in self.agents.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.agents = {}
        for f in self.logs + ([self.manager_log] if self.manager_log else []):
            f.close()


# ---------------------------------------------------------------------------------------------
# The bench


class Bench:
    def __init__(self, a, tmp):
        self.a = a
        self.c = Cluster(a, tmp)
        self.client = None
        self.hogs = []
        self.mon = Monitor()
        self.res = {"crash": [], "migrate": [], "hog": [], "verify": [], "conditions": {}}
        self.anomalies = []
        self.rng = random.Random(a.seed)

    def ready(self, timeout=None, flow_s=0.5):
        """Every host up, the VM protected, and the client's writes flowing."""
        c = self.c

        def ok():
            self.check_client()
            v = c.vm()
            if not v or v["status"] != "protected" or c.hosts_up() != len(HOSTS):
                return None
            lr = self.client.last_reply()
            if lr is None or time.time() - lr > max(flow_s, 5 * self.client.every):
                return None
            return v
        return c.wait(ok, timeout or self.a.timeout_s, "every host up, the VM protected, writes flowing")

    def check_client(self):
        if self.client.error:
            raise BenchError(f"the client's connection failed: {self.client.error}")

    def verify(self, part):
        t = time.time()
        self.client.pause()
        try:
            acked, present, wrong = self.client.verify()
        finally:
            self.client.resume()
        r = {"part": part, "acknowledged": acked, "present": present, "wrong": wrong,
             "errors": sum(1 for x in self.client.answers if x != "OK"), "seconds": round(time.time() - t, 1)}
        self.res["verify"].append(r)
        say(f"{part}: {present} of {acked} acknowledged writes present (GET each on the same connection, "
            f"{r['seconds']} s); {r['errors']} non-OK answers")
        if present != acked or r["errors"]:
            self.anomalies.append(f"{part}: {acked - present} acknowledged writes missing or wrong: {wrong}; "
                                  f"non-OK answers: {sorted(set(x for x in self.client.answers if x != 'OK'))[:5]}")
        return r

    def conditions(self, part, t0, t1, others):
        c = self.mon.between(t0, t1) or {}
        c.update({"start": t0, "end": t1, "other_processes": others})
        self.res["conditions"][part] = c
        return c

    # -- 1. crashes ------------------------------------------------------------------------

    def crashes(self):
        a, c = self.a, self.c
        t_part = time.time()
        others = other_processes(netns_inodes(c.ns(h) for h in HOSTS), c.own_pids())
        say(f"crash part: {a.crashes} crashes, seed {a.seed}; other processes: {others['count']} "
            f"{others['commands'][:4]}")
        lo, hi = a.crash_delay_s
        for k in range(a.crashes):
            v = self.ready()
            delay = self.rng.uniform(lo, hi)
            time.sleep(delay)
            v = c.vm()
            if not v or v["status"] != "protected":
                v = self.ready()
            primary, term = v["primary"], v["term"]
            ev0 = len(c.events.poll())
            t0, t_down, t1, links = c.kill_host(primary)
            t_crash = t_down or t0
            out = {"crash": k, "host": primary, "term": term, "delay_s": round(delay, 3),
                   "kill_cmd_ms": ms(t1 - t0), "links_down_after_cmd_ms": ms(t_down - t0) if t_down else None,
                   "t_crash": t_crash}
            try:
                prot = c.wait(lambda: [e for e in c.events.since(ev0, "protected") if (e.get("term") or 0) > term],
                              a.timeout_s, f"crash {k}: the VM protected at a new term", every=0.02)
                self.check_client()
                self.crash_figures(out, ev0, term, t_crash, prot[0])
            finally:
                self.res["crash"].append(out)
            say(f"crash {k}: host {primary} (term {term}) after {delay:.2f} s; detected {fmt(out.get('detect_ms'))} ms, "
                f"decision {fmt(out.get('decision_ms'))} ms, promotion {fmt(out.get('promotion_ms'))} ms, "
                f"first reply {fmt(out.get('client_ms'))} ms, protected {fmt(out.get('reprotect_ms'))} ms; "
                f"longest write {fmt(out.get('longest_wait_ms'))} ms; new primary {out.get('new_primary')} "
                f"(term {out.get('new_term')}); links down {fmt(out['links_down_after_cmd_ms'])} ms into "
                f"cluster.sh kill ({fmt(out['kill_cmd_ms'])} ms)")
            c.revive(primary)
        self.ready()
        self.verify("crash")
        self.conditions("crash", t_part, time.time(), others)

    def crash_figures(self, out, ev0, term, t_crash, prot):
        c = self.c
        new_term = prot["term"]
        det = c.events.since(ev0, "detected")
        prom = c.events.since(ev0, "promoting", term=new_term)
        run_ = c.events.since(ev0, "primary_running", term=new_term)
        out.update(new_term=new_term, new_primary=prom[0]["host"] if prom else None,
                   detected_events=len(det), detected_detail=det[0]["detail"] if det else None)
        if new_term != term + 1:
            self.anomalies.append(f"crash {out['crash']}: protected at term {new_term}, expected {term + 1} "
                                  f"({len(det)} detections)")
        if len(det) != 1:
            self.anomalies.append(f"crash {out['crash']}: {len(det)} detected events for one crash: "
                                  f"{[e['detail'] for e in det]}")
        t_det = det[0]["t"] if det else None
        t_prom = prom[0]["t"] if prom else None
        t_run = run_[0]["t"] if run_ else None
        out["detect_ms"] = ms(t_det - t_crash) if t_det else None
        out["decision_ms"] = ms(t_prom - t_det) if t_prom and t_det else None
        out["promotion_ms"] = ms(t_run - t_prom) if t_run and t_prom else None
        out["reprotect_ms"] = ms(prot["t"] - t_crash)
        out["reprotect_after_running_ms"] = ms(prot["t"] - t_run) if t_run else None
        # The first reply after the crash (kernel receive time): it comes from the new primary.
        deadline = time.time() + self.a.timeout_s
        i, tr = self.client.first_reply_after(t_crash)
        while i is None and time.time() < deadline:
            self.check_client()
            time.sleep(0.01)
            i, tr = self.client.first_reply_after(t_crash)
        out["client_ms"] = ms(tr - t_crash) if tr else None
        if i is not None:
            out["first_reply_write"] = i
            out["first_reply_sent_before_crash_ms"] = ms(t_crash - self.client.sends[i])
        w = self.client.window(t_crash - 1.0, max(prot["t"], tr or 0))
        if w:
            out["longest_wait_ms"] = ms(w["longest_wait"])
            out["longest_gap_ms"] = ms(w["longest_gap"])

    # -- 2. migrations ---------------------------------------------------------------------

    def migrations(self):
        a, c = self.a, self.c
        t_part = time.time()
        others = other_processes(netns_inodes(c.ns(h) for h in HOSTS), c.own_pids())
        say(f"migration part: {a.migrations} migrations; other processes: {others['count']} {others['commands'][:4]}")
        for k in range(a.migrations):
            v = self.ready()
            time.sleep(1.0)
            v = c.vm() if (c.vm() or {}).get("status") == "protected" else self.ready()
            primary, term = v["primary"], v["term"]
            backups = [b["host"] for b in v["backups"]]
            spare = [h for h in HOSTS if h != primary and h not in backups]
            kind = "backup" if k % 2 == 0 or not spare else "spare"
            target = backups[0] if kind == "backup" else spare[0]
            ev0 = len(c.events.poll())
            t_cmd = time.time()
            c.vmx_run("vm", "migrate", VM, "--to", target)
            out = {"migration": k, "from": primary, "to": target, "target_kind": kind, "term": term}
            try:
                prot = c.wait(lambda: [e for e in c.events.since(ev0, "protected") if (e.get("term") or 0) > term],
                              a.timeout_s, f"migration {k}: the VM protected at a new term", every=0.02)[0]
                self.check_client()
                new_term = prot["term"]
                prom = c.events.since(ev0, "promoting", term=new_term)
                run_ = c.events.since(ev0, "primary_running", term=new_term)
                det = c.events.since(ev0, "detected")
                unplanned = [e for e in det if "planned migration" not in (e.get("detail") or "")]
                hand = [e for e in c.events.since(ev0, "handover") if "abandoned" not in (e.get("detail") or "")]
                abandoned = [e for e in c.events.since(ev0, "handover") if "abandoned" in (e.get("detail") or "")]
                if abandoned:
                    self.anomalies.append(f"migration {k}: {[e['detail'] for e in abandoned]}")
                out.update(new_term=new_term, new_primary=prom[0]["host"] if prom else None,
                           cmd_to_promoting_ms=ms(prom[0]["t"] - t_cmd) if prom else None,
                           cmd_to_handover_ms=ms(hand[0]["t"] - t_cmd) if hand else None,
                           handover_ms=ms(prom[0]["t"] - hand[0]["t"]) if hand and prom else None,
                           abandoned=len(abandoned),
                           promotion_ms=ms(run_[0]["t"] - prom[0]["t"]) if prom and run_ else None,
                           cmd_to_protected_ms=ms(prot["t"] - t_cmd), unplanned_detections=len(unplanned))
                if out["new_primary"] != target or new_term != term + 1 or unplanned:
                    self.anomalies.append(f"migration {k}: to {target}, got primary {out['new_primary']} at term "
                                          f"{new_term} (from {term}); unplanned detections: "
                                          f"{[e['detail'] for e in unplanned]}")
                time.sleep(0.3)
                w = self.client.window(t_cmd, prot["t"] + 0.2)
                if w:
                    out.update(longest_wait_ms=ms(w["longest_wait"]), longest_gap_ms=ms(w["longest_gap"]),
                               writes=w["writes"])
            finally:
                self.res["migrate"].append(out)
            say(f"migration {k}: {primary} -> {target} ({kind}): longest write {fmt(out.get('longest_wait_ms'))} ms, "
                f"longest gap {fmt(out.get('longest_gap_ms'))} ms; command -> handover "
                f"{fmt(out.get('cmd_to_handover_ms'))} ms, handover -> promoting {fmt(out.get('handover_ms'))} ms, "
                f"command -> promoting {fmt(out.get('cmd_to_promoting_ms'))} ms, promotion {fmt(out.get('promotion_ms'))} ms, "
                f"-> protected {fmt(out.get('cmd_to_protected_ms'))} ms")
        self.ready()
        self.verify("migrate")
        self.conditions("migrate", t_part, time.time(), others)

    # -- 3. CPU hogs -----------------------------------------------------------------------

    def start_hogs(self, primary):
        cmd = [sys.executable, "-c", "while True: pass"]
        for _ in range(self.a.hogs):
            full = cmd if self.a.hog_ns == "root" else ["ip", "netns", "exec", self.c.ns(primary)] + cmd
            self.hogs.append(subprocess.Popen(full, stdin=subprocess.DEVNULL))

    def stop_hogs(self):
        for p in self.hogs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.hogs = []

    def observe(self, seconds):
        """Samples /v1/hosts every 100 ms for `seconds`: the largest silent_ms of each host."""
        c = self.c
        worst = {}
        t_end = time.time() + seconds
        while time.time() < t_end:
            c.check_alive()
            self.check_client()
            for h in c.hosts():
                worst[h["name"]] = max(worst.get(h["name"], 0), h.get("silent_ms") or 0)
            c.events.poll()
            time.sleep(0.1)
        return worst

    def window_counts(self, ev0, t0, t1):
        evs = [e for e in self.c.events.poll()[ev0:] if t0 <= e["t"] <= t1]
        kinds = {}
        for e in evs:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        det = [e for e in evs if e["kind"] == "detected"]
        return kinds, det

    def hog_runs(self):
        """Rounds: in each, every --detect-ms value in turn (the order rotates from round to
        round) gets its baseline window (if any) and its hog window, so a change of the
        machine's background load during the part falls on every value alike."""
        a, c = self.a, self.c
        t_part = time.time()
        others = other_processes(netns_inodes(c.ns(h) for h in HOSTS), c.own_pids())
        say(f"hog part: {a.hogs} hog(s) in the {'primary host' if a.hog_ns == 'primary' else 'root'} namespace, "
            f"{a.hog_minutes} min per --detect-ms in {a.detect_values} ({a.hog_rounds} round(s)); "
            f"other processes: {others['count']} {others['commands'][:4]}")
        self.client.every = a.hog_every_ms / 1000.0
        try:
            for r in range(a.hog_rounds):
                k = r % len(a.detect_values)
                for d in a.detect_values[k:] + a.detect_values[:k]:
                    self.hog_windows(r, d)
        finally:
            self.stop_hogs()
            self.client.every = a.every_ms / 1000.0
        self.ready(timeout=max(a.timeout_s, 60))
        self.verify("hog")
        self.conditions("hog", t_part, time.time(), others)

    def hog_windows(self, r, d):
        a, c = self.a, self.c
        detect = None if d == "default" else int(d)
        say(f"hog round {r}: restarting the manager with "
            f"{'its default --detect-ms' if detect is None else f'--detect-ms {detect}'}")
        c.stop_manager()
        c.start_manager(detect)
        self.ready(timeout=max(a.timeout_s, 60))
        time.sleep(2.0)
        for kind, minutes in (("baseline", a.baseline_minutes), ("hog", a.hog_minutes)):
            minutes /= a.hog_rounds
            if minutes <= 0:
                continue
            v = self.ready(timeout=max(a.timeout_s, 60))
            others_now = other_processes(netns_inodes(c.ns(h) for h in HOSTS), c.own_pids())
            ev0 = len(c.events.poll())
            if kind == "hog":
                self.start_hogs(v["primary"])
            t0 = time.time()
            say(f"hog round {r}: --detect-ms {d}: {kind} window of {minutes:g} min "
                f"({len(self.hogs)} hogs; primary {v['primary']}, term {v['term']})")
            try:
                worst = self.observe(minutes * 60.0)
            finally:
                t1 = time.time()
                self.stop_hogs()
            time.sleep(1.0)
            kinds, det = self.window_counts(ev0, t0, t1 + 0.5)
            w = self.client.window(t0, t1)
            cond = self.mon.between(t0, t1) or {}
            out = {"round": r, "detect": d, "detect_ms": detect, "kind": kind, "minutes": minutes,
                   "hogs": a.hogs if kind == "hog" else 0, "seconds": round(t1 - t0, 1), "events": kinds,
                   "detected": len(det), "per_hour": len(det) / ((t1 - t0) / 3600.0),
                   "detected_details": [f"{e['time']} {e.get('host')}: {e['detail']}" for e in det],
                   "max_silent_ms": worst, "longest_wait_ms": ms(w["longest_wait"]) if w else None,
                   "writes": w["writes"] if w else 0, "conditions": cond, "other_processes": others_now}
            self.res["hog"].append(out)
            say(f"hog round {r}: --detect-ms {d} {kind}: {len(det)} detected in {out['seconds']} s; events {kinds}; "
                f"max silent_ms {worst}; longest write {fmt(out['longest_wait_ms'])} ms; load "
                f"{fmt(cond.get('load1_mean'))}, CPU busy {fmt((cond.get('cpu_busy_mean') or 0) * 100)} %")
            for x in out["detected_details"]:
                say(f"    {x}")

    # -- run -------------------------------------------------------------------------------

    def run(self):
        self.mon.start()
        self.c.setup()
        self.client = Client(self.c.guest_addr(), self.a.every_ms)
        self.client.start()
        self.ready()
        say(f"client: one connection to {self.c.guest_addr()[0]}:{KV_PORT}, a write every {self.a.every_ms} ms")
        if "crash" in self.a.parts and self.a.crashes > 0:
            self.crashes()
        if "migrate" in self.a.parts and self.a.migrations > 0:
            self.migrations()
        if "hog" in self.a.parts and self.a.hog_minutes > 0:
            self.hog_runs()

    def cleanup(self):
        self.stop_hogs()
        if self.client is not None:
            self.client.close()
        self.c.teardown()
        self.mon.stop = True


# ---------------------------------------------------------------------------------------------
# Markdown


def cond_text(c):
    if not c:
        return "—"
    o = c.get("other_processes") or {}
    busy = o.get("count", 0) > 0 or (c.get("load1_mean") or 0) > 1.0
    s = (f"**{'busy' if busy else 'quiet'}**: load average (1 min) {c['load1_min']:.1f}–{c['load1_max']:.1f} "
         f"(mean {c['load1_mean']:.1f}) on {os.cpu_count()} CPUs, CPU busy {100 * (c.get('cpu_busy_mean') or 0):.0f} % "
         f"(whole machine, this bench included)")
    if o.get("count"):
        s += f"; {o['count']} other cargo/rustc/vmatrix/bench processes at the start, e.g. " + \
             ", ".join(f"`{x}`" for x in o["commands"][:3])
    return s


def row(label, s, unit=" ms"):
    if not s:
        return f"| {label} | — | — | — | 0 |"
    return f"| {label} | {fmt(s['p50'], unit)} | {fmt(s['p99'], unit)} | {fmt(s['max'], unit)} | {s['n']} |"


def markdown(b, meta):
    a = b.a
    L = []
    L.append("## Failover (manager and agents)")
    L.append("")
    L.append(f"- **Command:** `{meta['command']}` (as root)")
    L.append(f"- **Date:** {meta['start']} – {meta['end']} UTC; **machine:** `nproc` {meta['nproc']}, "
             f"`uname -r` {meta['kernel']}; {meta['binary']}.")
    L.append(f"- **Set-up:** one cluster of 3 hosts (`scripts/cluster.sh`, network namespaces on one machine), "
             f"the manager in the root namespace, an agent per host; VM `{VM}` 64 MiB, 64 MiB disk, 1 backup. "
             f"A Python client on one TCP connection writes `SET w<n> v<n>` (closed loop, one write every "
             f"{a.every_ms} ms; {a.hog_every_ms} ms in the hog part); reply times are the kernel's receive "
             f"timestamps, event times the manager's event log (same clock).")
    verify = "; ".join(f"{v['part']}: {v['present']} of {v['acknowledged']}" for v in b.res["verify"])
    L.append(f"- **Every acknowledged write present** (GET each on the same connection, cumulative): {verify or '—'}.")
    cr = [x for x in b.res["crash"] if x.get("reprotect_ms") is not None]
    if b.res["crash"]:
        L.append("")
        L.append(f"### Crash of the primary's host ({len(cr)} crashes, seed {a.seed}, default --detect-ms)")
        L.append("")
        L.append(f"Conditions: {cond_text(b.res['conditions'].get('crash'))}. The crash instant is when both "
                 f"links of the host are down (`cluster.sh kill` takes them down, then kills its processes); the "
                 f"crash falls at a random moment {a.crash_delay_s[0]:g}–{a.crash_delay_s[1]:g} s after the VM "
                 f"is protected and writes flow. p99 is nearest-rank: with fewer than 100 crashes it is the "
                 f"maximum.")
        L.append("")
        L.append("| phase | p50 | p99 | max | n |")
        L.append("|---|---|---|---|---|")
        L.append(row("crash → `detected` (detection)", summary([x.get("detect_ms") for x in cr])))
        L.append(row("`detected` → `promoting` (decision)", summary([x.get("decision_ms") for x in cr])))
        L.append(row("`promoting` → `primary_running` (promotion)", summary([x.get("promotion_ms") for x in cr])))
        L.append(row("`primary_running` → `protected` (the new backup's sync; output held meanwhile)",
                     summary([x.get("reprotect_after_running_ms") for x in cr])))
        L.append(row("crash → first reply on the client's connection (client-visible)",
                     summary([x.get("client_ms") for x in cr])))
        L.append(row("crash → `protected` at the new term (re-protection)", summary([x.get("reprotect_ms") for x in cr])))
        L.append(row("client's longest wait for one write across the crash",
                     summary([x.get("longest_wait_ms") for x in cr])))
        extra = sum(max(0, (x.get("detected_events") or 0) - 1) for x in cr)
        L.append("")
        L.append(f"Detections per crash: exactly one in {sum(1 for x in cr if x.get('detected_events') == 1)} of "
                 f"{len(cr)} ({extra} extra). `cluster.sh kill` took its links down "
                 f"{fmt(pct([x.get('links_down_after_cmd_ms') for x in cr], 50))} ms (median) after it was started.")
    if b.res["migrate"]:
        L.append("")
        mg = b.res["migrate"]
        L.append(f"### Planned migration (`vmatrix vm migrate {VM} --to <host>`, {len(mg)} migrations)")
        L.append("")
        L.append(f"Conditions: {cond_text(b.res['conditions'].get('migrate'))}. Targets alternate between the "
                 f"host of the synced backup and the spare host (a backup syncs there first).")
        L.append("")
        L.append("| target | n | client's longest wait for one write p50 / p99 / max | longest gap between replies (max) | "
                 "command → `handover` (p50) | `handover` → `promoting` (p50) | `promoting` → `primary_running` (p50) | "
                 "command → `protected` (p50) |")
        L.append("|---|---|---|---|---|---|---|---|")
        for kind, label in (("backup", "the backup's host"), ("spare", "the spare host"), (None, "all")):
            xs = [x for x in mg if kind is None or x.get("target_kind") == kind]
            if not xs:
                continue
            s = summary([x.get("longest_wait_ms") for x in xs])
            g = summary([x.get("longest_gap_ms") for x in xs])
            L.append(f"| {label} | {len(xs)} | " + (f"{fmt(s['p50'])} / {fmt(s['p99'])} / {fmt(s['max'])} ms" if s else "—")
                     + f" | {fmt(g['max'] if g else None, ' ms')}"
                     + f" | {fmt(pct([x.get('cmd_to_handover_ms') for x in xs], 50), ' ms')}"
                     + f" | {fmt(pct([x.get('handover_ms') for x in xs], 50), ' ms')}"
                     + f" | {fmt(pct([x.get('promotion_ms') for x in xs], 50), ' ms')}"
                     + f" | {fmt(pct([x.get('cmd_to_protected_ms') for x in xs], 50), ' ms')} |")
    if b.res["hog"]:
        L.append("")
        hg = b.res["hog"]
        where = "the primary host's namespace" if a.hog_ns == "primary" else "the root namespace"
        L.append(f"### False failovers under a CPU hog ({a.hogs} × `python3 -c 'while True: pass'`, nice 0, in {where})")
        L.append("")
        L.append(f"Conditions: {cond_text(b.res['conditions'].get('hog'))}. Nothing fails: every `detected` is a "
                 f"false failover. The manager is restarted with each `--detect-ms` (default: "
                 f"{meta['default_detect_ms']} ms); client one write every {a.hog_every_ms} ms. `silent_ms` is "
                 f"the largest any host showed in `/v1/hosts`, sampled every 100 ms (a lower bound of the "
                 f"longest heartbeat gap).")
        L.append("")
        L.append("| --detect-ms | load | minutes | `detected` (false failovers) | per hour (95 % upper bound) | "
                 "`host_down` | max `silent_ms` seen | client's longest wait | load avg (mean) / CPU busy |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        examples = []
        for d in a.detect_values:
            for kind in ("baseline", "hog"):
                xs = [x for x in hg if x["detect"] == d and x["kind"] == kind]
                if not xs:
                    continue
                secs = sum(x["seconds"] for x in xs)
                n = sum(x["detected"] for x in xs)
                hd = sum(x["events"].get("host_down", 0) for x in xs)
                silent = max((max(x["max_silent_ms"].values()) for x in xs if x["max_silent_ms"]), default=None)
                wait = max((x["longest_wait_ms"] for x in xs if x["longest_wait_ms"] is not None), default=None)
                loads = [(x["conditions"].get("load1_mean"), x["seconds"]) for x in xs if x["conditions"]]
                busy = [(x["conditions"].get("cpu_busy_mean"), x["seconds"]) for x in xs
                        if x["conditions"] and x["conditions"].get("cpu_busy_mean") is not None]
                wl = sum(l * t for l, t in loads) / sum(t for _, t in loads) if loads else None
                wb = sum(l * t for l, t in busy) / sum(t for _, t in busy) if busy else None
                label = f"{meta['default_detect_ms']} (default)" if d == "default" else d
                load = f"{a.hogs} hogs" if kind == "hog" else "no hog"
                L.append(f"| {label} | {load} | {secs / 60:.1f} | {n} | {n * 3600 / secs:.0f} "
                         f"(≤ {poisson_upper(n) * 3600 / secs:.0f}) | {hd} | {fmt(silent, ' ms')} | "
                         f"{fmt(wait, ' ms')} | {fmt(wl)} / {fmt(100 * wb if wb is not None else None)} % |")
                for x in xs:
                    for e in x["detected_details"][:2]:
                        if len([y for y in examples if y[0] == label]) < 3:
                            examples.append((label, e))
        L.append("")
        L.append(f"Windows: {a.hog_rounds} round(s); in each, every value in turn (the order rotates), "
                 f"{a.baseline_minutes / a.hog_rounds:g} min without hogs then {a.hog_minutes / a.hog_rounds:g} min "
                 f"with them. The upper bound is Poisson, 95 % one-sided.")
        if examples:
            L.append("")
            L.append("False failovers (the manager's reason), e.g.:")
            for label, e in examples:
                L.append(f"- --detect-ms {label}: {e}")
    if b.anomalies:
        L.append("")
        L.append("Anomalies: " + "; ".join(b.anomalies))
    return "\n".join(L)


def public_args(argv):
    """The command line without the output options (--out, --md, --keep-logs and their values)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        name = x.split("=", 1)[0]
        if name in ("--out", "--md", "--keep-logs"):
            skip = "=" not in x
            continue
        out.append(x)
    return out


def main():
    ap = argparse.ArgumentParser(description="Failover benchmark: crashes, migrations, false failovers under a CPU hog")
    ap.add_argument("--crashes", type=int, default=30, help="crashes of the primary's host (default 30)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the crash moments (default: random, printed)")
    ap.add_argument("--crash-delay-s", default="1,3",
                    help="the crash falls uniformly in this window after the VM is ready, s (default 1,3)")
    ap.add_argument("--migrations", type=int, default=10, help="planned migrations (default 10)")
    ap.add_argument("--hog-minutes", type=float, default=5.0, help="CPU-hog window per --detect-ms value (default 5)")
    ap.add_argument("--hog-rounds", type=int, default=5,
                    help="split each value's windows into this many rounds, interleaved across the values (default 5)")
    ap.add_argument("--baseline-minutes", type=float, default=0.0,
                    help="a window without hogs before each hog window (default 0: none)")
    ap.add_argument("--detect-values", default="default,100,200",
                    help="--detect-ms values of the hog part; 'default' = no flag (default: default,100,200)")
    ap.add_argument("--hogs", type=int, default=2, help="spinning processes (default 2)")
    ap.add_argument("--hog-ns", choices=["primary", "root"], default="primary",
                    help="where the hogs run (default: the primary host's namespace)")
    ap.add_argument("--every-ms", type=float, default=2.0, help="client: one write every N ms (default 2)")
    ap.add_argument("--hog-every-ms", type=float, default=20.0,
                    help="client during the hog part: one write every N ms (default 20)")
    ap.add_argument("--parts", default="crash,migrate,hog", help="which parts (default crash,migrate,hog)")
    ap.add_argument("--name", default="vmxb", help="cluster name (default vmxb; ≤ 6 characters)")
    ap.add_argument("--index", type=int, default=240, help="network index 1..250 (default 240)")
    ap.add_argument("--timeout-s", type=float, default=60.0, help="timeout of each wait, s (default 60)")
    ap.add_argument("--vmx", default=VMX_BUILT,
                    help="the vmatrix binary (default target/release/vmatrix, built with cargo if missing)")
    ap.add_argument("--out", help="write every measurement as JSON here")
    ap.add_argument("--md", help="write the Markdown block here too")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the manager's and agents' logs and the events here")
    a = ap.parse_args()
    if a.seed is None:
        a.seed = int.from_bytes(os.urandom(4), "big")
    try:
        lo, hi = (float(x) for x in a.crash_delay_s.split(","))
        assert 0 <= lo <= hi
    except (ValueError, AssertionError):
        ap.error("--crash-delay-s must be 'lo,hi' with 0 <= lo <= hi")
    a.crash_delay_s = (lo, hi)
    a.parts = {p.strip() for p in a.parts.split(",") if p.strip()}
    if a.parts - {"crash", "migrate", "hog"}:
        ap.error("--parts: crash, migrate, hog")
    if a.hog_rounds < 1:
        ap.error("--hog-rounds must be >= 1")
    a.detect_values = [d.strip() for d in a.detect_values.split(",") if d.strip()]
    for d in a.detect_values:
        if d != "default" and not d.isdigit():
            ap.error("--detect-values: 'default' or numbers of ms")
    if len(a.name) > 6 or not re.fullmatch(r"[a-z][a-z0-9]*", a.name):
        ap.error("--name: up to 6 lowercase letters/digits (cluster.sh's limit)")
    if os.geteuid() != 0:
        sys.exit("bench-failover: run as root (namespaces, KVM)")
    if a.vmx == VMX_BUILT and not os.path.exists(VMX_BUILT):
        say("target/release/vmatrix is missing: cargo build --release -p vmatrix")
        subprocess.run(["cargo", "build", "--release", "-p", "vmatrix"], cwd=ROOT, check=True)
    if not os.path.exists(GUEST):
        sys.exit(f"bench-failover: missing {GUEST} (scripts/build-guest.sh)")
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    sys.setswitchinterval(0.001)
    if not os.path.exists(a.vmx):
        sys.exit(f"bench-failover: missing {a.vmx}")
    help_text = run([a.vmx, "manager", "--help"]).stdout
    m = re.search(r"--detect-ms.*?\[default: (\d+)\]", help_text, re.S)
    head = run(["git", "-C", ROOT, "log", "-1", "--format=%h"], check=False).stdout.strip()
    dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], check=False).stdout.strip()
    meta = {
        "command": "python3 scripts/bench-failover.py " + " ".join(public_args(sys.argv[1:])),
        "seed": a.seed,
        "start": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "nproc": os.cpu_count(), "kernel": platform.release(),
        "binary_mtime": datetime.datetime.fromtimestamp(os.path.getmtime(a.vmx), datetime.timezone.utc)
        .strftime("%Y-%m-%d %H:%M UTC"),
        "head": head + (" + uncommitted changes in the tree" if dirty else ""),
        "vmx": a.vmx,
        "default_detect_ms": int(m.group(1)) if m else None,
    }
    meta["binary"] = (f"binary `target/release/vmatrix` of {meta['binary_mtime']} (tree at {meta['head']})"
                      if a.vmx == VMX_BUILT else f"binary `{a.vmx}` of {meta['binary_mtime']}") + ", release build"
    if "--seed" not in " ".join(sys.argv):
        meta["command"] += f" --seed {a.seed}"
    say(f"seed {a.seed}; {meta['nproc']} CPUs, Linux {meta['kernel']}; load {os.getloadavg()}; "
        f"manager default --detect-ms {meta['default_detect_ms']}")
    tmp = tempfile.mkdtemp(prefix=f"bench-failover-{a.name}-")
    b = Bench(a, tmp)
    rc = 0
    try:
        b.run()
    except (BenchError, Interrupted, OSError, subprocess.TimeoutExpired) as e:
        say(f"FAILED: {e}")
        b.anomalies.append(f"aborted: {e}")
        rc = 1
    finally:
        try:
            b.cleanup()
        finally:
            if a.keep_logs:
                os.makedirs(a.keep_logs, exist_ok=True)
                for n in os.listdir(tmp):
                    if n.endswith(".log") or n.endswith(".jsonl"):
                        shutil.copy(os.path.join(tmp, n), os.path.join(a.keep_logs, n))
                for h in HOSTS:
                    d = os.path.join(tmp, f"host-{h}", VM)
                    if os.path.isdir(d):
                        for n in os.listdir(d):
                            if n.endswith(".log"):
                                shutil.copy(os.path.join(d, n), os.path.join(a.keep_logs, f"host-{h}-{n}"))
                say(f"logs kept in {a.keep_logs}")
            shutil.rmtree(tmp, ignore_errors=True)
    meta["end"] = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M")
    md = markdown(b, meta)
    print()
    print(md)
    if b.anomalies:
        print()
        print("### Anomalies")
        for x in b.anomalies:
            print("- " + x)
        rc = rc or 2
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "results": b.res, "anomalies": b.anomalies}, f, indent=2, default=str)
        say(f"results written to {a.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
