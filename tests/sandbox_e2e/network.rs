//! Outbound networking in the sandbox (issue 10): a function fetches a page by name from
//! the test's own "internet" (a network namespace, tests/common/internet.rs) through its
//! veth, the host's NAT and the test's DNS server, and cannot reach the host's Invoke
//! API, another host port, another environment or 169.254.169.254, each of which the
//! test shows is there; a `network = "none"` function has only its loopback. A function
//! given the host's credentials signs a request with them and sends it by name to an API
//! of that internet, which verifies the signature. On a host
//! that cannot NAT (no `nft` on the server's PATH) the server says so at start with the
//! fix, `none` functions still answer and an outbound one fails with that reason.

use serde_json::json;

use crate::internet::{self, HostListener, Internet, DNS, METADATA, WEB};
use crate::support::{json, prerequisites, repo_path, FunctionDef, Server};

fn netprobe(name: &str) -> FunctionDef {
    let mut f = FunctionDef::new(
        name,
        repo_path("tests/vm-functions/netprobe"),
        "python",
        "app.handler",
    );
    f.timeout = 30;
    f.max_concurrency = 1;
    f
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_fetches_by_name_and_reaches_nothing_of_the_host() {
    let Some(bins) = prerequisites(&["/usr/sbin/nft", "/usr/bin/python3"]) else {
        return;
    };
    let internet = Internet::start().expect("the test's internet");
    let host = HostListener::start();
    let mut offline = netprobe("offline");
    offline.network = Some("none");
    let server = Server::start_on(
        bins,
        &[netprobe("net"), netprobe("peer"), offline],
        "0.0.0.0:0",
        &["--allow-remote", "--dns", DNS],
        &[],
    );
    let invoke_port = server.addr.port();

    // Another environment, serving on 8080 while the probe runs: the host reaches it.
    let peer = json(&server.invoke("peer", &json!({})).await)["address"]
        .as_str()
        .expect("the peer's address")
        .to_string();
    let probe = internet::probe_event(invoke_port, host.port, &peer);
    let serve = json!({"serve_seconds": 8});
    let (served, answer) = tokio::join!(server.invoke("peer", &serve), async {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let from_host = internet::host_reaches(&format!("{peer}:8080"));
        (from_host, server.invoke("net", &probe).await)
    });
    let (from_host, answer) = answer;
    assert_eq!(
        from_host.as_deref(),
        Some("peer\n"),
        "the host reaches the peer's listener"
    );
    assert_eq!(
        json(&served)["accepted"],
        1,
        "only the host's connection reached the peer"
    );
    assert!(
        internet::host_reaches(&format!("{METADATA}:80")).is_some(),
        "the metadata address is routed to a listener"
    );
    let answer = json(&answer);
    if let Err(e) = internet::check_outbound_only(&answer, invoke_port, host.port, &peer) {
        panic!("{e}\n{}", server.diagnostics());
    }
    assert_eq!(host.accepted(), 0, "the host port saw a connection");

    let offline = json(
        &server
            .invoke("offline", &json!({"reach": [format!("{WEB}:80")]}))
            .await,
    );
    assert_eq!(
        offline["reach"][format!("{WEB}:80")],
        "errno 101",
        "{offline}"
    );

    let gateway_of_net = answer["address"].as_str().map(str::to_string);
    server.stop();
    // Its veth went with it.
    let links = std::process::Command::new("ip")
        .args(["-o", "addr"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    let net = gateway_of_net.expect("the probe's address");
    let block: std::net::Ipv4Addr = net.parse().expect("an IPv4 address");
    let gateway = std::net::Ipv4Addr::from(u32::from(block) - 1);
    assert!(
        !links.contains(&format!(" {gateway}/")),
        "{gateway} is still on a host link:\n{links}"
    );
    drop(internet);
}

/// The "done when", in the sandbox: a function calls an HTTP API by DNS name with
/// the credentials kindling hands it (`credentials = "host"`), unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_calls_an_api_by_name_with_the_hosts_credentials() {
    let Some(bins) = prerequisites(&["/usr/sbin/nft", "/usr/bin/python3"]) else {
        return;
    };
    let internet = Internet::start().expect("the test's internet");
    let mut caller = FunctionDef::new(
        "caller",
        repo_path("tests/functions/signer"),
        "python",
        "app.call",
    );
    caller.credentials = Some("host");
    let server = Server::start_with(bins, &[caller], &["--dns", DNS], &internet::CREDENTIALS_ENV);
    let answer = server
        .invoke("caller", &internet::signed_call_event())
        .await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    if let Err(e) = internet::check_signed_call(&json(&answer)) {
        panic!("{e}\n{}", server.diagnostics());
    }
    server.stop();
    drop(internet);
}

/// `kindling serve` with a PATH that has no `nft`, as on a host without nftables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_cannot_nat_says_so_and_runs_functions_without_a_network() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let no_nft = "/usr/local/bin:/usr/bin:/bin";
    assert!(
        no_nft
            .split(':')
            .all(|dir| !std::path::Path::new(dir).join("nft").exists()),
        "nft is in {no_nft}: this test needs a PATH without it"
    );
    let mut offline = netprobe("offline");
    offline.network = Some("none");
    let server = Server::start_with(bins, &[netprobe("net"), offline], &[], &[("PATH", no_nft)]);
    let stderr = server.diagnostics();
    assert!(
        stderr.contains("environments cannot have a network here")
            && stderr.contains("install nftables: apt-get install nftables")
            && stderr.contains("functions with network = \"none\" still run"),
        "the start names the missing nftables and its fix:\n{stderr}"
    );

    let answer = server.invoke("offline", &json!({})).await;
    assert_eq!(
        (answer.status.as_u16(), answer.function_error.as_deref()),
        (200, None),
        "{}",
        server.diagnostics()
    );
    assert!(
        json(&answer)["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("none")),
        "a network = \"none\" function answers, with no address: {}",
        json(&answer)
    );

    let refused = server.invoke("net", &json!({})).await;
    let message = json(&refused)["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        refused.status == 502
            && message.contains("this host cannot give environments a network")
            && message.contains("install nftables")
            && message.contains("set network = \"none\" for the function"),
        "an outbound function fails with the reason and the fix ({}): {message}\n{}",
        refused.status,
        server.diagnostics()
    );
    server.stop();
}
