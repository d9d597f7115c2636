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
    let payload = match (&args.payload, &args.payload_file) {
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
    };
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
