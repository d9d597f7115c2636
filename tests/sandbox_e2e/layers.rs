//! Layers (issue 10), through `kindling serve` and the sandbox: a folder layer and a zip
//! layer unpacked in order into a read-only `/opt`, whose `python` package a handler
//! imports (the later layer's copy), whose `bin` program it runs from `PATH`, and whose
//! `nodejs/node_modules` module a Node.js handler requires; an ES module handler imports
//! layer packages by their bare names (from `nodejs/node_modules` and
//! `nodejs/node22/node_modules`, as Lambda's runtime searches NODE_PATH for ES modules);
//! a layer that escapes is refused at start.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::support::{json, prerequisites, repo_path, FunctionDef, Scratch, Server};

/// Zips `files` (path in the zip, contents) into `zip` with Python's zipfile, as a
/// layer's author would with any zip tool.
fn zip(zip: &Path, files: &[(&str, &str)]) {
    // Files readable by all (zipfile's default is 0600, which the function's user, as in
    // Lambda, could not read).
    let script = "import json, sys, zipfile\n\
                  def entry(name):\n    \
                  info = zipfile.ZipInfo(name)\n    \
                  info.external_attr = 0o100644 << 16\n    \
                  return info\n\
                  with zipfile.ZipFile(sys.argv[1], 'w') as z:\n    \
                  [z.writestr(entry(n), c) for n, c in json.loads(sys.argv[2])]";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(zip)
        .arg(json!(files).to_string())
        .status()
        .expect("cannot run python3");
    assert!(status.success());
}

fn layered(name: &str, runtime: &str, handler: &str, layers: &[&Path]) -> FunctionDef {
    let mut f = FunctionDef::new(
        name,
        repo_path("tests/functions/layer-user"),
        runtime,
        handler,
    );
    f.layers = layers.iter().map(|l| l.to_path_buf()).collect();
    f
}

#[tokio::test]
async fn layers_are_unpacked_in_order_into_opt() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let scratch = Scratch::new();
    let later = scratch.path().join("later.zip");
    zip(
        &later,
        &[
            ("python/layerpkg/__init__.py", "VALUE = 'second layer'\n"),
            (
                "nodejs/node22/node_modules/@kindling-test/node22-only/package.json",
                r#"{"name": "@kindling-test/node22-only", "type": "module", "exports": "./main.js"}"#,
            ),
            (
                "nodejs/node22/node_modules/@kindling-test/node22-only/main.js",
                "export const release = 'node22';\n",
            ),
        ],
    );
    let tools = repo_path("tests/layers/tools");
    let server = Server::start(
        bins,
        &[
            layered("py", "python", "app.handler", &[&tools, &later]),
            layered("js", "node", "index.handler", &[&tools]),
            layered("esm", "node", "esm.handler", &[&tools, &later]),
        ],
    );
    let answer = server.invoke("py", &json!({})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    assert_eq!(
        json(&answer),
        json!({
            "value": "second layer",
            "package": "/opt/python/layerpkg/__init__.py",
            "tool": "layer-tool ran with hi",
            "opt_writable": false,
            "ld_library_path": json(&answer)["ld_library_path"],
        })
    );
    assert!(json(&answer)["ld_library_path"]
        .as_str()
        .unwrap()
        .split(':')
        .any(|p| p == "/opt/lib"));
    let answer = server.invoke("js", &json!({})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    assert_eq!(json(&answer)["value"], "node module from a layer");
    let answer = server.invoke("esm", &json!({})).await;
    assert_eq!(answer.status, 200, "{}", server.diagnostics());
    assert_eq!(
        json(&answer),
        json!({
            "value": "ES module from a layer",
            "condition": "import",
            "extra": "subpath of a layer package",
            "scoped": "node22",
        }),
        "{}",
        server.log("esm")
    );
    server.stop();
}

#[test]
fn a_layer_that_escapes_stops_the_server_naming_it() {
    let Some(bins) = prerequisites(&["/usr/bin/python3"]) else {
        return;
    };
    let scratch = Scratch::new();
    let bad = scratch.path().join("bad.zip");
    zip(&bad, &[("../outside.py", "")]);
    let mut serve = Server::serve(
        bins,
        &[layered("py", "python", "app.handler", &[&bad])],
        &scratch,
    );
    let out = serve
        .args(["--addr", "127.0.0.1:0", "--state-dir"])
        .arg(scratch.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "layer {}: zip entry \"../outside.py\" climbs out of the code folder",
            bad.display()
        )),
        "{err}"
    );
    assert!(!scratch.path().join("outside.py").exists());
}
