"""The service under hostile load, measured (issue 32): `ortdiffusion serve` with its default
settings on the built-in model, in a process of its own, attacked over loopback from this one.

    python benchmarks/reliability.py --out benchmarks/results/reliability-cpu2.json

1. The worst request the defaults admit, for memory: the largest batch they allow (`max_batch_pixels`:
   one 256x256 image; n=4 of them runs as four batches); its peak resident memory (the server's VmHWM) against the machine's, and
   one denoising step's time at that batch — the unit at which deadlines are checked.
2. 30 clients for `--seconds`: 24 send requests back to back, 6 are slow (3 trickle each request's
   bytes over a few seconds, 3 send half a request and stop): counts of 200 / 429 / 5xx / other and
   transport errors, latency percentiles of the 200s, every 200's images decoded.
3. `--half-open` connections opened as fast as this process can, each sending half a request line
   and never more, while /health/live and a generation are tried every half second: how many of
   those answered, the server's open file handles and log lines during the attack.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import select  # poll: select() stops at 1024 handles
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from serve_load import free_port, pct

PROMPTS = ["a red circle on the left", "a small blue square at the top", "a green triangle above a yellow star"]


def start(args) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = Path(args.log)
    root = Path(__file__).resolve().parents[1]  # this checkout's ortdiffusion, whatever is installed
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "ortdiffusion.cli", "serve", "--model", args.model, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"), env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    for _ in range(3000):
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.1)
    raise RuntimeError("server did not become ready")


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def worst_request(url: str, pid: int) -> dict:
    before = status_kb(pid, "VmHWM")
    body = {"prompt": "a red circle", "n": 2, "size": "256x256", "steps": 2, "seed": 0, "response_format": "b64_json"}
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=900)
    seconds = time.perf_counter() - start
    refused = httpx.post(f"{url}/v1/images/generations", json={**body, "n": 10}, timeout=60).json()["error"]
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    compute = float(r.headers["x-ortdiffusion-compute-ms"]) / 1e3 / body["n"]  # one batch per image
    return {"request": body, "status": r.status_code, "seconds": round(seconds, 2),
            "step_seconds_at_this_batch": round(compute / body["steps"], 2),
            "peak_rss_before_gb": round(before / 2**20, 2), "peak_rss_gb": round(status_kb(pid, "VmHWM") / 2**20, 2),
            "machine_memory_gb": round(mem_total / 2**30, 1),
            "n_10_at_256_answer": {k: refused[k] for k in ("code", "param", "message")}}


def load(url: str, seconds: float) -> dict:
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    undecodable = [0]
    slow = {"trickled": 0, "trickle_ok": 0, "stalled": 0, "stalled_closed_by_server": 0}
    host, port = url.removeprefix("http://").split(":")

    def count(key: str) -> None:
        with lock:
            statuses[key] = statuses.get(key, 0) + 1

    def normal(i: int) -> None:
        with httpx.Client(timeout=600) as client:
            n = 0
            while time.monotonic() < stop:
                n += 1
                body = {"prompt": PROMPTS[(i + n) % 3], "seed": i * 1000 + n, "response_format": "b64_json",
                        "n": random.choice((1, 1, 2))}
                start = time.perf_counter()
                try:
                    r = client.post(f"{url}/v1/images/generations", json=body)
                except httpx.TransportError as e:
                    count(f"transport error {type(e).__name__}")
                    continue
                count(str(r.status_code))
                if r.status_code == 200:
                    with lock:
                        latencies.append(time.perf_counter() - start)
                    for d in r.json()["data"]:
                        if base64.b64decode(d["b64_json"])[:4] != b"\x89PNG":
                            undecodable[0] += 1
                elif r.status_code == 429:
                    time.sleep(float(r.headers.get("retry-after", "1")))

    def trickle() -> None:
        body = json.dumps({"prompt": "a red circle", "steps": 4}).encode()
        request = (f"POST /v1/images/generations HTTP/1.1\r\nHost: {host}:{port}\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body
        while time.monotonic() < stop:
            with socket.create_connection((host, int(port))) as s:
                for k in range(0, len(request), 16):  # about 3 s for the whole request
                    s.sendall(request[k:k + 16])
                    time.sleep(0.2)
                s.settimeout(600)
                reply = s.recv(64)
            with lock:
                slow["trickled"] += 1
                slow["trickle_ok"] += reply.startswith((b"HTTP/1.1 200", b"HTTP/1.1 429"))

    def stall() -> None:
        while time.monotonic() < stop:
            with socket.create_connection((host, int(port))) as s:
                s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: ")
                s.settimeout(max(1.0, stop - time.monotonic() + 15))
                try:
                    closed = s.recv(64) == b""
                except (ConnectionResetError, TimeoutError):
                    closed = True
            with lock:
                slow["stalled"] += 1
                slow["stalled_closed_by_server"] += closed

    threads = [threading.Thread(target=normal, args=(i,)) for i in range(24)]
    threads += [threading.Thread(target=trickle) for _ in range(3)] + [threading.Thread(target=stall) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    five = sum(v for k, v in statuses.items() if k.startswith("5"))
    return {"clients": 30, "normal_clients": 24, "slow_clients": 6, "seconds": seconds, "statuses": statuses,
            "count_200": statuses.get("200", 0), "count_429": statuses.get("429", 0), "count_5xx": five,
            "latency_200_s": pct(latencies), "undecodable_images": undecodable[0], "slow": slow}


def half_open(url: str, pid: int, total: int, log: Path) -> dict:
    host, port = url.removeprefix("http://").split(":")
    lines_before = len(log.read_bytes().splitlines())
    probes = {"live_ok": 0, "live_failed": 0, "generate_ok": 0, "generate_failed": 0}
    fds = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=30) as client:
            while not done.is_set():
                for key, call in (("live", lambda: client.get(f"{url}/health/live")),
                                  ("generate", lambda: client.post(f"{url}/v1/images/generations",
                                                                   json={"prompt": "a red circle", "steps": 2}))):
                    try:
                        ok = call().status_code == 200
                    except httpx.TransportError:
                        ok = False
                    probes[f"{key}_{'ok' if ok else 'failed'}"] += 1
                fds.append(len(os.listdir(f"/proc/{pid}/fd")))
                time.sleep(0.5)

    prober = threading.Thread(target=probe)
    prober.start()
    held: list[socket.socket] = []
    opened = refused_at_connect = closed_by_server = 0
    start = time.perf_counter()
    while opened < total:
        try:
            s = socket.create_connection((host, int(port)), timeout=10)
            s.sendall(b"GET /health/live HTT")
            held.append(s)
            opened += 1
        except OSError:
            refused_at_connect += 1
            time.sleep(0.01)
        if len(held) >= 2000 or opened == total:  # free this process's handles the server already closed
            for s in _readable(held):
                held.remove(s)
                s.close()
                closed_by_server += 1
    open_seconds = time.perf_counter() - start
    time.sleep(12)  # past the header deadline: whatever is still held must be closed by then
    still_open = sum(1 for s in held if not _closed(s))
    closed_by_server += len(held) - still_open
    for s in held:
        s.close()
    done.set()
    prober.join()
    lines = log.read_bytes().splitlines()[lines_before:]
    return {"connections": opened, "open_seconds": round(open_seconds, 1), "connect_errors": refused_at_connect,
            "closed_by_server": closed_by_server, "still_open_after_header_timeout": still_open,
            "probes_during_attack": probes, "server_open_fds_max": max(fds, default=-1),
            "server_log_lines_during_attack": len(lines), "server_log_sample": [x.decode()[:200] for x in lines[:5]]}


def _readable(held: list[socket.socket]) -> list[socket.socket]:
    poller = select.poll()
    by_fd = {s.fileno(): s for s in held}
    for fd in by_fd:
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    return [by_fd[fd] for fd, _ in poller.poll(0)]


def _closed(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--half-open", type=int, default=20_000)
    parser.add_argument("--log", default="/tmp/reliability-server.log")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    proc, url, log = start(args)
    try:
        result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "fd_limit": __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)},
                  "server": "ortdiffusion serve --model builtin (default settings)"}
        result["worst_admissible_request"] = worst_request(url, proc.pid)
        print(json.dumps(result["worst_admissible_request"]), flush=True)
        result["load"] = load(url, args.seconds)
        print(json.dumps(result["load"]), flush=True)
        result["half_open"] = half_open(url, proc.pid, args.half_open, log)
        print(json.dumps(result["half_open"]), flush=True)
        result["alive_after"] = httpx.get(f"{url}/health/ready", timeout=30).status_code == 200
        result["server_log_bytes"] = log.stat().st_size
    finally:
        proc.terminate()
        result["server_exit_code"] = proc.wait(120)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("alive_after", "server_log_bytes", "server_exit_code")}))


if __name__ == "__main__":
    main()
