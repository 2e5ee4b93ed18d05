"""HF's Python path for loading and tokenizing MNLI's train split, beside the soak benchmark's
figure for ours (issue 24, docs/PERFORMANCE.md).

    python scripts/hf_tokenize_bench.py target/soak/data target/soak/model [max_length|none]

Reads the parquet the soak benchmark wrote (392,702 rows) with `datasets.load_dataset("parquet")`
and tokenizes it as run_glue's `preprocess_function` does: `Dataset.map(batched=True)` over
transformers' fast tokenizer (the same tokenizer files as ours), truncation at max_length 128.
run_glue pads to max_length by default (`pad_to_max_length`); ours pads per batch at collate
time, so both are timed: padding="max_length" (run_glue's default) and padding=False. Each with
a fresh datasets cache (a first run, as a new user's), once.

Needs: pip install datasets transformers tokenizers pyarrow
"""

import os
import sys
import tempfile
import time


def main() -> None:
    data_dir, model_dir = sys.argv[1], sys.argv[2]
    # Imports are not timed (a notebook has them loaded already).
    import datasets
    from datasets import load_dataset
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    train = os.path.join(data_dir, "train-00000-of-00001.parquet")
    modes = ("max_length", False) if len(sys.argv) < 4 else (sys.argv[3] == "max_length" and "max_length" or False,)
    for padding in modes:
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()

            tok = AutoTokenizer.from_pretrained(model_dir, use_fast=True)
            ds = load_dataset("parquet", data_files={"train": train}, cache_dir=cache)["train"]
            t_load = time.perf_counter() - t0

            def preprocess(examples):
                return tok(
                    examples["premise"],
                    examples["hypothesis"],
                    padding=padding,
                    max_length=128,
                    truncation=True,
                )

            ds = ds.map(preprocess, batched=True, desc="tokenizing")
            total = time.perf_counter() - t0
            mean = sum(len(x) for x in ds["input_ids"]) / len(ds)
            print(
                f"HF python, padding={padding!r}: load + tokenize {len(ds)} rows in {total:.2f} s "
                f"(load {t_load:.2f} s, tokenize {total - t_load:.2f} s; {len(ds) / total:.0f} rows/s); "
                f"mean ids per row {mean:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
