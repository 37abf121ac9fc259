//! Tasks and facts about the running system itself.

use std::path::Path;
use std::sync::Arc;

use sequencer::TaskError;

use crate::platform::MountSpec;
use crate::runtime::{paths, BootInfo, Runtime};

/// Reads what the initramfs found (slot, disk) from `/run`.
pub async fn read_boot_info(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let platform = ctx.platform.clone();
    let info =
        super::blocking(move || BootInfo::load(platform.as_ref(), Path::new(paths::BOOT_INFO)))
            .await??;
    ctx.set_boot(info);
    Ok(())
}

/// Mounts a tmpfs on `/tmp` (the root image is read-only).
pub async fn mount_tmp(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    let spec = MountSpec::new("tmpfs", "/tmp", "tmpfs").data("mode=1777");
    Ok(ctx.platform.mount(&MountSpec {
        restricted: true,
        ..spec
    })?)
}

/// Mounts the cgroup v2 hierarchy and hands every controller the kernel has down to the
/// cgroups below the root (where services and containers go: containerd and runc need cpu,
/// memory, pids, io and cpuset there). `nsdelegate` makes a cgroup namespace a delegation
/// boundary; `memory_recursiveprot` lets memory protection set on a parent cover its children.
pub async fn mount_cgroups(ctx: Arc<Runtime>) -> Result<(), TaskError> {
    super::blocking(move || cgroups(&ctx)).await?
}

fn cgroups(ctx: &Runtime) -> Result<(), TaskError> {
    let p = &ctx.platform;
    p.mount(
        &MountSpec::new("cgroup2", paths::CGROUP, "cgroup2")
            .data("nsdelegate,memory_recursiveprot")
            .restricted(),
    )?;
    let root = Path::new(paths::CGROUP);
    let controllers = p
        .read(&root.join("cgroup.controllers"))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let enable = subtree_control(&controllers);
    if enable.is_empty() {
        return Ok(());
    }
    // Not a reason to stop the boot: the node's own work needs no controller, and what does
    // (containers) fails later saying so.
    match p.write(&root.join("cgroup.subtree_control"), enable.as_bytes()) {
        Ok(()) => tracing::info!("cgroup v2 on {}: {enable}", paths::CGROUP),
        Err(e) => tracing::error!("enabling the cgroup controllers ({enable}): {e}"),
    }
    Ok(())
}

/// What to write to `cgroup.subtree_control` to enable every controller in `controllers`.
pub fn subtree_control(controllers: &str) -> String {
    controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The type and source of the file system mounted on `/`, from a `mountinfo` text (the last
/// entry for `/` is the one on top).
pub fn root_mount(mountinfo: &str) -> Option<(String, String)> {
    crate::platform::linux::parse_mountinfo(mountinfo)
        .into_iter()
        .rev()
        .find(|m| m.target == Path::new("/"))
        .map(|m| (m.fstype, m.source))
}

/// The image's version, from `/etc/plinth-release` (`VERSION=...`).
pub fn release_version(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION="))
        .map(|v| v.trim().trim_matches('"').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_controller_the_kernel_has_is_handed_down() {
        assert_eq!(
            subtree_control("cpuset cpu io memory hugetlb pids rdma misc\n"),
            "+cpuset +cpu +io +memory +hugetlb +pids +rdma +misc"
        );
        assert_eq!(subtree_control(""), "");
    }

    #[test]
    fn the_root_mount_is_the_last_entry_for_slash() {
        let info = "\
1 1 0:2 / / rw - rootfs rootfs rw
22 1 259:3 / / ro,relatime shared:1 - squashfs /dev/nvme0n1p3 ro,errors=continue
23 22 0:5 / /dev rw - devtmpfs devtmpfs rw
";
        assert_eq!(
            root_mount(info),
            Some(("squashfs".into(), "/dev/nvme0n1p3".into()))
        );
    }

    #[test]
    fn the_release_file_gives_the_version() {
        assert_eq!(
            release_version("NAME=Plinth\nVERSION=\"0.1.0-b2\"\n").as_deref(),
            Some("0.1.0-b2")
        );
        assert_eq!(release_version("NAME=Plinth\n"), None);
    }
}
