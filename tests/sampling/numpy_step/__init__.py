"""The numpy implementation of docs/ALGORITHM.md §1–5 that app.sampling used before the numba
kernel (commit f781e90), kept verbatim (but for the options check, which it imports) as a
second reference: tests/sampling/test_numba_vs_numpy.py checks that the kernel gives the same
steps. Not used by the service."""
