//! Reading a guest's console log: init's boot milestones and the tail shown on failure.

use std::path::Path;

/// `init: userspace at 0.412 s` — seconds from kernel start to init, as init prints it.
pub fn userspace_at(console: &str) -> Option<f64> {
    milestone(console, "init: userspace at ")
}

/// `init: bootstrap started at 0.530 s`.
pub fn bootstrap_started_at(console: &str) -> Option<f64> {
    milestone(console, "init: bootstrap started at ")
}

fn milestone(console: &str, prefix: &str) -> Option<f64> {
    console.lines().find_map(|line| {
        let rest = &line[line.find(prefix)? + prefix.len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The last `lines` lines of a console log, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milestones_are_found_among_kernel_lines() {
        let log = "[    0.000000] Linux version 6.1\r\ninit: userspace at 0.412 s\r\n\
                   init: mounted /proc\ninit: bootstrap started at 0.530 s\n";
        assert_eq!(userspace_at(log), Some(0.412));
        assert_eq!(bootstrap_started_at(log), Some(0.530));
        assert_eq!(userspace_at("init: userspace at soon"), None);
        assert_eq!(bootstrap_started_at(""), None);
    }
}
