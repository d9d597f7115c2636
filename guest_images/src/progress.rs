//! Progress of long build steps. The library runs each step's commands and keeps their
//! full output in a log file, so that a failure can quote it; what a step is doing now
//! goes to the [`Progress`] its [`Cache`](crate::Cache) was given (the `kindling` CLI
//! draws spinners with it), and to `tracing`.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};

/// Lines of a failed command's log repeated in its error.
const TAIL_LINES: usize = 25;

/// Where a caller shows the long steps of a build (a kernel compile, debootstrap,
/// `mkfs.ext4`); cached lookups report nothing. Steps may run on several threads at once.
pub trait Progress: fmt::Debug + Send + Sync {
    /// A step, `what` (e.g. `minimal kernel`), begins; it has ended, built or failed,
    /// when the returned view is dropped.
    fn start(&self, what: &str) -> Box<dyn StepProgress>;
}

/// One running step, as its [`Progress`] shows it.
pub trait StepProgress: Send + Sync {
    /// What the step does now: the command it runs, or that command's latest output line
    /// (called from the threads reading the command's stdout and stderr).
    fn message(&self, text: &str);
}

/// One long step of a build.
pub(crate) struct Step {
    view: Option<Box<dyn StepProgress>>,
    what: String,
}

impl Step {
    /// Starts a step shown by `progress`, if any (see [`Cache::step`](crate::Cache)).
    pub(crate) fn start(progress: Option<&dyn Progress>, what: impl Into<String>) -> Step {
        let what = what.into();
        tracing::info!("{what}");
        Step {
            view: progress.map(|p| p.start(&what)),
            what,
        }
    }

    /// Shows what the step is doing now.
    pub(crate) fn say(&self, text: &str) {
        if let Some(view) = &self.view {
            view.message(text);
        }
    }

    /// Runs `cmd` to completion, appending its output to `log` and showing its latest
    /// line; fails with the command, its status and the tail of its output.
    pub(crate) fn run(&self, cmd: &mut Command, log: &Path) -> Result<()> {
        let shown = format!("{cmd:?}");
        self.say(&shown);
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let log_file = Mutex::new(log_file);
        writeln!(log_file.lock().expect("log lock"), "$ {shown}")?;
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {shown}"))?;
        let streams = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ];
        // The scope ends once both streams are drained, after the command has exited.
        let status = std::thread::scope(|scope| {
            for stream in streams.into_iter().flatten() {
                let log_file = &log_file;
                scope.spawn(move || {
                    for line in BufReader::new(stream).lines().map_while(|l| l.ok()) {
                        let _ = writeln!(log_file.lock().expect("log lock"), "{line}");
                        self.say(&line);
                    }
                });
            }
            child.wait()
        })?;
        if !status.success() {
            bail!(
                "{shown} failed ({status}); last lines of {}:\n{}",
                log.display(),
                tail(log, TAIL_LINES)
            );
        }
        Ok(())
    }

    /// Ends the step with a one-line summary (for the log; the view just ends).
    pub(crate) fn done(self, summary: impl fmt::Display) {
        tracing::info!("{}: {summary}", self.what);
    }
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<_> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Records every event, as `start <what>`, `<what>: <text>` and `end <what>`.
    #[derive(Debug, Default)]
    struct Recorder(Arc<Mutex<Vec<String>>>);

    struct View {
        what: String,
        events: Arc<Mutex<Vec<String>>>,
    }

    impl Progress for Recorder {
        fn start(&self, what: &str) -> Box<dyn StepProgress> {
            self.0.lock().unwrap().push(format!("start {what}"));
            Box::new(View {
                what: what.to_string(),
                events: self.0.clone(),
            })
        }
    }

    impl StepProgress for View {
        fn message(&self, text: &str) {
            let event = format!("{}: {text}", self.what);
            self.events.lock().unwrap().push(event);
        }
    }

    impl Drop for View {
        fn drop(&mut self) {
            self.events
                .lock()
                .unwrap()
                .push(format!("end {}", self.what));
        }
    }

    #[test]
    fn a_step_reports_its_commands_output_lines_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let recorder = Recorder::default();
        let events = recorder.0.clone();
        let step = Step::start(Some(&recorder), "demo");
        step.say("warming up");
        step.run(
            Command::new("sh").args(["-c", "echo one; echo two >&2"]),
            &log,
        )
        .unwrap();
        step.done("built");
        let events = events.lock().unwrap().clone();
        assert_eq!(events[..2], ["start demo", "demo: warming up"]);
        assert!(events[2].starts_with("demo: \"sh\""), "{events:?}");
        let mut output = events[3..5].to_vec();
        output.sort();
        assert_eq!(output, ["demo: one", "demo: two"]);
        assert_eq!(events[5..], ["end demo"]);
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(
            logged.contains("one\n") && logged.contains("two\n"),
            "{logged}"
        );
    }

    #[test]
    fn a_failed_command_quotes_its_output_and_ends_the_view() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let recorder = Recorder::default();
        let events = recorder.0.clone();
        let step = Step::start(Some(&recorder), "doomed");
        let err = step
            .run(Command::new("sh").args(["-c", "echo why; exit 3"]), &log)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("exit status: 3") && err.ends_with("why"),
            "{err}"
        );
        drop(step);
        assert_eq!(events.lock().unwrap().last().unwrap(), "end doomed");
    }

    #[test]
    fn a_step_without_progress_still_runs_and_logs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let step = Step::start(None, "quiet");
        step.run(Command::new("echo").arg("hi"), &log).unwrap();
        assert!(std::fs::read_to_string(&log).unwrap().ends_with("hi\n"));
    }
}
