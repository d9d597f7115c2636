//! `kindling invoke`: the caller's side, like `aws lambda invoke` against a local server.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use kindling_runtime_api::client::{self, InvocationType, InvokeOptions};

use crate::AddrArg;

#[derive(clap::Args)]
pub struct InvokeArgs {
    /// The function's name.
    function: String,
    /// The event, as JSON text.
    #[arg(long, conflicts_with = "payload_file")]
    payload: Option<String>,
    /// Read the event from a file (`-` for standard input).
    #[arg(long)]
    payload_file: Option<PathBuf>,
    /// RequestResponse (wait for the result), Event (queue it, answer 202) or DryRun.
    #[arg(long = "type", default_value = "RequestResponse")]
    invocation_type: InvocationType,
    /// Also print the last 4 KB of the invocation's log (X-Amz-Log-Type: Tail) to stderr.
    #[arg(long)]
    log: bool,
    #[command(flatten)]
    addr: AddrArg,
}

pub async fn invoke(args: InvokeArgs) -> anyhow::Result<ExitCode> {
    let payload = payload(&args)?;
    let options = InvokeOptions {
        invocation_type: args.invocation_type,
        log_tail: args.log,
        client_context: None,
    };
    let answer = client::invoke(args.addr.addr, &args.function, payload, &options).await?;
    if let Some(tail) = &answer.log_tail {
        eprint!("{tail}");
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&answer.body)?;
    if !answer.body.is_empty() && !answer.body.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    if let Some(kind) = &answer.function_error {
        eprintln!("kindling: the function failed ({kind})");
    }
    Ok(if answer.status.is_success() {
        ExitCode::SUCCESS
    } else {
        eprintln!("kindling: the server answered {}", answer.status);
        ExitCode::FAILURE
    })
}

/// The event: `--payload`'s text, `--payload-file`'s bytes (`-`: standard input), else `{}`
/// as `aws lambda invoke` sends.
fn payload(args: &InvokeArgs) -> anyhow::Result<Vec<u8>> {
    Ok(match (&args.payload, &args.payload_file) {
        (Some(text), _) => text.clone().into_bytes(),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
            buf
        }
        (None, Some(path)) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        (None, None) => b"{}".to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::error::ErrorKind;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<InvokeArgs, clap::Error> {
        let argv = ["kindling", "invoke"]
            .into_iter()
            .chain(args.iter().copied());
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Invoke(args) => args,
            _ => panic!("{args:?} parsed as another command"),
        })
    }

    #[test]
    fn the_payload_is_the_text_the_file_or_an_empty_object() {
        let args = parse(&["f", "--payload", r#"{"a":1}"#]).unwrap();
        assert_eq!(payload(&args).unwrap(), br#"{"a":1}"#);
        let args = parse(&["f"]).unwrap();
        assert_eq!(payload(&args).unwrap(), b"{}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("event.json");
        std::fs::write(&file, "[1, 2]").unwrap();
        let args = parse(&["f", "--payload-file", file.to_str().unwrap()]).unwrap();
        assert_eq!(payload(&args).unwrap(), b"[1, 2]");
        let missing = dir.path().join("missing.json");
        let args = parse(&["f", "--payload-file", missing.to_str().unwrap()]).unwrap();
        let err = payload(&args).unwrap_err().to_string();
        assert!(
            err.contains("cannot read") && err.contains("missing.json"),
            "{err}"
        );
    }

    #[test]
    fn payload_and_payload_file_exclude_each_other() {
        let err = parse(&["f", "--payload", "{}", "--payload-file", "e.json"]);
        assert_eq!(
            err.err().map(|e| e.kind()),
            Some(ErrorKind::ArgumentConflict)
        );
    }

    #[test]
    fn the_invocation_type_is_one_of_lambdas() {
        let args = parse(&["f"]).unwrap();
        assert_eq!(args.invocation_type, InvocationType::RequestResponse);
        let args = parse(&["f", "--type", "Event", "--log"]).unwrap();
        assert_eq!(args.invocation_type, InvocationType::Event);
        assert!(args.log);
        let err = parse(&["f", "--type", "event"])
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("'event'")),
            "{err:?}"
        );
        assert_eq!(
            parse(&[]).err().map(|e| e.kind()),
            Some(ErrorKind::MissingRequiredArgument)
        );
    }
}
