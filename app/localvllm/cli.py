"""`dual-vllm local {setup,start,stop,status,run}`: the product on this CPU machine.

setup    build (or reuse) the cached vLLM venv and the two converted models
start    setup, then start (or reuse) the two vLLM servers and leave them running
         (--max-logprobs N: vLLM's flag for both, default 1024; -1 = the whole vocabulary)
stop     stop the two servers (by the PIDs in their PID files)
status   what runs on the two ports
run      setup + start + the gateway in the foreground; Ctrl-C stops what it started
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from types import FrameType
from typing import TextIO

from app.localvllm import LocalVLLMError
from app.localvllm.servers import (
    BASE_PORT,
    MAX_LOGPROBS,
    TEACHER_PORT,
    ServerSpec,
    StartResult,
    default_specs,
    start_pair,
    status,
    stop_launched,
    stop_specs,
)
from app.localvllm.setup import Layout, run_setup

GATEWAY_HOST = "127.0.0.1"
GATEWAY_PORT = 8000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="local_command", required=True, metavar="ACTION")
    helps = {
        "setup": "build the cached vLLM venv and the two models (idempotent)",
        "start": "setup, then start (or reuse) the two vLLM servers in the background",
        "stop": "stop the two vLLM servers",
        "status": "show what runs on the two ports",
        "run": "setup + start + the gateway in the foreground (Ctrl-C stops all)",
    }
    for name, text in helps.items():
        action = sub.add_parser(name, help=text, description=text)
        if name != "setup":
            action.add_argument("--base-port", type=int, default=BASE_PORT)
            action.add_argument("--teacher-port", type=int, default=TEACHER_PORT)
        if name in ("start", "run"):
            action.add_argument(
                "--max-logprobs",
                type=int,
                default=MAX_LOGPROBS,
                help=f"vLLM's --max-logprobs for both servers ({MAX_LOGPROBS}; -1: the whole "
                "vocabulary, for full-vocabulary ground truth)",
            )
        if name == "run":
            action.add_argument("--host", default=None, help="gateway address (127.0.0.1)")
            action.add_argument("--port", type=int, default=None, help="gateway port (8000)")


def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    layout = Layout.from_env()
    try:
        if args.local_command == "setup":
            run_setup(layout, out)
            return 0
        max_logprobs = getattr(args, "max_logprobs", MAX_LOGPROBS)
        specs = default_specs(layout, args.base_port, args.teacher_port, max_logprobs)
        if args.local_command == "status":
            out.write("\n".join(status(layout, specs)) + "\n")
            return 0
        if args.local_command == "stop":
            stop_specs(layout, specs, out)
            return 0
        run_setup(layout, out)
        result = start_pair(layout, specs, out)
        if args.local_command == "start":
            out.write(_servers_ready(specs))
            return 0
        return run_gateway(layout, specs, result, args, out)
    except LocalVLLMError as exc:
        sys.stderr.write(f"dual-vllm local {args.local_command}: {exc}\n")
        return 1


def _servers_ready(specs: list[ServerSpec]) -> str:
    lines = [f"  {s.role:8} {s.url}  (model {s.served_name!r})" for s in specs]
    return "vLLM servers ready:\n" + "\n".join(lines) + "\n"


def how_to_call(url: str) -> str:
    return f"""
The gateway is starting on {url} (OpenAI-compatible; model "dual-vllm").

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{{
    "model": "dual-vllm",
    "messages": [{{"role": "user", "content": "What is the capital of France?"}}],
    "max_tokens": 32,
    "mixing": {{"alpha": null}}
  }}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="unused")
  reply = client.chat.completions.create(
      model="dual-vllm",
      messages=[{{"role": "user", "content": "What is the capital of France?"}}],
      max_tokens=32,
      extra_body={{"base_prompt": "Question: What is the capital of France?\\nAnswer:",
                  "mixing": {{"alpha": 0.5}}}},
  )
  print(reply.choices[0].message.content)

Ctrl-C stops the gateway and the vLLM servers this command started.
"""


def gateway_command() -> list[str]:
    """The gateway in this same Python environment (tests replace it with a stand-in)."""
    return [sys.executable, "-m", "app", "serve"]


def run_gateway(
    layout: Layout,
    specs: list[ServerSpec],
    result: StartResult,
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    """`sys.executable -m app serve` in the foreground; stop it and the servers this command
    launched (by their PIDs) at the end."""
    base, teacher = specs
    env = {
        **os.environ,
        "DUAL_VLLM_BASE_URL": base.url,
        "DUAL_VLLM_TEACHER_URL": teacher.url,
        # The teacher's tokenizer in process: output text without a /detokenize per token.
        "DUAL_VLLM_TOKENIZER": str(layout.teacher),
    }
    if args.host is not None:
        env["DUAL_VLLM_HOST"] = args.host
    if args.port is not None:
        env["DUAL_VLLM_PORT"] = str(args.port)
    host = env.get("DUAL_VLLM_HOST", GATEWAY_HOST)
    port = env.get("DUAL_VLLM_PORT", str(GATEWAY_PORT))
    # Its own process group: a terminal's Ctrl-C reaches only us, and we forward it once
    # (a second SIGINT would make uvicorn skip its graceful shutdown).
    gateway = subprocess.Popen(gateway_command(), env=env, process_group=0)
    out.write(how_to_call(f"http://{host}:{port}"))
    out.flush()

    def forward(signum: int, _frame: FrameType | None) -> None:
        # The gateway shuts down gracefully on SIGTERM; we wait for it below.
        if gateway.poll() is None:
            gateway.send_signal(signal.SIGTERM if signum == signal.SIGTERM else signal.SIGINT)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = gateway.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if gateway.poll() is None:
            gateway.kill()
            gateway.wait()
        if result.started:
            out.write("stopping the vLLM servers this command started\n")
            stop_launched(layout, result.launches, out)
        kept = [spec for spec in specs if spec not in result.started]
        if kept:
            out.write(f"left running (they were already up): {[s.url for s in kept]}\n")
    # A gateway ended by our own SIGINT/SIGTERM forwarding is a normal end.
    return 0 if code in (0, -signal.SIGINT, -signal.SIGTERM, 130) else code
