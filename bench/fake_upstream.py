"""One fake vLLM server (tests/fakes/vllm.py) in its own process, for bench/throughput.py.

    python -m bench.fake_upstream --role teacher --port 8302

No added latency and EOS never likely (`eos_after=None`), so the gateway's own cost is what a
benchmark against it measures. Serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse

import uvicorn

from tests.fakes.vllm import FakeVLLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--role", choices=["base", "teacher"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    fake = FakeVLLM(args.role, eos_after=None)
    uvicorn.run(fake.app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
