//! `functions.toml`: the functions a server runs.
//!
//! ```toml
//! [functions.hello]
//! code = "examples/hello-python"   # directory (or .zip), relative to this file
//! runtime = "python"
//! handler = "app.handler"
//! memory = 128                     # MB, 128..10240
//! timeout = 3                      # seconds, 1..900
//! isolation = "microvm"            # (default) or "sandbox"
//! max_concurrency = 10
//! hypervisor = "kindling"          # microvm only: "kindling" | "qemu"
//! snapstart = true                 # microvm only: restore a snapshot instead of booting
//! network = "outbound"             # outbound IPv4 and DNS (the default), or "none"
//! layers = ["layers/tools", "layers/deps.zip"]   # unpacked in order into /opt (at most 5)
//! credentials = "host"             # the server's AWS credentials (default: the server's choice)
//! url = true                       # a function URL: served over HTTP (see function_url.rs)
//! url_port = 9101                  # its port (default: a free one, printed at start)
//! url_payload = "1.0"              # API Gateway REST proxy events (default "2.0": function URLs')
//! # Event invocations, as PutFunctionEventInvokeConfig sets them:
//! maximum_retry_attempts = 2       # 0..2
//! maximum_event_age = 21600        # seconds, 60..21600
//! on_failure = "arn:aws:sqs:us-east-1:000000000000:failed"   # or a function's ARN
//! on_success = "arn:aws:lambda:us-east-1:000000000000:function:next"
//! [functions.hello.env]
//! GREETING = "hi"
//! ```
//!
//! Every mistake is reported with the file, the line and the key, because a server that
//! starts with a silently ignored key runs something other than what its author wrote.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::environment::{Credentials, Function, Isolation, Network};
use crate::function_url::UrlConfig;
use crate::store::EventInvokeConfig;
use crate::vocabulary::{closed_vocabulary, not_one_of};

/// Memory a function may ask for, in MB (Lambda's range).
pub const MEMORY_MB: RangeInclusive<u32> = 128..=10240;
/// Timeout a function may ask for, in seconds (Lambda's range).
pub const TIMEOUT_S: RangeInclusive<u32> = 1..=900;
/// Environments per function when the file does not say.
pub const DEFAULT_MAX_CONCURRENCY: usize = 10;
/// Layers a function may have (Lambda's limit).
pub const MAX_LAYERS: usize = 5;

closed_vocabulary! {
    /// Which hypervisor runs a `microvm` function.
    pub enum Hypervisor {
        /// Kindling's own VMM (`host_vmm`).
        Kindling = "kindling",
        /// `qemu-system-x86_64 -M microvm`.
        Qemu = "qemu",
    }
}

/// One `[functions.NAME]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionConfig {
    pub function: Function,
    /// Only meaningful with [`Isolation::MicroVm`]; `None` lets the server choose.
    pub hypervisor: Option<Hypervisor>,
    /// How its `Event` invocations are retried and where their outcomes go; `None` when
    /// the table sets none of those keys (Lambda's defaults).
    pub event_invoke: Option<EventInvokeConfig>,
    /// `url = true`: the function's URL (port 0: a free one); `None`: no URL.
    pub url: Option<UrlConfig>,
}

/// A mistake in a functions file, located as precisely as the file allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; `None` when the whole file is at fault (unreadable).
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    functions: BTreeMap<String, Spanned<RawFunction>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    code: Spanned<String>,
    runtime: Spanned<String>,
    handler: Spanned<String>,
    memory: Option<Spanned<i64>>,
    timeout: Option<Spanned<i64>>,
    isolation: Option<Spanned<String>>,
    max_concurrency: Option<Spanned<i64>>,
    hypervisor: Option<Spanned<String>>,
    snapstart: Option<Spanned<bool>>,
    network: Option<Spanned<String>>,
    layers: Option<Spanned<Vec<String>>>,
    credentials: Option<Spanned<String>>,
    url: Option<Spanned<bool>>,
    url_port: Option<Spanned<i64>>,
    url_payload: Option<Spanned<String>>,
    maximum_retry_attempts: Option<Spanned<i64>>,
    maximum_event_age: Option<Spanned<i64>>,
    on_success: Option<Spanned<String>>,
    on_failure: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// Reads and checks a functions file.
pub fn load(path: &Path, runtimes: &[&str]) -> Result<Vec<FunctionConfig>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        message: format!("cannot read: {e}"),
    })?;
    parse(&text, path, runtimes)
}

/// Parses the text of a functions file; `path` names it in errors and anchors `code`;
/// `runtimes` are the runtime names this host has images for.
pub fn parse(
    text: &str,
    path: &Path,
    runtimes: &[&str],
) -> Result<Vec<FunctionConfig>, ConfigError> {
    let at = Locator { text, path };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start));
        // A value of the wrong type is reported at the value: name its key too.
        let key = line
            .and_then(|n| text.lines().nth(n - 1))
            .and_then(|l| l.split_once('='))
            .map(|(k, _)| format!("{}: ", k.trim()))
            .unwrap_or_default();
        ConfigError {
            file: path.to_path_buf(),
            line,
            message: format!("{key}{}", e.message().trim()),
        }
    })?;
    if raw.functions.is_empty() {
        return Err(ConfigError {
            file: path.to_path_buf(),
            line: None,
            message: "no [functions.NAME] table: nothing to serve".into(),
        });
    }
    raw.functions
        .into_iter()
        .map(|(name, table)| function_config(name, table, runtimes, &at))
        .collect()
}

/// Turns a byte offset in the file and a message into an error naming file and line.
struct Locator<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Locator<'_> {
    fn error(&self, offset: usize, message: String) -> ConfigError {
        ConfigError {
            file: self.path.to_path_buf(),
            line: Some(line_of(self.text, offset)),
            message,
        }
    }
}

/// One `[functions.NAME]` table, checked.
fn function_config(
    name: String,
    table: Spanned<RawFunction>,
    runtimes: &[&str],
    at: &Locator,
) -> Result<FunctionConfig, ConfigError> {
    let table_at = table.span().start;
    let f = table.into_inner();
    let key = |k: &str| format!("functions.{name}.{k}");
    if !valid_name(&name) {
        return Err(at.error(
            table_at,
            format!("functions.{name}: a function name is 1-64 of [A-Za-z0-9_-]"),
        ));
    }
    let base = at.path.parent().unwrap_or(Path::new("."));
    let code = base.join(f.code.get_ref());
    check_code(&code)
        .map_err(|m| at.error(f.code.span().start, format!("{}: {m}", key("code"))))?;
    for (k, v) in [("runtime", &f.runtime), ("handler", &f.handler)] {
        if v.get_ref().trim().is_empty() {
            return Err(at.error(v.span().start, format!("{}: must not be empty", key(k))));
        }
    }
    if !runtimes.contains(&f.runtime.get_ref().as_str()) {
        let message = not_one_of(f.runtime.get_ref(), runtimes.iter().copied());
        return Err(at.error(
            f.runtime.span().start,
            format!("{}: {message}", key("runtime")),
        ));
    }
    let memory = in_range(&f.memory, MEMORY_MB, 128).map_err(range_error(at, key("memory")))?;
    let timeout = in_range(&f.timeout, TIMEOUT_S, 3).map_err(range_error(at, key("timeout")))?;
    let max_concurrency = in_range(&f.max_concurrency, 1..=1000, DEFAULT_MAX_CONCURRENCY)
        .map_err(range_error(at, key("max_concurrency")))?;
    // Like Lambda: every function gets a microVM unless it asks otherwise.
    let isolation =
        named(f.isolation.as_ref(), &key("isolation"), at)?.unwrap_or(Isolation::MicroVm);
    let hypervisor = named(f.hypervisor.as_ref(), &key("hypervisor"), at)?;
    let snapstart = f.snapstart.as_ref().is_some_and(|s| *s.get_ref());
    if snapstart && isolation == Isolation::Sandbox {
        // Refused rather than ignored: a user who asked for SnapStart expects its cold
        // starts, and the sandbox (the host's own kernel) has no VM to snapshot.
        let at_key = f.snapstart.as_ref().map_or(table_at, |s| s.span().start);
        return Err(at.error(
            at_key,
            format!(
                "{}: SnapStart snapshots a microVM; isolation = \"sandbox\" has none \
                 (use isolation = \"microvm\", or drop snapstart)",
                key("snapstart")
            ),
        ));
    }
    let network = named(f.network.as_ref(), &key("network"), at)?.unwrap_or(Network::Outbound);
    let layers = layers(f.layers.as_ref(), base, &key("layers"), at)?;
    let credentials: Option<Credentials> = named(f.credentials.as_ref(), &key("credentials"), at)?;
    let event_invoke = event_invoke(&f, &key, at)?;
    let url_port =
        in_range(&f.url_port, 1..=u16::MAX, 0).map_err(range_error(at, key("url_port")))?;
    let payload = named(f.url_payload.as_ref(), &key("url_payload"), at)?;
    let url = match (f.url.as_ref().is_some_and(|u| *u.get_ref()), &f.url_port) {
        (true, _) => Some(UrlConfig {
            port: url_port,
            payload: payload.unwrap_or_default(),
        }),
        (false, None) if payload.is_none() => None,
        (false, _) => {
            let (name, offset) = match (&f.url_port, &f.url_payload) {
                (Some(port), _) => ("url_port", port.span().start),
                (None, payload) => (
                    "url_payload",
                    payload.as_ref().map_or(0, |p| p.span().start),
                ),
            };
            return Err(at.error(
                offset,
                format!(
                    "{}: a setting of a function URL, but url = true is not set",
                    key(name)
                ),
            ));
        }
    };
    Ok(FunctionConfig {
        function: Function {
            name,
            code,
            runtime: f.runtime.into_inner(),
            handler: f.handler.into_inner(),
            memory_mb: memory,
            timeout: Duration::from_secs(u64::from(timeout)),
            isolation,
            max_concurrency,
            env: f.env,
            snapstart,
            network,
            layers,
            credentials,
        },
        hypervisor,
        event_invoke,
        url,
    })
}

/// The `layers` key: at most [`MAX_LAYERS`] folders or `.zip`s, relative to the file.
fn layers(
    value: Option<&Spanned<Vec<String>>>,
    base: &Path,
    key: &str,
    at: &Locator,
) -> Result<Vec<PathBuf>, ConfigError> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let error = |message: String| at.error(value.span().start, format!("{key}: {message}"));
    if value.get_ref().len() > MAX_LAYERS {
        return Err(error(format!(
            "{} layers; a function has at most {MAX_LAYERS}, as in Lambda",
            value.get_ref().len()
        )));
    }
    value
        .get_ref()
        .iter()
        .map(|layer| {
            let path = base.join(layer);
            check_code(&path).map(|()| path).map_err(&error)
        })
        .collect()
}

/// The table's event-invoke keys, checked as `PutFunctionEventInvokeConfig` checks them.
fn event_invoke(
    f: &RawFunction,
    key: &dyn Fn(&str) -> String,
    at: &Locator,
) -> Result<Option<EventInvokeConfig>, ConfigError> {
    if f.maximum_retry_attempts.is_none()
        && f.maximum_event_age.is_none()
        && f.on_success.is_none()
        && f.on_failure.is_none()
    {
        return Ok(None);
    }
    let defaults = EventInvokeConfig::default();
    let destination = |v: &Option<Spanned<String>>, k: &str| {
        v.as_ref()
            .map(|d| {
                crate::events::check_destination(d.get_ref())
                    .map(|()| d.get_ref().clone())
                    .map_err(|e| at.error(d.span().start, format!("{}: {e}", key(k))))
            })
            .transpose()
    };
    Ok(Some(EventInvokeConfig {
        maximum_retry_attempts: in_range(
            &f.maximum_retry_attempts,
            0..=2,
            defaults.maximum_retry_attempts,
        )
        .map_err(range_error(at, key("maximum_retry_attempts")))?,
        maximum_event_age_s: in_range(
            &f.maximum_event_age,
            60..=21_600,
            defaults.maximum_event_age_s,
        )
        .map_err(range_error(at, key("maximum_event_age")))?,
        on_success: destination(&f.on_success, "on_success")?,
        on_failure: destination(&f.on_failure, "on_failure")?,
        last_modified: String::new(),
    }))
}

/// An optional key of a closed vocabulary; `None` when absent.
fn named<T: std::str::FromStr<Err = String>>(
    value: Option<&Spanned<String>>,
    key: &str,
    at: &Locator,
) -> Result<Option<T>, ConfigError> {
    value
        .map(|v| {
            v.get_ref()
                .parse()
                .map_err(|e| at.error(v.span().start, format!("{key}: {e}")))
        })
        .transpose()
}

/// Names the key of a value [`in_range`] refused, with its range.
fn range_error<'a>(
    at: &'a Locator<'a>,
    key: String,
) -> impl Fn((usize, String)) -> ConfigError + 'a {
    move |(offset, range)| at.error(offset, format!("{key}: {range}"))
}

/// The value of an optional integer key, `default` when it is absent. A value outside `range`
/// (or outside `T`) is refused with where it is and `"{value} is out of range {start}..{end}"`.
fn in_range<T>(
    v: &Option<Spanned<i64>>,
    range: RangeInclusive<T>,
    default: T,
) -> Result<T, (usize, String)>
where
    T: Copy + PartialOrd + TryFrom<i64> + fmt::Display,
{
    let Some(s) = v else {
        return Ok(default);
    };
    match T::try_from(*s.get_ref()) {
        Ok(value) if range.contains(&value) => Ok(value),
        _ => Err((
            s.span().start,
            format!(
                "{} is out of range {}..{}",
                s.get_ref(),
                range.start(),
                range.end()
            ),
        )),
    }
}

/// Names travel in URLs, log file names and socket paths: keep them plain.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A directory, or a Lambda-style `.zip` (unpacked and checked by the image cache).
fn check_code(code: &Path) -> Result<(), String> {
    if code
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
    {
        if !code.is_file() {
            return Err(format!("{}: no such file", code.display()));
        }
        return Ok(());
    }
    if !code.is_dir() {
        return Err(format!("{}: no such directory", code.display()));
    }
    Ok(())
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::function_url::PayloadFormat;

    fn parse_in(dir: &Path, text: &str) -> Result<Vec<FunctionConfig>, ConfigError> {
        parse(text, &dir.join("functions.toml"), &["provided", "python"])
    }

    fn with_code() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("hello")).unwrap();
        dir
    }

    #[test]
    fn reads_the_example_from_the_issue() {
        let dir = with_code();
        let fs = parse_in(
            dir.path(),
            r#"
[functions.hello]
code = "hello"
runtime = "python"
handler = "app.handler"
memory = 256
timeout = 5
isolation = "microvm"
max_concurrency = 4
hypervisor = "qemu"
[functions.hello.env]
GREETING = "hi"
"#,
        )
        .unwrap();
        assert_eq!(fs.len(), 1);
        let f = &fs[0].function;
        assert_eq!(f.name, "hello");
        assert_eq!(f.code, dir.path().join("hello"));
        assert_eq!(
            (f.memory_mb, f.timeout, f.max_concurrency),
            (256, Duration::from_secs(5), 4)
        );
        assert_eq!(f.isolation, Isolation::MicroVm);
        assert_eq!(f.env.get("GREETING").map(String::as_str), Some("hi"));
        assert_eq!(fs[0].hypervisor, Some(Hypervisor::Qemu));
        assert_eq!(fs[0].event_invoke, None);
        assert!(!f.snapstart);
    }

    #[test]
    fn network_is_outbound_unless_none() {
        let dir = with_code();
        let head = "[functions.a]\ncode = 'hello'\nruntime = 'python'\nhandler = 'h'\n";
        let network = |extra: &str| {
            parse_in(dir.path(), &format!("{head}{extra}")).map(|fs| fs[0].function.network)
        };
        assert_eq!(network("").unwrap(), Network::Outbound);
        assert_eq!(
            network("network = 'outbound'\n").unwrap(),
            Network::Outbound
        );
        assert_eq!(network("network = 'none'\n").unwrap(), Network::None);
        let err = network("network = 'inbound'\n").unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.to_string().contains("functions.a.network"), "{err}");
    }

    #[test]
    fn function_urls_take_a_port_or_a_free_one() {
        let dir = with_code();
        let head = "[functions.a]\ncode = 'hello'\nruntime = 'python'\nhandler = 'a.b'\n";
        let url = |extra: &str| parse_in(dir.path(), &format!("{head}{extra}")).map(|f| f[0].url);
        let at = |port, payload| Ok(Some(UrlConfig { port, payload }));
        assert_eq!(url(""), Ok(None));
        assert_eq!(url("url = true\n"), at(0, PayloadFormat::V2));
        assert_eq!(
            url("url = true\nurl_port = 9101\n"),
            at(9101, PayloadFormat::V2)
        );
        assert_eq!(
            url("url = true\nurl_payload = '1.0'\n"),
            at(0, PayloadFormat::V1)
        );
        assert_eq!(url("url = false\n"), Ok(None));
        let e = url("url_port = 9101\n").unwrap_err();
        assert!(e.message.contains("url = true is not set"), "{e}");
        let e = url("url_payload = '1.0'\n").unwrap_err();
        assert!(
            e.message
                .contains("functions.a.url_payload: a setting of a function URL"),
            "{e}"
        );
        let e = url("url = true\nurl_payload = '3.0'\n").unwrap_err();
        assert!(e.message.contains("not a payload format"), "{e}");
        let e = url("url = true\nurl_port = 70000\n").unwrap_err();
        assert!(e.message.contains("functions.a.url_port"), "{e}");
    }

    #[test]
    fn snapstart_is_for_microvms_only() {
        let dir = with_code();
        let head = "[functions.a]\ncode = 'hello'\nruntime = 'python'\nhandler = 'h'\n";
        let fs = parse_in(dir.path(), &format!("{head}snapstart = true\n")).unwrap();
        assert!(fs[0].function.snapstart);
        let err = parse_in(
            dir.path(),
            &format!("{head}isolation = 'sandbox'\nsnapstart = true\n"),
        )
        .unwrap_err();
        assert_eq!(err.line, Some(6), "{err}");
        assert!(
            err.to_string()
                .contains("functions.a.snapstart: SnapStart snapshots a microVM"),
            "{err}"
        );
        let fs = parse_in(
            dir.path(),
            &format!("{head}isolation = 'sandbox'\nsnapstart = false\n"),
        )
        .unwrap();
        assert!(!fs[0].function.snapstart);
    }

    #[test]
    fn layers_and_credentials_are_read_and_checked() {
        let dir = with_code();
        std::fs::create_dir(dir.path().join("tools")).unwrap();
        std::fs::write(dir.path().join("deps.zip"), b"").unwrap();
        let head = "[functions.a]\ncode = 'hello'\nruntime = 'python'\nhandler = 'h'\n";
        let fs = parse_in(
            dir.path(),
            &format!("{head}layers = ['tools', 'deps.zip']\ncredentials = 'host'\n"),
        )
        .unwrap();
        let f = &fs[0].function;
        assert_eq!(
            f.layers,
            [dir.path().join("tools"), dir.path().join("deps.zip")]
        );
        assert_eq!(f.credentials, Some(Credentials::Host));
        let fs = parse_in(dir.path(), head).unwrap();
        assert_eq!(fs[0].function.layers, Vec::<PathBuf>::new());
        assert_eq!(fs[0].function.credentials, None);
        let six = format!("layers = [{}]\n", ["'tools'"; 6].join(", "));
        for (line, want) in [
            ("layers = ['nope']\n", "functions.a.layers: "),
            ("layers = ['nope']\n", "nope: no such directory"),
            (
                six.as_str(),
                "functions.a.layers: 6 layers; a function has at most 5",
            ),
            (
                "credentials = 'env'\n",
                r#"functions.a.credentials: "env" is not one of "host", "none""#,
            ),
        ] {
            let err = parse_in(dir.path(), &format!("{head}{line}")).unwrap_err();
            assert_eq!(err.line, Some(5), "{line}: {err}");
            assert!(err.to_string().contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn event_invoke_keys_are_read_and_checked() {
        let dir = with_code();
        let head = "[functions.a]\ncode = 'hello'\nruntime = 'python'\nhandler = 'h'\n";
        let fs = parse_in(
            dir.path(),
            &format!("{head}maximum_retry_attempts = 0\non_failure = 'arn:aws:sqs:us-east-1:000000000000:dlq'\n"),
        )
        .unwrap();
        let config = fs[0].event_invoke.clone().unwrap();
        assert_eq!(config.maximum_retry_attempts, 0);
        assert_eq!(config.maximum_event_age_s, 21_600);
        assert_eq!(
            config.on_failure.as_deref(),
            Some("arn:aws:sqs:us-east-1:000000000000:dlq")
        );
        assert_eq!(config.on_success, None);
        for (line, want) in [
            (
                "maximum_retry_attempts = 3\n",
                "functions.a.maximum_retry_attempts: 3 is out of range 0..2",
            ),
            (
                "maximum_event_age = 59\n",
                "functions.a.maximum_event_age: 59 is out of range 60..21600",
            ),
            (
                "on_success = 'dlq'\n",
                "functions.a.on_success: dlq is not a destination",
            ),
        ] {
            let err = parse_in(dir.path(), &format!("{head}{line}")).unwrap_err();
            assert_eq!(err.line, Some(5), "{line}: {err}");
            assert!(err.to_string().contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn defaults_apply() {
        let dir = with_code();
        let fs = parse_in(
            dir.path(),
            "[functions.a]\ncode='hello'\nruntime='provided'\nhandler='x'\n",
        )
        .unwrap();
        let f = &fs[0].function;
        assert_eq!(
            (f.memory_mb, f.timeout.as_secs(), f.max_concurrency),
            (128, 3, 10)
        );
        assert_eq!(f.isolation, Isolation::MicroVm);
    }

    #[test]
    fn mistakes_name_file_line_and_key() {
        let dir = with_code();
        let head = "[functions.a]\ncode = 'hello'\nruntime = 'python'\nhandler = 'h'\n";
        let cases = [
            (
                "memory = 64\n",
                "functions.a.memory: 64 is out of range 128..10240",
            ),
            ("memory = 10241\n", "functions.a.memory"),
            (
                "timeout = 0\n",
                "functions.a.timeout: 0 is out of range 1..900",
            ),
            ("timeout = 901\n", "functions.a.timeout"),
            ("max_concurrency = 0\n", "functions.a.max_concurrency"),
            ("isolation = 'docker'\n", "functions.a.isolation"),
            ("hypervisor = 'xen'\n", "functions.a.hypervisor"),
            ("memroy = 128\n", "memroy"),
        ];
        for (line, want) in cases {
            let err = parse_in(dir.path(), &format!("{head}{line}")).unwrap_err();
            assert_eq!(err.line, Some(5), "{line}: {err}");
            let text = err.to_string();
            assert!(text.contains("functions.toml:5: "), "{text}");
            assert!(text.contains(want), "{line}: {text}");
        }
    }

    #[test]
    fn an_unknown_runtime_is_named_with_its_line() {
        let dir = with_code();
        let err = parse_in(
            dir.path(),
            "[functions.a]\ncode = 'hello'\nhandler = 'h'\nruntime = 'pythno'\n",
        )
        .unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        assert!(
            err.to_string()
                .contains(r#"functions.a.runtime: "pythno" is not one of "provided", "python""#),
            "{err}"
        );
    }

    #[test]
    fn bad_code_and_missing_keys_are_rejected() {
        let dir = with_code();
        let err = parse_in(
            dir.path(),
            "[functions.a]\ncode = 'nope'\nruntime = 'python'\nhandler = 'h'\n",
        )
        .unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.to_string().contains("no such directory"), "{err}");
        let err = parse_in(
            dir.path(),
            "[functions.a]\ncode = 'f.zip'\nruntime = 'python'\nhandler = 'h'\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
        let err = parse_in(
            dir.path(),
            "[functions.a]\ncode = 'hello'\nruntime = 'python'\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("handler"), "{err}");
        let err = parse_in(dir.path(), "[other]\n").unwrap_err();
        assert!(err.to_string().contains("other"), "{err}");
        let err = parse_in(dir.path(), "").unwrap_err();
        assert!(err.to_string().contains("nothing to serve"), "{err}");
        let err = parse_in(
            dir.path(),
            "[functions.a]\ncode = 'hello'\nruntime = 'python'\nhandler = 'h'\nmax_concurrency = \"four\"\n",
        )
        .unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");
        assert!(
            err.to_string().contains("max_concurrency: invalid type"),
            "{err}"
        );
        let err = parse_in(dir.path(), "[functions.a]\ncode = \n").unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
    }
}
