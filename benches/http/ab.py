#!/usr/bin/env python3
"""A/B of two tenantry builds on the request path, alternated in one run.

    python3 benches/http/ab.py OLD_BINARY NEW_BINARY [--orgs 100] [--rounds 3]
        [--seconds 10] [--warmup 3] [--data-dir /tmp/tenantry-ab] [--port 28080]

Each build serves a zero-config local cluster of its own (`serve
--data-dir DIR/old`, `DIR/new`: a newer build may have migrated the
registry further than the older one accepts), one at a time, with
`--pool-size 16 --log-format json` (the request log on, to a file). Each
build's first start creates the same orgs (one token and one test each);
then, round after round, each build is started on fresh connections and
driven by wrk (-t2 -c32) with
`GET /v1/orgs/{slug}/tests/{id}` and bearer auth, round robin over the
orgs: a warm-up, then the measured run. Prints each run and the ratios of
the medians (new / old). Needs wrk.
"""
import argparse, json, os, re, signal, statistics, subprocess, sys, tempfile, time, urllib.request

p = argparse.ArgumentParser()
p.add_argument("old"); p.add_argument("new")
p.add_argument("--orgs", type=int, default=100)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--seconds", type=int, default=10)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--data-dir", default="/tmp/tenantry-ab")
p.add_argument("--port", type=int, default=28080)
p.add_argument("--extra", default="", help="more serve flags for both builds")
p.add_argument("--old-extra", default="", help="more serve flags for the old build only")
p.add_argument("--new-extra", default="", help="more serve flags for the new build only")
a = p.parse_args()
base = f"http://127.0.0.1:{a.port}"

def call(method, path, token, body=None):
    req = urllib.request.Request(base + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read() or b"null")

def start(binary, data_dir, extra=""):
    env = dict(os.environ); env.pop("DATABASE_URL", None)
    out, err = tempfile.TemporaryFile(), tempfile.NamedTemporaryFile(mode="w+")
    # the request log goes to a file (as to a log collector), read only on failure
    proc = subprocess.Popen([binary, "serve", "--data-dir", data_dir, "--bind", f"127.0.0.1:{a.port}",
                             "--pool-size", "16", "--log-format", "json", *a.extra.split(), *extra.split()],
                            stdout=out, stderr=err, env=env)
    def failed(why):
        err.seek(0)
        tail = [l for l in err.read().splitlines() if "request done" not in l][-5:]
        sys.exit(f"{binary} serve {why}:\n" + "\n".join(tail))
    for _ in range(600):
        if proc.poll() is not None:
            failed(f"exited with {proc.returncode}")
        try:
            urllib.request.urlopen(base + "/readyz").read(); break
        except Exception:
            time.sleep(0.1)
    time.sleep(0.2)
    if proc.poll() is not None:
        failed(f"exited with {proc.returncode}: another server answers on port {a.port}?")
    running.append(proc)
    out.seek(0)
    return proc, out.read().decode()

running = []

def stop(proc):
    proc.send_signal(signal.SIGTERM); proc.wait(timeout=60)
    running.remove(proc)

def stop_all():
    for proc in list(running):
        stop(proc)

import atexit
atexit.register(stop_all)

def prepare(binary, data_dir):
    """The orgs of one build's cluster, made at its first start: [(path, token)]."""
    targets = os.path.join(data_dir, "ab-targets.json")
    if not os.path.exists(targets):
        proc, printed = start(binary, data_dir)
        m = re.search(r"^(tny_\S+)$", printed, re.M)
        if not m:
            sys.exit(f"no bootstrap token printed (reuse of {data_dir} without {targets}?)")
        su = m.group(1)
        rows = []
        for i in range(a.orgs):
            slug = f"ab-{i:04}"
            call("POST", "/v1/admin/orgs", su, {"slug": slug, "name": slug, "owner_email": f"o@{slug}.test"})
            token = call("POST", f"/v1/admin/orgs/{slug}/tokens", su, {"email": f"o@{slug}.test"})["token"]["token"]
            beh = call("GET", f"/v1/orgs/{slug}/behaviors", token)["items"][0]["id"]
            st = call("GET", f"/v1/orgs/{slug}/statuses", token)["items"][0]["id"]
            t = call("POST", f"/v1/orgs/{slug}/tests", token,
                     {"prompt": "p", "expected_outcome": "e", "behavior_id": beh, "status_id": st})
            rows.append([f"/v1/orgs/{slug}/tests/{t['id']}", token])
        stop(proc)
        json.dump(rows, open(targets, "w"))
    rows = json.load(open(targets))[: a.orgs]
    lua = os.path.join(data_dir, "ab.lua")
    with open(lua, "w") as f:
        f.write("local t = {\n" + "".join(f'{{"{p}", "Bearer {tok}"}},\n' for p, tok in rows) + "}\n")
        f.write("local i = 0\nrequest = function()\n  i = i % #t + 1\n"
                "  return wrk.format('GET', t[i][1], {Authorization = t[i][2]})\nend\n")
    return lua

builds = {name: (getattr(a, name), os.path.join(a.data_dir, name)) for name in ("old", "new")}
scripts = {name: prepare(binary, d) for name, (binary, d) in builds.items()}

def wrk(seconds, lua):
    out = subprocess.run(["wrk", "-t2", "-c32", f"-d{seconds}s", "--latency", "-s", lua, base],
                         capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    def ms(q):
        v, unit = re.search(rf"^\s+{q}%\s+([\d.]+)(us|ms|s)", out, re.M).groups()
        return float(v) * {"us": 1e-3, "ms": 1, "s": 1e3}[unit]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, ms(50), ms(99), int(non2xx.group(1)) if non2xx else 0

res = {"old": [], "new": []}
for r in range(a.rounds):
    for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
        proc, _ = start(*builds[name], getattr(a, f"{name}_extra"))
        wrk(a.warmup, scripts[name])
        rps, p50, p99, bad = wrk(a.seconds, scripts[name])
        stop(proc)
        res[name].append((rps, p50, p99))
        print(f"round {r+1} {name}: {rps:8.0f} req/s  p50 {p50:5.2f} ms  p99 {p99:6.2f} ms  non-2xx {bad}", flush=True)
        if bad:
            sys.exit("non-2xx responses: the comparison is void")
med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in res.items()}
for k in ("old", "new"):
    print(f"median {k}: {med[k][0]:8.0f} req/s  p50 {med[k][1]:5.2f} ms  p99 {med[k][2]:6.2f} ms")
print(f"new/old: throughput {med['new'][0]/med['old'][0]:.3f}x  p50 {med['new'][1]/med['old'][1]:.3f}x  p99 {med['new'][2]/med['old'][2]:.3f}x")
