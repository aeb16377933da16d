"""A bounded load test of capsnet_serve.py (the drawing page's server) on loopback.

    python3 bench/serve_load.py [--clients 8] [--requests 2000] [--out runs/serve_load.txt]

Starts the server (shipped model, a free port of 127.0.0.1, its own process), then CLIENTS
threads send REQUESTS requests in all, each thread on one keep-alive connection as a browser
does, in the mix a drawing session makes: 70% POST /api/predict (a 36x36 drawing of two font
digits, half of them scaled and centred by the server), 25% POST /api/perturb (a Figure 4
slider), 5% GET /api/models. Prints, and writes to --out, the throughput, the latency percentiles
and the error count: any status but 200, any broken connection, any reply that is not JSON.
The server gets SIGINT at the end; everything stops within --deadline seconds.
"""
import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, cpu_model  # noqa: E402
import multimnist_capsnet as mc  # noqa: E402


def font_digit(d: int) -> np.ndarray:
    """Digit d in matplotlib's bundled font, white on black, 28x28 in [0, 1]."""
    fig = Figure(figsize=(0.28, 0.28), dpi=100)
    canvas = FigureCanvasAgg(fig)
    fig.patch.set_facecolor("black")
    fig.text(0.5, 0.5, str(d), color="white", fontsize=17, ha="center", va="center",
             fontweight="bold")
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., 0] / 255


def drawings(n: int, rng: np.random.Generator) -> list[list[float]]:
    """n 36x36 composites of two distinct font digits shifted by up to 4 px, flat, 3 decimals."""
    glyphs = [font_digit(d) for d in range(10)]
    out = []
    for _ in range(n):
        x = np.zeros((36, 36))
        for d in rng.choice(10, 2, replace=False):
            dy, dx = rng.integers(0, 9, 2)
            x[dy:dy + 28, dx:dx + 28] += glyphs[d]
        out.append(np.round(np.minimum(x, 1), 3).ravel().tolist())
    return out


def requests(n: int, rng: np.random.Generator) -> list[tuple[str, str, bytes | None]]:
    """The mix: (method, path, body) x n."""
    images = drawings(16, rng)
    pose = lambda: (rng.uniform(-0.25, 0.25, 16) + rng.normal(0, 0.2, 16)).round(4).tolist()
    out = []
    for kind in rng.choice(3, n, p=[0.70, 0.25, 0.05]):
        if kind == 0:
            body = dict(image=images[rng.integers(16)], fit=bool(rng.integers(2)))
            out.append(("POST", "/api/predict", json.dumps(body).encode()))
        elif kind == 1:
            body = dict(capsule=int(rng.integers(10)), pose=pose())
            out.append(("POST", "/api/perturb", json.dumps(body).encode()))
        else:
            out.append(("GET", "/api/models", None))
    return out


def client(port: int, todo: list, results: list, deadline: float) -> None:
    """Send each request of todo on one keep-alive connection (a new one after a failure)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for method, path, body in todo:
        if time.monotonic() > deadline:
            results.append((path, None, "deadline"))
            continue
        t0 = time.perf_counter()
        try:
            conn.request(method, path, body, {"Content-Type": "application/json"})
            reply = conn.getresponse()
            json.loads(reply.read())
            results.append((path, time.perf_counter() - t0,
                            None if reply.status == 200 else f"status {reply.status}"))
        except (OSError, http.client.HTTPException, ValueError) as e:
            results.append((path, None, type(e).__name__))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="serve_load.py", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8, help="client threads (default: %(default)s)")
    p.add_argument("--requests", type=int, default=2000, help="in all (default: %(default)s)")
    p.add_argument("--deadline", type=float, default=300, help="seconds at most (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="the request mix (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write the report here (default: none)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    todo = requests(args.requests, rng)
    # the server stops on SIGINT below: give it a terminal's SIGINT even where this script runs
    # as a background job, which a shell starts with SIGINT ignored (the server would inherit that)
    server = subprocess.Popen([sys.executable, str(ROOT / "capsnet_serve.py"), "--port", "0"],
                              stdout=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = server.stdout.readline()
        if not first.startswith("serving "):
            print(f"serve_load.py: error: the server did not start: {first!r}", file=sys.stderr)
            return 1
        url = first.split(" on ", 1)[1].split()[0]  # 'serving A.npz[, B.npz] on URL (...)'
        port = int(url.rsplit(":", 1)[1].strip("/"))
        assert url.startswith("http://127.0.0.1:"), url  # loopback only
        results, deadline = [], time.monotonic() + args.deadline
        load = os.getloadavg()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(port, todo[k::args.clients], results,
                                                         deadline))
                   for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    report = summary(results, wall, args, load)
    print(report, end="")
    if args.out:
        mc.atomic_write(Path(args.out), report.encode())
    return 0 if all(err is None for _, _, err in results) else 1


def summary(results, wall, args, load) -> str:
    ok = [(path, s) for path, s, err in results if err is None]
    errors = [err for _, _, err in results if err is not None]
    ms = lambda s: np.percentile(s, [50, 99]) * 1000
    lines = [f"# python3 bench/serve_load.py --clients {args.clients} --requests {args.requests}",
             f"# {cpu_model()}, {os.cpu_count()} cores, load average before {load[0]:.2f}; "
             "server and clients on one machine, 127.0.0.1",
             f"requests {len(results)}, errors {len(errors)}"
             + (f" ({', '.join(sorted(set(errors)))})" if errors else ""),
             f"wall {wall:.1f} s, throughput {len(ok) / wall:.1f} requests/s",
             f"latency all: p50 {ms([s for _, s in ok])[0]:.1f} ms, p99 "
             f"{ms([s for _, s in ok])[1]:.1f} ms"]
    for path in ("/api/predict", "/api/perturb", "/api/models"):
        s = [t for p, t in ok if p == path]
        if s:
            p50, p99 = ms(s)
            lines.append(f"  {path:13s} n {len(s):5d}  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
