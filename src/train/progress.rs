//! Progress of long work with ETA: an indicatif bar in a terminal; plain lines every few seconds
//! elsewhere (a notebook cell or a log file), since bars do not render there.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A progress reporter for `total` steps.
pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    start: Instant,
    last_line: Instant,
    every: Duration,
    label: String,
    quiet: bool,
}

impl Progress {
    /// A reporter; `quiet` prints nothing at all.
    pub fn new(label: &str, total: usize, quiet: bool) -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = (!quiet && tty).then(|| {
            let b = ProgressBar::new(total as u64);
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} {bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
            ) {
                b.set_style(style);
            }
            b.set_prefix(label.to_string());
            b
        });
        let now = Instant::now();
        Progress {
            bar,
            total,
            start: now,
            last_line: now,
            every: Duration::from_secs(10),
            label: label.into(),
            quiet,
        }
    }

    /// Reports that `done` steps are finished, with a short status (loss, rate…).
    pub fn update(&mut self, done: usize, status: &str) {
        if self.quiet {
            return;
        }
        if let Some(b) = &self.bar {
            b.set_position(done as u64);
            b.set_message(status.to_string());
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.last_line) < self.every && done < self.total {
            return;
        }
        self.last_line = now;
        let el = now.duration_since(self.start).as_secs_f64();
        let rate = done as f64 / el.max(1e-9);
        let eta = if rate > 0.0 {
            (self.total - done.min(self.total)) as f64 / rate
        } else {
            f64::NAN
        };
        eprintln!(
            "{} {done}/{} ({:.0}%) elapsed {} ETA {} · {:.2} steps/s · {status}",
            self.label,
            self.total,
            100.0 * done as f64 / self.total.max(1) as f64,
            hms(el),
            hms(eta),
            rate
        );
    }

    /// Prints a message above the bar (or as a line).
    pub fn println(&self, msg: &str) {
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// Ends the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

fn hms(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let s = s.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
