"""Test origins for the network-namespace tests: an HTTPS server that names itself, a listener
that records what reaches it, or an authoritative DNS server of ours that answers every A question
with one address and records each name it is asked. Only ever bound to the test's own namespace
addresses."""
import http.server
import socket
import ssl
import sys


def https(addr, port, cert, key, tag, big):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = open(big, "rb").read() if self.path == "/big" else tag.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    server = Server((addr, int(port)), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    server.serve_forever()


def record(proto, addr, port, out):
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(port)))
    if proto == "tcp":
        s.listen(8)
    while True:
        if proto == "udp":
            data, peer = s.recvfrom(2048)
        else:
            conn, peer = s.accept()
            conn.close()
        with open(out, "a") as f:
            f.write(f"{proto} from {peer[0]}\n")


def dns(addr, answer, out):
    """UDP port 53: A questions get `answer`, anything else an empty NOERROR. The question name
    is read label by label (no compression in a question) and written to `out`."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, 53))
    while True:
        data, peer = s.recvfrom(2048)
        if len(data) < 12:
            continue
        i, labels = 12, []
        while i < len(data) and data[i] != 0:
            n = data[i]
            labels.append(data[i + 1 : i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        question = data[12 : i + 5]
        qtype = int.from_bytes(data[i + 1 : i + 3], "big")
        with open(out, "a") as f:
            f.write(".".join(labels) + "\n")
        flags = b"\x85\x80"  # response, authoritative, recursion desired and available
        if qtype == 1:
            rr = b"\xc0\x0c" + b"\x00\x01\x00\x01" + (60).to_bytes(4, "big") + b"\x00\x04" + socket.inet_aton(answer)
            s.sendto(data[:2] + flags + b"\x00\x01\x00\x01\x00\x00\x00\x00" + question + rr, peer)
        else:
            s.sendto(data[:2] + flags + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question, peer)


if __name__ == "__main__":
    if sys.argv[1] == "https":
        https(*sys.argv[2:])
    elif sys.argv[1] == "dns":
        dns(*sys.argv[2:])
    else:
        record(*sys.argv[1:])
