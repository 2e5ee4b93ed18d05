//! Benchmark of one M-FAC step on the CPU, against the memory-bandwidth floor.
//!
//! ```sh
//! cargo run --release --example bench_mfac -- [--d 4386307] [--m 32,128,256] [--dtype f32,bf16] [--steps 10] [--noise 1] [--density 1]
//! ```
//! For each window size m and window dtype: fills the window (m steps), then times `--steps`
//! more steps and prints the median ms per step, split into the m×m side (the host's f64 work:
//! its median per step, the from-scratch rebuild that comes every m steps, and the two
//! amortised: the mean per step + rebuild / m; the share of steps the guard checked) and the rest (the window passes and the d-sized work), the
//! effective bandwidth over the two passes (2·m·d·s bytes), two plain streaming reads of the
//! same bytes timed right after each step (the floor), and the ratio step / floor.
//!
//! The m×m side alone: a window so small that the passes cost little, e.g.
//! `--d 4096 --m 1024 --dtype f32 --steps 300`.
//!
//! `--density ρ` (< 1) benchmarks the sparse window instead (top-k rows with error feedback,
//! e.g. `--m 1024 --density 0.01`): its floor, timed right after each step, is two plain reads
//! of the kept entries' bytes (indices and values) plus the d-length passes a step must make —
//! the accumulator (e += g: read e and g, write e), the selection (one read of e) and the update
//! (w −= lr·u: read u and w, write w) — each as a plain loop over buffers of the same sizes.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use mfac_lab::optim::{MFac, MFacConfig};
use mfac_lab::rng::SeededRng;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn arg(args: &[String], key: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let d: usize = arg(&args, "--d", "4386307").parse().context("--d")?;
    let steps: usize = arg(&args, "--steps", "10").parse().context("--steps")?;
    // The fresh part of each gradient, relative to the shared one (0: a window of rank 4).
    let noise_size: f32 = arg(&args, "--noise", "1").parse().context("--noise")?;
    let density: f64 = arg(&args, "--density", "1").parse().context("--density")?;
    if density < 1.0 {
        return sparse(&args, d, steps, noise_size, density);
    }
    let (ms, dtypes) = windows(&args, "32,128,256")?;
    println!(
        "M-FAC step benchmark: d = {d}, {} threads, {steps} timed steps after filling the window",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("| m | window | window GB | step ms (median) | m×m ms (median) | rebuild ms (every m steps) | m×m ms amortised | guard checks / step | passes + rest ms | GB/s over 2 passes | floor ms (2 reads) | step / floor |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (w, mut grads) = setup(d, noise_size)?;
    for &m in &ms {
        for &dt in &dtypes {
            let cfg = MFacConfig {
                num_grads: m,
                window_dtype: dt,
                ..MFacConfig::model_card()
            };
            let mut opt = MFac::try_new(vec![w.clone()], cfg)?;
            let bytes = opt.window_bytes() as f64;
            // The floor: the same number of bytes, read twice by the same threads. It is timed
            // right after each step, so both see the same machine (this VM's bandwidth drifts).
            let buf = vec![1.0f32; (bytes / 4.0) as usize];
            let (mut times, mut reads, mut gram, mut rest) = (vec![], vec![], vec![], vec![]);
            let mut timed = mfac_lab::optim::GramTiming::default();
            let mut check = 0.0;
            for t in 0..m + steps {
                let store = (w.as_tensor() * grads.at(t)?)?.sum_all()?.backward()?;
                let before = opt.gram_timing();
                let t0 = Instant::now();
                opt.try_step(&store)?;
                if t >= m {
                    let step = t0.elapsed().as_secs_f64();
                    let g = opt.gram_timing().since(&before);
                    timed.steps += g.steps;
                    timed.checks += g.checks;
                    times.push(step);
                    rest.push(step - g.seconds);
                    // Steps that rebuilt are counted in the rebuild column.
                    if g.rebuilds == 0 {
                        gram.push(g.seconds);
                    }
                    let t0 = Instant::now();
                    check += streaming_read(&buf);
                    check += streaming_read(&buf);
                    reads.push(t0.elapsed().as_secs_f64());
                }
            }
            assert!(check > 0.0);
            let step = median(times);
            let floor = median(reads);
            let all = opt.gram_timing();
            let rebuild = all.rebuild_seconds / all.rebuilds.max(1) as f64;
            // Amortised: the mean of the steps (a guard check on some, none on others) plus
            // the rebuild's share.
            let mean = gram.iter().sum::<f64>() / gram.len().max(1) as f64;
            let gram = if gram.is_empty() { 0.0 } else { median(gram) };
            drop(opt);
            println!(
                "| {m} | {dt:?} | {:.3} | {:.2} | {:.3} | {:.1} | {:.3} | {:.2} | {:.2} | {:.1} | {:.1} | {:.2} |",
                bytes / 1e9,
                step * 1e3,
                gram * 1e3,
                rebuild * 1e3,
                (mean + rebuild / m as f64) * 1e3,
                timed.checks as f64 / timed.steps.max(1) as f64,
                median(rest) * 1e3,
                2.0 * bytes / step / 1e9,
                floor * 1e3,
                step / floor
            );
        }
    }
    Ok(())
}

/// The parameters (d normal values, f32) and the gradients' generator, from one seeded stream.
fn setup(d: usize, noise: f32) -> Result<(Var, Gradients)> {
    let mut rng = SeededRng::new(1);
    let w = Var::from_tensor(
        &Tensor::from_vec(rng.normal_vec(d, 0.0, 1.0), d, &Device::Cpu)?.to_dtype(DType::F32)?,
    )?;
    let grads = Gradients::new(&mut rng, d, noise);
    Ok((w, grads))
}

/// `--m` (window sizes, default `default_m`) and `--dtype` (f32, bf16).
fn windows(args: &[String], default_m: &str) -> Result<(Vec<usize>, Vec<DType>)> {
    let ms = arg(args, "--m", default_m)
        .split(',')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let dtypes = arg(args, "--dtype", "f32,bf16")
        .split(',')
        .map(|s| match s {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            other => bail!("unknown dtype {other}"),
        })
        .collect::<Result<_>>()?;
    Ok((ms, dtypes))
}

/// Gradients like a training run's: four shared directions, cycled, plus fresh noise of the
/// same size every step (mini-batch noise), so the window has full rank. (Four directions alone
/// would make K of rank 4: every new row in the span of the others, the m×m side's worst case,
/// where the guard checks every step.)
struct Gradients {
    pool: Vec<Vec<f32>>,
    noise: u64,
    size: f32,
}

impl Gradients {
    fn new(rng: &mut SeededRng, d: usize, size: f32) -> Self {
        let pool = (0..4)
            .map(|_| {
                rng.normal_vec(d, 0.0, 1e-3)
                    .iter()
                    .map(|&x| x as f32)
                    .collect()
            })
            .collect();
        Gradients {
            pool,
            noise: 0x9E37_79B9_7F4A_7C15,
            size,
        }
    }

    fn at(&mut self, t: usize) -> Result<Tensor> {
        let noise = &mut self.noise;
        let size = self.size;
        let g: Vec<f32> = self.pool[t % self.pool.len()]
            .iter()
            .map(|&x| {
                // xorshift64: a uniform in [-1, 1), cheap enough for d = 4.4M every step.
                *noise ^= *noise << 13;
                *noise ^= *noise >> 7;
                *noise ^= *noise << 17;
                // Uniform in [-√3, √3)·1e-3: the shared part's standard deviation.
                x + size * 1.732e-3 * ((*noise >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect();
        let d = g.len();
        Ok(Tensor::from_vec(g, d, &Device::Cpu)?)
    }
}

/// The sparse window's benchmark (module docs).
fn sparse(args: &[String], d: usize, steps: usize, noise: f32, density: f64) -> Result<()> {
    let (ms, dtypes) = windows(args, "1024")?;
    let threads = rayon::current_num_threads();
    println!(
        "Sparse M-FAC step benchmark: d = {d}, density {density}, {threads} threads, {steps} timed steps after filling the window"
    );
    println!("| m | values | k per row | window GB | state GB | step ms (median) | m×m ms (median) | passes + rest ms | floor ms | step / floor | floor: 2 reads of the rows ms | floor: d-length passes ms |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (w, mut grads) = setup(d, noise)?;
    for &m in &ms {
        for &dt in &dtypes {
            let cfg = MFacConfig {
                num_grads: m,
                window_dtype: dt,
                ..MFacConfig::model_card().with_density(density)
            };
            let mut opt = MFac::try_new(vec![w.clone()], cfg)?;
            let rows_bytes = opt.window_bytes() as f64;
            // The floor's buffers: the rows' bytes, and d-length vectors as the step has them.
            let rows = vec![1.0f32; (rows_bytes / 4.0) as usize];
            let (mut e, g) = (vec![0.5f32; d], vec![0.25f32; d]);
            let (mut wv, u) = (vec![1.0f32; d], vec![1e-3f64; d]);
            let (mut times, mut floors, mut reads, mut passes, mut gram, mut rest) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            let mut parts: Vec<[f64; 6]> = vec![];
            let mut check = 0.0;
            for t in 0..m + steps {
                let store = (w.as_tensor() * grads.at(t)?)?.sum_all()?.backward()?;
                let before = opt.gram_timing();
                let t0 = Instant::now();
                opt.try_step(&store)?;
                if t < m {
                    continue;
                }
                let step = t0.elapsed().as_secs_f64();
                let gt = opt.gram_timing().since(&before);
                times.push(step);
                rest.push(step - gt.seconds);
                if let Some(p) = opt.sparse_profile() {
                    parts.push([
                        p.accumulate_ms,
                        p.select_ms,
                        p.row_ms,
                        p.pass1_ms,
                        p.pass2_ms,
                        p.update_ms,
                    ]);
                }
                if gt.rebuilds == 0 {
                    gram.push(gt.seconds);
                }
                let t0 = Instant::now();
                check += streaming_read(&rows);
                check += streaming_read(&rows);
                let t1 = Instant::now();
                add_into(&mut e, &g);
                check += streaming_read(&e);
                descend(&mut wv, &u);
                let t2 = Instant::now();
                reads.push((t1 - t0).as_secs_f64());
                passes.push((t2 - t1).as_secs_f64());
                floors.push((t2 - t0).as_secs_f64());
            }
            assert!(check != 0.0);
            let state = mfac_lab::optim::Optim::state_bytes(&opt) as f64;
            let (step, floor) = (median(times), median(floors));
            println!(
                "| {m} | {dt:?} | {} | {:.3} | {:.3} | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                opt.kept_per_row(),
                rows_bytes / 1e9,
                state / 1e9,
                step * 1e3,
                if gram.is_empty() { 0.0 } else { median(gram.clone()) * 1e3 },
                median(rest) * 1e3,
                floor * 1e3,
                step / floor,
                median(reads) * 1e3,
                median(passes) * 1e3,
            );
            let part = |i: usize| median(parts.iter().map(|p| p[i]).collect());
            println!(
                "  where the step goes (median ms): accumulator {:.2}, selection {:.2}, row write {:.2}, pass 1 (K's row) {:.2}, m×m {:.2}, pass 2 (u) {:.2}, update {:.2}",
                part(0),
                part(1),
                part(2),
                part(3),
                if gram.is_empty() { 0.0 } else { median(gram.clone()) * 1e3 },
                part(4),
                part(5)
            );
        }
    }
    Ok(())
}

/// e += g over the threads (the accumulator's pass).
fn add_into(e: &mut [f32], g: &[f32]) {
    let chunk = e.len().div_ceil(rayon::current_num_threads()).max(1);
    std::thread::scope(|s| {
        for (a, b) in e.chunks_mut(chunk).zip(g.chunks(chunk)) {
            s.spawn(move || {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += *y;
                }
            });
        }
    });
}

/// w −= 1e-4·u over the threads (the update's pass).
fn descend(w: &mut [f32], u: &[f64]) {
    let chunk = w.len().div_ceil(rayon::current_num_threads()).max(1);
    std::thread::scope(|s| {
        for (a, b) in w.chunks_mut(chunk).zip(u.chunks(chunk)) {
            s.spawn(move || {
                for (x, y) in a.iter_mut().zip(b) {
                    *x = (*x as f64 - 1e-4 * y) as f32;
                }
            });
        }
    });
}

/// One plain streaming read of `buf` (the floor an M-FAC step is compared with is two of them),
/// split into one piece per thread of rayon's pool (as the M-FAC passes are), each read by its
/// own scoped thread. Returns a checksum (to keep it honest).
fn streaming_read(buf: &[f32]) -> f64 {
    let chunk = buf.len().div_ceil(rayon::current_num_threads()).max(1);
    std::thread::scope(|s| {
        let hs: Vec<_> = buf
            .chunks(chunk)
            .map(|c| {
                s.spawn(move || {
                    let mut acc = [0.0f32; 16];
                    for x in c.chunks_exact(16) {
                        for k in 0..16 {
                            acc[k] += x[k];
                        }
                    }
                    acc.iter().map(|&a| a as f64).sum::<f64>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    })
}
