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
    // Tests running at once (threads or processes): one builds, the others wait (a file lock).
    ensure_artifacts(&image_dir(), &machined(), "0.1.0-test")
        .unwrap_or_else(|e| panic!("image: {e}"))
}

/// Where the built image is: `PLINTH_IMAGE_DIR`, or `out/` in the workspace.
pub fn image_dir() -> PathBuf {
    std::env::var_os("PLINTH_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("out"))
}

/// The static machined the image is built with.
pub fn machined() -> PathBuf {
    workspace().join("target/x86_64-unknown-linux-gnu/release/machined")
}

/// A node prepared for a test. Its disk images are deleted when the test passes (each is up to
/// 2 GiB once the guest has written it, and a CI machine's disk may be small) and kept, with
/// everything else in its directory, when it fails.
#[derive(Clone)]
pub struct TestNode {
    node: PreparedNode,
    _images: std::sync::Arc<DiskImages>,
}

impl std::ops::Deref for TestNode {
    type Target = PreparedNode;
    fn deref(&self) -> &PreparedNode {
        &self.node
    }
}

struct DiskImages(PathBuf);

impl Drop for DiskImages {
    fn drop(&mut self) {
        // The last clone goes when the test function ends; during a failing test's unwind the
        // thread is panicking.
        if !std::thread::panicking() {
            remove_images(&self.0);
        }
    }
}

/// Deletes the disk images (`.raw`, `.img`, `.fd`) under `dir`.
fn remove_images(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            remove_images(&path);
        } else if matches!(
            path.extension().and_then(|x| x.to_str()),
            Some("raw" | "img" | "fd")
        ) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn test_node(node: PreparedNode) -> TestNode {
    let dir = node.spec.dir.clone();
    TestNode {
        node,
        _images: std::sync::Arc::new(DiskImages(dir)),
    }
}

/// Prepares `spec` (its directory made afresh by the caller) as a test node.
pub fn prepared(spec: NodeSpec) -> TestNode {
    let name = spec.name.clone();
    test_node(prepare(&spec, &artifacts()).unwrap_or_else(|e| panic!("preparing node {name}: {e}")))
}

/// A fresh node directory under the target dir (its logs kept after the test for inspection).
pub fn node(name: &str) -> TestNode {
    node_with_services(name, Vec::new())
}

/// A node whose config declares `services`.
pub fn node_with_services(name: &str, services: Vec<config::Service>) -> TestNode {
    node_of(name, services, &artifacts())
}

/// A node booting `image` (another build: [`image`]).
pub fn node_booting(name: &str, image: &imager::Artifacts) -> TestNode {
    node_of(name, Vec::new(), image)
}

fn node_of(name: &str, services: Vec<config::Service>, image: &imager::Artifacts) -> TestNode {
    let spec = NodeSpec {
        services,
        ..plain_spec(name)
    };
    test_node(prepare(&spec, image).unwrap_or_else(|e| panic!("preparing node {name}: {e}")))
}

/// A node with nothing configured beyond what every node has, in a directory of its own under
/// the target dir, made afresh.
pub fn plain_spec(name: &str) -> NodeSpec {
    let dir = workspace().join("target/vm-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    NodeSpec {
        name: name.into(),
        dir,
        image_dir: PathBuf::new(),
        memory_mb: 1024,
        services: Vec::new(),
        trusted_keys: Vec::new(),
        extensions: Vec::new(),
        containers: Vec::new(),
        forwards: Vec::new(),
        preset: None,
        lan: None,
    }
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

/// Runs the CLI against `node` (its own client config): whether it succeeded, and
/// stdout+stderr.
pub fn plinth_output<S: AsRef<std::ffi::OsStr>>(node: &PreparedNode, args: &[S]) -> (bool, String) {
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
    (out.status.success(), text)
}

/// [`plinth_output`] that panics with the output if the CLI fails.
pub fn plinth(node: &PreparedNode, args: &[&str]) -> String {
    let (ok, text) = plinth_output(node, args);
    assert!(ok, "plinth {args:?} failed:\n{text}");
    text
}

/// The names in `dir` (`::/EFI/...`) of a powered-off node's ESP (mtools reads the FAT).
pub fn esp_dir(node: &PreparedNode, dir: &str) -> Vec<String> {
    let (offset, _) = partition(node, upgrade::layout::LABEL_ESP);
    let out = std::process::Command::new("mdir")
        .args(["-b", "-i"])
        .arg(format!("{}@@{offset}", node.disk.display()))
        .arg(dir)
        .output()
        .expect("mdir (apt-get install mtools)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect()
}

/// Where partition `label` of a node's raw disk starts and how long it is.
/// Where partition `label` is on the node's disk: offset and length in bytes.
pub fn partition(node: &PreparedNode, label: &str) -> (u64, u64) {
    let mut disk = std::fs::File::open(&node.disk).expect("open disk");
    let parts = upgrade::layout::read_table(&mut disk).expect("GPT");
    let p = parts
        .iter()
        .find(|p| p.label == label)
        .unwrap_or_else(|| panic!("no {label}"));
    (p.offset, p.len)
}

/// A name e2fsprogs (`debugfs`, `dumpe2fs`) opens as partition `label` of the node's disk, in
/// place (`FILE?offset=N`), so nothing is copied out.
pub fn e2fs_device(node: &PreparedNode, label: &str) -> String {
    let (offset, _) = partition(node, label);
    format!("{}?offset={offset}", node.disk.display())
}

/// Whether partition `label` of the node's disk holds only zeroes (read in place, in chunks).
pub fn partition_is_zero(node: &PreparedNode, label: &str) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let (offset, len) = partition(node, label);
    let mut disk = std::fs::File::open(&node.disk).expect("open disk");
    disk.seek(SeekFrom::Start(offset)).expect("seek");
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        disk.read_exact(&mut chunk[..n]).expect("read");
        if chunk[..n].iter().any(|&b| b != 0) {
            return false;
        }
        left -= n as u64;
    }
    true
}

/// The key the VM tests sign bundles with.
pub fn signing_key() -> upgrade::bundle::SigningKey {
    upgrade::bundle::SigningKey::from_bytes(&[42u8; 32])
}

/// A node that trusts [`signing_key`].
pub fn upgradable_node(name: &str) -> TestNode {
    node_with_extensions(name, Vec::new(), Vec::new())
}

/// A node that trusts [`signing_key`], with `extensions` in its ESP's store and `services`
/// in its config.
pub fn node_with_extensions(
    name: &str,
    extensions: Vec<PathBuf>,
    services: Vec<config::Service>,
) -> TestNode {
    node_with_workloads(name, extensions, services, Vec::new(), Vec::new())
}

/// [`node_with_extensions`] with `containers` in its config too, and the guest ports
/// `forwards` forwarded from the host.
pub fn node_with_workloads(
    name: &str,
    extensions: Vec<PathBuf>,
    services: Vec<config::Service>,
    containers: Vec<config::Container>,
    forwards: Vec<u16>,
) -> TestNode {
    let dir = workspace().join("target/vm-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let spec = NodeSpec {
        name: name.into(),
        dir,
        image_dir: PathBuf::new(),
        memory_mb: 1024,
        services,
        trusted_keys: vec![upgrade::bundle::public_hex(&signing_key().verifying_key())],
        extensions,
        containers,
        forwards,
        preset: None,
        lan: None,
    };
    test_node(prepare(&spec, &artifacts()).unwrap_or_else(|e| panic!("preparing node {name}: {e}")))
}

/// Builds another image (same kernel and machined, its own version and command line) and
/// returns its signed bundle.
pub fn bundle(name: &str, version: &str, extra_cmdline: &[&str]) -> PathBuf {
    bundle_filled(name, version, extra_cmdline, 0)
}

/// The bundle of build `a` bringing the extension files `extensions`, written as `file` beside
/// the build.
pub fn bundle_of(a: &imager::Artifacts, extensions: &[PathBuf], file: &str) -> PathBuf {
    let bytes = imager::bundle_release(a, &signing_key(), 0, None, extensions).expect("bundle");
    let path = a.rootfs.with_file_name(file);
    std::fs::write(&path, bytes).expect("write bundle");
    path
}

/// [`bundle`], with `filler_bytes` of incompressible filler in its root (for benchmarks).
pub fn bundle_filled(
    name: &str,
    version: &str,
    extra_cmdline: &[&str],
    filler_bytes: u64,
) -> PathBuf {
    let a = image_filled(name, version, extra_cmdline, filler_bytes);
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
    image_filled(name, version, extra_cmdline, 0)
}

/// [`image`], with `filler_bytes` of incompressible filler in its root.
pub fn image_filled(
    name: &str,
    version: &str,
    extra_cmdline: &[&str],
    filler_bytes: u64,
) -> imager::Artifacts {
    image_with(name, version, extra_cmdline, filler_bytes, "machined")
}

/// [`image`] of an OS providing extension `level`.
pub fn image_at_level(name: &str, version: &str, level: u32) -> imager::Artifacts {
    image_built(name, version, &[], 0, "machined", level, None)
}

/// [`image`] on another Debian kernel package (or the metapackage naming it): the generic
/// `linux-image-amd64`, say, which has the VM's hardware watchdog driver the default image's
/// cloud kernel lacks.
pub fn image_on_kernel(
    name: &str,
    version: &str,
    extra_cmdline: &[&str],
    kernel_package: &str,
) -> imager::Artifacts {
    image_built(
        name,
        version,
        extra_cmdline,
        0,
        "machined",
        upgrade::extension::LEVEL,
        Some(kernel_package),
    )
}

/// [`image_filled`] with another static binary of this workspace as `/init` (the boot
/// benchmark's floor, `plinth-floor`).
pub fn image_with(
    name: &str,
    version: &str,
    extra_cmdline: &[&str],
    filler_bytes: u64,
    init: &str,
) -> imager::Artifacts {
    image_built(
        name,
        version,
        extra_cmdline,
        filler_bytes,
        init,
        upgrade::extension::LEVEL,
        None,
    )
}

/// An image built with the base image's kernel unless `kernel_package` names another.
fn image_built(
    name: &str,
    version: &str,
    extra_cmdline: &[&str],
    filler_bytes: u64,
    init: &str,
    extension_level: u32,
    kernel_package: Option<&str>,
) -> imager::Artifacts {
    let base = artifacts();
    let out_dir = workspace().join("target/vm-tests/images").join(name);
    let cache = image_dir().join("cache");
    imager::build(&imager::BuildOptions {
        out_dir,
        cache_dir: cache,
        machined: workspace()
            .join("target/x86_64-unknown-linux-gnu/release")
            .join(init),
        version: version.into(),
        kernel_package: Some(kernel_package.map_or_else(
            || format!("linux-image-{}", base.kernel_release),
            str::to_owned,
        )),
        extra_cmdline: extra_cmdline.iter().map(|s| s.to_string()).collect(),
        filler_bytes,
        secureboot: base.secureboot.clone(),
        // Another /init (the floor) still carries machined, so its initramfs is the node's.
        initramfs_ballast: (init != "machined")
            .then(|| workspace().join("target/x86_64-unknown-linux-gnu/release/machined")),
        extension_level,
    })
    .unwrap_or_else(|e| panic!("building image {name}: {e}"))
}

/// Calls `attempt` on a client of the node every 500 ms until it answers `Ok(Ok(_))`, or panics
/// after `secs` naming `what` and the last answer (`Ok(Err(state))` says what was seen). A
/// transport failure is retried on a new connection: a TCG guest on a CI host with slow storage
/// has gone quiet long enough for a keepalive PING to go unanswered, which says nothing about
/// what is being waited for. Any other error fails at once.
pub async fn poll_api<T, F, Fut>(node: &PreparedNode, secs: u64, what: &str, mut attempt: F) -> T
where
    F: FnMut(api::proto::machine_client::MachineClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<Result<T, String>, tonic::Status>>,
{
    let ctx = node.context().expect("context").clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut client = None;
    let mut last = "nothing yet".to_string();
    loop {
        if client.is_none() {
            match api::client::connect_context(&node.endpoint(), &ctx).await {
                Ok(c) => client = Some(c),
                Err(e) => last = format!("connecting: {e}"),
            }
        }
        if let Some(c) = &client {
            match attempt(c.clone()).await {
                Ok(Ok(t)) => return t,
                Ok(Err(state)) => last = state,
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    eprintln!("{what}: {e}; connecting again");
                    last = e.to_string();
                    client = None;
                }
                Err(e) => panic!("{what}: {e}"),
            }
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {last}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
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

/// A service running `command`, restarted always, 3 s to stop, no dependencies or health check.
pub fn service(name: &str, command: Vec<String>) -> config::Service {
    config::Service {
        name: name.into(),
        command,
        depends_on: vec![],
        environment: vec![],
        restart: config::RestartPolicy::Always,
        stop_timeout_s: 3,
        health: None,
    }
}

/// Shuts the node down with `plinth shutdown` and returns the shutdown phases that failed
/// (every file system must unmount: an extension or a container left mounted would fail one).
pub async fn shutdown_failures(node: &PreparedNode, vm: &mut vm_tests::qemu::Vm) -> Vec<String> {
    let n = node.clone();
    let out = tokio::task::spawn_blocking(move || plinth(&n, &["-e", &n.endpoint(), "shutdown"]))
        .await
        .expect("cli");
    assert!(out.contains("shutdown started"), "{out}");
    vm.wait_exit(Duration::from_secs(120))
        .expect("QEMU exits by itself");
    vm.serial
        .lines()
        .iter()
        .filter_map(|l| sequencer::trace::parse_line(&l.text))
        .filter_map(|e| match e.kind {
            sequencer::EventKind::PhaseStop {
                sequence,
                phase,
                error: Some(error),
                ..
            } if sequence == "shutdown" => Some(format!("{phase}: {error}")),
            _ => None,
        })
        .collect()
}

/// The runtime extension in `dir`, built as `plinth image extension --runtime` builds it.
pub fn runtime_extension(dir: &std::path::Path) -> PathBuf {
    runtime_extension_at(dir, upgrade::extension::LEVEL)
}

/// [`runtime_extension`] built for extension `level`.
pub fn runtime_extension_at(dir: &std::path::Path, level: u32) -> PathBuf {
    use imager::extension::{ExtensionOptions, RUNTIME_DEBS, RUNTIME_PROGRAMS};
    let opts = ExtensionOptions {
        name: "runtime".into(),
        version: "1.0".into(),
        dir: None,
        debs: RUNTIME_DEBS.iter().map(|d| d.to_string()).collect(),
        programs: RUNTIME_PROGRAMS.iter().map(|p| p.to_string()).collect(),
        cache: workspace().join("target/vm-tests/cache"),
        staging: dir.join("runtime.staging"),
        level,
    };
    let (bytes, _) = imager::extension::build(&opts, &signing_key()).expect("packing the runtime");
    let out = dir.join(format!("runtime@{level}.ext"));
    std::fs::write(&out, bytes).expect("writing the extension");
    out
}

/// The etcd extension in `dir`, built as `plinth image extension --etcd` builds it.
pub fn etcd_extension(dir: &std::path::Path) -> PathBuf {
    use imager::extension::{ExtensionOptions, ETCD_DEBS, ETCD_PROGRAMS};
    let opts = ExtensionOptions {
        name: "etcd".into(),
        version: "3.4".into(),
        dir: None,
        debs: ETCD_DEBS.iter().map(|d| d.to_string()).collect(),
        programs: ETCD_PROGRAMS.iter().map(|p| p.to_string()).collect(),
        cache: workspace().join("target/vm-tests/cache"),
        staging: dir.join("etcd.staging"),
        level: upgrade::extension::LEVEL,
    };
    let (bytes, _) = imager::extension::build(&opts, &signing_key()).expect("packing etcd");
    let out = dir.join("etcd.ext");
    std::fs::write(&out, bytes).expect("writing the extension");
    out
}

/// `plinth image busybox`'s archive, in `dir`.
pub fn busybox_image(dir: &std::path::Path) -> PathBuf {
    let mut bytes = Vec::new();
    imager::container::busybox(
        &workspace().join("target/vm-tests/cache"),
        imager::container::BUSYBOX_NAME,
        &mut bytes,
    )
    .expect("busybox image");
    let out = dir.join("busybox.tar");
    std::fs::write(&out, bytes).expect("write");
    out
}
