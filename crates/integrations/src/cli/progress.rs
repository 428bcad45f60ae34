//! Progress for long commands, on a terminal only: `rotate-keys` (rows done
//! of total, rate, time left), `bench` (the current step), `migrate`. In a
//! pipe, a file or CI (standard error not a terminal) nothing is drawn, so
//! logs and scripts see only the commands' own lines. Drawn by `indicatif`
//! on standard error.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A bar or spinner, or nothing when standard error is not a terminal.
pub struct Progress(Option<ProgressBar>);

impl Progress {
    fn on_terminal() -> bool {
        std::io::stderr().is_terminal()
    }

    /// A bar of `total` `unit`s with the rate and the time left.
    pub fn bar(total: u64, unit: &str) -> Progress {
        if !Self::on_terminal() {
            return Progress(None);
        }
        let bar = ProgressBar::new(total);
        let template =
            format!("{{bar:30}} {{pos}}/{{len}} {unit}  {{per_sec}}  {{eta}} left  {{msg}}");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            bar.set_style(style);
        }
        Progress(Some(bar))
    }

    /// A spinner saying `message`, ticking on its own.
    pub fn spinner(message: impl Into<String>) -> Progress {
        if !Self::on_terminal() {
            return Progress(None);
        }
        let spinner = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            spinner.set_style(style);
        }
        spinner.set_message(message.into());
        spinner.enable_steady_tick(Duration::from_millis(120));
        Progress(Some(spinner))
    }

    /// Moves the bar to `done`.
    pub fn set(&self, done: u64) {
        if let Some(bar) = &self.0 {
            bar.set_position(done);
        }
    }

    /// Sets the total.
    pub fn set_length(&self, total: u64) {
        if let Some(bar) = &self.0 {
            bar.set_length(total);
        }
    }

    /// Replaces the message.
    pub fn message(&self, message: impl Into<String>) {
        if let Some(bar) = &self.0 {
            bar.set_message(message.into());
        }
    }

    /// Removes it from the terminal (the command prints its own result).
    pub fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
