"""Batch jobs: `dual-vllm generate` (dataset in, records out), `dual-vllm run-batch` (OpenAI
batch file in, vLLM batch records out) and `dual-vllm report`.

Modules: datasets (readers, field mapping, shards, sample keys), writer (the resumable JSONL
store), job (a job's options and its prompts as sent), runner (the run: concurrency, retries),
records (the output records and totals), gateway (`generate --gateway`: samples over HTTP),
export (Parquet and Hugging Face datasets outputs), cli (`generate`'s command line), runbatch
(`run-batch`), report (plots and HTML from an output file). See docs/BATCH.md.
"""
