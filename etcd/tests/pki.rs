//! The etcd PKI `generate_cluster` writes, used by the real etcd (Debian's `etcd-server`,
//! started with [`Member`]'s command line) and its own client (`etcdctl` from `etcd-client`): a control-plane node's member certificate
//! serves clients and peers over mutual TLS, every node's machined certificate is a client
//! etcd accepts, and a certificate from the API's CA is refused (etcd trusts its own CA alone).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::gen::{generate_cluster, ClusterNode, ClusterOptions};
use config::MachineType;
use etcd::{Member, PkiFiles, Start};

mod common;

fn tool(name: &str, package: &str) -> String {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()));
    assert!(
        found,
        "{name} is missing: apt-get install {package} (./x test does)"
    );
    name.into()
}

struct Etcd(Child);

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write(dir: &Path, name: &str, data: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write");
    p.display().to_string()
}

/// etcdctl with these credentials: (succeeded, output).
fn etcdctl(endpoint: &str, ca: &str, cert: &str, key: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool("etcdctl", "etcd-client"))
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints=https://{endpoint}"),
            &format!("--cacert={ca}"),
            &format!("--cert={cert}"),
            &format!("--key={key}"),
            "--dial-timeout=3s",
            "--command-timeout=5s",
        ])
        .args(args)
        .output()
        .expect("etcdctl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn etcd_serves_its_members_and_machined_with_the_generated_certificates_and_no_other() {
    let mut ports = common::free_ports(4).into_iter();
    let mut node = |name: &str, kind, i: u8| ClusterNode {
        name: name.into(),
        machine_type: kind,
        address: format!("127.0.0.{i}/8"),
        endpoint: format!("127.0.0.{i}"),
        etcd_ports: (ports.next().expect("a port"), ports.next().expect("a port")),
    };
    let g = generate_cluster(&ClusterOptions {
        cluster: "pki".into(),
        nodes: vec![
            node("cp-1", MachineType::Controlplane, 1),
            node("worker-1", MachineType::Worker, 2),
        ],
        interface: "lo".into(),
        gateway: None,
        trusted_keys: vec![],
    })
    .expect("generate");
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let cp = g.nodes[0].cluster.as_ref().expect("cluster");
    let certificate = cp.etcd.member.as_ref().expect("member certificate");
    let pki = PkiFiles::under(d);
    let ca = write(d, "ca.crt", &cp.etcd.ca);
    write(d, "member.crt", &certificate.cert);
    write(d, "member.key", &certificate.key);
    let member = Member::of("cp-1", cp, &d.join("data"), pki).expect("member");
    let endpoint = member
        .me
        .client_url()
        .trim_start_matches("https://")
        .to_string();
    let log = std::fs::File::create(d.join("etcd.log")).expect("log");
    let _etcd = Etcd(
        Command::new(tool("etcd", "etcd-server"))
            .args(member.args(&Start::New))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd"),
    );

    // The worker's machined certificate: a client etcd accepts.
    let w = &g.nodes[1].cluster.as_ref().expect("cluster").etcd.client;
    let (wcert, wkey) = (
        write(d, "worker.crt", &w.cert),
        write(d, "worker.key", &w.key),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ok, out) = etcdctl(&endpoint, &ca, &wcert, &wkey, &["put", "plinth", "yes"]);
        if ok {
            break;
        }
        let log = std::fs::read_to_string(d.join("etcd.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "etcd never took a put: {out}\n{log}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The control plane's own machined certificate reads it back.
    let c = &cp.etcd.client;
    let (ccert, ckey) = (write(d, "cp.crt", &c.cert), write(d, "cp.key", &c.key));
    let (ok, out) = etcdctl(&endpoint, &ca, &ccert, &ckey, &["get", "plinth"]);
    assert!(ok && out.contains("yes"), "{out}");

    // The API's admin certificate (another CA) is refused by etcd.
    let (_, ctx) = g.client.context(None).expect("context");
    let (acert, akey) = (
        write(d, "admin.crt", ctx.cert.as_deref().expect("cert")),
        write(d, "admin.key", ctx.key.as_deref().expect("key")),
    );
    let (ok, out) = etcdctl(&endpoint, &ca, &acert, &akey, &["get", "plinth"]);
    assert!(!ok, "etcd accepted a certificate from the API's CA: {out}");
}
