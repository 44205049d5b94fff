//! Progress of long jobs (caching, training epochs, evaluation, reproduce). On a terminal an
//! indicatif bar with rate and ETA; anywhere else (a log file, CI) a bar would be invisible or
//! fill the log with redraws, so a plain line goes to the log every [`PLAIN_EVERY`] and once
//! at the end.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain progress line is written.
pub const PLAIN_EVERY: Duration = Duration::from_secs(15);

/// A job of `total` items.
pub struct Progress {
    view: View,
    label: String,
    total: u64,
    pos: u64,
    message: String,
    start: Instant,
    last_line: Instant,
    /// Plain lines: the least time between two.
    every: Duration,
}

enum View {
    Hidden,
    Bar(ProgressBar),
    Plain,
}

impl Progress {
    /// A bar when stderr is a terminal, plain log lines otherwise; nothing when `show` is
    /// false (tests, jobs nested in a larger one).
    pub fn new(label: impl Into<String>, total: usize, show: bool) -> Self {
        let label = label.into();
        let view = match (show, std::io::stderr().is_terminal()) {
            (false, _) => View::Hidden,
            (true, false) => View::Plain,
            (true, true) => {
                let bar = ProgressBar::new(total as u64);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}",
                    )
                    .expect("a valid progress template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(label.clone());
                View::Bar(bar)
            }
        };
        let now = Instant::now();
        Self {
            view,
            label,
            total: total as u64,
            pos: 0,
            message: String::new(),
            start: now,
            last_line: now,
            every: PLAIN_EVERY,
        }
    }

    /// A job of a few long steps that run bars of their own (reproduce's experiments, whose
    /// models train with a bar per epoch): a plain line after every step, on a terminal too,
    /// since two bars would draw over each other.
    pub fn steps(label: impl Into<String>, total: usize, show: bool) -> Self {
        Self {
            view: if show { View::Plain } else { View::Hidden },
            every: Duration::ZERO,
            ..Self::new(label, total, false)
        }
    }

    /// Shows nothing.
    pub fn hidden() -> Self {
        Self::new("", 0, false)
    }

    /// Items done so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Items per second so far.
    pub fn rate(&self) -> f64 {
        self.pos as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// Shown after the counts (e.g. the last loss).
    pub fn set_message(&mut self, message: impl Into<String>) {
        self.message = message.into();
        if let View::Bar(bar) = &self.view {
            bar.set_message(self.message.clone());
        }
    }

    /// `n` more items done.
    pub fn inc(&mut self, n: usize) {
        self.pos += n as u64;
        match &self.view {
            View::Bar(bar) => bar.inc(n as u64),
            View::Plain if self.last_line.elapsed() >= self.every => {
                self.last_line = Instant::now();
                tracing::info!("{}", self.line());
            }
            _ => {}
        }
    }

    /// Clears the bar, or writes the last plain line.
    pub fn finish(self) {
        match &self.view {
            View::Bar(bar) => bar.finish_and_clear(),
            View::Plain => tracing::info!("{} (done)", self.line()),
            View::Hidden => {}
        }
    }

    fn line(&self) -> String {
        plain_line(
            &self.label,
            (self.pos, self.total),
            self.start.elapsed(),
            &self.message,
        )
    }
}

/// `label: pos/total (pct %), rate/s, ETA s, message`.
pub fn plain_line(
    label: &str,
    (pos, total): (u64, u64),
    elapsed: Duration,
    message: &str,
) -> String {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let rate = pos as f64 / secs;
    let eta = match rate > 0.0 {
        true => format!("{:.0} s", total.saturating_sub(pos) as f64 / rate),
        false => "unknown".to_string(),
    };
    let pct = 100.0 * pos as f64 / total.max(1) as f64;
    let mut line = format!("{label}: {pos}/{total} ({pct:.0} %), {rate:.1}/s, ETA {eta}");
    if !message.is_empty() {
        line += &format!(", {message}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_line_has_counts_rate_and_eta() {
        let line = plain_line("cache", (250, 1000), Duration::from_secs(5), "loss 0.5");
        assert_eq!(line, "cache: 250/1000 (25 %), 50.0/s, ETA 15 s, loss 0.5");
        let start = plain_line("epoch", (0, 10), Duration::ZERO, "");
        assert_eq!(start, "epoch: 0/10 (0 %), 0.0/s, ETA unknown");
    }
}
