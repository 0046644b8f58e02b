#!/usr/bin/env python3
"""A socket-activated HTTP server that knows nothing of handover, for the interop tests.

It takes its sockets the way systemd socket activation defines it (LISTEN_PID must be its own
pid, sockets at fds 3..), says ready with Debian's `systemd-notify --ready` (which sends
BARRIER=1 with an fd and waits until the receiver closes it), and serves `pid=<pid>
generation=<n>` over HTTP/1.1 with `Connection: close` until SIGTERM, then finishes the request
it is serving, if any, and exits 0.

SIGTERM only sets a flag, checked between connections: exiting from the handler could drop a
connection that accept() had just returned (closed unread: the client gets a reset), which is
what a handler that exits "when not busy" does when the signal lands between accept() and the
busy flag. To see the flag while idle, accept() waits at most ACCEPT_WAIT (a timeout on the
listening socket, so it is non-blocking from then on; every generation of this script does the
same with the socket they share).

Modes (argv[1]):
  notify      one TCP socket; readiness by systemd-notify
  multi       three sockets named web (tcp), admin (unix), dns (udp); prints their kinds
  file DIR    no notification: creates DIR/ready-<pid> once serving (for --ready exec:)
"""
import os
import signal
import socket
import subprocess
import sys
import time

# How long accept() waits before the loop looks at the stop flag again.
ACCEPT_WAIT = 0.1


def fail(why):
    print(f"protocol-error pid={os.getpid()} {why}", flush=True)
    sys.exit(9)


def kind(sock):
    if sock.family == socket.AF_UNIX:
        return "unix"
    return "tcp" if sock.type == socket.SOCK_STREAM else "udp"


def main():
    mode = sys.argv[1] if len(sys.argv) > 1 else "notify"
    pid = os.getpid()
    listen_pid = os.environ.get("LISTEN_PID")
    if listen_pid is None or int(listen_pid) != pid:
        fail(f"LISTEN_PID={listen_pid}")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    generation = os.environ.get("HANDOVER_GENERATION", "?")
    # socket.socket(fileno=...) detects the family and type of the fd.
    socks = [socket.socket(fileno=3 + i) for i in range(count)]
    if mode == "multi":
        print("kinds " + " ".join(f"{n}={kind(s)}" for n, s in zip(names, socks)), flush=True)
    elif count != 1:
        fail(f"LISTEN_FDS={count}")
    web = socks[0]
    # SIGTERM: finish the connection being served, if any, then exit 0.
    state = {"stop": False}

    def on_term(*_):
        state["stop"] = True

    signal.signal(signal.SIGTERM, on_term)
    web.settimeout(ACCEPT_WAIT)
    host, port = web.getsockname()[:2]
    notify_rc, notify_ms = "none", 0
    if mode == "file":
        open(os.path.join(sys.argv[2], f"ready-{pid}"), "w").close()
    else:
        started = time.monotonic()
        rc = subprocess.run(["systemd-notify", "--ready", "--status=python serving"]).returncode
        notify_rc, notify_ms = rc, int((time.monotonic() - started) * 1000)
    print(
        f"ready pid={pid} generation={generation} addr={host}:{port} names={':'.join(names)} "
        f"notify_rc={notify_rc} notify_ms={notify_ms}",
        flush=True,
    )
    body = f"pid={pid} generation={generation}".encode()
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        len(body),
        body,
    )
    while not state["stop"]:
        try:
            conn, _ = web.accept()
        except socket.timeout:
            continue  # (also when another generation took the connection first)
        conn.settimeout(None)
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                request += chunk
            if request:
                conn.sendall(reply)
    sys.exit(0)


main()
