"""Batch data generation: `dual-vllm generate` (dataset in, JSONL out) and `dual-vllm report`.

Modules: datasets (readers, field mapping, shards, sample keys), writer (the resumable JSONL
store), job (a job's options and its prompts as sent), runner (the run: concurrency, retries),
records (the output records and totals), cli (`generate`'s command line), report (plots and
HTML from an output file). See docs/BATCH.md.
"""
