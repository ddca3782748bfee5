"""Render `qtool eval --json` result lines (JSONL) as a markdown table: python benchmarks/ppl_table.py FILE."""

import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip().startswith("{")]
print("| spec | ppl | windows x seqlen | weight MiB | bits/param (linears) | KV MiB (b1, 2048) | device | s |")
print("|---|---:|---|---:|---:|---:|---|---:|")
for r in rows:
    m = r["memory"]
    print(
        f"| {r['spec']} | {r['ppl']:.3f} | {r['windows']} x {r['seqlen']} | {m['weight_bytes'] / 2**20:.1f} | "
        f"{m['weight_bits_per_param']:.3f} | {m['kv_bytes'] / 2**20:.1f} | {r['device']} | {r['seconds']} |"
    )
