//! Progress of long work with ETA: an indicatif bar in a terminal; plain lines elsewhere (a
//! notebook cell or a log file), since bars do not render there: one after the first step (the
//! ETA shows at once), then one every [`LINE_EVERY`] and one at the end. evcxr passes the
//! kernel's stderr to the notebook line by line while the cell runs, so the lines appear live.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// Seconds between two plain progress lines (not in a terminal).
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// A progress reporter for `total` steps: what [`Trainer::fit`](crate::train::Trainer::fit)
/// shows, and usable in a notebook's own loop.
///
/// ```
/// use mfac_lab::prelude::*;
/// let mut bar = Progress::new("my loop", 3, false);
/// for step in 1..=3 {
///     // … one step of work …
///     bar.update(step, &format!("loss {:.4}", 1.0 / step as f64));
/// }
/// bar.finish();
/// ```
pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    start: Instant,
    last_line: Instant,
    every: Duration,
    label: String,
    quiet: bool,
    printed: bool,
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
            every: LINE_EVERY,
            label: label.into(),
            quiet,
            printed: false,
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
        if !line_due(
            self.printed,
            now.duration_since(self.last_line),
            self.every,
            done,
            self.total,
        ) {
            return;
        }
        self.printed = true;
        self.last_line = now;
        eprintln!(
            "{}",
            self.line(done, status, now.duration_since(self.start))
        );
    }

    /// The plain line for `done` steps after `elapsed`: label, `done/total (P%)`, elapsed, ETA,
    /// rate and the status.
    fn line(&self, done: usize, status: &str, elapsed: Duration) -> String {
        let el = elapsed.as_secs_f64();
        let rate = done as f64 / el.max(1e-9);
        let eta = if rate > 0.0 {
            (self.total - done.min(self.total)) as f64 / rate
        } else {
            f64::NAN
        };
        format!(
            "{} {done}/{} ({:.0}%) elapsed {} ETA {} · {:.2} steps/s · {status}",
            self.label,
            self.total,
            100.0 * done as f64 / self.total.max(1) as f64,
            hms(el),
            hms(eta),
            rate
        )
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

/// Whether a plain line is due: the first update, then one per `every`, and the last step.
fn line_due(
    printed: bool,
    since_last: Duration,
    every: Duration,
    done: usize,
    total: usize,
) -> bool {
    !printed || since_last >= every || done >= total
}

/// `h:mm:ss`, or `?` for a time not known yet.
pub(crate) fn hms(s: f64) -> String {
    if !s.is_finite() {
        return "?".into();
    }
    let s = s.round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_after_the_first_step_then_every_few_seconds_and_at_the_end() {
        let every = LINE_EVERY;
        let short = Duration::from_millis(300);
        assert!(
            line_due(false, short, every, 1, 100),
            "the first update prints (the ETA at once)"
        );
        assert!(
            !line_due(true, short, every, 2, 100),
            "not again within {every:?}"
        );
        assert!(line_due(true, every, every, 40, 100));
        assert!(
            line_due(true, short, every, 100, 100),
            "the last step always prints"
        );
    }

    #[test]
    fn the_line_has_step_rate_eta_and_status() {
        let p = Progress::new("adamw mnli", 200, true);
        let line = p.line(50, "loss 1.0986", Duration::from_secs(10));
        assert_eq!(
            line,
            "adamw mnli 50/200 (25%) elapsed 0:00:10 ETA 0:00:30 · 5.00 steps/s · loss 1.0986"
        );
        // Before any step the ETA is unknown, not a division by zero.
        assert!(p.line(0, "", Duration::ZERO).contains("ETA ?"));
    }
}
