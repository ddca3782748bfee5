"""Time one LLaMA-2-7B-shaped block of train-blockap: python3 benchmarks/blockap_7b_block.py [--preset P] [--spec S].

A one-block model with random weights (hidden 4096, MLP 11008, 32 heads), 128 x 2048 random tokens,
one epoch, batch 1, on the GPU: prints seconds and peak GPU memory for the block (statistics,
targets, training, fold and the quantized-chain update), as one JSON line.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qtool.core.checkpoint import BlockJournal
from qtool.core.spec import parse_spec
from qtool.models.adapters import adapter_for
from qtool.quant.blockwise_train import PRESETS, TrainSettings, train_blocks

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="omniquant", choices=list(PRESETS))
parser.add_argument("--spec", default="W4A16-g128")
parser.add_argument("--samples", type=int, default=128)
parser.add_argument("--seqlen", type=int, default=2048)
args = parser.parse_args()

device = torch.device("cuda")
config = LlamaConfig(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    num_hidden_layers=1,
    vocab_size=1024,
    max_position_embeddings=args.seqlen,
)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
adapter = adapter_for(model.config)
preset = PRESETS[args.preset]
settings = TrainSettings(epochs=1, batch=1, seed=0, lr=dict(preset.lr), cosine=preset.cosine)
windows = torch.randint(0, config.vocab_size, (args.samples, args.seqlen))
journal = BlockJournal(Path(tempfile.mkdtemp()) / "out", "bench")
torch.cuda.reset_peak_memory_stats(device)
torch.cuda.synchronize()
t0 = time.time()
train_blocks(model, adapter, parse_spec(args.spec), preset, settings, windows, device, journal)
torch.cuda.synchronize()
seconds = time.time() - t0
journal.remove()
print(
    json.dumps(
        {
            "preset": args.preset,
            "spec": args.spec,
            "tokens": args.samples * args.seqlen,
            "epochs": 1,
            "seconds_per_block": round(seconds, 2),
            "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "device": torch.cuda.get_device_name(device),
        }
    )
)
