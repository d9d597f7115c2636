//! Who a function is in AWS (issue 10, "Credentials and identity"), through `kindling
//! serve` and the sandbox: the host's credentials (its environment's, or a profile's of
//! `~/.aws`) reach the functions that get them, which sign a request that botocore on the
//! host verifies; the region and account the server is given are the functions'; and the
//! secret never appears in anything the server writes or serves.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use crate::support::{json, prerequisites, repo_path, FunctionDef, Scratch, Server};

const KEY_ID: &str = "AKIDKINDLINGTEST0001";
const SECRET: &str = "kindlingTESTsecret/9a8b7c6d5e4f3a2b1c0dXY";
const TOKEN: &str = "kindlingTESTtoken+FwoGZXIvYXdzEBcaDH7";
/// A timestamp for the signature, any will do.
const AMZ_DATE: &str = "20260102T030405Z";

fn signer(name: &str, handler: &str) -> FunctionDef {
    FunctionDef::new(
        name,
        repo_path("tests/functions/signer"),
        "python",
        &format!("app.{handler}"),
    )
}

/// The `Authorization` header botocore's SigV4 signer gives the request `app.sign`
/// signs, with `key`, `secret` and `token`, in `region`, at [`AMZ_DATE`].
fn botocore_authorization(key: &str, secret: &str, token: Option<&str>, region: &str) -> String {
    let script = r#"
import json, sys
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
key, secret, token, region, amz_date = json.loads(sys.argv[1])
request = AWSRequest(method="GET",
                     url="https://sts.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15")
auth = SigV4Auth(Credentials(key, secret, token), "sts", region)
# add_auth's own steps, at a given time instead of now.
request.context["timestamp"] = amz_date
auth._modify_request_before_signing(request)
signature = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
auth._inject_signature_to_request(request, signature)
print(request.headers["Authorization"])
"#;
    let args = json!([key, secret, token, region, AMZ_DATE]).to_string();
    let out = Command::new("/usr/bin/python3")
        .args(["-c", script, &args])
        .output()
        .expect("cannot run /usr/bin/python3");
    assert!(
        out.status.success(),
        "botocore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Why botocore cannot check signatures here, if it cannot.
fn no_botocore() -> Option<String> {
    let ok = Command::new("/usr/bin/python3")
        .args(["-c", "import botocore.auth"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| "botocore is not installed (python3-boto3)".to_string())
}

/// Every file under `dir` whose bytes hold `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    walkdir(dir)
        .into_iter()
        .filter(|path| {
            std::fs::read(path)
                .is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
        })
        .map(|p| p.display().to_string())
        .collect()
}

fn walkdir(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => out.extend(walkdir(&path)),
            Ok(t) if t.is_file() => out.push(path),
            _ => {}
        }
    }
    out
}

/// `curl -s URL`'s body.
fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-sS", url])
        .output()
        .expect("cannot run curl");
    assert!(out.status.success(), "curl {url}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn host_credentials_sign_requests_and_never_reach_a_log() {
    let Some(bins) = prerequisites(&["/usr/bin/python3", "/usr/bin/curl"]) else {
        return;
    };
    if let Some(reason) = no_botocore() {
        println!("SKIPPED: {reason}");
        return;
    }
    let mut bare = signer("bare", "report");
    bare.credentials = Some("none");
    bare.env = vec![("AWS_ACCESS_KEY_ID".into(), "its-own".into())];
    let server = Server::start_with(
        bins,
        &[signer("signs", "sign"), signer("reports", "report"), bare],
        &["--credentials", "host", "--account-id", "123456789012"],
        &[
            ("AWS_ACCESS_KEY_ID", KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_SESSION_TOKEN", TOKEN),
            ("AWS_REGION", "eu-west-3"),
            ("AWS_PROFILE", "unused"),
            // Everything the server logs, at its most talkative.
            ("KINDLING_LOG", "debug"),
        ],
    );
    assert!(
        server
            .diagnostics()
            .contains("AWS credentials for functions: from the environment"),
        "{}",
        server.diagnostics()
    );
    let answer = server.invoke("signs", &json!({"amz_date": AMZ_DATE})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    let signed = json(&answer);
    assert_eq!(
        signed["authorization"],
        botocore_authorization(KEY_ID, SECRET, Some(TOKEN), "eu-west-3"),
        "the function's signature is not botocore's"
    );
    assert_eq!(signed["region"], "eu-west-3");
    assert_eq!(
        signed["arn"],
        "arn:aws:lambda:eu-west-3:123456789012:function:signs"
    );
    // The server-wide setting reaches a function that does not say; `none` overrides it.
    let answer = server.invoke("reports", &json!({})).await;
    assert_eq!(
        json(&answer),
        json!({"AWS_ACCESS_KEY_ID": true, "AWS_SECRET_ACCESS_KEY": true,
               "AWS_SESSION_TOKEN": true, "key": KEY_ID})
    );
    let answer = server
        .invoke(
            "arn:aws:lambda:eu-west-3:123456789012:function:bare",
            &json!({}),
        )
        .await;
    assert_eq!(
        json(&answer),
        json!({"AWS_ACCESS_KEY_ID": true, "AWS_SECRET_ACCESS_KEY": false,
               "AWS_SESSION_TOKEN": false, "key": "its-own"}),
        "{}",
        server.diagnostics()
    );
    // A function that fails shows its error, not its environment.
    let answer = server.invoke("signs", &json!({})).await;
    assert_eq!(answer.function_error.as_deref(), Some("Unhandled"));

    // Nowhere the server writes or answers: its output, its state dir (logs, consoles,
    // database), `kindling logs`, /metrics, the control plane's GetFunction.
    let base = format!("http://{}", server.addr);
    let served = [
        curl(&format!("{base}/metrics")),
        curl(&format!("{base}/2015-03-31/functions/signs")),
        curl(&format!("{base}/2015-03-31/functions/signs/configuration")),
        curl(&format!("{base}/2015-03-31/functions/")),
    ];
    let mut printed = vec![server.diagnostics(), server.stdout()];
    for args in [&["logs", "signs"][..], &["logs", "signs", "--console"]] {
        let out = server.cli(args);
        printed.push(String::from_utf8_lossy(&out.stdout).into_owned());
        printed.push(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    assert!(
        served[1].contains("\"FunctionName\":\"signs\""),
        "{}",
        served[1]
    );
    assert!(
        printed[0].contains("DEBUG"),
        "the server logged at debug level"
    );
    for secret in [SECRET, TOKEN] {
        for text in served.iter().chain(&printed) {
            assert!(!text.contains(secret), "{secret} in:\n{text}");
        }
        assert_eq!(
            files_holding(&server.state_dir, secret),
            Vec::<String>::new(),
            "{secret}"
        );
    }
    server.stop();
}

#[tokio::test]
async fn a_profile_gives_credentials_and_region_and_none_stops_the_server() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    if let Some(reason) = no_botocore() {
        println!("SKIPPED: {reason}");
        return;
    }
    let home = Scratch::new();
    std::fs::create_dir(home.path().join(".aws")).unwrap();
    std::fs::write(
        home.path().join(".aws/credentials"),
        format!("[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = nope\n\n[dev]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n"),
    )
    .unwrap();
    std::fs::write(
        home.path().join(".aws/config"),
        "[profile dev]\nregion = ap-southeast-2\n",
    )
    .unwrap();
    // The files are named by the SDKs' variables: a changed HOME would move the image
    // cache too.
    let credentials_file = home.path().join(".aws/credentials");
    let config_file = home.path().join(".aws/config");
    let mut signs = signer("signs", "sign");
    signs.credentials = Some("host");
    // The environment's keys are not the named profile's, and are not used.
    let server = Server::start_with(
        bins,
        &[signs, signer("reports", "report")],
        &["--profile", "dev"],
        &[
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                credentials_file.to_str().unwrap(),
            ),
            ("AWS_CONFIG_FILE", config_file.to_str().unwrap()),
            ("AWS_ACCESS_KEY_ID", "AKIDFROMENV"),
            ("AWS_SECRET_ACCESS_KEY", "fromenv"),
            ("AWS_REGION", ""),
            ("AWS_DEFAULT_REGION", ""),
        ],
    );
    let answer = server.invoke("signs", &json!({"amz_date": AMZ_DATE})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    let signed: Value = json(&answer);
    assert_eq!(
        signed["authorization"],
        botocore_authorization(KEY_ID, SECRET, None, "ap-southeast-2")
    );
    assert_eq!(
        signed["arn"],
        "arn:aws:lambda:ap-southeast-2:000000000000:function:signs"
    );
    // Only the function that asked gets them.
    let answer = server.invoke("reports", &json!({})).await;
    assert_eq!(json(&answer)["AWS_SECRET_ACCESS_KEY"], false);
    server.stop();

    // A function that gets the host's credentials, and none to be found: no start.
    let empty = Scratch::new();
    let mut signs = signer("signs", "sign");
    signs.credentials = Some("host");
    let mut serve = Server::serve(bins, &[signs], &empty);
    let out = serve
        .args(["--addr", "127.0.0.1:0", "--state-dir"])
        .arg(empty.path().join("state"))
        .env("AWS_SHARED_CREDENTIALS_FILE", empty.path().join("none"))
        .env("AWS_CONFIG_FILE", empty.path().join("none"))
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("credentials = \"host\" (signs): no AWS credentials found"),
        "{err}"
    );
}
