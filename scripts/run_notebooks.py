"""Runs notebooks on the evcxr kernel with nbclient, timed; used by scripts/notebook-setup.sh
(`prebuild`) and scripts/run-notebooks.sh (`run`). Needs the venv those scripts install.

  prebuild --dep ':dep mfac-lab = { path = ".." }'
      executes the notebooks' first two cells (that `:dep` line, then `use mfac_lab::prelude::*`)
      from notebooks/, so the compile folder named by notebooks/evcxr.toml holds their build.
  run NOTEBOOK... --out DIR
      executes each notebook from its own folder into DIR and fails unless it ran without an
      error, drew an image, printed its device (a line starting "device: "), printed a progress
      line (`N/M (P%) elapsed … ETA …`) in its longest cell that trains (fit,
      compare_optimizers, a loop with Progress) and in every cell that ran 10 s or more.
      Prints, per notebook, the seconds from starting the kernel to the end of the second code
      cell ("open") and the whole run; DIR/timings.json keeps them.
  lever --compile-dir DIR --opt-level N
      a measurement for docs/PERFORMANCE.md: builds the notebooks' dependency on the kernel in
      its own compile folder DIR/evcxr (Cargo.lock's crates, vendored as the set-up does) with evcxr's
      opt_level N (--no-default-features: without the hub; --deps-release: the dependencies
      at opt-level 3 without debug assertions and overflow checks, as a release build and as
      the set-up builds them; without it, evcxr's profile for everything), timing that cold build (run it
      again for the warm open); then, in that build, times tokenizing the embedded MNLI sample
      and 30 training steps (batch 32) with AdamW and with the card's sparse M-FAC.
"""
import argparse
import json
import os
import re
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

PROGRESS = re.compile(r"\d+/\d+ \(\d+%\) elapsed \S+ ETA \S+")
DEVICE = re.compile(r"^device: \S", re.M)
TRAINING = re.compile(r"\.fit\(|compare_optimizers\(|Progress::new\(")
LONG_CELL_S = 10.0


def trains(cell):
    """Whether a code cell trains (comment lines, such as the full-size cells, do not count)."""
    code = "\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith("//"))
    return cell.cell_type == "code" and bool(TRAINING.search(code))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def client_for(nb, cwd):
    return NotebookClient(nb, kernel_name="rust", timeout=3600, allow_errors=False,
                          record_timing=True, resources={"metadata": {"path": cwd}})


def stream_text(cell):
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append(o.get("text", ""))
        elif o.get("output_type") in ("display_data", "execute_result"):
            out.append(o.get("data", {}).get("text/plain", ""))
    # A result has no newline of its own: keep every output on its own lines.
    return "".join(t if t.endswith("\n") else t + "\n" for t in out if t)


def execute(nb, cwd):
    """Runs every code cell; returns (seconds to the end of the 2nd code cell from the kernel's
    start, total seconds, seconds per code cell as (index, s), error or None)."""
    client = client_for(nb, cwd)
    t0 = time.monotonic()
    opened, per_cell, error = None, [], None
    with client.setup_kernel():
        code = 0
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            c0 = time.monotonic()
            try:
                client.execute_cell(cell, i)
            except CellExecutionError as e:
                error = f"cell {i}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}"
                per_cell.append((i, time.monotonic() - c0))
                break
            per_cell.append((i, time.monotonic() - c0))
            code += 1
            if code == 2:
                opened = time.monotonic() - t0
    return opened, time.monotonic() - t0, per_cell, error


def prebuild(dep):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(dep),
                nbformat.v4.new_code_cell("use mfac_lab::prelude::*;")]
    opened, total, _, error = execute(nb, os.path.join(ROOT, "notebooks"))
    if error:
        print(f"pre-build FAILED: {error}", file=sys.stderr)
        return 1
    print(f"pre-build done: {total:.0f} s")
    return 0


LEVER_CELL = """
let data = mnli_sample()?;
let model0 = ModelSource::random_bert_tiny().load(3, 42, &Device::Cpu, DType::F32)?;
let tok = model0.tokenizer()?.clone();
let (pairs, _) = data.pairs(&data.train)?;
let t = std::time::Instant::now();
for chunk in pairs.chunks(32) { tok.batch(chunk, None, &Device::Cpu)?; }
println!("tokenize {} pairs: {:.3} s", pairs.len(), t.elapsed().as_secs_f64());
let mut cfg = TrainConfig::run_glue();
cfg.max_steps = Some(30);
cfg.quiet = true;
cfg.max_eval_samples = Some(32);
for spec in [OptimizerSpec::adamw(1e-4), OptimizerSpec::mfac(MFacConfig::model_card().with_density(0.01))] {
    let model = ModelSource::random_bert_tiny().load(3, 42, &Device::Cpu, DType::F32)?;
    let name = spec.name();
    let h = Trainer::new(model, cfg.clone()).optimizer(spec).fit(&data)?;
    println!("{name}: {:.4} s/step over {} steps", h.cost.train_seconds / h.cost.steps as f64, h.cost.steps);
}
"""


DEPS_RELEASE = """
# Dependencies (mfac-lab included) as a release build compiles them; the cells' own code keeps
# evcxr's profile.
[profile.dev.package."*"]
opt-level = 3
debug-assertions = false
overflow-checks = false
"""


def lever(compile_dir, opt_level, no_default_features, deps_release):
    import shutil
    import tempfile
    compile_dir = os.path.abspath(compile_dir)
    # The vendored source applies to a compile folder one level below the config's folder.
    vendored = os.path.join(ROOT, "target", "notebook-build", ".cargo", "config.toml")
    if not os.path.exists(vendored):
        print("run scripts/notebook-setup.sh first (it vendors Cargo.lock's crates)", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(compile_dir, ".cargo"), exist_ok=True)
    config = os.path.join(compile_dir, ".cargo", "config.toml")
    if not (os.path.exists(config) and os.path.samefile(vendored, config)):
        # The set-up's config without its profile section, then the lever's.
        with open(vendored) as f:
            text = f.read().split("[profile.")[0].rstrip("\n# \n")
        lines = text.splitlines()
        while lines and lines[-1].startswith("#"):
            lines.pop()
        with open(config, "w") as f:
            f.write("\n".join(lines) + "\n" + (DEPS_RELEASE if deps_release else ""))
    compile_dir = os.path.join(compile_dir, "evcxr")
    with tempfile.TemporaryDirectory() as cwd:
        with open(os.path.join(cwd, "evcxr.toml"), "w") as f:
            f.write(f'[evcxr]\ntmpdir = "{compile_dir}"\nopt_level = "{opt_level}"\n')
        nb = nbformat.v4.new_notebook()
        features = ", default-features = false" if no_default_features else ""
        nb.cells = [nbformat.v4.new_code_cell(f':dep mfac-lab = {{ path = "{ROOT}"{features} }}'),
                    nbformat.v4.new_code_cell("use mfac_lab::prelude::*;\nlet quick = std::env::var(\"MFAC_LAB_QUICK\").is_ok();"),
                    nbformat.v4.new_code_cell(LEVER_CELL)]
        opened, total, per_cell, error = execute(nb, cwd)
    if error:
        print(f"lever FAILED: {error}", file=sys.stderr)
        return 1
    print(f"opt_level {opt_level}{' without default features' if no_default_features else ''}"
          f"{', dependencies as in a release build' if deps_release else ''}: "
          f"kernel start + the :dep cell {opened - per_cell[1][1]:.1f} s (cold: the build), "
          f"open + first two cells {opened:.1f} s")
    print(stream_text(nb.cells[2]).strip())
    return 0


def check(nb, per_cell):
    """What an executed notebook must show; returns the problems and a short description."""
    problems, images, text = [], 0, ""
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            if "image/svg+xml" in data or "image/png" in data:
                images += 1
        text += stream_text(cell)
    if images == 0:
        problems.append("no image")
    device = DEVICE.search(text)
    if not device:
        problems.append('no "device: …" line')
    # The cells that train (Trainer::fit, compare_optimizers, a loop with its own Progress): the
    # longest of them must show progress, and so must any cell that ran 10 s or more.
    later = [(i, t) for i, t in per_cell[2:] if trains(nb.cells[i])]
    longest = max(later, key=lambda c: c[1]) if later else None
    if longest is None:
        problems.append("no cell that trains")
    elif not PROGRESS.search(stream_text(nb.cells[longest[0]])):
        problems.append(f"no progress line in its longest training cell (cell {longest[0]}, {longest[1]:.1f} s)")
    for i, t in per_cell[2:]:
        if t >= LONG_CELL_S and not PROGRESS.search(stream_text(nb.cells[i])):
            problems.append(f"cell {i} ran {t:.0f} s without a progress line")
    dev_line = text[device.start():].splitlines()[0] if device else "?"
    desc = f"{images} image(s), {dev_line}"
    if longest:
        desc += f", progress in its longest training cell ({longest[0]}, {longest[1]:.1f} s)"
    return problems, desc


def run(paths, out):
    os.makedirs(out, exist_ok=True)
    status, timings = 0, {}
    for path in paths:
        name = os.path.basename(path)
        nb = nbformat.read(path, as_version=4)
        opened, total, per_cell, error = execute(nb, os.path.dirname(os.path.abspath(path)))
        nbformat.write(nb, os.path.join(out, name))
        timings[name] = {"open_and_two_cells_s": opened, "total_s": total,
                         "cells_s": {str(i): round(s, 2) for i, s in per_cell}}
        if error:
            print(f"FAILED: {name}: {error}")
            status = 1
            continue
        problems, desc = check(nb, per_cell)
        if problems:
            print(f"FAILED: {name}: " + "; ".join(problems))
            status = 1
            continue
        print(f"ok: {name}: open + first two cells {opened:.1f} s, whole notebook {total:.1f} s; {desc}")
    with open(os.path.join(out, "timings.json"), "w") as f:
        json.dump(timings, f, indent=1)
    return status


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prebuild")
    p.add_argument("--dep", required=True)
    r = sub.add_parser("run")
    r.add_argument("notebooks", nargs="+")
    r.add_argument("--out", required=True)
    lv = sub.add_parser("lever")
    lv.add_argument("--compile-dir", required=True)
    lv.add_argument("--opt-level", required=True)
    lv.add_argument("--no-default-features", action="store_true")
    lv.add_argument("--deps-release", action="store_true")
    a = ap.parse_args()
    if a.cmd == "prebuild":
        return prebuild(a.dep)
    if a.cmd == "lever":
        return lever(a.compile_dir, a.opt_level, a.no_default_features, a.deps_release)
    return run(a.notebooks, a.out)


if __name__ == "__main__":
    sys.exit(main())
