//! Containers through containerd's API: the image's config and the node's settings made into
//! an OCI runtime spec, a writable snapshot on the image's unpacked layers, a container record
//! and its task (run by containerd's runc shim), its output appended to a file.
//!
//! Names are machined's: a container named `web` is containerd's container `web` and its
//! snapshot `web` in the `plinth` namespace. Starting one first clears whatever an earlier run
//! of that name left (a task, a record, a snapshot), so a restart after a crash of machined or
//! containerd begins clean.

use std::collections::HashMap;
use std::path::PathBuf;

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, RemoveSnapshotRequest};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{
    container, Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, GetImageRequest, KillRequest, ListContainersRequest, ListTasksRequest,
    ReadContentRequest, StartRequest, WaitRequest,
};
use oci_spec::image::{ImageConfiguration, ImageManifest};
use oci_spec::runtime::{
    Capability, LinuxCapabilitiesBuilder, LinuxDeviceCgroupBuilder, LinuxNamespaceType,
    LinuxPidsBuilder, Mount, MountBuilder, Spec, UserBuilder,
};
use tonic::transport::Channel;

use crate::containerd::{Containerd, Error};
use crate::images::{call, request, SNAPSHOTTER};
use crate::oci::chain_ids;

/// The runtime containerd runs them with (its runc shim).
const RUNTIME: &str = "io.containerd.runc.v2";
/// The type containerd stores an OCI runtime spec under.
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The cgroup every container's own cgroup is made under.
const CGROUP_PARENT: &str = "/plinth";
/// The most processes one container may have.
const PIDS_MAX: i64 = 4096;
/// The largest image manifest or config read.
const MAX_DOCUMENT: i64 = 4 << 20;

/// What machined asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Its name (the containerd container's id).
    pub name: String,
    /// The image's normalised reference.
    pub image: String,
    /// Program and arguments; empty for the image's entrypoint and command.
    pub command: Vec<String>,
    /// `KEY=VALUE` over the image's.
    pub environment: Vec<String>,
    /// The node's network namespace; otherwise its own, with only loopback.
    pub host_network: bool,
    /// (directory on the node, path in the container, read-only).
    pub mounts: Vec<(PathBuf, String, bool)>,
    /// Where its output is appended.
    pub log: PathBuf,
}

/// A container as containerd has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStatus {
    /// Its name.
    pub name: String,
    /// Its image.
    pub image: String,
    /// Its task's state (`running`, `stopped`, `created`, ...), or `no task`.
    pub state: String,
    /// Its task's PID (in the node's PID namespace), 0 without one.
    pub pid: u32,
}

/// The capabilities a container's process gets: containerd's (and Docker's) default set.
const CAPABILITIES: &[Capability] = &[
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

impl Containerd {
    /// Starts the container `spec` describes; returns its task's PID. What an earlier run of
    /// the same name left is cleared first.
    pub async fn start_container(&self, spec: &ContainerSpec) -> Result<u32, Error> {
        let channel = self.connect().await?;
        remove(&channel, &spec.name).await;
        let image = image_config(&channel, &spec.image).await?;
        let runtime_spec = runtime_spec(spec, &image.config)?;
        let log = format!("file://{}", spec.log.display());
        let io = TaskIo {
            stdin: String::new(),
            stdout: log.clone(),
            stderr: log,
            terminal: false,
        };
        create_and_start(&channel, &spec.name, &image, &runtime_spec, io).await
    }

    /// Waits until the container's task exits; returns its exit status.
    pub async fn wait(&self, name: &str) -> Result<u32, Error> {
        let channel = self.connect().await?;
        let r = TasksClient::new(channel)
            .wait(request(
                WaitRequest {
                    container_id: name.into(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(call("Tasks.Wait"))?;
        Ok(r.into_inner().exit_status)
    }

    /// Sends `signal` to every process of the container.
    pub async fn kill(&self, name: &str, signal: i32) -> Result<(), Error> {
        let channel = self.connect().await?;
        TasksClient::new(channel)
            .kill(request(
                KillRequest {
                    container_id: name.into(),
                    exec_id: String::new(),
                    signal: signal as u32,
                    all: true,
                },
                None,
            ))
            .await
            .map_err(call("Tasks.Kill"))?;
        Ok(())
    }

    /// Removes the container's task, record and snapshot (each if there).
    pub async fn remove_container(&self, name: &str) -> Result<(), Error> {
        let channel = self.connect().await?;
        remove(&channel, name).await;
        Ok(())
    }

    /// The containers in machined's namespace with their tasks' states.
    pub async fn containers(&self) -> Result<Vec<ContainerStatus>, Error> {
        let channel = self.connect().await?;
        let records = ContainersClient::new(channel.clone())
            .list(request(ListContainersRequest::default(), None))
            .await
            .map_err(call("Containers.List"))?
            .into_inner()
            .containers;
        let tasks = TasksClient::new(channel)
            .list(request(ListTasksRequest::default(), None))
            .await
            .map_err(call("Tasks.List"))?
            .into_inner()
            .tasks;
        Ok(records
            .into_iter()
            .map(|c| {
                // containerd 1.6 names a task's container in `id` and leaves `container_id`
                // empty; later releases fill in both.
                let task = tasks.iter().find(|t| {
                    t.container_id == c.id || (t.container_id.is_empty() && t.id == c.id)
                });
                ContainerStatus {
                    state: task
                        .map(|t| {
                            containerd_client::types::v1::Status::try_from(t.status)
                                .map(|s| s.as_str_name().to_lowercase())
                                .unwrap_or_else(|_| "unknown".into())
                        })
                        .unwrap_or_else(|| "no task".into()),
                    pid: task.map(|t| t.pid).unwrap_or(0),
                    name: c.id,
                    image: c.image,
                }
            })
            .collect())
    }
}

/// Refuses a mount source with a symbolic link on its way (a container with a writable
/// mount could plant one to make a later mount bind the node's root): checked before the
/// directory is made, as the directory's creation and runc's bind would follow it.
pub fn check_mount_source(source: &std::path::Path) -> Result<(), Error> {
    let mut at = PathBuf::from("/");
    for part in source.components().skip(1) {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Error::Refused(format!(
                    "mount source {}: {} is a symbolic link",
                    source.display(),
                    at.display()
                )))
            }
            Ok(_) => {}
            // The rest is made as directories.
            Err(_) => return Ok(()),
        }
    }
    Ok(())
}

/// Deletes the task (killing it if it runs), the record and the snapshot of `name`; each
/// that is not there is fine.
pub(crate) async fn remove(channel: &Channel, name: &str) {
    let mut tasks = TasksClient::new(channel.clone());
    let kill = KillRequest {
        container_id: name.into(),
        exec_id: String::new(),
        signal: 9,
        all: true,
    };
    if tasks.kill(request(kill, None)).await.is_ok() {
        let wait = WaitRequest {
            container_id: name.into(),
            exec_id: String::new(),
        };
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tasks.wait(request(wait, None)),
        )
        .await;
    }
    let _ = tasks
        .delete(request(
            DeleteTaskRequest {
                container_id: name.into(),
            },
            None,
        ))
        .await;
    let _ = ContainersClient::new(channel.clone())
        .delete(request(DeleteContainerRequest { id: name.into() }, None))
        .await;
    let _ = SnapshotsClient::new(channel.clone())
        .remove(request(
            RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: name.into(),
            },
            None,
        ))
        .await;
}

/// Whether containerd holds a container `name`; `None` when it does not answer.
pub(crate) async fn exists(channel: &Channel, name: &str) -> Option<bool> {
    let got = ContainersClient::new(channel.clone())
        .get(request(
            containerd_client::services::v1::GetContainerRequest { id: name.into() },
            None,
        ))
        .await;
    match got {
        Ok(_) => Some(true),
        Err(s) if s.code() == tonic::Code::NotFound => Some(false),
        Err(_) => None,
    }
}

/// Where a task's standard streams go: `file://` URIs or FIFO paths; empty for none.
pub(crate) struct TaskIo {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// Creates the container `name` from `image` with `runtime_spec` (record, then a writable
/// snapshot on the image's top layer), then its task with `io`, and starts it; returns the
/// task's PID. Whatever was made is removed again when a step fails.
pub(crate) async fn create_and_start(
    channel: &Channel,
    name: &str,
    image: &Image,
    runtime_spec: &Spec,
    io: TaskIo,
) -> Result<u32, Error> {
    let top = chain_ids(image.config.rootfs().diff_ids())
        .pop()
        .ok_or_else(|| Error::Refused(format!("image {} has no layers", image.name)))?;
    let json = serde_json::to_vec(runtime_spec)
        .map_err(|e| Error::Refused(format!("encoding the runtime spec: {e}")))?;
    let record = Container {
        id: name.to_string(),
        image: image.name.clone(),
        runtime: Some(container::Runtime {
            name: RUNTIME.into(),
            options: None,
        }),
        spec: Some(prost_types::Any {
            type_url: SPEC_TYPE.into(),
            value: json,
        }),
        snapshotter: SNAPSHOTTER.into(),
        snapshot_key: name.to_string(),
        labels: HashMap::from([("plinth.dev/managed".to_string(), "true".to_string())]),
        ..Default::default()
    };
    ContainersClient::new(channel.clone())
        .create(request(
            CreateContainerRequest {
                container: Some(record),
            },
            None,
        ))
        .await
        .map_err(call("Containers.Create"))?;
    // The snapshot after the record that names it: garbage collection (which a removal
    // elsewhere can start at any moment) keeps a snapshot a container names, and would
    // take one that nothing names yet.
    let mut snapshots = SnapshotsClient::new(channel.clone());
    let prepared = snapshots
        .prepare(request(
            PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: name.to_string(),
                parent: top,
                labels: HashMap::new(),
            },
            None,
        ))
        .await;
    let mounts = match prepared {
        Ok(r) => r.into_inner().mounts,
        Err(s) => {
            remove(channel, name).await;
            return Err(match s.code() {
                tonic::Code::NotFound => Error::Refused(format!(
                    "image {} is not unpacked on this node: import it again",
                    image.name
                )),
                _ => call("Snapshots.Prepare")(s),
            });
        }
    };
    let mut tasks = TasksClient::new(channel.clone());
    let created = tasks
        .create(request(
            CreateTaskRequest {
                container_id: name.to_string(),
                rootfs: mounts,
                stdin: io.stdin,
                stdout: io.stdout,
                stderr: io.stderr,
                terminal: io.terminal,
                ..Default::default()
            },
            None,
        ))
        .await;
    if let Err(s) = created {
        remove(channel, name).await;
        return Err(call("Tasks.Create")(s));
    }
    let started = tasks
        .start(request(
            StartRequest {
                container_id: name.to_string(),
                exec_id: String::new(),
            },
            None,
        ))
        .await;
    match started {
        Ok(r) => Ok(r.into_inner().pid),
        Err(s) => {
            remove(channel, name).await;
            Err(call("Tasks.Start")(s))
        }
    }
}

/// Reads a blob of the content store whole (at most [`MAX_DOCUMENT`]).
async fn read_blob(channel: &Channel, digest: &str, size: i64) -> Result<Vec<u8>, Error> {
    if size > MAX_DOCUMENT {
        return Err(Error::Refused(format!(
            "{digest} is {size} bytes: too large for a manifest or config"
        )));
    }
    let mut stream = ContentClient::new(channel.clone())
        .read(request(
            ReadContentRequest {
                digest: digest.into(),
                offset: 0,
                size: 0,
            },
            None,
        ))
        .await
        .map_err(call("Content.Read"))?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(call("Content.Read"))? {
        out.extend_from_slice(&chunk.data);
        if out.len() as i64 > MAX_DOCUMENT {
            return Err(Error::Refused(format!("{digest} is too large")));
        }
    }
    Ok(out)
}

/// An image as containerd holds it.
pub(crate) struct Image {
    /// The image record's name.
    pub name: String,
    /// Its manifest's digest.
    pub digest: String,
    /// Its config.
    pub config: ImageConfiguration,
}

/// The image record `reference` and its config.
pub(crate) async fn image_config(channel: &Channel, reference: &str) -> Result<Image, Error> {
    let image = ImagesClient::new(channel.clone())
        .get(request(
            GetImageRequest {
                name: reference.into(),
            },
            None,
        ))
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => Error::Refused(format!(
                "image {reference} is not on this node: plinth image import it first"
            )),
            _ => call("Images.Get")(s),
        })?
        .into_inner()
        .image
        .and_then(|i| i.target)
        .ok_or_else(|| Error::Refused(format!("image {reference} has no target")))?;
    let manifest: ImageManifest =
        serde_json::from_slice(&read_blob(channel, &image.digest, image.size).await?)
            .map_err(|e| Error::Refused(format!("the manifest of {reference}: {e}")))?;
    let c = manifest.config();
    let config: ImageConfiguration =
        serde_json::from_slice(&read_blob(channel, c.digest().as_ref(), c.size() as i64).await?)
            .map_err(|e| Error::Refused(format!("the config of {reference}: {e}")))?;
    Ok(Image {
        name: reference.to_string(),
        digest: image.digest,
        config,
    })
}

/// The OCI runtime spec of a container: the defaults of runc's own `spec` made stricter (a
/// device cgroup that denies what is not listed, containerd's capability set), the image's
/// process settings under the node's, the node's mounts.
pub fn runtime_spec(c: &ContainerSpec, image: &ImageConfiguration) -> Result<Spec, Error> {
    let refused = |e: oci_spec::OciSpecError| Error::Refused(format!("container {}: {e}", c.name));
    let settings = image.config().clone().unwrap_or_default();
    let args = if c.command.is_empty() {
        let mut a = settings.entrypoint().clone().unwrap_or_default();
        a.extend(settings.cmd().clone().unwrap_or_default());
        a
    } else {
        c.command.clone()
    };
    if args.is_empty() {
        return Err(Error::Refused(format!(
            "container {}: the image {} has no entrypoint or command, and the config gives none",
            c.name, c.image
        )));
    }
    let mut env: Vec<String> = settings.env().clone().unwrap_or_default();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    for e in &c.environment {
        let key = e.split('=').next().unwrap_or_default();
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let (uid, gid) = user(settings.user().as_deref().unwrap_or("")).ok_or_else(|| {
        Error::Refused(format!(
            "container {}: the image's user {:?} is not numeric (uid or uid:gid)",
            c.name,
            settings.user().clone().unwrap_or_default()
        ))
    })?;
    let caps: std::collections::HashSet<Capability> = CAPABILITIES.iter().copied().collect();
    // Inheritable and ambient stay empty (the builder would fill them with its defaults): a
    // process of a non-root user gets no capability by exec.
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(std::collections::HashSet::new())
        .ambient(std::collections::HashSet::new())
        .build()
        .map_err(refused)?;
    let mut spec = Spec::default();
    spec.set_hostname(Some(c.name.clone()));
    if let Some(root) = spec.root_mut() {
        root.set_readonly(Some(false));
    }
    if let Some(p) = spec.process_mut() {
        p.set_args(Some(args));
        p.set_env(Some(env));
        p.set_cwd(
            settings
                .working_dir()
                .clone()
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "/".into())
                .into(),
        );
        p.set_user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(refused)?,
        );
        p.set_capabilities(Some(capabilities));
    }
    let mut mounts: Vec<Mount> = spec.mounts().clone().unwrap_or_default();
    for (source, destination, read_only) in &c.mounts {
        let mut options = vec!["rbind".to_string(), "nosuid".into(), "nodev".into()];
        options.push(if *read_only { "ro" } else { "rw" }.into());
        mounts.push(
            MountBuilder::default()
                .destination(destination)
                .typ("bind")
                .source(source)
                .options(options)
                .build()
                .map_err(refused)?,
        );
    }
    spec.set_mounts(Some(mounts));
    if let Some(linux) = spec.linux_mut() {
        linux.set_cgroups_path(Some(PathBuf::from(format!("{CGROUP_PARENT}/{}", c.name))));
        if c.host_network {
            let namespaces = linux
                .namespaces()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Network)
                .collect();
            linux.set_namespaces(Some(namespaces));
        }
        if let Some(resources) = linux.resources_mut() {
            // Deny every device but those runc always allows (null, zero, tty, ...).
            resources.set_devices(Some(vec![LinuxDeviceCgroupBuilder::default()
                .allow(false)
                .access("rwm")
                .build()
                .map_err(refused)?]));
            // A fork bomb in a container must not take the node's PIDs (machined spawns too).
            resources.set_pids(Some(
                LinuxPidsBuilder::default()
                    .limit(PIDS_MAX)
                    .build()
                    .map_err(refused)?,
            ));
        }
    }
    Ok(spec)
}

/// A numeric `uid[:gid]` (empty: root).
fn user(s: &str) -> Option<(u32, u32)> {
    if s.is_empty() {
        return Some((0, 0));
    }
    match s.split_once(':') {
        Some((u, g)) => Some((u.parse().ok()?, g.parse().ok()?)),
        None => {
            let u = s.parse().ok()?;
            Some((u, u))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(command: &[&str], host: bool) -> ContainerSpec {
        ContainerSpec {
            name: "web".into(),
            image: "plinth.local/busybox:latest".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            environment: vec!["A=1".into(), "PATH=/bin".into()],
            host_network: host,
            mounts: vec![(PathBuf::from("/var/lib/web"), "/data".into(), true)],
            log: PathBuf::from("/var/log/services/web.log"),
        }
    }

    fn image(config: serde_json::Value) -> ImageConfiguration {
        serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": []},
        }))
        .expect("config")
    }

    #[test]
    fn the_image_gives_the_defaults_and_the_node_config_wins() {
        let img = image(serde_json::json!({
            "Entrypoint": ["/bin/httpd"], "Cmd": ["-f"], "Env": ["PATH=/usr/bin", "B=2"],
            "WorkingDir": "/srv", "User": "1000:1001",
        }));
        let s = runtime_spec(&spec(&[], false), &img).expect("spec");
        let p = s.process().clone().expect("process");
        assert_eq!(p.args().clone().expect("args"), ["/bin/httpd", "-f"]);
        assert_eq!(
            p.env().clone().expect("env"),
            ["B=2", "A=1", "PATH=/bin"],
            "the config's PATH replaces the image's"
        );
        assert_eq!(p.cwd(), &PathBuf::from("/srv"));
        assert_eq!((p.user().uid(), p.user().gid()), (1000, 1001));
        let s = runtime_spec(&spec(&["/bin/sh", "-c", "true"], false), &img).expect("spec");
        assert_eq!(
            s.process()
                .clone()
                .expect("p")
                .args()
                .clone()
                .expect("args"),
            ["/bin/sh", "-c", "true"]
        );
    }

    #[test]
    fn the_host_network_drops_the_network_namespace_only() {
        let img = image(serde_json::json!({"Cmd": ["/bin/sh"]}));
        let kinds = |host| {
            runtime_spec(&spec(&[], host), &img)
                .expect("spec")
                .linux()
                .clone()
                .expect("linux")
                .namespaces()
                .clone()
                .expect("namespaces")
                .iter()
                .map(|n| n.typ())
                .collect::<Vec<_>>()
        };
        assert!(kinds(false).contains(&LinuxNamespaceType::Network));
        assert!(!kinds(true).contains(&LinuxNamespaceType::Network));
        assert!(kinds(true).contains(&LinuxNamespaceType::Pid));
    }

    #[test]
    fn mounts_are_bound_read_only_when_asked_and_devices_denied_by_default() {
        let img = image(serde_json::json!({"Cmd": ["/bin/sh"]}));
        let s = runtime_spec(&spec(&[], false), &img).expect("spec");
        let m = s
            .mounts()
            .clone()
            .expect("mounts")
            .into_iter()
            .find(|m| m.destination() == &PathBuf::from("/data"))
            .expect("the bind mount");
        let options = m.options().clone().expect("options");
        assert!(options.contains(&"ro".to_string()) && options.contains(&"rbind".to_string()));
        let devices = s
            .linux()
            .clone()
            .expect("linux")
            .resources()
            .clone()
            .expect("resources")
            .devices()
            .clone()
            .expect("devices");
        assert_eq!(devices.len(), 1);
        assert!(!devices[0].allow());
        let resources = s
            .linux()
            .clone()
            .expect("linux")
            .resources()
            .clone()
            .expect("r");
        assert_eq!(resources.pids().expect("pids").limit(), PIDS_MAX);
        let caps = s
            .process()
            .clone()
            .expect("process")
            .capabilities()
            .clone()
            .expect("caps");
        assert_eq!(caps.inheritable().clone().map(|c| c.len()), Some(0));
        assert_eq!(caps.ambient().clone().map(|c| c.len()), Some(0));
        assert!(caps
            .effective()
            .clone()
            .expect("e")
            .contains(&Capability::NetBindService));
    }

    #[test]
    fn an_image_without_a_command_or_with_a_named_user_is_refused() {
        let e = runtime_spec(&spec(&[], false), &image(serde_json::json!({})))
            .expect_err("no command")
            .to_string();
        assert!(e.contains("no entrypoint or command"), "{e}");
        let e = runtime_spec(
            &spec(&[], false),
            &image(serde_json::json!({"Cmd": ["/x"], "User": "www-data"})),
        )
        .expect_err("named user")
        .to_string();
        assert!(e.contains("not numeric"), "{e}");
    }
}
