//! End to end through the real `kindling` CLI and the namespace sandbox (issue 3,
//! "Tests"): every test starts its own `kindling serve` (or `run`) on a generated
//! functions.toml, with its own state dir and port, invokes over the real Invoke API,
//! and ends with SIGTERM and a check that nothing is left behind. The control-plane tests
//! (`control_plane.rs`) hand the server to boto3 and the AWS CLI instead
//! (`tests/control_plane/lambda_api.py`), which start, kill and restart it themselves.
//!
//! `adversarial.rs` is issue 9's suite: a hostile function and a hostile caller, with the
//! server's peak RSS and fds printed under each flood.
//!
//! Needs root and the static guest binaries (`scripts/build-guest.sh`); a test that
//! cannot run prints `SKIPPED: <reason>`. Each sandbox's root is its runtime's image
//! directory, as in a microVM (`kindling images build`; built on first use otherwise).
//! The first test to run builds `kindling-sandbox-exec` and the `lambda_runtime`-crate
//! runtime with cargo, into the target dir of the `kindling` under test.

mod adversarial;
#[path = "../common/attacks.rs"]
mod attacks;
mod control_plane;
mod extensions;
mod failures;
#[path = "../common/gauge.rs"]
mod gauge;
mod http_triggers;
mod identity;
#[path = "../common/internet.rs"]
mod internet;
mod invoke_api;
mod layers;
mod lifecycle;
mod network;
mod node_ric;
mod python_ric;
mod runtime_traits;
mod runtimes;
mod streaming;
mod support;
#[path = "../common/unprivileged.rs"]
mod unprivileged;
