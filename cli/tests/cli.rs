//! The CLI as a user runs it (the built `plinth` binary), on what goes wrong before any node
//! answers: no client config, a node that is not up, several nodes that are not up. Its
//! presence also makes `cargo test` build `target/debug/plinth`, which the scenario and VM
//! tests run, with the same features as every other test binary (`./x test` builds once).

use std::path::Path;
use std::process::{Command, Output};

fn plinth(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(args)
        .env("PLINTHCONFIG", config)
        .output()
        .expect("running plinth")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A port on 127.0.0.1 that nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A client config with a CA and an admin certificate, as `plinth gen config` writes it.
fn client_config(dir: &Path, endpoint: &str) -> std::path::PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_plinth"))
        .args(["gen", "config", "demo", "--endpoint", endpoint, "-o"])
        .arg(dir)
        .output()
        .expect("running plinth");
    assert!(out.status.success(), "gen config: {}", stderr(&out));
    dir.join("plinthconfig")
}

#[test]
fn without_a_client_config_the_error_names_the_file_and_how_to_make_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nowhere/config");
    let out = plinth(&missing, &["version"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("plinth gen config"), "{err}");
}

#[test]
fn a_node_that_is_not_up_is_named_and_the_exit_status_is_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let endpoint = format!("127.0.0.1:{}", closed_port());
    let config = client_config(dir.path(), &endpoint);
    let out = plinth(&config, &["version"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&endpoint) && err.contains("nothing is listening there"),
        "{err}"
    );
}

#[test]
fn with_nodes_every_failed_node_is_reported_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (
        format!("127.0.0.1:{}", closed_port()),
        format!("127.0.0.1:{}", closed_port()),
    );
    let config = client_config(dir.path(), &a);
    let out = plinth(&config, &["-n", &format!("{a},{b}"), "version"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    for node in [&a, &b] {
        assert!(err.contains(&format!("error: {node}: connecting")), "{err}");
    }
    assert!(err.contains("2 of 2 nodes failed"), "{err}");
}
