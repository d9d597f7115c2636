//! The cold-start breakdown, read the way a user reads it: from the `REPORT` line of the
//! environment's first invocation (`Init Duration` and the environment's start phases,
//! see `kindling_runtime_api::logs::report_line`).

use std::time::Duration;

use anyhow::{bail, Context as _};
use kindling_runtime_api::logs::LogLine;
use tokio::sync::broadcast::{self, error::RecvError};

/// Fields every `REPORT` line carries; the others are the cold-start breakdown.
const PER_INVOCATION: [&str; 4] = [
    "Duration",
    "Billed Duration",
    "Memory Size",
    "Max Memory Used",
];

/// The named millisecond fields of a `REPORT` line beyond the per-invocation ones
/// (`Init Duration`, `Hypervisor Start`, `Guest Boot`, ...), in the line's order. The
/// `REPORT` of a failed invocation (`Status: timeout`, `Status: error`) is an error that
/// says how it failed.
pub fn breakdown(line: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let Some(rest) = line.strip_prefix("REPORT RequestId: ") else {
        bail!("not a REPORT line: {line:?}");
    };
    if let Some(at) = rest.find("\tStatus: ") {
        bail!(
            "the invocation failed ({})",
            rest[at + 1..].replace('\t', ", ")
        );
    }
    let mut phases = Vec::new();
    for field in rest.split('\t').skip(1) {
        let (name, value) = field
            .split_once(": ")
            .with_context(|| format!("REPORT field {field:?} has no value"))?;
        if PER_INVOCATION.contains(&name) {
            continue;
        }
        let ms = value
            .strip_suffix(" ms")
            .and_then(|v| v.parse::<f64>().ok())
            .with_context(|| format!("REPORT field {field:?} is not in milliseconds"))?;
        phases.push((name.to_string(), ms));
    }
    Ok(phases)
}

/// The `Duration` of a `REPORT` line (the invocation itself, event → result), in ms.
pub fn duration_ms(line: &str) -> Option<f64> {
    line.split('\t')
        .find_map(|field| field.strip_prefix("Duration: "))
        .and_then(|value| value.strip_suffix(" ms"))
        .and_then(|value| value.parse().ok())
}

/// Waits (up to `patience`) for `function`'s next `REPORT` line and returns its breakdown.
pub async fn next_breakdown(
    logs: &mut broadcast::Receiver<LogLine>,
    function: &str,
    patience: Duration,
) -> anyhow::Result<Vec<(String, f64)>> {
    breakdown(&next_report(logs, function, patience).await?)
}

/// Waits (up to `patience`) for `function`'s next `REPORT` line.
pub async fn next_report(
    logs: &mut broadcast::Receiver<LogLine>,
    function: &str,
    patience: Duration,
) -> anyhow::Result<String> {
    let wait = async {
        loop {
            match logs.recv().await {
                Ok(line) if line.function == function && line.text.starts_with("REPORT ") => {
                    return Ok(line.text);
                }
                Ok(_) | Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => bail!("the server stopped before logging a REPORT"),
            }
        }
    };
    tokio::time::timeout(patience, wait)
        .await
        .with_context(|| format!("no REPORT line for {function} within {patience:?}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breakdown_is_what_follows_the_per_invocation_fields() {
        let line = "REPORT RequestId: 5f1c\tDuration: 1.20 ms\tBilled Duration: 2 ms\t\
                    Memory Size: 128 MB\tMax Memory Used: 20 MB\tInit Duration: 45.67 ms\t\
                    Hypervisor Start: 3.10 ms\tGuest Boot: 729.00 ms";
        assert_eq!(
            breakdown(line).unwrap(),
            vec![
                ("Init Duration".to_string(), 45.67),
                ("Hypervisor Start".to_string(), 3.1),
                ("Guest Boot".to_string(), 729.0),
            ]
        );
        let warm = "REPORT RequestId: 5f1c\tDuration: 1.20 ms\tBilled Duration: 2 ms\t\
                    Memory Size: 128 MB\tMax Memory Used: 20 MB";
        assert!(breakdown(warm).unwrap().is_empty());
        assert_eq!(duration_ms(line), Some(1.2));
        assert_eq!(
            duration_ms("REPORT RequestId: 1\tBilled Duration: 2 ms"),
            None
        );
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(breakdown("START RequestId: 1 Version: $LATEST").is_err());
        assert!(breakdown("REPORT RequestId: 1\tGuest Boot: soon").is_err());
        let failed = "REPORT RequestId: 1\tDuration: 3000.00 ms\tInit Duration: 9.00 ms\t\
                      Status: error\tError Type: Runtime.ExitError";
        assert_eq!(
            breakdown(failed).unwrap_err().to_string(),
            "the invocation failed (Status: error, Error Type: Runtime.ExitError)"
        );
        assert!(breakdown("REPORT RequestId: 1\tGuest Boot").is_err());
    }
}
