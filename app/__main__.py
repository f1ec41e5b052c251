"""`python -m app` is the same CLI as `dual-vllm`."""

from app.cli import main

raise SystemExit(main())
