"""Batch data generation: `dual-vllm generate` (dataset in, JSONL out) and `dual-vllm report`.

Modules: datasets (readers, field mapping, shards, sample keys), writer (the resumable JSONL
store), generate (the job), report (plots and HTML from an output file). See docs/BATCH.md.
"""
