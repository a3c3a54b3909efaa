#!/usr/bin/env python3
"""Raw-socket checks of the flexllm.http server (tests/integration/http_echo.lua).

Runs the echo server with small limits, talks HTTP/1.1 to it byte by byte, and
prints TAP. Python's standard library only."""
import json
import os
import select
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIMITS = dict(request_timeout=1, idle_timeout=2, max_connections=8,
              max_header_bytes=4096, max_body_bytes=65536)


class Resp:
    def __init__(self, status, headers, body, chunks):
        self.status, self.headers, self.body, self.chunks = status, headers, body, chunks

    def json(self):
        return json.loads(self.body)


class Conn:
    """One client connection with a byte buffer and an HTTP/1.1 response reader."""

    def __init__(self, port, timeout=5.0):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data):
        self.s.sendall(data)

    def _fill(self):
        d = self.s.recv(65536)
        if not d:
            raise EOFError("the server closed the connection")
        self.buf += d

    def line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        ln, self.buf = self.buf.split(b"\r\n", 1)
        return ln

    def exact(self, n):
        while len(self.buf) < n:
            self._fill()
        d, self.buf = self.buf[:n], self.buf[n:]
        return d

    def response(self):
        status = int(self.line().split(b" ")[1])
        headers = {}
        while True:
            ln = self.line()
            if not ln:
                break
            k, v = ln.split(b":", 1)
            headers[k.decode().lower()] = v.strip().decode()
        chunks = []
        if headers.get("transfer-encoding") == "chunked":
            while True:
                n = int(self.line(), 16)
                chunk = self.exact(n)
                self.exact(2)
                if n == 0:
                    break
                chunks.append(chunk)
            body = b"".join(chunks)
        elif "content-length" in headers:
            body = self.exact(int(headers["content-length"]))
        else:
            body = self.rest()
        return Resp(status, headers, body, chunks)

    def rest(self):
        while True:
            try:
                self._fill()
            except EOFError:
                d, self.buf = self.buf, b""
                return d

    def at_eof(self, timeout=5.0):
        """True when the server closes with nothing more sent within timeout."""
        self.s.settimeout(timeout)
        try:
            return self.s.recv(1) == b"" and not self.buf
        except (socket.timeout, ConnectionResetError):
            return False

    def readable(self):
        return bool(self.buf) or bool(select.select([self.s], [], [], 0)[0])

    def close(self):
        self.s.close()


def request(method, path, body=b"", headers=None, version="1.1"):
    h = {"Host": "test"}
    if (body or method == "POST") and "Transfer-Encoding" not in (headers or {}):
        h["Content-Length"] = str(len(body))
    h.update(headers or {})
    head = "".join("%s: %s\r\n" % kv for kv in h.items())
    return ("%s %s HTTP/%s\r\n%s\r\n" % (method, path, version, head)).encode() + body


class Suite:
    def __init__(self):
        args = ["%s=%s" % kv for kv in LIMITS.items()]
        self.proc = subprocess.Popen(["luajit", os.path.join(ROOT, "tests/integration/http_echo.lua")] + args,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the echo server did not start: " + self.proc.stderr.read().decode())
        self.port = int(line)
        self.n = 0
        self.failed = 0
        self.refused = 0  # error answers the C layer gave, to compare with its stats

    def check(self, desc, fn):
        self.n += 1
        try:
            err = fn()
        except Exception as e:  # a broken check is a failure, with what broke it
            err = "%s: %s" % (type(e).__name__, e)
        if err:
            self.failed += 1
            print("not ok %d - %s: %s" % (self.n, desc, err))
        else:
            print("ok %d - %s" % (self.n, desc))
        sys.stdout.flush()

    def conn(self):
        return Conn(self.port)

    def exchange(self, data, then_eof=False):
        """Sends data on a new connection and reads one response. then_eof: returns it with
        whether the server then closed the connection, sending nothing more."""
        c = self.conn()
        c.send(data)
        r = c.response()
        eof = then_eof and c.at_eof()
        c.close()
        return (r, eof) if then_eof else r

    def get(self, path):
        return self.exchange(request("GET", path, headers={"Connection": "close"}))

    def error_answer(self, r, status, words):
        """None when r is the C layer's OpenAI-style error with this status and words."""
        if r.status != status:
            return "status %d, want %d (%r)" % (r.status, status, r.body[:200])
        self.refused += 1
        e = r.json().get("error", {})
        want_type = "server_error" if status >= 500 else "invalid_request_error"  # as reply.lua types them
        if e.get("type") != want_type or "param" not in e or "code" not in e:
            return "not an OpenAI-style error body: %r" % r.body
        if words not in e.get("message", ""):
            return "message %r does not say %r" % (e.get("message"), words)
        if r.headers.get("content-type") != "application/json":
            return "content-type %r" % r.headers.get("content-type")
        return None


def main():
    t = Suite()

    def echo():
        r = t.exchange(request("POST", "/v1/echo?x=1&y=2", b"hello", {"X-Custom": "Abc", "x-rep": "a"}))
        j = r.json()
        want = {"method": "POST", "path": "/v1/echo", "query": "x=1&y=2", "body": "hello", "http_version": "1.1"}
        got = {k: j.get(k) for k in want}
        if r.status != 200 or got != want:
            return "got %d %r" % (r.status, got)
        if j["headers"].get("x-custom") != "Abc" or not j["remote"].startswith("127.0.0.1:"):
            return "headers %r remote %r" % (j["headers"], j["remote"])
    t.check("a POST is delivered with method, path, query, body, lower-cased headers, remote", echo)

    def repeated_headers():
        h = t.exchange(b"GET /r HTTP/1.1\r\nHost: t\r\nX-A: 1\r\nx-a: 2\r\nConnection: close\r\n\r\n").json()["headers"]
        return None if h.get("x-a") == "1, 2" else "x-a is %r" % h.get("x-a")
    t.check("repeated headers are joined with ', '", repeated_headers)

    def pipelined():
        c = t.conn()
        c.send(request("POST", "/p1", b"one") + request("GET", "/p2") + request("POST", "/p3", b"three"))
        rs = [c.response().json() for _ in range(3)]
        c.close()
        got = [(r["path"], r["body"]) for r in rs]
        if got != [("/p1", "one"), ("/p2", ""), ("/p3", "three")]:
            return "answers %r" % got
        if len({r["conn"] for r in rs}) != 1:
            return "connection ids differ: %r" % [r["conn"] for r in rs]
    t.check("three pipelined requests sent at once are answered in order on one connection", pipelined)

    def keep_alive():
        c = t.conn()
        c.send(request("GET", "/k1"))
        a = c.response()
        c.send(request("GET", "/k2"))
        b = c.response()
        c.close()
        if a.json()["conn"] != b.json()["conn"] or b.json()["path"] != "/k2":
            return "%r then %r" % (a.body, b.body)
        if "connection" in a.headers:
            return "a keep-alive answer says Connection: %s" % a.headers["connection"]
    t.check("keep-alive: two requests in turn on one connection", keep_alive)

    def http10():
        r, eof = t.exchange(b"GET /old HTTP/1.0\r\n\r\n", then_eof=True)
        if r.json()["http_version"] != "1.0" or r.headers.get("connection") != "close" or not eof:
            return "version %r, connection %r, closed %r" % (r.json()["http_version"], r.headers.get("connection"), eof)
    t.check("HTTP/1.0 without keep-alive: answered with Connection: close, then closed", http10)

    def conn_close():
        r, eof = t.exchange(request("GET", "/c", headers={"Connection": "close"}), then_eof=True)
        return None if r.status == 200 and eof else "status %d, closed %r" % (r.status, eof)
    t.check("Connection: close from an HTTP/1.1 client: answered, then closed", conn_close)

    def truncated():
        c = t.conn()
        c.send(b"POST /t HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
        c.close()
        c = t.conn()
        c.send(b"GET /half HTTP/1.1\r\nHo")
        c.close()
        r = t.get("/after")
        return None if r.status == 200 and r.json()["path"] == "/after" else "status %d" % r.status
    t.check("requests cut off by a client that closes: the server serves the next one", truncated)

    def garbage():
        r, eof = t.exchange(b"\x01\x02GARBAGE / HTTP/1.1\r\n\r\n", then_eof=True)
        return t.error_answer(r, 400, "malformed HTTP request: invalid HTTP method") or (None if eof else "not closed")
    t.check("a garbage request line gets a 400 JSON error naming the parser error, then close", garbage)

    def big_header():
        r = t.exchange(request("GET", "/h", headers={"X-Big": "a" * 8000}))
        return t.error_answer(r, 431, "larger than the limit of 4096 bytes")
    t.check("headers over max_header_bytes get 431", big_header)

    def big_length():
        # answered without a byte of the body sent
        r = t.exchange(b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n")
        return t.error_answer(r, 413, "10000000 bytes")
    t.check("Content-Length over max_body_bytes gets 413 before the body is sent", big_length)

    def big_chunked():
        body = b"".join(b"%x\r\n%s\r\n" % (8192, b"z" * 8192) for _ in range(10)) + b"0\r\n\r\n"
        r = t.exchange(request("POST", "/bc", headers={"Transfer-Encoding": "chunked"}) + body)
        return t.error_answer(r, 413, "larger than the limit of 65536 bytes")
    t.check("a chunked body over max_body_bytes gets 413", big_chunked)

    def chunked_body():
        c = t.conn()
        c.send(request("POST", "/ch", headers={"Transfer-Encoding": "chunked"}))
        for part in (b"5\r\nhello\r\n", b"6\r\n wor", b"ld\r\n", b"0\r\n\r\n"):
            c.send(part)
            time.sleep(0.01)
        r = c.response()
        c.close()
        return None if r.json()["body"] == "hello world" else "body %r" % r.json()["body"]
    t.check("a chunked request body sent in pieces arrives whole", chunked_body)

    def expect_continue():
        c = t.conn()
        c.send(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        first = c.line()
        c.line()
        c.send(b"data")
        r = c.response()
        c.close()
        if first != b"HTTP/1.1 100 Continue" or r.json()["body"] != "data":
            return "first line %r, body %r" % (first, r.body)
    t.check("Expect: 100-continue gets 100 Continue before the body is read", expect_continue)

    def lua_status():
        r = t.get("/status/404")
        if r.status != 404 or r.json()["error"]["message"] != "status 404":
            return "got %d %r" % (r.status, r.body)
    t.check("a 404 with a body from Lua", lua_status)

    def stream():
        r = t.get("/stream?n=5")
        evs = [json.loads(ch.decode()[len("data: "):]) for ch in r.chunks]
        if r.headers.get("content-type") != "text/event-stream" or [e["i"] for e in evs] != [1, 2, 3, 4, 5]:
            return "content-type %r, chunks %r" % (r.headers.get("content-type"), r.chunks)
    t.check("a stream arrives as 5 chunks of server-sent events, then the last chunk", stream)

    def wait_connections(n):
        """Waits until the server has at most n connections open besides the asking one."""
        for _ in range(100):
            r = t.get("/stats")
            if r.status == 503:  # closed connections not yet seen by the server
                t.refused += 1
            elif r.json()["connections"] <= n + 1:
                return
            time.sleep(0.05)

    def too_many():
        wait_connections(0)
        held = [t.conn() for _ in range(LIMITS["max_connections"])]
        for c in held:
            c.send(request("GET", "/hold"))
            c.response()
        extra = t.conn()
        r = extra.response()
        err = t.error_answer(r, 503, "server busy: 8 connections open")
        eof = extra.at_eof()
        extra.close()
        held.pop().close()
        for _ in range(100):  # the server sees the close on its next poll
            c = t.conn()
            c.send(request("GET", "/again"))
            r2 = c.response()
            c.close()
            if r2.status == 200:
                break
            t.refused += 1
            time.sleep(0.02)
        for c in held:
            c.close()
        wait_connections(0)  # the next checks need the slots free
        if err:
            return err
        if not eof or r2.status != 200:
            return "closed %r, then status %d" % (eof, r2.status)
    t.check("one connection over max_connections gets 503 and is closed; a freed slot serves again", too_many)

    def slow_client():
        slow = t.conn()
        slow.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n")
        r = t.get("/meanwhile")
        early = slow.readable()
        r408 = slow.response()
        slow.close()
        if r.status != 200 or early:
            return "other client status %d, slow client answered early %r" % (r.status, early)
        return t.error_answer(r408, 408, "not complete within 1 seconds")
    t.check("a client sending half a request gets 408 after request_timeout; another is served meanwhile", slow_client)

    def idle():
        c = t.conn()
        c.send(request("GET", "/i"))
        c.response()
        eof = c.at_eof(timeout=10)
        c.close()
        return None if eof else "not closed, or bytes sent"
    t.check("an idle keep-alive connection is closed after idle_timeout without a response", idle)

    def disconnect_mid_stream():
        c = t.conn()
        c.send(request("GET", "/stream?n=100000000"))
        c.line()
        while c.line():
            pass
        n = int(c.line(), 16)
        conn_id = json.loads(c.exact(n).decode()[len("data: "):])["conn"]
        c.close()
        for _ in range(200):
            if conn_id in t.get("/closed").json()["closed"]:
                break
            time.sleep(0.02)
        else:
            return "no closed event for connection %r" % conn_id
        r = t.get("/after-stream")
        return None if r.status == 200 else "status %d after the stream" % r.status
    t.check("a client gone mid-stream gives Lua a closed event and the server keeps serving", disconnect_mid_stream)

    def stats():
        st = t.get("/stats").json()
        if st["rejected"] != t.refused:
            return "rejected %r, the C layer answered %d errors" % (st["rejected"], t.refused)
        if st["requests"] < 20 or st["accepted"] < 20:
            return "stats %r" % st
    t.check("stats count the errors answered by the C layer", stats)

    def quit_():
        r = t.get("/quit")
        rc = t.proc.wait(timeout=10)
        err = t.proc.stderr.read().decode()
        if r.status != 200 or rc != 0 or err:
            return "status %d, exit %d, stderr %r" % (r.status, rc, err)
    t.check("the server stops cleanly", quit_)

    if t.proc.poll() is None:
        t.proc.kill()
    print("1..%d" % t.n)
    return 1 if t.failed else 0


if __name__ == "__main__":
    sys.exit(main())
