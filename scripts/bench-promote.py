#!/usr/bin/env python3
"""How long a promotion takes, phase by phase: backup -> primary, for guests of several sizes.

What the failover agent does on a promotion (vmatrix/src/cluster/agent/supervisor.rs), on one
"host": a network namespace vmxprom<N> (scripts/netns.sh, N in 60..69) in which this script
runs itself again (`ip netns exec`), as the agent runs inside its host, so every process it
starts and every client connection it opens is in the namespace (the guest is
10.77.<N>.2:7000 on the bridge, the backup listens on 127.0.0.1:7100).

Per run (fresh directory, fresh processes):
  1. setup: certificates, a --disk-mib disk, `vmatrix backup --control b.sock`, `vmatrix primary
     --mem-mib M --backup ... --term 1 --control p.sock`; wait until protected;
  2. data: 100 SETs; CHURN over --fill-pct of guest RAM, one pass in about 2 s (one byte per
     page: those pages hold data), then CHURN 0 0; 20 more SETs (so the backup holds all);
  3. the primary is killed (SIGKILL) and reaped; then, timed with this process's clock:
       decision   the moment `PUT /promote {"term":2}` is sent on the backup's control socket
       answer     its answer `{"checkpoint":N}`
       exited     the backup process has exited (polled every 0.5 ms)
       spawned    `vmatrix primary --from-image <image> --disk <dir>/disk-term2.img --term 2
                  --unprotected-start --tap tap0 --control p2.sock ...` is started
       status     its control socket answers `GET /status` (polled every 0.5 ms)
       connected  a new client TCP connection to the guest is established
       reply      that connection's `GET key0` is answered
     and, from the processes' own logs (tracing timestamps), the backup's steps (`promoting for
     term`, `image brought to checkpoint`, `image finalized`) and the new primary's
     (`... restored from ...` with its own breakdown, when the build logs it); also the
     backup's resident memory and the load average at the decision;
  4. every acknowledged key is read back from the promoted primary (all must be there);
  5. cleanup (processes, namespace, directory), also on errors and signals.

Usage (as root, /dev/kvm; binaries built: cargo build --release -p vmatrix, scripts/build-guest.sh):
  python3 scripts/bench-promote.py [--mem-mib 64,1024] [--fill-pct 75] [--disk-mib 16] [--runs 3]
                                   [--vmx target/release/vmatrix] [--index 60] [--out s.json]
                                   [--keep-logs DIR]
Python 3 standard library only.
"""

import argparse
import datetime
import http.client
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guest", "target", "x86_64-unknown-linux-gnu", "release", "vmatrix-guest")
NETNS = os.path.join(ROOT, "scripts", "netns.sh")
PAGE = 4096
T0 = time.monotonic()


def say(msg):
    print(f"[bench-promote {time.monotonic() - T0:7.2f}s] {msg}", flush=True)


class BenchError(Exception):
    pass


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP on a Unix socket (a VM process's control socket)."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def ctl(sock_path, method, path, body=None, timeout=120.0):
    """One request on a control socket (HTTP + JSON); (status code, decoded JSON answer)."""
    c = UnixHTTPConnection(sock_path, timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        c.request(method, path, body=data, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        c.close()


class Kv:
    """One TCP connection to the guest's KV service."""

    def __init__(self, addr, timeout=10.0):
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def cmd(self, line):
        self.sock.sendall((line + "\n").encode())
        reply = self.file.readline()
        if not reply:
            raise BenchError("KV connection closed by the guest")
        return reply.decode(errors="replace").strip()

    def close(self):
        self.file.close()
        self.sock.close()


def connect_retry(addr, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Kv(addr, timeout=2.0)
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(f"no KV service at {addr[0]}:{addr[1]} within {timeout} s")
            time.sleep(0.05)


def wait_until(pred, timeout, what, step=0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not within {timeout} s")
        time.sleep(step)


def rss_mib(pid):
    """Resident memory of a process, MiB (its exit frees it: part of "exited")."""
    try:
        for l in open(f"/proc/{pid}/status"):
            if l.startswith("VmRSS:"):
                return round(int(l.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z")


def log_time(line):
    m = LOG_TS.match(line)
    if not m:
        return None
    frac = (m.group(2) or ".0")[1:7].ljust(6, "0")
    dt = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(
        tzinfo=datetime.timezone.utc, microsecond=int(frac))
    return dt.timestamp()


def first_line(path, needle, since_wall):
    """(wall time, line) of the first log line after `since_wall` containing `needle`."""
    try:
        text = open(path, encoding="utf-8", errors="replace").read()
    except OSError:
        return None, None
    for l in text.splitlines():
        t = log_time(l)
        if t is not None and t >= since_wall and needle in l:
            return t, l
    return None, None


class Run:
    """One promotion of a `mem_mib` guest; its processes and files live in `self.dir`."""

    def __init__(self, args, mem_mib):
        self.a, self.mem_mib = args, mem_mib
        self.dir = tempfile.mkdtemp(prefix="vmx-promote-")
        self.procs = []
        self.guest = (f"10.77.{args.index}.2", 7000)

    def path(self, name):
        return os.path.join(self.dir, name)

    def spawn(self, args, log):
        p = subprocess.Popen([self.a.vmx] + args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=open(self.path(log), "ab"))
        self.procs.append(p)
        return p

    def setup(self):
        pki = self.path("pki")
        run([self.a.vmx, "certs", "init", pki])
        for h in ("hostp", "hostb"):
            run([self.a.vmx, "certs", "issue", pki, "--host", h])
        run([self.a.vmx, "disk", "create", self.path("disk.img"), "--size-mib", str(self.a.disk_mib)])
        self.backup = self.spawn(["--log", "info", "backup", "--listen", "127.0.0.1:7100", "--image-dir",
                                  self.path("image"), "--certs", pki, "--host", "hostb", "--control",
                                  self.path("b.sock")], "backup.log")
        wait_until(lambda: os.path.exists(self.path("b.sock")), 10, "the backup's control socket")
        cfg = f"ip={self.guest[0]}/24,gw=10.77.{self.a.index}.1,port={self.guest[1]}"
        self.primary = self.spawn(["--log", "info", "primary", "--guest", GUEST, "--disk", self.path("disk.img"),
                                   "--tap", "tap0", "--mem-mib", str(self.mem_mib), "--guest-config", cfg,
                                   "--backup", "hostb@127.0.0.1:7100", "--certs", pki, "--host", "hostp",
                                   "--term", "1", "--control", self.path("p.sock"),
                                   "--console-log", self.path("console1.log")], "primary1.log")
        wait_until(lambda: self.status("p.sock").get("protected") is True, 120, "protected")

    def status(self, sock, timeout=2.0):
        """`GET /status` of a control socket; {} if it does not answer (yet)."""
        try:
            code, st = ctl(self.path(sock), "GET", "/status", timeout=timeout)
            return st if code == 200 else {}
        except (OSError, ValueError, http.client.HTTPException):
            return {}

    def fill(self):
        kv = connect_retry(self.guest, 30)
        kv.sock.settimeout(120.0)  # CHURN first zeroes its region: seconds for a big guest
        self.keys = {}
        for i in range(100):
            self.set(kv, f"key{i}", f"v{i}")
        pages = self.mem_mib * 256 * self.a.fill_pct // 100
        rate = max(1, pages // 2000)
        if pages:
            reply = kv.cmd(f"CHURN {pages} {rate}")
            if reply != "OK":
                raise BenchError(f"CHURN {pages} {rate}: {reply}")
            time.sleep(pages / rate / 1000 + 0.5)
            kv.cmd("CHURN 0 0")
        for i in range(100, 120):
            self.set(kv, f"key{i}", f"v{i}")
        kv.close()
        self.filled_pages = pages

    def set(self, kv, k, v):
        reply = kv.cmd(f"SET {k} {v}")
        if reply != "OK":
            raise BenchError(f"SET {k}: {reply}")
        self.keys[k] = v

    def promote(self):
        """Kills the primary, promotes the backup, starts the new primary; the timestamps."""
        self.primary.kill()
        self.primary.wait()
        t = {"backup_rss_mib": rss_mib(self.backup.pid), "load1": os.getloadavg()[0],
             "wall0": time.time()}
        m0 = time.monotonic()
        code, answer = ctl(self.path("b.sock"), "PUT", "/promote", {"term": 2})
        t["answer"] = time.monotonic() - m0
        if code != 200 or "checkpoint" not in answer:
            raise BenchError(f"promote: HTTP {code} {answer}")
        while self.backup.poll() is None:
            time.sleep(0.0005)
        t["exited"] = time.monotonic() - m0
        if self.backup.returncode != 0:
            raise BenchError(f"the backup exited with {self.backup.returncode}")
        t["spawned"] = time.monotonic() - m0
        self.primary2 = self.spawn(["--log", "info", "primary", "--from-image", self.path("image"), "--disk",
                                    self.path("disk-term2.img"), "--term", "2", "--unprotected-start", "--tap",
                                    "tap0", "--certs", self.path("pki"), "--host", "hostb", "--control",
                                    self.path("p2.sock"), "--console-log", self.path("console2.log")],
                                   "primary2.log")
        sock = self.path("p2.sock")
        while True:
            if self.primary2.poll() is not None:
                raise BenchError(f"the promoted primary exited: {self.log_tail('primary2.log')}")
            if os.path.exists(sock) and self.status("p2.sock", timeout=1.0):
                break
            time.sleep(0.0005)
        t["status"] = time.monotonic() - m0
        kv = connect_retry(self.guest, 10)
        t["connected"] = time.monotonic() - m0
        reply = kv.cmd("GET key0")
        t["reply"] = time.monotonic() - m0
        if reply != "VALUE v0":
            raise BenchError(f"GET key0 after the promotion: {reply}")
        missing = [k for k, v in self.keys.items() if kv.cmd(f"GET {k}") != f"VALUE {v}"]
        kv.close()
        if missing:
            raise BenchError(f"{len(missing)} acknowledged keys missing after the promotion: {missing[:5]}")
        t["answer_text"] = json.dumps(answer)
        return t

    def log_phases(self, wall0):
        """Log-stamped steps of the backup and the new primary, ms after `wall0`."""
        out = {}
        for key, log, needle in [
            ("b_promoting", "backup.log", "promoting for term"),
            ("b_journal", "backup.log", "from its journal"),
            ("b_finalized", "backup.log", "image finalized at checkpoint"),
            ("p_restored", "primary2.log", "restored from"),
            ("p_history", "primary2.log", "history "),
        ]:
            tw, line = first_line(self.path(log), needle, wall0)
            out[key] = None if tw is None else round((tw - wall0) * 1e3, 2)
            if key == "p_restored" and line:
                out["p_restored_line"] = line.split(" restored from ", 1)[-1][:200]
        return out

    def log_tail(self, name, n=30):
        try:
            return "\n".join(open(self.path(name), errors="replace").read().splitlines()[-n:])
        except OSError:
            return ""

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if self.a.keep_logs:
            dst = os.path.join(self.a.keep_logs, f"mem{self.mem_mib}-{os.path.basename(self.dir)}")
            os.makedirs(dst, exist_ok=True)
            for f in os.listdir(self.dir):
                if f.endswith(".log"):
                    shutil.copy(self.path(f), dst)
        shutil.rmtree(self.dir, ignore_errors=True)


def one_run(a, mem_mib, i):
    r = Run(a, mem_mib)
    try:
        say(f"{mem_mib} MiB guest, run {i + 1}/{a.runs}: setting up (initial sync)")
        r.setup()
        r.fill()
        say(f"  filled {r.filled_pages} pages; {len(r.keys)} keys acknowledged; promoting")
        t = r.promote()
        phases = r.log_phases(t.pop("wall0"))
        t.update(phases)
        for k in ("answer", "exited", "spawned", "status", "connected", "reply"):
            t[k] = round(t[k] * 1e3, 2)
        say(f"  decision -> answer {t['answer']} ms, exited {t['exited']}, status {t['status']}, "
            f"connected {t['connected']}, first reply {t['reply']} ms (load {t['load1']:.1f}); backup "
            f"log: promoting {t['b_promoting']}, journal {t['b_journal']}, finalized {t['b_finalized']}; "
            f"primary log: restored {t['p_restored']} ({t.get('p_restored_line', '-')})")
        return t
    finally:
        r.cleanup()


def summarize(runs):
    keys = ["answer", "exited", "status", "connected", "reply", "b_promoting", "b_journal", "b_finalized", "p_restored"]
    out = {}
    for k in keys:
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = {"median": round(statistics.median(vals), 2), "min": min(vals), "max": max(vals)} if vals else None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem-mib", default="64,1024")
    ap.add_argument("--fill-pct", type=int, default=75)
    ap.add_argument("--disk-mib", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--vmx", default=os.path.join(ROOT, "target", "release", "vmatrix"))
    ap.add_argument("--index", type=int, default=60)
    ap.add_argument("--out")
    ap.add_argument("--keep-logs")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.vmx = os.path.abspath(a.vmx)
    ns = f"vmxprom{a.index}"
    signal.signal(signal.SIGTERM, on_signal)
    for f in (a.vmx, GUEST):
        if not os.path.exists(f):
            sys.exit(f"bench-promote: {f} is missing (build it first)")
    if not a.inside:
        # The namespace, then this script again inside it (`ip netns exec` also gives it the
        # namespace's /sys, where the VMM finds its tap).
        run([NETNS, "up", ns, str(a.index)])
        try:
            code = subprocess.call(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__),
                                    "--inside"] + sys.argv[1:])
        finally:
            subprocess.run([NETNS, "down", ns], capture_output=True)
        sys.exit(code)
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "vmx": a.vmx, "fill_pct": a.fill_pct, "disk_mib": a.disk_mib, "load_before": os.getloadavg(),
              "sizes": {}}
    for mem in [int(m) for m in a.mem_mib.split(",")]:
        runs = [one_run(a, mem, i) for i in range(a.runs)]
        result["sizes"][mem] = {"runs": runs, "summary": summarize(runs)}
        s = result["sizes"][mem]["summary"]
        say(f"{mem} MiB: medians (ms after the decision): " + ", ".join(
            f"{k} {v['median']}" for k, v in s.items() if v))
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
