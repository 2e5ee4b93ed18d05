"""The PyTorch baseline of examples/bench_train.rs: one HF Trainer-style training step of
bert-tiny (random weights from ../shared/fixtures/bert-tiny-random), batch 32, seq 128 (padded,
as run_glue), dropout on, AdamW, grad-norm clip 1.0, on the CPU with 2 threads. Prints the
median seconds per step, forward + backward alone and the full step.

    python3 scripts/bench_pytorch.py [--steps 20] [--threads 2] [--seq 128]

Needs torch and transformers (not a dependency of the crate; a venv is enough).
"""
import argparse, pathlib, statistics, time

import torch
from transformers import BertConfig, BertForSequenceClassification

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--seq", type=int, default=128)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(42)
root = pathlib.Path(__file__).resolve().parent.parent
cfg = BertConfig.from_json_file(str(root / "../shared/fixtures/bert-tiny-random/config.json"))
cfg.num_labels = 3
model = BertForSequenceClassification(cfg)
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
b, t = 32, args.seq
ids = torch.randint(1000, cfg.vocab_size, (b, t))
ids[:, 0] = 101
types = torch.zeros_like(ids)
mask = torch.ones_like(ids)
labels = torch.randint(0, 3, (b,))

def pass_only():
    out = model(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels)
    out.loss.backward()
    model.zero_grad(set_to_none=True)

def step():
    out = model(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    model.zero_grad(set_to_none=True)

for name, f in [("forward + backward alone", pass_only), ("full step (AdamW)", step)]:
    times = []
    for k in range(args.steps + 2):
        t0 = time.perf_counter()
        f()
        if k >= 2:
            times.append(time.perf_counter() - t0)
    print(f"pytorch {torch.__version__}, {args.threads} threads, seq {t}: {name}: "
          f"{statistics.median(times):.3f} s")
