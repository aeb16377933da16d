"""`capsnet_serve.py`: the JSON API over real HTTP on a free port of 127.0.0.1, the
command, and the page in a real browser (headless Chromium driven through ChromeDriver's W3C
WebDriver API, standard library only: the strokes are the browser's own pointer events).

The API tests always run: the shipped model, MNIST-like test digits made here (the sample
button's), no network. The browser test needs Debian's chromium and chromium-driver, which
.ci/run installs; where they are missing it is skipped and says so.
"""
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

import capsnet_serve as cs
import capsnet_predict as cp
import multimnist_capsnet as mc
from test_capsnet_predict import font_digit, stub_model

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("multimnist_capsnet.py", "mnist_fetch.py", "cnn_baseline.py", "capsnet_predict.py",
           "capsnet_serve.py", "mpi_train.py", "affnist_like.py", "visualize_multimnist_capsnet.py",
           "make_multimnist_capsnet_gif.py")
MODELS = ("models/capsnet-multimnist.npz", "models/capsnet-mnist.npz", "models/count_cnn.npz")
SHIPPED = mc.load_checkpoint(mc.MODEL_FILE)


def font_test_set(n=50, seed=0):
    """MNIST-shaped test digits and labels for the sample button: font digits, 28x28."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.uint8)
    return np.stack([font_digit(int(d))[4:32, 4:32] for d in y]), y


@pytest.fixture(scope="module")
def digits():
    return font_test_set()


def running(models, digits, log=False):
    """A server on a free port, serving in a thread: -> (server, its URL)."""
    server = cs.make_server(models, digits, "127.0.0.1", 0, log)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def url(digits):
    shipped = cs.Served("capsnet-multimnist.npz", SHIPPED, cs.accuracy_words(mc.MODEL_FILE, SHIPPED))
    server, url = running([shipped], digits)
    yield url
    server.shutdown()
    server.server_close()


def call(url, path, body=None, raw=None, headers=None):
    """-> (status, JSON reply) of a GET, or of a POST of body (as JSON) or raw bytes."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def composite(a=2, b=3) -> np.ndarray:
    """The font composite the shipped model reads with a wide margin (test_capsnet_predict.SHIPPED_CASES)."""
    return np.minimum(font_digit(a, 0, -2).astype(int) + font_digit(b, 1, 2), 255) / 255


# ----------------------------------------------------------------------------------------------
# The API

def test_the_page_and_its_models(url):
    req = urllib.request.urlopen(url + "/", timeout=30)
    page = req.read().decode()
    assert req.status == 200 and req.headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<canvas id="pad"' in page and "/api/predict" in page
    status, info = call(url, "/api/models")
    m = info["models"][0]
    assert status == 200 and info["sample"] is True and info["slider"] == 0.25
    assert (m["canvas"], m["digits"], m["dims"], m["iterations"], m["grid"]) == (36, 2, 16, 3, 10)
    cells = np.array(m["cells"]).reshape(36, 36)
    assert cells.min() == -1 and sorted(set(cells.ravel()) - {-1}) == list(range(100))


def test_predict_reads_a_composite_and_shows_its_capsules_and_routing(url):
    x = composite()
    status, r = call(url, "/api/predict", dict(image=x.tolist(), fit=False))
    assert status == 200 and r["ink"] and sorted(r["found"]) == [2, 3]
    assert sorted(r["top"]) == [2, 3] and r["input"] == np.round(x * 255).astype(int).ravel().tolist()
    v = np.array(r["capsules"])
    want = mc.class_scores(mc.predict(SHIPPED.eval_params, SHIPPED.cfg, (x[None] * 255).round().astype(np.uint8)))[0]
    np.testing.assert_allclose(r["lengths"], want, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), r["lengths"], atol=1e-3)
    assert np.array(r["recon"]).shape == (2, 36 * 36) and max(map(max, r["recon"])) > 200
    routing = np.array(r["routing"])                               # (R, J, G*G)
    assert routing.shape == (3, 10, 100) and len(r["excess"]) == 200 and r["gain"] >= 1
    assert (routing[0] == routing[0, :1]).all()                    # iteration 1: uniform, c = 1/10
    assert not (routing[2] == routing[2, :1]).all()


def test_a_drawing_counted_two_is_read_once_for_the_count_and_the_answer(monkeypatch):
    """Served, the count's MultiMNIST model routes a drawing it counts two once: the reply is
    the one a separate copy of the model gives, with one encoding of the 36x36 view, not two."""
    one, counter = mc.load_checkpoint(cp.MNIST_MODEL_FILE), cp.load_counter()
    served = cs.Served("capsnet-multimnist.npz", SHIPPED, "")
    body = dict(image=composite().tolist(), fit=False)
    apart = cs.page_predict(served, body, counter, (one, mc.load_checkpoint(mc.MODEL_FILE)))
    sides, encode = [], mc.encode
    monkeypatch.setattr(mc, "encode", lambda params, x, cfg: (sides.append(x.shape[1]),
                                                              encode(params, x, cfg))[1])
    shared = cs.page_predict(served, body, counter, (one, SHIPPED))
    assert shared == apart and shared["count"] == 2 and sorted(sides) == [28, 36]


def test_predict_scales_a_drawing_and_finds_no_digit_on_a_blank(url):
    x = np.zeros((36, 36))
    x[2:34, 16:19] = 1                                             # a tall stroke: a 1
    status, r = call(url, "/api/predict", dict(image=x.ravel().tolist(), fit=True))
    assert status == 200 and r["found"] == [1] and "scaled" in r["how"]
    assert r["count"] == 1 and r["count_score"] < 0                  # one stroke, one digit
    assert np.array(r["input"]).reshape(36, 36).any(1).sum() == cp.DIGIT_BOX
    for fit in (True, False):
        assert call(url, "/api/predict", dict(image=np.zeros((36, 36)).tolist(), fit=fit)) == \
            (200, dict(model="capsnet-multimnist.npz", ink=False, how="no ink"))


def test_perturb_decodes_one_capsule_as_figure_4(url):
    _, r = call(url, "/api/predict", dict(image=composite().tolist()))
    k = r["top"][0]
    status, same = call(url, "/api/perturb", dict(capsule=k, pose=r["capsules"][k]))
    assert status == 200 and np.abs(np.subtract(same["recon"], r["recon"][0])).max() <= 1
    pose = np.array(r["capsules"][k])
    pose[3] += 0.25
    _, moved = call(url, "/api/perturb", dict(capsule=k, pose=pose.tolist()))
    assert np.abs(np.subtract(moved["recon"], same["recon"])).max() > 20


def test_sample_is_a_pair_of_the_papers_task(url):
    status, r = call(url, "/api/sample")
    a, b = (np.array(r[k]).reshape(36, 36) for k in "ab")
    assert status == 200 and len(r["labels"]) == 2 and r["labels"][0] != r["labels"][1]
    assert a.max() > 200 and b.max() > 200 and a.any(0).sum() <= 28 and b.any(1).sum() <= 28


def test_a_one_digit_model_and_no_mnist(tmp_path, digits):
    one = cs.Served("one.npz", mc.load_checkpoint(stub_model(tmp_path / "one.npz", 28,
                                                             {3: 0.97, 5: 0.8})), "")
    server, url = running([cs.Served("two", SHIPPED, ""), one], None)
    try:
        status, info = call(url, "/api/models")
        assert [(m["canvas"], m["digits"]) for m in info["models"]] == [(36, 2), (28, 1)]
        assert info["sample"] is False
        bar = np.zeros((28, 28))
        bar[4:24, 12:15] = 1
        status, r = call(url, "/api/predict", dict(model="one.npz", image=bar.tolist()))
        assert status == 200 and r["found"] == [3] and r["top"] == [3, 5]
        assert call(url, "/api/sample?model=one.npz") == (503, dict(
            error="this server has no MNIST test digits (the page hides the button)"))
    finally:
        server.shutdown()
        server.server_close()
    server, url = running([one], digits)
    try:
        status, r = call(url, "/api/sample")
        assert status == 200 and len(r["labels"]) == 1 and not any(r["b"])
    finally:
        server.shutdown()
        server.server_close()


def raw_http(url, data: bytes) -> bytes:
    """Send raw bytes to the server (its own address put for 'Host: x'), -> its first reply."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(data.replace(b"Host: x\r\n", f"Host: {host}:{port}\r\n".encode()))
        out = b""
        while (chunk := s.recv(65536)) and not _whole(out := out + chunk):
            pass
        return out


def _whole(reply: bytes) -> bool:
    head, sep, body = reply.partition(b"\r\n\r\n")
    n = [int(ln.split(b":")[1]) for ln in head.split(b"\r\n")
         if ln.lower().startswith(b"content-length:")]
    return bool(sep) and bool(n) and len(body) >= n[0]


def status_and_error(reply: bytes) -> tuple[int, str]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


x36 = np.zeros((36, 36)).tolist()
BAD_POSTS = {  # name: (path, raw body, status, a piece of the one-line error)
    "malformed JSON": ("/api/predict", b'{"image": [1, 2', 400, "malformed JSON: "),
    "not UTF-8": ("/api/predict", b'{"image": "\xff"}', 400, "malformed JSON: "),
    "not an object": ("/api/predict", b"[1, 2]", 400, "must be a JSON object"),
    "no image": ("/api/predict", b"{}", 400, "has no 'image'"),
    "wrong size": ("/api/predict", json.dumps(dict(image=[[0] * 28] * 28)).encode(), 400,
                   "has shape (28, 28); this model takes 36x36"),
    "ragged": ("/api/predict", b'{"image": [[0, 1], [0]]}', 400, "must be a list of numbers"),
    "strings": ("/api/predict", json.dumps(dict(image=[["a"] * 36] * 36)).encode(), 400,
                "must be a list of numbers"),
    "NaN": ("/api/predict", json.dumps(dict(image=[[float("nan")] * 36] * 36)).encode(), 400,
            "numbers in 0..1"),
    "too bright": ("/api/predict", json.dumps(dict(image=[[2] * 36] * 36)).encode(), 400,
                   "numbers in 0..1"),
    "huge number": ("/api/predict", b'{"image": [' + b"1" * 400 + b"]}", 400,
                    "must be a list of numbers"),
    "deep nesting": ("/api/predict", b"[" * 100000 + b"]" * 100000, 400, "malformed JSON: "),
    "fit not a bool": ("/api/predict", json.dumps(dict(image=x36, fit="yes")).encode(), 400,
                       "'fit' must be true or false"),
    "unknown model": ("/api/predict", json.dumps(dict(image=x36, model="../x.npz")).encode(), 400,
                      "no model '../x.npz'; this server has capsnet-multimnist.npz"),
    "model not a name": ("/api/predict", json.dumps(dict(image=x36, model=[])).encode(), 400,
                         "no model '[]'"),
    "capsule 10": ("/api/perturb", json.dumps(dict(capsule=10, pose=[0] * 16)).encode(), 400,
                   "'capsule' must be a digit 0..9"),
    "capsule true": ("/api/perturb", json.dumps(dict(capsule=True, pose=[0] * 16)).encode(), 400,
                     "'capsule' must be a digit"),
    "pose of 15": ("/api/perturb", json.dumps(dict(capsule=1, pose=[0] * 15)).encode(), 400,
                   "'pose' must be 16 numbers in -1.25..1.25"),
    "pose too long": ("/api/perturb", json.dumps(dict(capsule=1, pose=[9] * 16)).encode(), 400,
                      "'pose' must be 16 numbers"),
    "no such route": ("/api/train", b"{}", 404, "no such page: /api/train"),
    "too large": ("/api/predict", b" " * (cs.MAX_BODY + 1), 413,
                  "a body of 1,048,577 bytes; the limit is 1,048,576"),
}


@pytest.mark.parametrize("name", list(BAD_POSTS))
def test_a_bad_request_is_one_line_and_the_server_keeps_serving(url, name):
    path, body, status, expect = BAD_POSTS[name]
    got, reply = call(url, path, raw=body, headers={"Content-Type": "application/json"})
    assert got == status and expect in reply["error"] and "\n" not in reply["error"]
    assert "Traceback" not in reply["error"] and len(reply["error"]) < 200
    assert call(url, "/api/predict", dict(image=composite().tolist()))[0] == 200


@pytest.mark.parametrize("request_bytes, status, expect", [
    (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n", 413,
     "a body of 99,999,999 bytes"),
    (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411,
     "send the body with a Content-Length"),
    (b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such page: /../../etc/passwd"),
    (b"GET /multimnist_capsnet.py HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such page"),
    (b"GET /models/capsnet-multimnist.npz HTTP/1.1\r\nHost: x\r\n\r\n", 404, "no such page"),
    (b"PUT / HTTP/1.1\r\nHost: x\r\n\r\n", 501, "Unsupported method ('PUT')"),
    (b"GET /api/predict?x=1 HTTP/1.1\r\nHost: x\r\n\r\n", 405,
     "GET /api/predict: this route takes POST"),
    (b"POST /api/models HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}", 405,
     "POST /api/models: this route takes GET"),
    (b"GET / HTTP/1.1 extra\r\n\r\n", 400, "Bad request version ('extra')"),
    (b"garbage\r\n\r\n", 400, "Bad request syntax ('garbage')"),
])
def test_raw_bad_requests_read_no_file_and_leave_the_server_up(url, request_bytes, status, expect):
    got, error = status_and_error(reply := raw_http(url, request_bytes))
    assert got == status and expect in error and "root:" not in error
    if status == 405:                                   # and says which method the route takes
        assert reply_head(reply)[1]["allow"] == expect.split()[-1]
    assert call(url, "/api/models")[0] == 200


@pytest.mark.parametrize("then, status, expect", [
    ("hang up", 400, "the body ended after 10 of its 100 bytes"),
    ("go quiet", 408, "the body did not arrive within 0.5 s")])
def test_a_body_shorter_than_its_length_is_one_line_and_no_log(url, monkeypatch, capfd, then,
                                                                status, expect):
    """A client that sends less than its Content-Length, then closes its side or waits past the
    handler's timeout, gets one line, the connection closed, and leaves the log quiet."""
    monkeypatch.setattr(cs.PageHandler, "timeout", 0.5)
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /api/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 100"
                  "\r\n\r\n".encode() + b"{" * 10)
        if then == "hang up":
            s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):                   # to the end: the server closes
            data += chunk
    got, error = status_and_error(data)
    assert got == status and error == expect and reply_head(data)[1]["connection"] == "close"
    assert call(url, "/api/models")[0] == 200 and capfd.readouterr().err == ""


def test_keep_alive_survives_a_refused_body(url):
    """Two requests on one connection: a body over the cap (drained), then a good one."""
    big = b" " * (cs.MAX_BODY + 10)
    good = json.dumps(dict(image=composite().tolist())).encode()
    req = lambda body: (b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                        % len(body)) + body
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall((req(big) + req(good) + b"GET /api/none HTTP/1.1\r\nHost: x\r\n\r\n").replace(
            b"Host: x", f"Host: {host}:{port}".encode()))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert re.findall(rb"HTTP/1.1 (\d\d\d) ", data) == [b"413", b"200", b"404"]


def reply_head(reply: bytes) -> tuple[int, dict]:
    """A raw reply's status and its headers, names in lower case."""
    head = reply.partition(b"\r\n\r\n")[0].decode().split("\r\n")
    return int(head[0].split()[1]), {k.strip().lower(): v.strip() for k, v in
                                      (ln.split(":", 1) for ln in head[1:])}


def request(method, path, host, extra=b"", body=b""):
    return (f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra
            + (b"Content-Length: %d\r\n" % len(body) if body else b"") + b"\r\n" + body)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1:1",
                                  "localhost", "", None])
@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/api/models"),
                                          ("POST", "/api/predict"), ("OPTIONS", "/api/predict")])
def test_a_request_naming_another_host_is_refused(url, host, method, path):
    """DNS rebinding: another site's page reaches the server under that site's name, which
    its Host header carries. Only the server's own address is answered."""
    port = url.rsplit(":", 1)[1]
    body = json.dumps(dict(image=composite().tolist())).encode() if method == "POST" else b""
    data = request(method, path, host.format(port=port) if host is not None else "", body=body)
    if host is None:                                                   # no Host at all
        data = data.replace(b"Host: \r\n", b"")
    status, head = reply_head(reply := raw_http(url, data))
    error = status_and_error(reply)[1]
    assert status == 403 and head["connection"] == "close" and "\n" not in error
    assert error.endswith(f"refused (open http://127.0.0.1:{port}/)") and len(error) < 200


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}",
                                  "LOCALHOST:{port}"])
def test_the_servers_own_names_are_answered(url, host):
    port = url.rsplit(":", 1)[1]
    status, head = reply_head(raw_http(url, request("GET", "/api/models", host.format(port=port))))
    assert status == 200
    assert cs.own_hosts("0.0.0.0", 80) == {"localhost", "127.0.0.1", "[::1]", "0.0.0.0",
                                            "localhost:80", "127.0.0.1:80", "[::1]:80",
                                            "0.0.0.0:80"}
    assert "[::1]:8000" in cs.own_hosts("::1", 8000) and "myhost:8000" in cs.own_hosts(
        "MyHost", 8000)


def test_an_ipv6_address_is_served_under_its_bracketed_name():
    """--host ::1 listens on IPv6 loopback and answers its own name, [::1] with the port."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as e:
        pytest.skip(f"this machine has no IPv6 loopback ({e.strerror})")
    shipped = cs.Served("capsnet-multimnist.npz", SHIPPED, "")
    server = cs.make_server([shipped], None, "::1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert server.url == f"http://[::1]:{port}/"
        with socket.create_connection(("::1", port), timeout=30) as s:
            s.sendall(request("GET", "/api/models", f"[::1]:{port}"))
            assert reply_head(s.recv(65536))[0] == 200
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("origin, status", [("http://evil.example", 403),
                                            ("http://127.0.0.1:{port}.evil.example", 403),
                                            ("null", 403), ("http://127.0.0.1:{port}", 200),
                                            ("http://localhost:{port}", 200), (None, 200)])
def test_a_post_from_another_sites_page_is_refused(url, origin, status):
    """A cross-origin POST sent as text/plain needs no preflight: its Origin refuses it. The
    page's own (same origin) and a client that names none (curl, scripts) are served."""
    port = url.rsplit(":", 1)[1]
    extra = b"Content-Type: text/plain\r\n" + (
        f"Origin: {origin.format(port=port)}\r\n".encode() if origin else b"")
    body = json.dumps(dict(image=composite().tolist())).encode()
    reply = raw_http(url, request("POST", "/api/predict", f"127.0.0.1:{port}", extra, body))
    got, error = status_and_error(reply) if reply_head(reply)[0] != 200 else (200, "")
    assert got == status and (status == 200 or "is another site: refused" in error), error


def test_options_says_what_may_be_sent_and_grants_no_other_site(url):
    port = url.rsplit(":", 1)[1]
    own = f"127.0.0.1:{port}"
    status, head = reply_head(raw_http(url, request("OPTIONS", "/api/predict", own)))
    assert status == 204 and head["allow"] == "GET, POST, OPTIONS" and head["content-length"] == "0"
    preflight = (b"Origin: http://evil.example\r\nAccess-Control-Request-Method: POST\r\n"
                 b"Access-Control-Request-Headers: content-type\r\n")
    status, head = reply_head(raw_http(url, request("OPTIONS", "/api/predict", own, preflight)))
    assert status == 403 and not any(k.startswith("access-control-") for k in head)
    assert call(url, "/api/models")[0] == 200


def test_concurrent_requests_are_answered_alike(url):
    body = dict(image=composite().tolist())
    results, errors = [], []

    def client():
        try:
            for _ in range(3):
                results.append(call(url, "/api/predict", body))
        except Exception as e:  # recorded, then asserted: a thread's exception would vanish
            errors.append(e)
    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 24
    assert all(s == 200 and r == results[0][1] for s, r in results)


# ----------------------------------------------------------------------------------------------
# The command

def terminal_sigint():
    """In the child before it starts: SIGINT as a terminal's Ctrl-C gives it. A shell starts a
    background job (`pytest &`, nohup) with SIGINT ignored, the child inherits that, Python then
    installs no KeyboardInterrupt, and a server sent SIGINT would never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def serve(*args, cwd):
    """`serve` in a child process; killed on the way out if still running, so that a failed or
    timed-out test leaves no server behind."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "capsnet_serve.py"),
                             *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=terminal_sigint)
    with proc:  # closes the pipes
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_serve_starts_on_a_free_port_and_stops_on_ctrl_c(tmp_path):
    """On every address (0.0.0.0), saying which names it answers; no MNIST: no random pairs."""
    with serve("--port", "0", "--data-dir", tmp_path, "--host", "0.0.0.0", cwd=tmp_path) as proc:
        try:
            first = proc.stdout.readline()
            assert first.startswith("serving capsnet-multimnist.npz"), first
            url = first.split(" on ", 1)[1].split()[0].rstrip("/")
            assert url.startswith("http://0.0.0.0:"), first
            assert proc.stdout.readline().endswith("random-pair button is hidden (python3 "
                                                   "mnist_fetch.py fetches them)\n")
            assert proc.stdout.readline().startswith("0.0.0.0 listens on every address, but "
                                                     "answers only requests to localhost's")
            status, info = call(url, "/api/models")
            assert status == 200 and info["sample"] is False
            assert info["models"][0]["accuracy"].startswith(
                "set accuracy 0.859 on 10,000 test pairs")
            for size in (5 * cs.MAX_BODY, 12 * cs.MAX_BODY):  # drained, then past the drain
                drop_mid_body(url, size)
            assert call(url, "/api/models")[0] == 200
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out == "stopped\n" and err == ""
    assert list(tmp_path.iterdir()) == []


def drop_mid_body(url, size: int):
    """POST a body of size bytes, send a tenth of it, and hang up with a reset (SO_LINGER 0), as
    a client that gives up on an oversized upload does."""
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(f"POST /api/predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {size}"
              f"\r\n\r\n".encode() + b" " * (size // 10))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    time.sleep(0.3)                       # the server meets the reset before the next request


def test_a_failing_test_leaves_no_server_running(tmp_path):
    with pytest.raises(RuntimeError), serve("--port", "0", "--data-dir", tmp_path,
                                            cwd=tmp_path) as proc:
        assert proc.stdout.readline().startswith("serving ")
        raise RuntimeError("a test failing while the server runs")
    assert proc.returncode == -signal.SIGKILL  # killed on the way out, not exited by itself


def test_serve_bad_flags_and_a_busy_port_are_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for args, code, expect in [
            (("--port", "70000"), 2, "'70000' is not a port number 0..65535"),
            (("--port", "x"), 2, "'x' is not a port number"),
            (("--checkpoint", tmp_path / "none.npz"), 1, "does not exist"),
            (("--port", port), 1, f"cannot listen on 127.0.0.1:{port}: Address already in use"),
            (("--host", "no.such.host.invalid", "--port", "0"), 1, "cannot listen on no.such"),
        ]:
            with serve(*args, cwd=tmp_path) as proc:
                out, err = proc.communicate(timeout=60)
            assert proc.returncode == code and out == "" and err.count("\n") == 1, (args, err)
            assert expect in err and err.startswith("capsnet_serve.py: error: "), err


def test_serve_refuses_a_cnn_checkpoint(tmp_path):
    cfg = mc.Config(model="cnn", cnn_conv1=2, cnn_conv2=2, cnn_fc=4)
    mc.save_model(tmp_path / "cnn.npz", mc.new_run(cfg))
    with serve("--checkpoint", tmp_path / "cnn.npz", cwd=tmp_path) as proc:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "the page shows capsules, and a cnn has none" in err


def test_every_serve_flag_has_help_and_errors_point_to_help(capsys):
    parser = cs.build_serve_parser()
    for action in parser._actions:
        assert (action.help or "").strip() and not action.help.startswith("(default")
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--no-such-flag"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--help" in err


def test_the_page_and_the_models_ship_with_the_package(tmp_path, monkeypatch):
    """pip's wheel carries every module, and the page and the shipped models to
    share/multimnist-capsnet/, where the modules look when they are not beside them."""
    src = tmp_path / "src"                        # built from a copy: setuptools writes build/
    (src / "models").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", cs.PAGE, *MODULES, *MODELS):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No matching distribution found for setuptools" in r.stderr:
        pytest.skip("pip cannot fetch setuptools to build a wheel (no package index)")
    assert r.returncode == 0, r.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert set(MODULES) <= set(names)
    share = "multimnist_capsnet-0.1.0.data/data/share/multimnist-capsnet/"
    assert {share + cs.PAGE, *(share + m for m in MODELS)} <= set(names)
    assert cs.page_file() == ROOT / cs.PAGE
    installed = tmp_path / "env"
    (installed / "share" / "multimnist-capsnet").mkdir(parents=True)
    (installed / "share" / "multimnist-capsnet" / cs.PAGE).write_text("the page")
    monkeypatch.setattr(cs, "__file__", str(tmp_path / "site-packages" / "capsnet_serve.py"))
    monkeypatch.setattr(sys, "prefix", str(installed))
    assert cs.page_file().read_text() == "the page"
    model = installed / "share" / "multimnist-capsnet" / MODELS[0]
    model.parent.mkdir()
    model.write_bytes(b"a model")
    assert mc.installed(MODELS[0], cs.__file__) == model


# ----------------------------------------------------------------------------------------------
# The page in a real browser

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element key


class WebDriver:
    """The few W3C WebDriver commands the test needs, over HTTP with the standard library."""

    def __init__(self, url: str, args: list[str]):
        self.url = url
        caps = {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})[
            "sessionId"]

    def _call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"WebDriver {method} {path}: {e.read()[:500]!r}") from None

    def __call__(self, method, path="", body=None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def js(self, script, *args):
        return self("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css) -> dict:
        return self("POST", "/element", {"using": "css selector", "value": css})

    def click(self, css):
        self("POST", f"/element/{self.find(css)[ELEMENT]}/click", {})

    def keys(self, css, text):
        self("POST", f"/element/{self.find(css)[ELEMENT]}/value", {"text": text})

    def draw(self, css, points, size):
        """Press, move through points (pixels of an element size x size), release: the
        browser's own pointer events on the element."""
        el = self.find(css)
        at = lambda p: {"type": "pointerMove", "duration": 15, "origin": el,
                        "x": int(p[0] - size / 2), "y": int(p[1] - size / 2)}
        steps = [at(points[0]), {"type": "pointerDown", "button": 0},
                 *map(at, points[1:]), {"type": "pointerUp", "button": 0}]
        self("POST", "/actions", {"actions": [{"type": "pointer", "id": "pen", "actions": steps,
                                               "parameters": {"pointerType": "mouse"}}]})


def wait(fn, what, timeout=20.0):
    t0 = time.monotonic()
    while not (value := fn()):
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no headless browser: Debian's chromium and chromium-driver are not installed "
                    "(.ci/run installs them with apt-get where it can)")
    port = free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: _ready(url), "chromedriver")
        wd = WebDriver(url, ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync",
                             "--disable-dev-shm-usage", "--force-device-scale-factor=1",
                             "--window-size=1360,900", f"--user-data-dir={tmp_path / 'profile'}"])
        yield wd
        wd("DELETE")
    finally:
        driver.terminate()
        driver.wait(timeout=30)


def _ready(url) -> bool:
    try:
        return call(url, "/status")[1]["value"]["ready"]
    except OSError:
        return False


def circle(cx, cy, rx, ry, n=24):
    t = np.linspace(0, 2 * np.pi, n + 1)
    return list(zip(cx + rx * np.sin(t), cy - ry * np.cos(t)))


def test_the_page_reads_digits_drawn_with_its_own_pointer_events(browser, url):
    page = browser
    page("POST", "/url", {"url": url + "/"})
    wait(lambda: page.js("return document.body.dataset.ready") == "1", "the page to load")
    found = lambda: page.js("return document.getElementById('digits').dataset.found")
    count = lambda what: int(page.js(f"return document.body.dataset.{what}"))
    lengths = lambda: page.js("return [...document.querySelectorAll('#lengths .len')].map("
                              "(e) => [+e.dataset.digit, +e.dataset.length])")
    assert page.js("return document.getElementById('model').textContent") == (
        "model: capsnet-multimnist.npz, set accuracy 0.859 on 10,000 test pairs, paper's task "
        "(free shifts, add-and-clip) (reads two digits)")

    counted = lambda: page.js("return document.getElementById('digits').dataset.count")
    page.draw("#pad", [(190, 60), (188, 120), (186, 200), (184, 290)], 360)   # red: a 1
    wait(lambda: found() == "1", "the 1 to be read as one digit")           # not '1 and 7'
    assert counted() == "1" and page.js("return document.getElementById('count').textContent"
                                         ).startswith("One digit, as capsnet_predict.py counts")
    ls = np.array(lengths())
    assert ls.shape == (10, 2) and (ls[:, 0] == np.arange(10)).all()
    assert ls[:, 1].argmax() == 1 and ls[1, 1] >= 0.5 and 0 <= ls[:, 1].min()

    page.click("#pen-b")
    before = count("predictions")
    page.draw("#pad", circle(185, 175, 55, 95), 360)                          # green: a 0
    wait(lambda: count("predictions") > before and "0" in found().split(","), "the 0 to be read")
    assert sorted(found().split(",")) == ["0", "1"] and counted() == "2", found()
    pad = page.js("const g = document.getElementById('pad').getContext('2d');"
                  "const d = g.getImageData(0, 0, 360, 360).data; let r = 0, gr = 0;"
                  "for (let i = 0; i < d.length; i += 4) { r = Math.max(r, d[i] - d[i + 1]);"
                  " gr = Math.max(gr, d[i + 1] - d[i]); } return [r, gr];")
    assert min(pad) > 150                                        # red strokes and green ones

    pixels = "return Array.from(document.getElementById('perturbed').getContext('2d')" \
             ".getImageData(0, 0, 144, 144).data).reduce((a, b) => a + b, 0)"
    wait(lambda: count("perturbs") > 0, "Figure 4's first drawing")
    before, drawn = count("perturbs"), page.js(pixels)
    page.keys("#dim0", "\ue014" * 10)                            # ArrowRight: +0.10
    wait(lambda: count("perturbs") > before and page.js(pixels) != drawn, "the slider's redraw")
    assert page.js("return document.getElementById('dim0').value") == "0.1"

    if out := os.environ.get("SERVE_SCREENSHOT"):   # the README's picture, as the test saw it
        mc.atomic_write(Path(out), base64.b64decode(page("GET", "/screenshot")))

    page.click("#sample")
    wait(lambda: "MNIST test digits" in page.js("return document.getElementById('status')"
                                                ".textContent"), "a test pair")
    assert page.js("return document.getElementById('fit').checked") is False
    page.click("#clear")
    wait(lambda: page.js("return document.getElementById('digits').textContent") ==
         "draw a digit", "the cleared page")
    assert lengths() == []
    png = base64.b64decode(page("GET", "/screenshot"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_load_test_runs_and_counts_no_errors(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--clients", "4",
                        "--requests", "40", "--out", str(tmp_path / "load.txt")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "load.txt").read_text()
    assert report == r.stdout and "requests 40, errors 0\n" in report and "p99" in report
