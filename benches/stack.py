"""Shared pieces of serin's benchmarks: start a real coordinator, demo apps, a private nginx and
an agent as separate processes of a release `serin` binary, plus a small load generator.

Standard library only (Python 3.9+). Every process started here is stopped by `Stack.stop()`
(SIGTERM, then SIGKILL), which the benchmarks call in a `finally`.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def now_ms() -> float:
    """Wall-clock Unix time in milliseconds (the clock the coordinator and demo app use)."""
    return time.time() * 1000.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(host: str, port: int, path: str, timeout: float = 1.0):
    """One GET on a fresh connection: (status, headers dict, body str)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read().decode("utf-8", "replace")
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        conn.close()


def http_post_json(host: str, port: int, path: str, payload: dict, timeout: float = 2.0):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(payload),
                     headers={"content-type": "application/json"})
        r = conn.getresponse()
        body = r.read().decode()
        if r.status != 200:
            raise RuntimeError(f"POST {path} -> {r.status}: {body}")
        return json.loads(body)
    finally:
        conn.close()


def wait_until(what: str, fn, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last_error = e
        time.sleep(every)
    raise TimeoutError(f"{what}: not ready after {timeout}s (last error: {last_error})")


def find_serin(explicit: str | None) -> Path:
    p = Path(explicit or os.environ.get("SERIN_BIN") or REPO / "target/release/serin")
    if not p.is_file():
        raise SystemExit(f"{p} not found: run `cargo build --release` first (or set SERIN_BIN)")
    return p.resolve()


def find_nginx() -> str:
    n = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not n:
        raise SystemExit("nginx not found: apt-get install -y nginx-light")
    return n


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    # The process to measure when `popen` is a wrapper such as /usr/bin/time.
    pid: int
    stop_cmd: list[str] | None = None


@dataclass
class Stack:
    """A loopback serin deployment in `dir`, each piece its own process."""

    dir: Path
    serin: Path
    procs: list[Proc] = field(default_factory=list)
    coordinator: str = ""
    nginx_dir: Path | None = None

    # -- processes -------------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], env: dict | None = None,
              time_v: bool = False, stop_cmd: list[str] | None = None) -> Proc:
        log = open(self.dir / f"{name}.log", "wb")
        if time_v:
            argv = ["/usr/bin/time", "-v", "-o", str(self.dir / f"{name}.time.txt")] + argv
        full_env = dict(os.environ)
        full_env.update(env or {})
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=full_env, start_new_session=True)
        pid = p.pid
        if time_v:
            pid = wait_until(f"{name} child of /usr/bin/time", lambda: child_pid(p.pid), 5, 0.01)
        proc = Proc(name, p, pid, stop_cmd)
        self.procs.append(proc)
        return proc

    def stop(self):
        for proc in reversed(self.procs):
            if proc.popen.poll() is not None:
                continue
            try:
                if proc.stop_cmd:
                    subprocess.run(proc.stop_cmd, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=5)
                else:
                    # SIGTERM the measured process; /usr/bin/time then reports and exits.
                    os.kill(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            try:
                proc.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()
        self.procs.clear()

    # -- pieces ----------------------------------------------------------------------------
    def start_coordinator(self) -> str:
        port = free_port()
        self.spawn("coordinator", [str(self.serin), "coordinator", "run", "--node-id", "1",
                                   "--listen", f"127.0.0.1:{port}",
                                   "--data-dir", str(self.dir / "coordinator")])
        self.coordinator = f"http://127.0.0.1:{port}"
        wait_until("coordinator", lambda: self.cli(["rollout", "list", "--json"], check=False)
                   .returncode == 0, timeout=30, every=0.2)
        return self.coordinator

    def start_demo_app(self, name: str, version: str, latency_ms: int = 5) -> int:
        port = free_port()
        self.spawn(name, [str(self.serin), "demo-app", "--port", str(port), "--version", version,
                          "--latency-ms", str(latency_ms)])
        wait_until(name, lambda: http_get("127.0.0.1", port, "/healthz")[0] == 200)
        return port

    def start_nginx(self) -> Path:
        """A private nginx like serin's LocalNginx: `nginx -p DIR -c DIR/nginx.conf`."""
        binary = find_nginx()
        d = self.dir / "nginx"
        (d / "tmp").mkdir(parents=True, exist_ok=True)
        conf, site = d / "nginx.conf", d / "site.conf"
        conf.write_text(f"""# Private nginx for serin's benchmarks (same as LocalNginx's).
worker_processes 1;
worker_shutdown_timeout 5s;
pid "{d}/nginx.pid";
error_log "{d}/error.log" notice;
events {{}}
http {{
    access_log off;
    client_body_temp_path "{d}/tmp/client_body";
    proxy_temp_path "{d}/tmp/proxy";
    fastcgi_temp_path "{d}/tmp/fastcgi";
    uwsgi_temp_path "{d}/tmp/uwsgi";
    scgi_temp_path "{d}/tmp/scgi";
    include "{site}";
}}
""")
        site.write_text("# serin: placeholder until the first apply\n")
        base = [binary, "-p", str(d), "-c", str(conf)]
        self.spawn("nginx", base + ["-g", "daemon off;"], stop_cmd=base + ["-s", "stop"])
        wait_until("nginx pid file", lambda: (d / "nginx.pid").exists())
        self.nginx_dir = d
        self.nginx_binary = binary
        return d

    def write_agent_config(self, instances: list[dict], services: list[tuple[str, int]],
                           interval: str = "1s") -> Path:
        """instances: dicts with name, service, variant, port. services: (service, listen_port)."""
        lines = [
            'name = "bench-host"',
            f'coordinators = ["{self.coordinator}"]',
            f'interval = "{interval}"',
            f'data_dir = "{self.dir / "agent"}"',
        ]
        for i in instances:
            lines += ["", "[[instances]]", f'name = "{i["name"]}"', f'service = "{i["service"]}"',
                      f'variant = "{i["variant"]}"', f'address = "127.0.0.1:{i["port"]}"',
                      f'metrics_url = "http://127.0.0.1:{i["port"]}/metrics"']
        if services:
            d = self.nginx_dir
            lines += ["", "[nginx]", f'binary = "{self.nginx_binary}"',
                      f'config = "{d / "nginx.conf"}"', f'prefix = "{d}"',
                      f'site = "{d / "site.conf"}"']
            for service, port in services:
                lines += ["", "[[nginx.services]]", f'service = "{service}"',
                          f'listen = "127.0.0.1:{port}"']
        path = self.dir / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_agent(self, config: Path, env: dict | None = None, time_v: bool = False,
                    wait_ports: list[int] = (), standalone: bool = False) -> Proc:
        # `serin agent run --config F`, or the lean `serin-agent run --config F`.
        command = ["run"] if standalone else ["agent", "run"]
        p = self.spawn("agent", [str(self.serin), *command, "--config", str(config)],
                       env=env, time_v=time_v)
        for port in wait_ports:
            wait_until(f"nginx serving :{port}", lambda port=port:
                       http_get("127.0.0.1", port, "/__serin/generation")[0] == 200, timeout=30)
        return p

    def cli(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.serin)] + args + ["--coordinator", self.coordinator],
                              capture_output=True, text=True, check=check, timeout=30)


def child_pid(pid: int) -> int | None:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return None
    return int(kids[0]) if kids else None


# -- /proc sampling --------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int, key: str = "VmRSS:") -> int:
    """A memory line of /proc/PID/status (VmRSS, RssAnon, RssFile, VmHWM), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process (all its threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return int(fields[11]) + int(fields[12])


# -- load ------------------------------------------------------------------------------------
class Load:
    """Constant-rate GETs, a new connection per request (as `serin demo`'s load does).

    Records (t_send_ms, t_recv_ms, status, x-serin-version) for every request.
    """

    def __init__(self, targets: list[tuple[int, str]], rps: float, workers: int = 6):
        self.targets = targets
        self.period = workers / rps
        self.workers = workers
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.records: list[tuple[float, float, int, str]] = []
        self.threads = [threading.Thread(target=self._run, args=(w,), daemon=True)
                        for w in range(workers)]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def _run(self, worker: int):
        time.sleep(self.period * worker / self.workers)
        next_at = time.monotonic()
        n = 0
        while not self.stop_event.is_set():
            port, path = self.targets[(worker + n) % len(self.targets)]
            n += 1
            sent = now_ms()
            try:
                status, headers, _ = http_get("127.0.0.1", port, f"{path}/{worker}", timeout=2)
                version = headers.get("x-serin-version", "?")
            except Exception:  # noqa: BLE001 - a failed request is recorded as status 0
                status, version = 0, "?"
            with self.lock:
                self.records.append((sent, now_ms(), status, version))
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()  # behind: skip missed ticks

    def since(self, t_ms: float):
        with self.lock:
            return [r for r in self.records if r[0] >= t_ms]

    def trim(self):
        with self.lock:
            self.records = [r for r in self.records if r[0] >= now_ms() - 60_000]

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=5)
