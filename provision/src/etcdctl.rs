//! Debian's `etcdctl` against a cluster's etcd, with a node's etcd client certificate: how the
//! tests read and write keys through etcd's own client.

use std::path::Path;
use std::process::Command;

/// Runs `etcdctl ARGS` against `endpoints` (client URLs), the certificate files written into
/// `dir`: whether it succeeded, and its stdout and stderr together.
pub fn etcdctl(
    cluster: &config::Cluster,
    endpoints: &[String],
    dir: &Path,
    args: &[&str],
) -> (bool, String) {
    let file = |name: &str, pem: &str| {
        let p = dir.join(name);
        let _ = std::fs::write(&p, pem);
        p.display().to_string()
    };
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .arg(format!(
            "--cacert={}",
            file("etcd-ca.crt", &cluster.etcd.ca)
        ))
        .arg(format!(
            "--cert={}",
            file("etcd-client.crt", &cluster.etcd.client.cert)
        ))
        .arg(format!(
            "--key={}",
            file("etcd-client.key", &cluster.etcd.client.key)
        ))
        .arg("--command-timeout=20s")
        .args(args)
        .output();
    match out {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (
            false,
            format!("etcdctl: {e} (apt-get install etcd-client; ./x test does)"),
        ),
    }
}
