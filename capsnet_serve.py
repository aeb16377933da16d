"""A page to draw digits on and watch the capsules read them, served on loopback.

    python3 capsnet_serve.py [--port 8000] [--host 127.0.0.1] [--checkpoint PATH]

The page (capsnet_serve_page.html) posts a drawing; the server answers with the capsule lengths,
each digit's reconstruction and the routing. It reads the model and MNIST's cached test digits,
never writes, and downloads nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import http.server
import json
import socket
import sys
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import capsnet_predict as cp
import multimnist_capsnet as mc
import visualize_multimnist_capsnet as viz
from multimnist_capsnet import CapsNetError, MODEL_FILE, Run

PAGE = "capsnet_serve_page.html"  # beside this module; pip install . puts it in share/
MAX_BODY = 2 ** 20   # bytes a request may send; a drawing is under 7 KB of JSON
SLIDER = 0.25        # the Figure 4 sliders add -SLIDER..SLIDER to one dimension, as the paper's
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def page_file() -> Path:
    """The page, beside this module or where pip install . put it (mc.installed)."""
    return mc.installed(PAGE, __file__)


class BadRequest(CapsNetError):
    """A request the server refuses, with its HTTP status; the message is one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Served:
    """A model the page can use, and what the page says about it."""
    name: str
    run: Run
    accuracy: str
    path: Path | None = None   # its file, when it was read from one


def accuracy_words(path, run: Run) -> str:
    """The model's test accuracy in words: the first test set its file names (`bench/recipe.py ship`
    stores them), else its last epoch's."""
    one = run.cfg.n_labels == 1
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    for task, m in (meta.get("test_metrics") or {}).items():
        n = meta.get("n_test")
        on = f"{f'{n:,} ' if n else ''}test {'digits' if one else 'pairs'}, {task}"
        if "test_error" in m:
            return f"test error {100 * m['test_error']:.2f}% on {on}"
        return f"{'accuracy' if one else 'set accuracy'} {m.get('set_acc', m['top1']):.3f} on {on}"
    if run.history["epochs"]:
        last = run.history["epochs"][-1]
        if "test_error" in last:
            return (f"test error {100 * last['test_error']:.2f}% on its {run.cfg.n_test:,} test "
                    f"digits (last epoch)")
        return (f"set accuracy {last['set_acc']:.3f} on its {run.cfg.n_test:,} test composites "
                f"(last epoch)")
    return "never evaluated"


def served_models(checkpoint: str | None) -> list[Served]:
    """What serve offers: --checkpoint alone, else the shipped MultiMNIST model and, once
    models/capsnet-mnist.npz ships, the MNIST model beside it."""
    paths = ([Path(checkpoint)] if checkpoint else
             [MODEL_FILE] + [cp.MNIST_MODEL_FILE] * cp.MNIST_MODEL_FILE.exists())
    models = []
    for path in paths:
        run = mc.load_checkpoint(path)
        if run.cfg.model != "capsnet":
            raise CapsNetError(f"{path}: the page shows capsules, and a {run.cfg.model} has none")
        models.append(Served(path.name, run, accuracy_words(path, run), path))
    return models


def cached_test_digits(data_dir=None) -> tuple[np.ndarray, np.ndarray] | None:
    """MNIST's test digits and labels from the cache, or None: the server downloads nothing."""
    paths = [mc.mnist_dir(data_dir) / name for name in TEST_FILES]
    raws = [mc.cached_idx(p) for p in paths] if all(p.exists() for p in paths) else [None]
    if any(r is None for r in raws):
        return None
    return mc.parse_idx(raws[0], "images"), mc.parse_idx(raws[1], "labels")


def _u8(a) -> list[int]:
    """Values in [0, 1] as a flat list of 0..255: a third of the JSON of floats."""
    return np.round(255 * np.clip(a, 0, 1)).astype(int).ravel().tolist()


def _image(body: dict, canvas: int) -> np.ndarray:
    """The request's 'image' (canvas rows of canvas numbers in 0..1, or flat) as float64."""
    if "image" not in body:
        raise BadRequest(400, "the request has no 'image'")
    try:
        x = np.asarray(body["image"], dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(400, "'image' must be a list of numbers, or a list of rows of them")
    if x.shape not in ((canvas, canvas), (canvas * canvas,)):
        raise BadRequest(400, f"'image' has shape {x.shape}; this model takes {canvas}x{canvas} "
                              f"({canvas * canvas} numbers)")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise BadRequest(400, "'image' values must be numbers in 0..1")
    return x.reshape(canvas, canvas)


def page_models(models: dict, digits) -> dict:
    """GET /api/models: each model's name, canvas, digit count, accuracy, and what the page
    needs to draw the routing (the primary-capsule grid cell each canvas pixel shows)."""
    out = []
    for m in models.values():
        cfg = m.run.cfg
        g = cfg.grid()[1]
        cells = viz.upsample_grid(cfg, np.arange(1, g * g + 1).reshape(g, g, 1))[..., 0] - 1
        out.append(dict(name=m.name, canvas=cfg.canvas, digits=cfg.n_labels,
                        accuracy=m.accuracy, dims=cfg.digit_dim, iterations=cfg.routing_iters,
                        grid=g, cells=cells.astype(int).ravel().tolist()))
    return dict(models=out, sample=digits is not None, slider=SLIDER, min_length=cp.MIN_LENGTH)


def count(x: np.ndarray, counter, n_labels: int, models=(None, None), read_twos=None
          ) -> tuple[int, float | None]:
    """How many digits the drawing x (white on black, in [0, 1]) holds, by predict's rule
    (cp.count_scores; counter is cp.load_counter's, or None without the file; models the
    shipped MNIST and MultiMNIST runs, each None without its file; read_twos(twos) -> the
    MultiMNIST model's capsules (1, J, E) on its view twos (1, 36, 36), when a caller reads it
    anyway): -> (1 or 2, the rule's score or None). A one-digit model reads one."""
    if n_labels == 1 or counter is None:
        return n_labels, None
    v = cp.both_views([x])
    if not v.ink[0]:                        # a blank: nothing to count
        return n_labels, None
    caps = (None, read_twos(v.twos) if read_twos else None)
    score = float(cp.count_scores(v, counter, *models, caps=caps)[0])
    return (2 if score > 0 else 1), score


def page_predict(m: Served, body: dict, counter=None, models=(None, None)) -> dict:
    """POST /api/predict {model, image, fit}: the capsule lengths, how many digits the drawing
    holds (count: predict's rule) and those found, the two longest capsules' reconstructions,
    the digit capsules, and the routing: per iteration and digit capsule, each primary-capsule
    grid cell's |u|-weighted coupling (routing_colours), and the last iteration's excess over
    uniform for the two longest, stretched by gain."""
    cfg, params = m.run.cfg, m.run.eval_params
    x, fit = _image(body, cfg.canvas), body.get("fit", False)
    if type(fit) is not bool:
        raise BadRequest(400, "'fit' must be true or false")
    every = np.arange(cfg.n_classes)[None]                       # couplings to every capsule
    routed = []

    def read_twos(twos):  # this model's input if the count says two: routed once, for both
        routed.append(next(viz.routing_batches(params, cfg, twos, every)))
        return routed[0][3].astype(np.float32)  # mc.predict's capsules, widened and back
    shared = m.run is models[1] and not fit
    n, score = count(x, counter, cfg.n_labels, models, read_twos if shared else None)
    img, how = cp.fit_digits(x, cfg.canvas, n) if fit else cp.to_canvas(x, cfg.canvas, n)
    if img is None:
        return dict(model=m.name, ink=False, how=how)
    _, ulen, c, v = routed[0] if routed and n == 2 else next(
        viz.routing_batches(params, cfg, img[None], every))
    lengths = np.linalg.norm(v[0], axis=1)
    top = mc.top2(lengths[None])[0]
    recon = mc.reconstruct(params, np.repeat(v, 2, 0), top)
    routing = [[_u8(viz.routing_colours(cfg, ulen[0], ck, ck)[..., 0]) for ck in c[r, 0]]
               for r in range(len(c))]
    excess, gain = viz.routing_excess(cfg, ulen[0], c[-1, 0, top])
    return dict(model=m.name, ink=True, how=how, input=img.ravel().tolist(), count=n,
                count_score=None if score is None else round(score, 3),
                lengths=np.round(lengths, 4).tolist(), found=cp.digits_found(lengths, n),
                top=top.tolist(), recon=[_u8(r) for r in recon],
                capsules=np.round(v[0], 5).tolist(), routing=routing, excess=_u8(excess),
                gain=float(gain))


def page_perturb(m: Served, body: dict) -> dict:
    """POST /api/perturb {model, capsule, pose}: the reconstruction from digit capsule `capsule`
    set to `pose` (its 16 numbers), all others masked: the paper's Figure 4, one cell."""
    cfg = m.run.cfg
    k, pose = body.get("capsule"), body.get("pose")
    if type(k) is not int or not 0 <= k < cfg.n_classes:
        raise BadRequest(400, f"'capsule' must be a digit 0..{cfg.n_classes - 1}")
    try:
        pose = np.asarray(pose, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        pose = None
    if pose is None or pose.shape != (cfg.digit_dim,) or not np.isfinite(pose).all() \
            or np.abs(pose).max() > 1 + SLIDER:
        raise BadRequest(400, f"'pose' must be {cfg.digit_dim} numbers in "
                              f"-{1 + SLIDER}..{1 + SLIDER}")
    v = np.zeros((1, cfg.n_classes, cfg.digit_dim))
    v[0, k] = pose
    return dict(recon=_u8(mc.reconstruct(m.run.eval_params, v, np.array([k]))[0]))


def page_sample(m: Served, digits) -> dict:
    """GET /api/sample?model=: a random MNIST test pair made as the paper's task (shifted by up to
    cfg.max_shift, added and clipped) as its two layers a and b; one digit for a one-digit model."""
    if digits is None:
        raise BadRequest(503, "this server has no MNIST test digits (the page hides the button)")
    cfg, rng = m.run.cfg, np.random.default_rng()
    x, y = digits
    if cfg.n_labels == 1:
        i = int(rng.integers(len(x)))
        a = mc.place(x[i:i + 1], np.zeros(1, int), np.zeros(1, int), cfg.canvas)[0]
        return dict(a=a.ravel().tolist(), b=[0] * cfg.canvas ** 2, labels=[int(y[i])])
    p = mc.make_pairs(x, y, 1, rng, min_iou=0.0, overlay="clip-sum", max_shift=cfg.max_shift,
                   canvas=cfg.canvas)
    return dict(a=p["a"][0].ravel().tolist(), b=p["b"][0].ravel().tolist(),
                labels=p["labels"][0].tolist())


# The routes, each path under one method: the page, GET's JSON answers (handler, query) and
# POST's (handler, model, body).
PAGE_PATHS = ("/", "/index.html")
GET_ROUTES = {
    "/api/models": lambda h, query: page_models(h.server.models, h.server.digits),
    "/api/sample": lambda h, query: page_sample(h._model(query.get("model", [None])[0]),
                                                h.server.digits)}
POST_ROUTES = {
    "/api/predict": lambda h, m, body: page_predict(m, body, h.server.counter,
                                                    h.server.count_models),
    "/api/perturb": lambda h, m, body: page_perturb(m, body)}


class PageHandler(http.server.BaseHTTPRequestHandler):
    """The page and its JSON API, on fixed routes: no request names a file. Every error is a
    JSON {"error": one line} with its status; the server keeps serving after each."""
    server_version = "multimnist-capsnet"
    protocol_version = "HTTP/1.1"           # keep-alive: a drawing sends a request per stroke
    timeout = 30                            # seconds a client may take to send its request

    def do_GET(self):
        if self._stranger():
            return
        path, _, query = self.path.partition("?")
        if path in POST_ROUTES:
            return self._wrong_method("POST")
        if path in PAGE_PATHS:
            return self._reply(200, self.server.page, "text/html; charset=utf-8")
        fn = GET_ROUTES.get(path)
        self._api(fn and (lambda: fn(self, urllib.parse.parse_qs(query))))

    def do_POST(self):
        if self._stranger(post=True):
            return
        fn = POST_ROUTES.get(self.path)
        if fn is None and self.path.partition("?")[0] in PAGE_PATHS + tuple(GET_ROUTES):
            return self._wrong_method("GET")
        self._api(fn and (lambda: self._post(lambda m, body: fn(self, m, body))))

    def _wrong_method(self, allowed: str):
        """405 for a route that exists under another method; a body sent with it is not read."""
        self.close_connection = True
        self._reply(405, json.dumps(dict(error=f"{self.command} {self.path.partition('?')[0]}: "
                                               f"this route takes {allowed}")).encode(),
                    "application/json", {"Allow": allowed})

    def do_OPTIONS(self):
        """What a client may send (a CORS preflight included): no cross-origin grant, so a
        browser sends another site's request no further."""
        if self._stranger(post=True):
            return
        self.send_response(204)
        self.send_header("Allow", "GET, POST, OPTIONS")
        self.send_header("Content-Length", "0")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def _stranger(self, post: bool = False) -> bool:
        """Refuse (403, one line, then hang up) a request whose Host is not this server's
        address, as a page on another site reached through DNS rebinding sends, and (post) one
        that another site's page sends, as its Origin says. -> whether it was refused."""
        host, origin = (self.headers.get(h, "").strip().lower() for h in ("Host", "Origin"))
        if host not in self.server.hosts:
            why = f"Host {host[:60]!r} is not this server's address" if host else "no Host"
        elif post and origin and origin not in self.server.origins:
            why = f"Origin {origin[:60]!r} is another site"
        else:
            return False
        n = self.headers.get("Content-Length", "")
        if n.isdigit() and int(n) <= MAX_BODY:
            self._discard(int(n))               # read, so that the client gets the 403
        self.close_connection = True            # and hang up
        self._reply(403, json.dumps(dict(error=f"{why}: refused (open "
                                               f"{self.server.url})")).encode(),
                    "application/json")
        return True

    def _post(self, fn) -> dict:
        body = self._body()
        return fn(self._model(body.get("model")), body)

    def _api(self, fn):
        try:
            if fn is None:
                self.close_connection = True    # a body sent with it is not read
                raise BadRequest(404, f"no such page: {self.path[:100]}")
            status, out = 200, fn()
        except BadRequest as e:
            status, out = e.status, dict(error=str(e))
        except CapsNetError as e:
            status, out = 400, dict(error=str(e))
        except Exception as e:  # a bug: one line here and to the client, and keep serving
            self.log_error("internal error: %s: %s", type(e).__name__, e)
            status, out = 500, dict(error=f"internal error ({type(e).__name__})")
        self._reply(status, json.dumps(out).encode(), "application/json")

    def _model(self, name) -> Served:
        models = self.server.models
        if name is None:
            return next(iter(models.values()))
        if not isinstance(name, str) or name not in models:
            raise BadRequest(400, f"no model {str(name)[:60]!r}; this server has "
                                  f"{', '.join(models)}")
        return models[name]

    def _body(self) -> dict:
        """The request's JSON object, at most MAX_BODY bytes."""
        try:
            n = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            n = -1
        if n < 0:
            self.close_connection = True        # whatever body follows is not read
            raise BadRequest(411, "send the body with a Content-Length")
        if n > MAX_BODY:
            self._discard(n)
            raise BadRequest(413, f"a body of {n:,} bytes; the limit is {MAX_BODY:,}")
        try:
            data = self.rfile.read(n)
        except OSError:                         # the socket's timeout too: a client gone quiet
            self.close_connection = True
            raise BadRequest(408, f"the body did not arrive within {self.timeout} s") from None
        if len(data) < n:
            self.close_connection = True
            raise BadRequest(400, f"the body ended after {len(data):,} of its {n:,} bytes")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
            raise BadRequest(400, f"malformed JSON: {str(e)[:100]}") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the body must be a JSON object")
        return body

    def _discard(self, n: int):
        """Read and drop a body too large to take, so that its client, still sending, gets the
        413 rather than a reset; past 8 x MAX_BODY, hang up instead. A client that gives up
        meanwhile has left: nothing to say."""
        if n > 8 * MAX_BODY:
            self.close_connection = True
            return
        try:
            while n > 0 and (chunk := self.rfile.read(min(n, 65536))):
                n -= len(chunk)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _reply(self, status: int, data: bytes, kind: str, more: dict = None):
        self.send_response(status)
        for name, value in (more or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:  # the client left before its answer: nothing to log
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """A malformed request line or header: JSON like every other error, then hang up (a
        request too malformed to tell its version is answered as HTTP/1.0, not 0.9's bare body)."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        self._reply(code, json.dumps(dict(error=message or "bad request")).encode(),
                    "application/json")

    def log_message(self, fmt, *args):
        if self.server.log:
            super().log_message(fmt, *args)

    def log_error(self, fmt, *args):
        print(f"serve: {self.address_string()}: {fmt % args}"[:300], file=sys.stderr)


class PageServer(http.server.ThreadingHTTPServer):
    """A thread per connection; a connection its client breaks (a reset, a closed pipe) is the
    client's business and leaves no line; any other failure is one line on stderr."""
    daemon_threads = True

    def __init__(self, address, handler):
        if ":" in address[0]:                   # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            print(f"serve: {client_address[0]}: {sys.exc_info()[1]!r}"[:300], file=sys.stderr)


def own_hosts(host: str, port: int) -> set[str]:
    """The Host headers that name a server listening on host:port: loopback's names
    (localhost, 127.0.0.1, [::1]) and host itself, each with the port (and without it on port
    80, as browsers send it), lower case."""
    names = {"localhost", "127.0.0.1", "[::1]", f"[{host}]" if ":" in host else host}
    return {f"{h.lower()}:{port}" for h in names} | ({h.lower() for h in names} if port == 80
                                                      else set())


def make_server(models: list[Served], digits=None, host: str = "127.0.0.1", port: int = 8000,
                log: bool = False) -> PageServer:
    """The page's server, listening (port 0: a free one), not yet serving."""
    try:
        page = page_file().read_bytes()
    except OSError as e:
        raise CapsNetError(f"cannot read the page {page_file()}: {e.strerror}") from None
    try:
        server = PageServer((host, port), PageHandler)
    except (OSError, OverflowError) as e:
        raise CapsNetError(f"cannot listen on {host}:{port}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    server.models, server.digits, server.page, server.log = \
        {m.name: m for m in models}, digits, page, log
    port = server.server_address[1]
    server.hosts = own_hosts(host, port)
    server.origins = {f"http://{h}" for h in server.hosts}
    server.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
    server.counter = cp.load_counter()   # None without models/count_cnn.npz: no count
    served = {m.path: m.run for m in models}  # the count weighs both shipped models' redrawings
    server.count_models = tuple(served.get(f) or (mc.load_checkpoint(f) if f.exists() else None)
                                for f in (cp.MNIST_MODEL_FILE, cp.MODEL_FILE))
    return server


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number 0..65535")
    return int(text)


def build_serve_parser() -> argparse.ArgumentParser:
    p = mc.ArgumentParser(prog="capsnet_serve.py",
                       description="A page in your browser: draw two digits with two pens and "
                                   "watch the capsules read them, their reconstructions, the "
                                   "routing, and the paper's Figure 4 on sliders. Ctrl-C stops.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on, and the one name it answers to besides "
                        "localhost's: to open the page from another machine, give this "
                        "machine's address (the page has no login) (default: %(default)s)")
    p.add_argument("--port", type=_port, default=8000,
                   help="port to listen on; 0 picks a free one (default: %(default)s)")
    shipped = Path("models", MODEL_FILE.name)
    p.add_argument("--checkpoint", default=None,
                   help=f"serve this model or --save checkpoint alone (default: {shipped}, and "
                        "models/capsnet-mnist.npz for one digit)")
    p.add_argument("--data-dir", default=None,
                   help="MNIST cache for the page's random test pairs, read only, never "
                        "downloaded (default: $HINTON_MNIST_DIR or ~/.cache/hinton-mnist)")
    p.add_argument("--log", action="store_true", help="print a line per request")
    return p


def serve_main(argv) -> int:
    parser = build_serve_parser()
    args = parser.parse_args(argv)
    try:
        models = served_models(args.checkpoint)
        digits = cached_test_digits(args.data_dir)
        server = make_server(models, digits, args.host, args.port, args.log)
    except CapsNetError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"serving {', '.join(m.name for m in models)} on {server.url} (Ctrl-C stops)",
          flush=True)
    if digits is None:
        print(f"no MNIST test digits in {mc.mnist_dir(args.data_dir)}: the page's random-pair "
              "button is hidden (python3 mnist_fetch.py fetches them)", flush=True)
    if args.host in ("0.0.0.0", "::"):
        print(f"{args.host} listens on every address, but answers only requests to localhost's "
              "names: to open the page from another machine, give --host this machine's address",
              flush=True)
    blas = mc.blas_limiter()  # one BLAS thread per request: requests run side by side
    try:
        with blas.limit(limits=1) if blas else contextlib.nullcontext():
            server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0


def main(argv=None) -> int:
    try:
        return serve_main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
