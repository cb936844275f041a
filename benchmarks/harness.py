"""How the parent measures two sides: a JSON-lines protocol with each side's child process, warm-up and
alternating timed requests (ours, HF, HF, ours, ...) repeated when other processes disturbed them, medians.

Each side runs in its own child process so that its peak RSS is its own. A child loads once, then answers
commands (`run`, `profile`, `quit`) on stdin with one JSON line each on stdout.
"""
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from . import system
from .workload import ROOT


def median(xs):
    return float(statistics.median(xs)) if xs else float("nan")


def ids_digest(ids):
    return hashlib.sha256(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:16]


def request_figures(t0, c0, t1, stamps, tokens):
    """One request's figures from its start (wall t0, CPU c0), end t1 and one (wall, CPU) stamp per token."""
    first, last = stamps[0], stamps[-1]
    steps = len(stamps) - 1
    decode_s = last[0] - first[0]
    gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
    return {"ttft_s": first[0] - t0, "decode_s": decode_s, "decode_steps": steps,
            "decode_tok_s": steps / decode_s if decode_s > 0 else float("nan"),
            "decode_step_ms_median": 1e3 * median(gaps),
            "cpu_per_wall_prefill": (first[1] - c0) / max(first[0] - t0, 1e-9),
            "cpu_per_wall_decode": (last[1] - first[1]) / max(decode_s, 1e-9),
            "total_s": t1 - t0, "tokens": [int(t) for t in tokens], "rss_mb": system.rss_mb()}


# ---------------------------------------------------------------------------------------------- child side
class Protocol:
    """Child side: JSON lines on a private copy of stdout; fd 1 goes to stderr so that MindSpore's C++
    prints cannot corrupt the protocol. Create it before importing the frameworks."""

    def __init__(self):
        sys.stdout.flush()
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, obj):
        self.out.write(json.dumps(obj) + "\n")
        self.out.flush()


def serve(make_side, threads):
    """Child main loop: pin to `threads` cores, build the side (`make_side()`: an object with info(), run()
    and profile(repeats)), report `ready` with its info, then answer commands until `quit`."""
    proto = Protocol()
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    system.limit_cores(threads)
    side = make_side()
    proto.send({"event": "ready", **side.info()})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            proto.send(side.run())
        elif cmd["cmd"] == "profile":
            proto.send(side.profile(cmd.get("repeats", 3)))
        elif cmd["cmd"] == "quit":
            proto.send({"peak_rss_mb": system.peak_rss_mb(), "rss_mb": system.rss_mb()})
            return 0
    return 0


# ---------------------------------------------------------------------------------------------- parent side
class Child:
    """The parent's handle on one side's child process (argv runs `serve`); its stderr goes to a temporary
    log whose tail is shown if it dies."""

    def __init__(self, side, argv, threads):
        self.side = side
        self.log = tempfile.NamedTemporaryFile(prefix=f"bench_{side}_", suffix=".log", delete=False)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOG_v=os.environ.get("GLOG_v", "3"))
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, cwd=ROOT, env=env)

    def recv(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            with open(self.log.name, errors="replace") as f:
                tail = f.read()[-3000:]
            raise RuntimeError(f"{self.side} child exited ({self.proc.returncode}); log tail:\n{tail}")
        return json.loads(line)

    def ask(self, cmd, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        return self.recv()

    def cpu_seconds(self):
        return system.process_cpu_seconds(self.proc.pid)

    def finish(self):
        last = self.ask("quit")
        self.proc.stdin.close()
        _, status, usage = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        os.unlink(self.log.name)
        last["peak_rss_mb_wait4"] = usage.ru_maxrss / 1024
        return last

    def kill(self):
        """End the child now (after a failure); a finished child is left as it is."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def timed_request(children, side, cmd="run", **kw):
    """One request on `side`; also how many cores other processes (not the two children) kept busy."""
    other = [c for s, c in children.items() if s != side][0]
    me = children[side]
    b0, m0, o0, t0 = system.busy_seconds(), me.cpu_seconds(), other.cpu_seconds(), time.monotonic()
    res = me.ask(cmd, **kw)
    b1, m1, o1, t1 = system.busy_seconds(), me.cpu_seconds(), other.cpu_seconds(), time.monotonic()
    res["background_cores"] = max(0.0, (b1 - b0) - (m1 - m0) - (o1 - o0)) / (t1 - t0)
    res["idle_side_cpu_s"] = o1 - o0
    return res


def say(msg):
    print(f"[bench] {msg}", file=sys.stderr)


def warm_up(children, sides, requests):
    """`requests` untimed requests per side -> (the first response per side, every warm-up ttft per side)."""
    warm, warm_ttft = {}, {s: [] for s in sides}
    for side in sides:
        say(f"warm-up {side} ({requests} requests) ...")
        for _ in range(requests):
            res = children[side].ask("run")
            warm.setdefault(side, res)
            warm_ttft[side].append(res["ttft_s"])
    return warm, warm_ttft


def alternate(children, sides, runs, max_background, max_attempts):
    """`runs` accepted requests per side, asked alternately (a, b, b, a, ...); a request during which other
    processes kept more than `max_background` cores busy is rejected and repeated, at most runs x
    max_attempts rounds; if the machine is never quiet enough the quietest rejected ones fill up.
    -> (accepted per side, rejected per side)."""
    accepted, rejected = {s: [] for s in sides}, {s: [] for s in sides}
    attempt = 0
    while min(len(accepted[s]) for s in sides) < runs and attempt < runs * max_attempts:
        order = sides if attempt % 2 == 0 else sides[::-1]
        attempt += 1
        for side in order:
            if len(accepted[side]) >= runs:
                continue
            res = timed_request(children, side)
            ok = res["background_cores"] <= max_background
            (accepted if ok else rejected)[side].append(res)
            say(f"{side}: ttft {res['ttft_s']:.3f} s, decode {res['decode_tok_s']:.2f} tok/s, "
                f"other processes used {res['background_cores']:.2f} cores" + ("" if ok else " -> rejected, repeating"))
    for side in sides:
        if len(accepted[side]) < runs:
            extra = sorted(rejected[side], key=lambda r: r["background_cores"])[:runs - len(accepted[side])]
            accepted[side].extend(extra)
            for r in extra:
                rejected[side].remove(r)
                r["accepted_despite_background"] = True
    return accepted, rejected


def quietest_profile(children, side, repeats, max_background, max_attempts):
    """The side's `profile` breakdown, asked until other processes stayed under `max_background` cores (at
    most `max_attempts` times; the quietest answer counts)."""
    best = None
    for _ in range(max_attempts):
        res = timed_request(children, side, "profile", repeats=repeats)
        if best is None or res["background_cores"] < best["background_cores"]:
            best = res
        if res["background_cores"] <= max_background:
            break
    return best


def spawn_json(argv, log_path, on_event=None):
    """Run a child to its end (stderr appended to log_path); return (its JSON events + a last `background`
    event with the cores other processes used meanwhile, wall seconds, peak RSS MB from wait4, exit code)."""
    events = []
    with open(log_path, "ab") as log:
        busy0 = system.busy_seconds()
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, text=True,
                                env=dict(os.environ, GLOG_v=os.environ.get("GLOG_v", "3")))
        for line in proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                ev = json.loads(line)
                events.append(ev)
                if on_event:
                    on_event(ev)
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    background = max(0.0, system.busy_seconds() - busy0 - usage.ru_utime - usage.ru_stime) / wall
    events.append({"event": "background", "cores": background})
    return events, wall, usage.ru_maxrss / 1024, code
