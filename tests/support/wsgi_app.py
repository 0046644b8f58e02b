"""A WSGI app for the gunicorn interop test: answers `pid=<worker pid> generation=<n>`."""
import os


def app(environ, start_response):
    body = f"pid={os.getpid()} generation={os.environ.get('HANDOVER_GENERATION', '?')}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
