"""Stand-ins for a vLLM server process, for the start/stop tests (no vLLM needed)."""

from __future__ import annotations

import socket
import sys
import textwrap

from app.localvllm.servers import SERVER_MODULE, ServerSpec
from app.localvllm.setup import Layout

# A stand-in for vLLM: /health, /v1/models and /v1/completions on the port in its argv. Its argv
# carries SERVER_MODULE and the port like the real command, so the PID checks treat it as ours.
FAKE_SERVER = textwrap.dedent(
    """
    import json, sys
    from http.server import BaseHTTPRequestHandler, HTTPServer
    port, name = int(sys.argv[sys.argv.index("--port") + 1]), sys.argv[-1]
    class H(BaseHTTPRequestHandler):
        def _send(self, body):
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def do_GET(self):
            self._send({"data": [{"id": name}]} if self.path == "/v1/models" else {})
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send({"choices": [{"text": "!"}]})
        def log_message(self, *args):
            pass
    print("fake vLLM listening", flush=True)
    HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


def fake_command(layout: Layout, spec: ServerSpec) -> list[str]:
    return [
        sys.executable,
        "-c",
        FAKE_SERVER,
        SERVER_MODULE,
        "--port",
        str(spec.port),
        spec.served_name,
    ]


def slow_command(layout: Layout, spec: ServerSpec) -> list[str]:
    """The stand-in, but healthy only after ~5 s (long enough on a loaded machine): a server
    another command is still starting."""
    argv = fake_command(layout, spec)
    argv[2] = "import time; time.sleep(5)\n" + FAKE_SERVER
    return argv


def dying_command(layout: Layout, spec: ServerSpec) -> list[str]:
    script = "import sys; print('ValueError: No supported config format found'); sys.exit(3)"
    return [sys.executable, "-c", script, SERVER_MODULE, "--port", str(spec.port)]


def silent_command(layout: Layout, spec: ServerSpec) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import time; time.sleep(60)",
        SERVER_MODULE,
        "--port",
        str(spec.port),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
