"""CONNECT latency through the proxy on loopback, alone and while 8 clients loop POST /reload with
the whole Service Tags file loaded (issue 9, item 4). Not run in CI.

Usage: python3 benches/reload_storm.py BIN TOKEN
  BIN: a release build (cargo build --release; target/release/egress-proxy)
  TOKEN: the admin bearer token to use; empty for a build from before [admin] token_file.
Run it from a scratch directory: it writes p.toml, token, audit.jsonl and proxy.log there.
Everything is on 127.0.0.1 (ports 23128 and 29901, and an origin on port 0)."""
import socket, subprocess, sys, threading, time, statistics, os, urllib.request

BIN, TOKEN = sys.argv[1], sys.argv[2]
tags = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "ServiceTags_Public_20251020.json")
origin = socket.socket(); origin.bind(("127.0.0.1", 0)); origin.listen(512)
oport = origin.getsockname()[1]
def serve():
    while True:
        c, _ = origin.accept(); c.close()
threading.Thread(target=serve, daemon=True).start()
open("token", "w").write(TOKEN + "\n")
tls_only = "tls_only = false" if TOKEN else ""
admin_tbl = '[admin]\ntoken_file = "token"\n' if TOKEN else ""
cfg = f'''regions = ["westus2"]
[listen]
http = "127.0.0.1:23128"
admin = "127.0.0.1:29901"
{admin_tbl}[audit]
path = "audit.jsonl"
[service_tags]
file = "{tags}"
[safety]
allow_internal = ["127.0.0.1/32"]
[[rule]]
name = "origin"
action = "allow"
cidrs = ["127.0.0.1/32"]
ports = [{oport}]
{tls_only}
[[rule]]
name = "many"
action = "allow"
service_tags = ["AzureCloud", "Storage", "AzureFrontDoor.Frontend"]
'''
open("p.toml", "w").write(cfg)
proxy = subprocess.Popen([BIN, "run", "--config", "p.toml"], stderr=open("proxy.log", "w"), stdout=subprocess.DEVNULL)
time.sleep(2)
def connect_ms():
    t = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", 23128))
    s.sendall(f"CONNECT 127.0.0.1:{oport} HTTP/1.1\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(1024)
        if not d: break
        buf += d
    s.close()
    assert buf.startswith(b"HTTP/1.1 200"), buf
    return (time.perf_counter() - t) * 1000
def measure(n=1000):
    return statistics.median(connect_ms() for _ in range(n))
quiet = measure()
stop = False
reloads = [0]
def loop():
    while not stop:
        req = urllib.request.Request("http://127.0.0.1:29901/reload", method="POST")
        if TOKEN: req.add_header("Authorization", "Bearer " + TOKEN)
        try:
            urllib.request.urlopen(req, timeout=60).read(); reloads[0] += 1
        except Exception as e:
            pass
ts = [threading.Thread(target=loop, daemon=True) for _ in range(8)]
for t in ts: t.start()
time.sleep(1)
t0 = time.time()
stormy = measure()
dt = time.time() - t0
stop = True
proxy.terminate(); proxy.wait()
print(f"{os.path.basename(os.path.dirname(os.path.dirname(BIN)))}: CONNECT median {quiet:.2f} ms quiet, {stormy:.2f} ms during 8-client POST /reload loop ({reloads[0]} reload answers in {dt:.1f} s)")
