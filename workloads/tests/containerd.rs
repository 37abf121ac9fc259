//! Against the real containerd: Debian's package (the one the runtime extension carries),
//! started on this machine with a config like the node's, in a directory of its own.
//!
//! It needs root (containerd mounts overlayfs snapshots); CI runs as root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use workloads::oci::{write_layout, LayerEntry};
use workloads::Containerd;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// Debian's containerd unpacked (downloaded once with `apt-get download`). The tests of this
/// binary run side by side, as threads of one process (`cargo test`) or as processes of their
/// own (nextest): one of them unpacks, the others wait for it (a lock in the process, and a
/// file lock across processes; on a fresh machine two unpacking into one staging directory
/// removed each other's files).
fn containerd_package() -> PathBuf {
    static PACKAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PACKAGE.get_or_init(unpack_containerd_package).clone()
}

/// The package cache, locked for this process until the file returned is dropped.
fn locked_cache() -> (PathBuf, std::fs::File) {
    let cache = workspace().join("target/tmp/containerd-package");
    std::fs::create_dir_all(&cache).expect("mkdir");
    let lock = std::fs::File::create(cache.join(".lock")).expect("lock file");
    lock.lock().expect("lock");
    (cache, lock)
}

fn unpack_containerd_package() -> PathBuf {
    let (cache, _lock) = locked_cache();
    let unpacked = cache.join("root");
    if unpacked.join("usr/bin/containerd").is_file() {
        return unpacked;
    }
    for package in ["containerd", "runc", "libseccomp2"] {
        let have = std::fs::read_dir(&cache).expect("read").flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{package}_"))
        });
        if !have {
            let ok = Command::new("apt-get")
                .args(["download", package])
                .current_dir(&cache)
                .status()
                .expect("apt-get");
            assert!(ok.success(), "apt-get download {package}");
        }
    }
    // Unpacked beside, then moved into place whole: a run cut short leaves no half tree.
    let staging = cache.join("root.partial");
    let _ = std::fs::remove_dir_all(&staging);
    for deb in std::fs::read_dir(&cache).expect("read").flatten() {
        if deb.path().extension().is_some_and(|e| e == "deb") {
            let ok = Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb.path())
                .arg(&staging)
                .status()
                .expect("dpkg-deb");
            assert!(ok.success());
        }
    }
    // As the runtime extension does: runc finds libseccomp by its RUNPATH (runc starts a
    // container's init with an environment of its own, without LD_LIBRARY_PATH).
    let ok = Command::new("patchelf")
        .arg("--set-rpath")
        .arg(unpacked.join("usr/lib/x86_64-linux-gnu"))
        .arg(staging.join("usr/sbin/runc"))
        .status()
        .expect("patchelf (apt-get install patchelf)");
    assert!(ok.success());
    let _ = std::fs::remove_dir_all(&unpacked);
    std::fs::rename(&staging, &unpacked).expect("moving the package into place");
    unpacked
}

/// A containerd of its own, stopped when dropped.
struct Host {
    child: Child,
    containerd: Containerd,
    dir: PathBuf,
}

impl Host {
    fn start(name: &str) -> Host {
        assert!(
            nix::unistd::geteuid().is_root(),
            "these tests run containerd, which needs root"
        );
        let pkg = containerd_package();
        let dir = workspace().join("target/tmp").join(name);
        unmount_under(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let containerd = Containerd::new(&dir.join("var"), &dir.join("run"));
        std::fs::create_dir_all(containerd.config.parent().expect("dir")).expect("mkdir");
        std::fs::write(&containerd.config, containerd.config_toml()).expect("config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("log");
        let child = Command::new(pkg.join("usr/bin/containerd"))
            .arg("--config")
            .arg(&containerd.config)
            .env(
                "PATH",
                format!(
                    "{}:{}:/usr/sbin:/usr/bin:/sbin:/bin",
                    pkg.join("usr/bin").display(),
                    pkg.join("usr/sbin").display()
                ),
            )
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("containerd");
        Host {
            child,
            containerd,
            dir,
        }
    }

    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.containerd.version().await {
                Ok(v) => {
                    assert!(v.starts_with("1."), "{v}");
                    return;
                }
                Err(e) if Instant::now() > deadline => panic!("containerd never answered: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `ctr` from the same package, on this containerd, in machined's namespace.
    fn ctr(&self, args: &[&str]) -> String {
        let out = Command::new(containerd_package().join("usr/bin/ctr"))
            .arg("--address")
            .arg(&self.containerd.socket)
            .args(["--namespace", workloads::images::NAMESPACE])
            .args(args)
            .output()
            .expect("ctr");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // A container left by a failed test would outlive containerd in its shim, and its
        // runc state (under /run/containerd/runc, which containerd does not move) would make
        // the next run's container of that name "already exist".
        let runc_root = Path::new("/run/containerd/runc").join(workloads::images::NAMESPACE);
        for id in std::fs::read_dir(&runc_root)
            .into_iter()
            .flatten()
            .flatten()
        {
            // Only this containerd's: the other test's runs beside it.
            let state = std::fs::read_to_string(id.path().join("state.json")).unwrap_or_default();
            if !state.contains(self.dir.to_string_lossy().as_ref()) {
                continue;
            }
            let _ = Command::new(containerd_package().join("usr/sbin/runc"))
                .arg("--root")
                .arg(&runc_root)
                .args(["delete", "--force"])
                .arg(id.file_name())
                .status();
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        unmount_under(&self.dir);
    }
}

/// Detaches every mount under `dir` (a container's rootfs left by a failed run).
fn unmount_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|t| Path::new(t).starts_with(dir))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// An archive of one image named `name` whose layer holds `/hello` saying `text`.
fn archive(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(format!("{}.tar", text.trim()));
    let mut f = std::fs::File::create(&path).expect("create");
    write_layout(
        &mut f,
        name,
        &[
            LayerEntry::Dir("etc".into(), 0o755),
            LayerEntry::File("hello".into(), 0o644, text.as_bytes().to_vec()),
        ],
        serde_json::json!({"Cmd": ["/hello"]}),
    )
    .expect("write");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_is_imported_unpacked_and_named_and_a_corrupt_one_changes_nothing() {
    let host = Host::start("containerd-import");
    host.ready().await;
    let work = host.dir.join("archives");
    std::fs::create_dir_all(&work).expect("mkdir");

    let good = archive(&work, "plinth.local/hello:1", "hello\n");
    let checked = workloads::oci::read(&good).expect("checks");
    let seen = std::sync::Mutex::new(0u64);
    let imported = host
        .containerd
        .import(&checked, None, &|n| *seen.lock().expect("lock") = n)
        .await
        .expect("imports");
    assert_eq!(imported.len(), 1);
    assert_eq!(imported[0].name, "plinth.local/hello:1");
    assert_eq!(imported[0].digest, checked.images[0].manifest.digest);
    let written = *seen.lock().expect("lock");
    assert_eq!(written, imported[0].size, "progress reached the whole size");

    // containerd's own client sees a complete image and its unpacked snapshot.
    let images = host.ctr(&["images", "check"]);
    assert!(
        images.contains("plinth.local/hello:1") && images.contains("complete"),
        "{images}"
    );
    let snapshots = host.ctr(&["snapshots", "--snapshotter", "overlayfs", "ls"]);
    assert!(
        snapshots.contains(&checked.images[0].diff_ids[0]),
        "the layer is unpacked under its chain id: {snapshots}"
    );
    // Once the import's lease is gone, garbage collection keeps everything the image needs.
    host.ctr(&["content", "prune", "references"]);
    let images = host.ctr(&["images", "check"]);
    assert!(images.contains("complete"), "{images}");

    // The same archive again: nothing new, same answer.
    let again = host
        .containerd
        .import(&checked, None, &|_| {})
        .await
        .expect("imports again");
    assert_eq!(again[0].digest, imported[0].digest);

    // A renamed import names the same content.
    host.containerd
        .import(&checked, Some("team/hello:2"), &|_| {})
        .await
        .expect("imports renamed");
    let names: Vec<String> = host
        .containerd
        .images()
        .await
        .expect("lists")
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(
        names,
        ["docker.io/team/hello:2", "plinth.local/hello:1"],
        "{names:?}"
    );

    // A flipped byte in a layer is refused by the check, before containerd is asked.
    let bad = archive(&work, "plinth.local/bad:1", "corrupt\n");
    let mut bytes = std::fs::read(&bad).expect("read");
    let at = bytes
        .windows(7)
        .position(|w| w == b"corrupt")
        .expect("the file's text");
    bytes[at] ^= 0x01;
    std::fs::write(&bad, bytes).expect("write");
    let e = workloads::oci::read(&bad).expect_err("refused").to_string();
    assert!(e.contains("corrupt"), "{e}");
    assert_eq!(host.containerd.images().await.expect("lists").len(), 2);
}

/// Debian's busybox-static as an image: `/bin/busybox` and a few applets.
fn busybox_archive(dir: &Path) -> PathBuf {
    let (cache, lock) = locked_cache();
    let have = std::fs::read_dir(&cache)
        .expect("read")
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("busybox-static_")
        });
    let deb = match have {
        Some(e) => e.path(),
        None => {
            let ok = Command::new("apt-get")
                .args(["download", "busybox-static"])
                .current_dir(&cache)
                .status()
                .expect("apt-get");
            assert!(ok.success());
            drop(lock);
            return busybox_archive(dir);
        }
    };
    drop(lock);
    let unpacked = dir.join("busybox.unpack");
    let ok = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&unpacked)
        .status()
        .expect("dpkg-deb");
    assert!(ok.success());
    let busybox = std::fs::read(unpacked.join("bin/busybox")).expect("busybox");
    let mut files = vec![
        LayerEntry::Dir("bin".into(), 0o755),
        LayerEntry::File("bin/busybox".into(), 0o755, busybox),
        LayerEntry::Dir("www".into(), 0o755),
        LayerEntry::Dir("tmp".into(), 0o1777),
    ];
    for applet in ["sh", "httpd", "echo", "sleep", "cat", "readlink", "stty"] {
        files.push(LayerEntry::Symlink(
            format!("bin/{applet}"),
            "busybox".into(),
        ));
    }
    let path = dir.join("busybox.tar");
    let mut f = std::fs::File::create(&path).expect("create");
    write_layout(
        &mut f,
        "plinth.local/busybox:test",
        &files,
        serde_json::json!({"Cmd": ["/bin/sh"]}),
    )
    .expect("write");
    path
}

/// Ports that nothing listens on now, all different (each is held until all are found).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// GET / from 127.0.0.1:port, retried while the server starts.
async fn get(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            std::io::Result::Ok(out)
        };
        match attempt.await {
            Ok(body) if body.contains("200 OK") => return body,
            other if Instant::now() > deadline => panic!("no page on port {port}: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_on_the_host_network_or_a_private_one_with_a_published_port() {
    use workloads::containers::ContainerSpec;
    let host = Host::start("containerd-run");
    host.ready().await;
    let work = host.dir.join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    let archive = workloads::oci::read(&busybox_archive(&work)).expect("checks");
    host.containerd
        .import(&archive, None, &|_| {})
        .await
        .expect("imports");
    let site = work.join("site");
    std::fs::create_dir_all(&site).expect("mkdir");
    std::fs::write(site.join("index.html"), "from a container\n").expect("page");
    let spec = |name: &str, command: Vec<String>, host_network: bool| ContainerSpec {
        name: name.into(),
        image: "plinth.local/busybox:test".into(),
        command,
        environment: vec!["GREETING=hello".into()],
        host_network,
        mounts: vec![(site.clone(), "/www".into(), true)],
        log: work.join(format!("{name}.log")),
    };

    // A command's output goes to its log; its exit status comes back.
    let said = spec(
        "said",
        vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo $GREETING from $(cat /www/index.html); exit 3".into(),
        ],
        false,
    );
    host.containerd
        .start_container(&said)
        .await
        .expect("starts");
    assert_eq!(host.containerd.wait("said").await.expect("waits"), 3);
    let log = std::fs::read_to_string(&said.log).expect("log");
    assert!(log.contains("hello from from a container"), "{log}");
    host.containerd
        .remove_container("said")
        .await
        .expect("removes");

    // On the host network it listens on the node's loopback itself.
    let ports = free_ports(2);
    let port = ports[0];
    let web = spec(
        "web-host",
        vec![
            "/bin/httpd".into(),
            "-f".into(),
            "-p".into(),
            format!("127.0.0.1:{port}"),
            "-h".into(),
            "/www".into(),
        ],
        true,
    );
    let pid = host.containerd.start_container(&web).await.expect("starts");
    assert!(pid > 0);
    assert!(get(port).await.contains("from a container"));
    let listed = host.containerd.containers().await.expect("lists");
    assert!(
        listed
            .iter()
            .any(|c| c.name == "web-host" && c.state == "running" && c.pid == pid),
        "pid {pid}: {listed:?}"
    );
    // The server is its namespace's PID 1, which the kernel spares the signals it has no
    // handler for: SIGTERM does nothing here (the supervisor follows it with SIGKILL at the
    // stop timeout), SIGKILL ends it.
    host.containerd.kill("web-host", 9).await.expect("SIGKILL");
    let status = tokio::time::timeout(Duration::from_secs(20), host.containerd.wait("web-host"))
        .await
        .expect("exits")
        .expect("waits");
    assert_eq!(status, 128 + 9, "killed by SIGKILL");
    host.containerd
        .remove_container("web-host")
        .await
        .expect("removes");

    // On a private network: nothing listens on the node until the port is published.
    let inside = spec(
        "web-private",
        vec![
            "/bin/httpd".into(),
            "-f".into(),
            "-p".into(),
            "80".into(),
            "-h".into(),
            "/www".into(),
        ],
        false,
    );
    let pid = host
        .containerd
        .start_container(&inside)
        .await
        .expect("starts");
    let netns = workloads::network::Netns::of_pid(pid).expect("netns");
    netns.loopback_up().expect("lo up");
    let published = ports[1];
    let stop = tokio_util::sync::CancellationToken::new();
    workloads::network::publish(
        netns,
        std::net::IpAddr::from([127, 0, 0, 1]),
        &[(published, 80)],
        stop.clone(),
    )
    .await
    .expect("publishes");
    assert!(get(published).await.contains("from a container"));
    stop.cancel();
    host.containerd
        .remove_container("web-private")
        .await
        .expect("removes");
    assert!(host
        .containerd
        .containers()
        .await
        .expect("lists")
        .is_empty());

    // A missing image is named.
    let e = host
        .containerd
        .start_container(&ContainerSpec {
            image: "plinth.local/nothing:1".into(),
            ..spec("ghost", vec!["/bin/sh".into()], false)
        })
        .await
        .expect_err("no such image")
        .to_string();
    assert!(
        e.contains("plinth.local/nothing:1") && e.contains("import"),
        "{e}"
    );
}

/// What a debug session printed, and how it ended.
struct Session {
    stdout: String,
    stderr: String,
    ending: workloads::debug::Ending,
}

/// Runs a debug session of `command` with `stdin` sent (then closed), to its end.
async fn debug(
    host: &Host,
    name: &str,
    command: &[&str],
    terminal: Option<(u16, u16)>,
    stdin: &[&str],
) -> Session {
    use workloads::debug::{DebugSpec, Input, Output};
    let dir = host.dir.join("debug").join(name);
    let task = host
        .containerd
        .start_debug(
            &DebugSpec {
                name: name.into(),
                image: "plinth.local/busybox:test".into(),
                command: command.iter().map(|s| s.to_string()).collect(),
                terminal,
            },
            &dir,
        )
        .await
        .expect("starts");
    assert!(task.pid > 0 && task.digest.starts_with("sha256:"));
    let input = futures::stream::iter(
        stdin
            .iter()
            .map(|s| Ok(Input::Stdin(s.as_bytes().to_vec())))
            .collect::<Vec<_>>(),
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let run = tokio::spawn(task.run(input, tx, |o| o, tokio_util::sync::CancellationToken::new()));
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    while let Some(o) = rx.recv().await {
        match o {
            Output::Stdout(b) => stdout.extend(b),
            Output::Stderr(b) => stderr.extend(b),
        }
    }
    let ending = run.await.expect("runs");
    assert!(!dir.exists(), "the FIFOs are removed");
    Session {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        ending,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debug_container_runs_in_the_hosts_namespaces_with_its_root_at_host() {
    use workloads::debug::{DebugSpec, Ending, Input};
    let host = Host::start("containerd-debug");
    host.ready().await;
    let work = host.dir.join("work");
    std::fs::create_dir_all(&work).expect("mkdir");
    let archive = workloads::oci::read(&busybox_archive(&work)).expect("checks");
    host.containerd
        .import(&archive, None, &|_| {})
        .await
        .expect("imports");

    // The host's PID 1 and its root, seen from inside.
    let s = debug(
        &host,
        "debug-comm",
        &["cat", "/host/proc/1/comm"],
        None,
        &[],
    )
    .await;
    let comm = std::fs::read_to_string("/proc/1/comm").expect("comm");
    assert_eq!(s.stdout, comm);
    assert_eq!(s.ending, Ending::Exited(0));
    let s = debug(
        &host,
        "debug-pid",
        &[
            "sh",
            "-c",
            "readlink /proc/self/ns/pid; readlink /proc/self/ns/net",
        ],
        None,
        &[],
    )
    .await;
    let ns = |n: &str| {
        std::fs::read_link(format!("/proc/self/ns/{n}"))
            .expect("ns")
            .display()
            .to_string()
    };
    assert_eq!(
        s.stdout,
        format!("{}\n{}\n", ns("pid"), ns("net")),
        "{:?} {:?}",
        s.stderr,
        s.ending
    );

    // Stdin reaches the program, end-of-file included; stderr and the exit status come back.
    let s = debug(&host, "debug-cat", &["cat"], None, &["hello ", "debug\n"]).await;
    assert_eq!(
        (s.stdout.as_str(), s.ending),
        ("hello debug\n", Ending::Exited(0))
    );
    let s = debug(
        &host,
        "debug-err",
        &["sh", "-c", "echo oops >&2; exit 4"],
        None,
        &[],
    )
    .await;
    assert_eq!((s.stderr.as_str(), s.ending), ("oops\n", Ending::Exited(4)));

    // On a terminal of the size asked for.
    let s = debug(
        &host,
        "debug-tty",
        &[
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo terminal; stty size",
        ],
        Some((33, 101)),
        &[],
    )
    .await;
    assert!(
        s.stdout.contains("terminal") && s.stdout.contains("33 101"),
        "{:?}",
        s.stdout
    );

    // Output written just before the exit all arrives, to a caller that reads slowly.
    let task = host
        .containerd
        .start_debug(
            &DebugSpec {
                name: "debug-lines".into(),
                image: "plinth.local/busybox:test".into(),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done".into(),
                ],
                terminal: None,
            },
            &host.dir.join("debug/lines"),
        )
        .await
        .expect("starts");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<workloads::debug::Output>(2);
    let run = tokio::spawn(task.run(
        futures::stream::empty(),
        tx,
        |o| o,
        tokio_util::sync::CancellationToken::new(),
    ));
    let mut got = Vec::new();
    while let Some(o) = rx.recv().await {
        if let workloads::debug::Output::Stdout(b) = o {
            got.extend(b);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(run.await.expect("runs"), Ending::Exited(0));
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.lines().count(), 20000);
    assert_eq!(text.lines().last(), Some("line-19999"));

    // The node ending the session kills and removes the container.
    let task = host
        .containerd
        .start_debug(
            &DebugSpec {
                name: "debug-stop".into(),
                image: "plinth.local/busybox:test".into(),
                command: vec!["sleep".into(), "1000".into()],
                terminal: None,
            },
            &host.dir.join("debug/stop"),
        )
        .await
        .expect("starts");
    let (tx, _rx) = tokio::sync::mpsc::channel::<workloads::debug::Output>(4);
    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(task.run(
        futures::stream::pending::<Result<Input, String>>(),
        tx,
        |o| o,
        stop.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let ending = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("ends")
        .expect("runs");
    assert_eq!(ending, Ending::Cancelled);
    assert!(!host.dir.join("debug/stop").exists());

    // The caller going away kills and removes the container.
    let task = host
        .containerd
        .start_debug(
            &DebugSpec {
                name: "debug-gone".into(),
                image: "plinth.local/busybox:test".into(),
                command: vec!["sleep".into(), "1000".into()],
                terminal: None,
            },
            &host.dir.join("debug/gone"),
        )
        .await
        .expect("starts");
    let (tx, rx) = tokio::sync::mpsc::channel::<workloads::debug::Output>(4);
    let never = futures::stream::pending::<Result<Input, String>>();
    let run = tokio::spawn(task.run(never, tx, |o| o, tokio_util::sync::CancellationToken::new()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(rx);
    let ending = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("ends")
        .expect("runs");
    assert_eq!(ending, Ending::CallerGone);
    assert!(host
        .containerd
        .containers()
        .await
        .expect("lists")
        .is_empty());

    // A missing image is named, and nothing is left.
    let e = host
        .containerd
        .start_debug(
            &DebugSpec {
                name: "debug-ghost".into(),
                image: "plinth.local/nothing:1".into(),
                command: vec![],
                terminal: None,
            },
            &host.dir.join("debug/ghost"),
        )
        .await
        .err()
        .expect("no such image")
        .to_string();
    assert!(e.contains("plinth.local/nothing:1"), "{e}");
    assert!(!host.dir.join("debug/ghost").exists());
    assert!(host
        .containerd
        .containers()
        .await
        .expect("lists")
        .is_empty());
}
