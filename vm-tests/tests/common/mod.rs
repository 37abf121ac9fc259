//! What every VM test shares: where the workspace and the built image are, and how to get a
//! booted node.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use vm_tests::node::{ensure_artifacts, prepare, NodeSpec, PreparedNode};

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The built image (`PLINTH_IMAGE_DIR`, or `out/` in the workspace), built now if missing.
pub fn artifacts() -> imager::Artifacts {
    // Tests of one binary run on parallel threads; one of them builds, the others wait.
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let image_dir = std::env::var_os("PLINTH_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("out"));
    let machined = workspace().join("target/x86_64-unknown-linux-gnu/release/machined");
    ensure_artifacts(&image_dir, &machined, "0.1.0-test").unwrap_or_else(|e| panic!("image: {e}"))
}

/// A fresh node directory under the target dir (kept after the test for inspection).
pub fn node(name: &str) -> PreparedNode {
    node_with_services(name, Vec::new())
}

/// A node whose config declares `services`.
pub fn node_with_services(name: &str, services: Vec<config::Service>) -> PreparedNode {
    let dir = workspace().join("target/vm-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let spec = NodeSpec {
        name: name.into(),
        dir,
        image_dir: PathBuf::new(),
        memory_mb: 1024,
        services,
        trusted_keys: Vec::new(),
    };
    prepare(&spec, &artifacts()).unwrap_or_else(|e| panic!("preparing node {name}: {e}"))
}

/// How long a boot through OVMF under TCG may take before a test gives up.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// The `plinth` CLI built from this workspace (by `./x test`, or `cargo build -p cli`).
pub fn plinth_cli() -> PathBuf {
    let p = workspace().join("target/debug/plinth");
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build -p cli` (./x test does)",
        p.display()
    );
    p
}

/// Runs the CLI against `node` (its own client config) and returns stdout+stderr; panics with
/// the output if it fails.
pub fn plinth(node: &PreparedNode, args: &[&str]) -> String {
    let out = std::process::Command::new(plinth_cli())
        .args(args)
        .env("PLINTHCONFIG", node.spec.dir.join("plinthconfig"))
        .output()
        .expect("running plinth");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "plinth {args:?} failed:\n{text}");
    text
}

/// Reads a partition (by GPT label) out of a node's raw disk into a file of its own.
pub fn extract_partition(node: &PreparedNode, label: &str, out: &std::path::Path) {
    use std::io::{Read, Seek, SeekFrom};
    let mut disk = std::fs::File::open(&node.disk).expect("open disk");
    let parts = upgrade::layout::read_table(&mut disk).expect("GPT");
    let p = parts
        .iter()
        .find(|p| p.label == label)
        .unwrap_or_else(|| panic!("no {label}"));
    disk.seek(SeekFrom::Start(p.offset)).expect("seek");
    let mut data = vec![0u8; p.len as usize];
    disk.read_exact(&mut data).expect("read");
    std::fs::write(out, data).expect("write");
}

/// The key the VM tests sign bundles with.
pub fn signing_key() -> upgrade::bundle::SigningKey {
    upgrade::bundle::SigningKey::from_bytes(&[42u8; 32])
}

/// A node that trusts [`signing_key`].
pub fn upgradable_node(name: &str) -> PreparedNode {
    let dir = workspace().join("target/vm-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let spec = NodeSpec {
        name: name.into(),
        dir,
        image_dir: PathBuf::new(),
        memory_mb: 1024,
        services: Vec::new(),
        trusted_keys: vec![upgrade::bundle::public_hex(&signing_key().verifying_key())],
    };
    prepare(&spec, &artifacts()).unwrap_or_else(|e| panic!("preparing node {name}: {e}"))
}

/// Builds another image (same kernel and machined, its own version and command line) and
/// returns its signed bundle.
pub fn bundle(name: &str, version: &str, extra_cmdline: &[&str]) -> PathBuf {
    let a = image(name, version, extra_cmdline);
    let out_dir = workspace().join("target/vm-tests/images").join(name);
    let read = |p: &std::path::Path| std::fs::read(p).expect("read image part");
    let bytes = upgrade::bundle::build(
        version,
        std::env::consts::ARCH,
        &read(&a.uki_a),
        &read(&a.uki_b),
        &read(&a.rootfs),
        &signing_key(),
    )
    .expect("bundle");
    let path = out_dir.join("bundle.plinth");
    std::fs::write(&path, bytes).expect("write bundle");
    path
}

/// Builds another image: the same kernel and machined, its own version and command line.
pub fn image(name: &str, version: &str, extra_cmdline: &[&str]) -> imager::Artifacts {
    let base = artifacts();
    let out_dir = workspace().join("target/vm-tests/images").join(name);
    let cache = std::env::var_os("PLINTH_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("out"))
        .join("cache");
    imager::build(&imager::BuildOptions {
        out_dir,
        cache_dir: cache,
        machined: workspace().join("target/x86_64-unknown-linux-gnu/release/machined"),
        version: version.into(),
        kernel_package: Some(format!("linux-image-{}", base.kernel_release)),
        extra_cmdline: extra_cmdline.iter().map(|s| s.to_string()).collect(),
    })
    .unwrap_or_else(|e| panic!("building image {name}: {e}"))
}

/// Status of a node through the API.
pub async fn status(node: &PreparedNode) -> api::proto::StatusResponse {
    let ctx = node.context().expect("context").clone();
    let mut c = api::client::connect_context(&node.endpoint(), &ctx)
        .await
        .expect("connect");
    c.status(api::proto::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
}
