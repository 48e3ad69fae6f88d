"""Test origins for the network-namespace tests: an HTTPS server that names itself, or a
listener that records what reaches it. Only ever bound to the test's own namespace addresses."""
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


if __name__ == "__main__":
    if sys.argv[1] == "https":
        https(*sys.argv[2:])
    else:
        record(*sys.argv[1:])
