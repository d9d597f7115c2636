//! End to end through the real `kindling serve` CLI and the namespace sandbox (issue 3,
//! "Tests"): every test starts its own server on a generated functions.toml, invokes
//! over the real Invoke API, and ends with SIGTERM and a check that nothing is left.
//!
//! Needs root, the static guest binaries (`scripts/build-guest.sh`), and the host's
//! python3, node, bash and curl; a test that cannot run prints `SKIPPED: <reason>`.

mod failures;
mod invoke_api;
mod lifecycle;
mod runtimes;
mod support;
