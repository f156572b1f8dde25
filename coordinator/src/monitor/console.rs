//! The coordinator's console: a live progress bar on a terminal, periodic `progress` log lines
//! elsewhere (log files, `docker logs`, `kubectl logs`), where a redrawn bar would be noise.
//!
//! Log lines and the bar share stderr: the tracing subscriber writes through [`Console`], which
//! lifts the bar for the length of each line, so lines scroll above it instead of through it.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tracing::info;
use tracing_subscriber::fmt::MakeWriter;

use crate::format::duration;

/// How progress is shown; `Auto` is a bar on a terminal and lines otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    #[default]
    Auto,
    Bar,
    Lines,
    Off,
}

impl std::str::FromStr for ProgressMode {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value.to_ascii_lowercase().as_str() {
            "auto" => Ok(ProgressMode::Auto),
            "bar" => Ok(ProgressMode::Bar),
            "lines" | "log" => Ok(ProgressMode::Lines),
            "off" | "none" => Ok(ProgressMode::Off),
            _ => Err(format!("expected auto, bar, lines or off, found {value:?}")),
        }
    }
}

/// What one update shows.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressView {
    pub step: u64,
    pub steps_total: u64,
    pub steps_per_sec: Option<f64>,
    pub images_per_sec: Option<f64>,
    pub eta_secs: Option<f64>,
    pub loss_d: f64,
    pub loss_g: f64,
    pub train_d: bool,
    pub train_g: bool,
    pub workers: usize,
}

/// The console, cloned into the tracing subscriber and the trainer's monitor.
#[derive(Debug, Clone)]
pub struct Console {
    bar: ProgressBar,
    mode: ProgressMode,
    /// `--progress bar` was asked for where stderr is no terminal, so lines are shown.
    no_terminal_for_bar: bool,
    /// Seconds between `progress` lines in lines mode.
    every: Duration,
}

/// A cheap default for library users and tests: lines every 10 s, no bar.
impl Default for Console {
    fn default() -> Self {
        Console::new(ProgressMode::Lines, Duration::from_secs(10))
    }
}

impl Console {
    /// `Auto` is decided here, from whether stderr is a terminal.
    pub fn new(mode: ProgressMode, every: Duration) -> Console {
        let terminal = std::io::stderr().is_terminal();
        // A bar is only drawn on a terminal; elsewhere it would show nothing at all.
        let no_terminal_for_bar = mode == ProgressMode::Bar && !terminal;
        let mode = match mode {
            ProgressMode::Auto | ProgressMode::Bar if terminal => ProgressMode::Bar,
            ProgressMode::Auto | ProgressMode::Bar => ProgressMode::Lines,
            other => other,
        };
        // Hidden until training starts: the joins and the dataset summary come first.
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        Console {
            bar,
            mode,
            every,
            no_terminal_for_bar,
        }
    }

    pub fn mode(&self) -> ProgressMode {
        self.mode
    }

    /// A progress display for a run of `steps_total` steps that starts at `step`.
    pub fn start(&self, step: u64, steps_total: u64) -> Progress {
        if self.no_terminal_for_bar {
            tracing::warn!("--progress bar: stderr is not a terminal, so progress is shown as lines");
        }
        if self.mode == ProgressMode::Bar {
            let style = ProgressStyle::with_template(
                "{spinner:.green} step {pos}/{len} [{bar:30.cyan/blue}] {percent:>3}% {msg}",
            )
            .expect("the progress template is valid")
            .progress_chars("=> ");
            self.bar.set_style(style);
            self.bar.set_length(steps_total);
            self.bar.set_position(step);
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        Progress {
            console: self.clone(),
            last_line: None,
        }
    }
}

/// The display of one run: [`Progress::update`] after every step.
#[derive(Debug)]
pub struct Progress {
    console: Console,
    last_line: Option<Instant>,
}

impl Progress {
    pub fn update(&mut self, view: &ProgressView) {
        match self.console.mode {
            ProgressMode::Bar => {
                self.console.bar.set_position(view.step);
                self.console.bar.set_message(summary(view));
            }
            ProgressMode::Lines => {
                let due = self.last_line.is_none_or(|at| at.elapsed() >= self.console.every);
                if due || view.step == view.steps_total {
                    self.last_line = Some(Instant::now());
                    info!(
                        step = view.step,
                        steps = view.steps_total,
                        steps_per_sec = view.steps_per_sec.map(round2),
                        images_per_sec = view.images_per_sec.map(round2),
                        eta = view.eta_secs.map(duration),
                        loss_d = round4(view.loss_d),
                        loss_g = round4(view.loss_g),
                        trained = trained(view),
                        workers = view.workers,
                        "progress"
                    );
                }
            }
            ProgressMode::Auto | ProgressMode::Off => {}
        }
    }

    /// Takes the bar off the screen; the last state stays in the log lines.
    pub fn finish(self) {
        if self.console.mode == ProgressMode::Bar {
            self.console.bar.finish_and_clear();
        }
    }
}

/// The bar's message: rates, ETA, losses, what trained, workers.
pub fn summary(view: &ProgressView) -> String {
    let rate = |value: Option<f64>, unit: &str| value.map_or(format!("- {unit}"), |v| format!("{v:.2} {unit}"));
    format!(
        "{} {} ETA {} loss_d {:.4} loss_g {:.4} trained {} workers {}",
        rate(view.steps_per_sec, "steps/s"),
        rate(view.images_per_sec, "img/s"),
        view.eta_secs.map_or("-".to_string(), duration),
        view.loss_d,
        view.loss_g,
        trained(view),
        view.workers
    )
}

/// Which networks the step trained: `D+G`, `D`, `G` or `none` (the loss balancing skips one
/// that is far ahead).
fn trained(view: &ProgressView) -> &'static str {
    match (view.train_d, view.train_g) {
        (true, true) => "D+G",
        (true, false) => "D",
        (false, true) => "G",
        (false, false) => "none",
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

/// One log line, written to stderr in one piece with the bar lifted.
#[derive(Debug)]
pub struct ConsoleLine {
    bar: ProgressBar,
    line: Vec<u8>,
}

impl Write for ConsoleLine {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut self.line);
        self.bar.suspend(|| {
            let mut stderr = std::io::stderr().lock();
            stderr.write_all(&line).and_then(|()| stderr.flush())
        })
    }
}

impl Drop for ConsoleLine {
    fn drop(&mut self) {
        // Nowhere to report a failed write to stderr.
        let _ = self.flush();
    }
}

impl<'a> MakeWriter<'a> for Console {
    type Writer = ConsoleLine;

    fn make_writer(&'a self) -> ConsoleLine {
        ConsoleLine {
            bar: self.bar.clone(),
            line: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> ProgressView {
        ProgressView {
            step: 250,
            steps_total: 1000,
            steps_per_sec: Some(2.5),
            images_per_sec: Some(80.0),
            eta_secs: Some(300.0),
            loss_d: 1.23456,
            loss_g: 0.5,
            train_d: true,
            train_g: false,
            workers: 2,
        }
    }

    #[test]
    fn the_summary_names_rates_eta_losses_what_trained_and_workers() {
        assert_eq!(
            summary(&view()),
            "2.50 steps/s 80.00 img/s ETA 5m 00s loss_d 1.2346 loss_g 0.5000 trained D workers 2"
        );
        let early = ProgressView {
            steps_per_sec: None,
            images_per_sec: None,
            eta_secs: None,
            train_g: true,
            ..view()
        };
        assert!(
            summary(&early).starts_with("- steps/s - img/s ETA - "),
            "{}",
            summary(&early)
        );
        assert!(summary(&early).contains("trained D+G"));
    }

    #[test]
    fn modes_parse_from_their_names() {
        assert_eq!("BAR".parse::<ProgressMode>(), Ok(ProgressMode::Bar));
        assert_eq!("log".parse::<ProgressMode>(), Ok(ProgressMode::Lines));
        assert!(
            "sometimes"
                .parse::<ProgressMode>()
                .unwrap_err()
                .contains("auto, bar, lines or off")
        );
    }

    #[test]
    fn lines_and_off_are_kept_and_a_bar_needs_a_terminal() {
        let mode = |asked| Console::new(asked, Duration::from_secs(1)).mode();
        assert_eq!(mode(ProgressMode::Lines), ProgressMode::Lines);
        assert_eq!(mode(ProgressMode::Off), ProgressMode::Off);
        // Test runs capture stderr, so it is no terminal.
        if !std::io::stderr().is_terminal() {
            assert_eq!(mode(ProgressMode::Auto), ProgressMode::Lines);
            assert_eq!(mode(ProgressMode::Bar), ProgressMode::Lines);
        }
    }
}
