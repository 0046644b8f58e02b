#!/usr/bin/env python3
"""A stand-in for a library app under `handover run`, for the parked-probation tests: it
speaks the control channel at HANDOVER_CONTROL_FD (a SOCK_SEQPACKET socket, one message a
packet) the way the library does, without the library.

- takes its listener by socket activation (fd 3, LISTEN_PID its own pid) and says READY=1 on
  NOTIFY_SOCKET; prints `ready pid=<pid> generation=<n> addr=<ip:port>`;
- sends `parkable` at start; on `park` stops accepting (prints `parked pid=<pid>`), on
  `resume` accepts again (`resumed pid=<pid>`); prints `promoted pid=<pid>` and
  `probation pid=<pid> ms=<ms>` when told;
- when the file named by argv[1] says `unhealthy` at its start, answers `probation` with
  `unhealthy told to by the test`;
- serves `pid=<pid> generation=<n>` with `Connection: close`; SIGTERM: finish the connection
  being served, exit 0.
"""
import os
import select
import signal
import socket
import sys

stopping = False


def on_term(_signo, _frame):
    global stopping
    stopping = True


def say(line):
    # One write per line: generations share stdout, and print() writes the line and its end
    # separately, so two generations' lines could interleave.
    os.write(1, (line + "\n").encode())


def serve(conn, body):
    conn.settimeout(5)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    except OSError:
        pass
    finally:
        conn.close()


def main():
    signal.signal(signal.SIGTERM, on_term)
    pid = os.getpid()
    if os.environ.get("LISTEN_PID") != str(pid) or os.environ.get("LISTEN_FDS") != "1":
        say(f"protocol-error pid={pid} LISTEN_PID={os.environ.get('LISTEN_PID')}")
        sys.exit(9)
    generation = os.environ.get("HANDOVER_GENERATION", "1")
    listener = socket.socket(fileno=3)
    # Shared with the other generation: never block in accept() for a connection it took.
    listener.setblocking(False)
    control = socket.socket(fileno=int(os.environ["HANDOVER_CONTROL_FD"]))
    control.send(b"parkable")
    verdict = ""
    try:
        with open(sys.argv[1]) as f:
            verdict = f.read().strip()
    except (IndexError, OSError):
        pass
    notify = os.environ.get("NOTIFY_SOCKET", "")
    if notify:
        address = "\0" + notify[1:] if notify.startswith("@") else notify
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as n:
            n.sendto(b"READY=1", address)
    host, port = listener.getsockname()[:2]
    say(f"ready pid={pid} generation={generation} addr={host}:{port}")
    body = f"pid={pid} generation={generation}".encode()
    parked = False
    while not stopping:
        watched = [control] if parked else [control, listener]
        try:
            readable, _, _ = select.select(watched, [], [], 0.1)
        except InterruptedError:
            continue
        if control in readable:
            message = control.recv(1024).decode()
            if not message:
                control.close()
                control = None
                break
            word, _, rest = message.partition(" ")
            if word == "park":
                parked = True
                say(f"parked pid={pid}")
            elif word == "resume":
                parked = False
                say(f"resumed pid={pid}")
            elif word == "promoted":
                say(f"promoted pid={pid}")
            elif word == "probation":
                say(f"probation pid={pid} ms={rest}")
                if verdict == "unhealthy":
                    control.send(b"unhealthy told to by the test")
        if listener in readable and not parked:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            serve(conn, body)
    # SIGTERM (or the supervisor gone): serve what is queued for us no more; exit.
    sys.exit(0)


if __name__ == "__main__":
    main()
