#!/usr/bin/env python3
"""The load generator and row summariser of scripts/chaos.

  CHAOS_KEY=<api key> load.py seed --url U [--users N]
  CHAOS_KEY=<api key> load.py run  --url U --mix status,token --concurrency C --stop-file F --out O
  load.py row    --name NAME --marks F [--attempts N] [--lost L] events.json [events.json ...]
  load.py acked  events.json     (the acknowledged put-new account ids, one a line)

`run` is a closed loop: C workers, each on its own keep-alive HTTP/1.1
connection, send requests one after another until the stop file appears (at
most --duration seconds) and record every
answer as (time, label): "<kind> ok" for a 2xx, "<kind> <status> <error code>"
otherwise, "<kind> conn <errno name>" when the connection fails and
"<kind> timeout" when no answer comes within --timeout seconds. After an
error a worker pauses --error-pause seconds (a client's backoff; it also keeps
the load bounded while every request fails at once). Kinds:

  status   GET /v1/users/{user}/integrations            (read scope)
  token    GET /v1/integrations/github/{account}/token  (credentials scope)
  put-row  PUT one fixed integration (user chaos-u1)    (write scope)
  put-new  PUT a new integration per request, named <tag>-<worker>-<n>; the
           acknowledged (2xx) account ids are written to the output, so rows
           lost after a crash can be counted against the table.

Only the standard library: the client is a few lines over asyncio streams
because aiohttp/httpx are not part of a stock Python and the script must run
where `scripts/install-deps` has run, with nothing more to install.
"""

import argparse
import asyncio
import collections
import errno
import json
import os
import random
import sys
import time

FIXED_USER = "chaos-u1"
FIXED_ACCOUNT = "chaos-a1"


def token_body(expires_in=86400):
    return json.dumps({
        "access_token": "chaos-access-%016x" % random.getrandbits(64),
        "refresh_token": "chaos-refresh-%016x" % random.getrandbits(64),
        "expires_in": expires_in,
        "scope": "repo read:user",
        "token_type": "Bearer",
    }).encode()


class Conn:
    """One keep-alive HTTP/1.1 connection; reopened after any failure."""

    def __init__(self, host, port, key):
        self.host, self.port, self.key = host, port, key
        self.reader = self.writer = None

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except Exception:  # noqa: BLE001 - a broken socket is expected here
                pass
        self.reader = self.writer = None

    async def request(self, method, path, body=b""):
        """Returns (status, body bytes)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Authorization: Bearer {self.key}\r\nContent-Length: {len(body)}\r\n"
        )
        if body:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        line = await self.reader.readline()
        if not line:
            raise ConnectionResetError(errno.ECONNRESET, "closed before the answer")
        status = int(line.split()[1])
        length, keep = 0, True
        while True:
            h = await self.reader.readline()
            if h in (b"\r\n", b""):
                break
            name, _, value = h.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and "close" in value.lower():
                keep = False
        data = await self.reader.readexactly(length) if length else b""
        if not keep:
            await self.close()
        return status, data


def error_code(data):
    try:
        return json.loads(data)["error"]["code"]
    except Exception:  # noqa: BLE001 - any body that is not our error shape
        return "-"


def conn_label(e):
    if isinstance(e, asyncio.IncompleteReadError):
        return "conn closed"
    no = getattr(e, "errno", None)
    if no in errno.errorcode:
        return "conn " + errno.errorcode[no]
    return "conn " + type(e).__name__


def split_url(url):
    hostport = url.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    return host, int(port)


async def worker(w, args, stop, events, acked):
    host, port = split_url(args.url)
    conn = Conn(host, port, args.key)
    kinds = args.mix.split(",")
    n = 0
    while not stop.is_set():
        kind = kinds[n % len(kinds)]
        n += 1
        user = "chaos-u%d" % random.randint(1, args.users)
        if kind == "status":
            method, path, body = "GET", f"/v1/users/{user}/integrations", b""
        elif kind == "token":
            account = "chaos-a%d" % random.randint(1, args.users)
            method, path, body = "GET", f"/v1/integrations/github/{account}/token", b""
        elif kind == "put-row":
            method, body = "PUT", token_body()
            path = f"/v1/users/{FIXED_USER}/integrations/github/{FIXED_ACCOUNT}"
        elif kind == "put-new":
            account = f"{args.tag}-{w}-{n}"
            method, body = "PUT", token_body()
            path = f"/v1/users/{args.tag}-{w}/integrations/github/{account}"
        else:
            sys.exit(f"unknown kind {kind!r}; accepted: status, token, put-row, put-new")
        try:
            status, data = await asyncio.wait_for(conn.request(method, path, body), args.timeout)
            if 200 <= status < 300:
                label = kind + " ok"
                if kind == "put-new":
                    acked.append(account)
            else:
                label = f"{kind} {status} {error_code(data)}"
        except asyncio.TimeoutError:
            label = kind + " timeout"
            await conn.close()
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
            label = f"{kind} {conn_label(e)}"
            await conn.close()
        events.append((time.time(), label))
        if not label.endswith(" ok"):
            await asyncio.sleep(args.error_pause)
    await conn.close()


async def run(args):
    events, acked = [], []
    start = time.time()
    stop = asyncio.Event()

    async def watch():
        # One poll of the stop file every 50 ms, not one per request.
        while not stop.is_set():
            if os.path.exists(args.stop_file) or time.time() > start + args.duration:
                stop.set()
            await asyncio.sleep(0.05)

    await asyncio.gather(watch(), *(worker(w, args, stop, events, acked) for w in range(args.concurrency)))
    labels = sorted({lab for _, lab in events})
    index = {lab: i for i, lab in enumerate(labels)}
    with open(args.out, "w") as f:
        json.dump({
            "start": start,
            "end": time.time(),
            "labels": labels,
            "events": [[round(t, 4), index[lab]] for t, lab in events],
            "acked": acked,
        }, f)


async def seed(args):
    host, port = split_url(args.url)

    async def one(i, conn):
        path = f"/v1/users/chaos-u{i}/integrations/github/chaos-a{i}"
        status, data = await conn.request("PUT", path, token_body())
        if status != 200:
            sys.exit(f"seeding {path}: {status} {data[:200]!r}")

    conns = [Conn(host, port, args.key) for _ in range(8)]

    async def lane(k):
        for i in range(1 + k, args.users + 1, len(conns)):
            await one(i, conns[k])
        await conns[k].close()

    await asyncio.gather(*(lane(k) for k in range(len(conns))))


def read_marks(path):
    marks = {}
    with open(path) as f:
        for line in f:
            name, _, t = line.partition(" ")
            if t.strip():
                marks[name] = float(t)
    return marks


def row(args):
    events, start, end, acked = [], None, None, 0
    for path in args.files:
        with open(path) as f:
            d = json.load(f)
        labels = d["labels"]
        events += [(t, labels[i]) for t, i in d["events"]]
        start = d["start"] if start is None else min(start, d["start"])
        end = d["end"] if end is None else max(end, d["end"])
        acked += len(d["acked"])
    events.sort()
    m = read_marks(args.marks)
    # The first second (connections opening) is no part of "before".
    t0 = m.get("load_start", start) + 1.0
    t3 = m.get("load_end", end)
    t1, t2 = m.get("fault_start"), m.get("fault_end")

    def rate(a, b):
        if a is None or b is None or b - a < 0.5:
            return "—"
        ok = sum(1 for t, lab in events if a <= t < b and lab.endswith(" ok"))
        return f"{ok / (b - a):,.0f}"

    if t1 is None:  # the condition lasts the whole run
        load = f"— / {rate(t0, t3)} / —"
        ref = t0
    else:
        load = f"{rate(t0, t1)} / {rate(t1, t2)} / {rate(t2, t3)}"
        ref = t1
    errors = [(t, lab) for t, lab in events if not lab.endswith(" ok")]
    if errors:
        window = f"{errors[-1][0] - errors[0][0]:.1f} (+{errors[0][0] - ref:.1f} to +{errors[-1][0] - ref:.1f})"
        counts = collections.Counter(lab for _, lab in errors)
        codes = ", ".join(f"{lab} ×{c}" for lab, c in counts.most_common())
    else:
        window, codes = "0", "none"
    total_ok = sum(1 for _, lab in events if lab.endswith(" ok"))
    codes += f" (of {total_ok + len(errors):,} requests)"
    # Back: from the moment the server accepted again (its log's "ready to
    # accept connections", else the end of the fault) to the first success.
    ready = m.get("ready", t2)
    back = "—"
    if ready is not None and errors:
        oks = [t for t, lab in events if t >= ready and lab.endswith(" ok")]
        back = f"{oks[0] - ready:.2f}" if oks else "never"
    lost = args.lost
    if lost not in ("—", ""):
        lost = f"{lost} of {acked:,} acknowledged"
    print(f"| {args.name} | {load} | {window} | {codes} | {args.attempts} | {back} | {lost} |")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("seed", "run"):
        s = sub.add_parser(name)
        s.add_argument("--url", required=True)
        s.add_argument("--users", type=int, default=200)
    r = sub.choices["run"]
    r.add_argument("--mix", default="status,token")
    r.add_argument("--concurrency", type=int, default=24)
    r.add_argument("--stop-file", required=True)
    r.add_argument("--duration", type=float, default=120.0)
    r.add_argument("--timeout", type=float, default=30.0)
    r.add_argument("--error-pause", type=float, default=0.05)
    r.add_argument("--tag", default="k9")
    r.add_argument("--out", required=True)
    w = sub.add_parser("row")
    w.add_argument("--name", required=True)
    w.add_argument("--marks", required=True)
    w.add_argument("--attempts", default="—")
    w.add_argument("--lost", default="—")
    w.add_argument("files", nargs="+")
    a = sub.add_parser("acked")
    a.add_argument("file")
    args = p.parse_args()
    if args.cmd in ("run", "seed"):
        args.key = os.environ.get("CHAOS_KEY") or sys.exit("CHAOS_KEY (an API key) is not set")
    if args.cmd == "acked":
        with open(args.file) as f:
            print("\n".join(json.load(f)["acked"]))
    elif args.cmd == "run":
        asyncio.run(run(args))
    elif args.cmd == "seed":
        asyncio.run(seed(args))
    else:
        row(args)


if __name__ == "__main__":
    main()
