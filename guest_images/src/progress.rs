//! Progress for long build steps: a spinner that says what is running and shows the
//! latest line of its output, with the full output kept in a log file so that a failure
//! can point at it.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// Lines of a failed command's log repeated in its error.
const TAIL_LINES: usize = 25;

/// One long step of a build, shown as a spinner while it runs (hidden when stderr is not
/// a terminal, as in CI, where `tracing` carries the same news).
pub(crate) struct Step {
    bar: ProgressBar,
    what: String,
}

impl Step {
    pub(crate) fn start(what: impl Into<String>) -> Step {
        let what = what.into();
        tracing::info!("{what}");
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {wide_msg}")
                .expect("the template is valid"),
        );
        bar.set_prefix(what.clone());
        bar.enable_steady_tick(Duration::from_millis(120));
        Step { bar, what }
    }

    /// Shows what the step is doing now.
    pub(crate) fn say(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    /// Runs `cmd` to completion, appending its output to `log` and showing its latest
    /// line; fails with the command, its status and the tail of its output.
    pub(crate) fn run(&self, cmd: &mut Command, log: &Path) -> Result<()> {
        let shown = format!("{cmd:?}");
        self.say(shown.clone());
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let log_file = Arc::new(Mutex::new(log_file));
        writeln!(log_file.lock().expect("log lock"), "$ {shown}")?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {shown}"))?;
        let pumps: Vec<_> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .map(|stream| {
            let (bar, log_file) = (self.bar.clone(), log_file.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                    let _ = writeln!(log_file.lock().expect("log lock"), "{line}");
                    bar.set_message(line);
                }
            })
        })
        .collect();
        let status = child.wait()?;
        for pump in pumps {
            let _ = pump.join();
        }
        if !status.success() {
            bail!(
                "{shown} failed ({status}); last lines of {}:\n{}",
                log.display(),
                tail(log, TAIL_LINES)
            );
        }
        Ok(())
    }

    /// Ends the step with a one-line summary.
    pub(crate) fn done(self, summary: impl std::fmt::Display) {
        tracing::info!("{}: {summary}", self.what);
        self.bar.finish_and_clear();
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
