//! Version and Status: what the node runs, its lifecycle state, its slots and boot entries.

use std::path::Path;

use api::proto::{StatusResponse, VersionResponse};
use phases::runtime::paths;
use phases::tasks::system::release_version;
use phases::Runtime;

/// The facts of this boot, read once when the API starts.
pub fn fixed_version(runtime: &Runtime) -> VersionResponse {
    let p = &runtime.platform;
    let (root_fstype, root_source) = p
        .mounts()
        .ok()
        .and_then(|m| m.into_iter().rev().find(|m| m.target == Path::new("/")))
        .map(|m| (m.fstype, m.source))
        .unwrap_or_default();
    let release = p
        .read(Path::new(paths::RELEASE))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    VersionResponse {
        version: release_version(&release).unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
        node_name: String::new(),
        slot: runtime
            .boot()
            .map(|b| b.slot.to_string())
            .unwrap_or_default(),
        machined_pid: std::process::id(),
        root_fstype,
        root_source,
        boot_id: p.boot_id(),
        arch: std::env::consts::ARCH.into(),
        kernel: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        state: String::new(),
        root_partition: runtime
            .boot()
            .map(|b| b.root_device.display().to_string())
            .unwrap_or_default(),
    }
}

/// The Version reply: the fixed facts, the node's name and its state now.
pub fn version(runtime: &Runtime, fixed: &VersionResponse) -> VersionResponse {
    VersionResponse {
        state: runtime.controller.state().to_string(),
        node_name: runtime.config().map(|c| c.machine.name).unwrap_or_default(),
        ..fixed.clone()
    }
}

fn slot_status(slot: upgrade::Slot, r: &upgrade::meta::SlotRecord) -> api::proto::SlotStatus {
    api::proto::SlotStatus {
        slot: slot.to_string(),
        state: r.state.as_str().into(),
        version: r.version.clone(),
        attempts: r.attempts,
        failure: r.failure.clone().unwrap_or_default(),
        breadcrumbs: r.breadcrumbs.iter().map(ToString::to_string).collect(),
        security_version: r.security_version,
    }
}

/// The Status reply: state, running sequence, both slots' records from META, the boot entries.
pub fn status(runtime: &Runtime, fixed: &VersionResponse) -> StatusResponse {
    let state = runtime.controller.state();
    let (running_sequence, running_actor_id) = runtime
        .controller
        .running()
        .map(|(k, a)| (k.to_string(), a))
        .unwrap_or_default();
    let meta = phases::slots::read_meta(runtime)
        .ok()
        .flatten()
        .map(|l| l.meta);
    let vars = runtime.platform.efivars();
    let entries = vars.readable_boot_entries().unwrap_or_default();
    let mut boot_entries: Vec<api::proto::BootEntry> = entries
        .readable
        .into_iter()
        .map(|(n, o)| api::proto::BootEntry {
            number: u32::from(n),
            description: o.description.to_string_lossy(),
            path: o.file_path_list.to_string(),
            active: o.is_active(),
        })
        .collect();
    boot_entries.extend(
        entries
            .unreadable
            .into_iter()
            .map(|n| api::proto::BootEntry {
                number: u32::from(n),
                description: "(cannot be decoded)".into(),
                path: String::new(),
                active: false,
            }),
    );
    boot_entries.sort_by_key(|e| e.number);
    let cfg = runtime.config();
    StatusResponse {
        machine_type: cfg
            .as_ref()
            .map(|c| c.machine.machine_type.as_str().to_string())
            .unwrap_or_default(),
        cluster: cfg
            .as_ref()
            .and_then(|c| c.cluster.as_ref())
            .map(|c| c.name.clone())
            .unwrap_or_default(),
        controlplanes: cfg
            .as_ref()
            .and_then(|c| c.cluster.as_ref())
            .map(|c| c.controlplanes.iter().map(|m| m.name.clone()).collect())
            .unwrap_or_default(),
        machined_rss_kib: rss_kib().unwrap_or(0),
        state: state.to_string(),
        superstate: state.superstate().into(),
        running_sequence,
        running_actor_id,
        slot: fixed.slot.clone(),
        boot_id: fixed.boot_id.clone(),
        slots: meta
            .as_ref()
            .map(|m| {
                upgrade::Slot::ALL
                    .iter()
                    .map(|s| slot_status(*s, m.slot(*s)))
                    .collect()
            })
            .unwrap_or_default(),
        committed: meta
            .as_ref()
            .map(|m| m.committed.to_string())
            .unwrap_or_default(),
        security_floor: meta.as_ref().map_or(0, |m| m.security_floor),
        boot_entries,
        boot_order: vars
            .boot_order()
            .unwrap_or_default()
            .into_iter()
            .map(u32::from)
            .collect(),
        boot_current: vars.boot_current().ok().flatten().map(u32::from),
        boot_next: vars.boot_next().ok().flatten().map(u32::from),
        last_failure: meta
            .and_then(|m| m.last_failure)
            .map(|f| api::proto::TrialFailure {
                slot: f.slot.to_string(),
                version: f.version,
                reason: f.reason,
                unix_ms: f.unix_ms,
            }),
        trial: runtime.trial(),
        trust: Some(trust(runtime)),
    }
}

/// The chain of trust as this boot has it.
fn trust(runtime: &Runtime) -> api::proto::Trust {
    let p = &runtime.platform;
    let secure_boot = bootloader::secureboot::mode(&p.efivars())
        .map(|m| m.to_string())
        .unwrap_or_else(|e| format!("unknown: {e}"));
    let mapped = runtime.boot().and_then(|b| b.verity);
    let verity_state = mapped
        .as_ref()
        .map(|m| match p.mapping_status(&m.name) {
            // dm-verity's status: V while every block read verified, C once one did not.
            Ok(Some(s)) if s.trim() == "V" => "verified".to_string(),
            Ok(Some(s)) if s.trim() == "C" => "corrupted".to_string(),
            Ok(Some(s)) => s,
            Ok(None) => "not mapped".to_string(),
            Err(e) => format!("unknown: {e}"),
        })
        .unwrap_or_default();
    let tpm = p.tpm().ok().flatten();
    let volumes: Vec<api::proto::VolumeProtection> = runtime
        .volumes()
        .into_iter()
        .map(|v| {
            let (encrypted, pcrs) = match &v.protection {
                phases::volume::Protection::Sealed { pcrs, .. } => (true, pcrs.clone()),
                phases::volume::Protection::Locked(_) => (true, Vec::new()),
                phases::volume::Protection::Plain(_) => (false, Vec::new()),
            };
            api::proto::VolumeProtection {
                label: v.label,
                encrypted,
                detail: v.protection.to_string(),
                pcrs,
            }
        })
        .collect();
    let mut pcrs = Vec::new();
    let has_tpm = tpm.is_some();
    if let Some(mut tpm) = tpm {
        let which = [tpm::policy::PCR_SECURE_BOOT, tpm::policy::PCR_UKI];
        if let Ok(values) = tpm.pcr_read(&which) {
            pcrs = which
                .iter()
                .zip(values)
                .map(|(i, v)| api::proto::PcrValue {
                    index: *i,
                    sha256: tpm::policy::hex(&v),
                })
                .collect();
        }
    }
    api::proto::Trust {
        secure_boot,
        verity_root: mapped.map(|m| m.root.root).unwrap_or_default(),
        verity_state,
        tpm: if has_tpm { "TPM 2.0" } else { "none" }.into(),
        volumes,
        pcrs,
    }
}

/// The supervised services.
pub fn services(runtime: &Runtime) -> Vec<api::proto::ServiceInfo> {
    runtime
        .services
        .list()
        .into_iter()
        .map(|s| api::proto::ServiceInfo {
            name: s.name,
            state: s.state.as_str().into(),
            pid: s.pid.unwrap_or(0),
            restarts: s.restarts,
            healthy: s.healthy,
            last_exit: s.last_exit.unwrap_or_default(),
            depends_on: s.depends_on,
        })
        .collect()
}

/// The system extensions found at boot, as `plinth get extensions` shows them.
pub fn extensions(runtime: &Runtime) -> api::proto::ExtensionListResponse {
    api::proto::ExtensionListResponse {
        extensions: runtime
            .extensions()
            .into_iter()
            .map(|e| {
                let (refused_reason, refused_message) = e.refused.unwrap_or_default();
                api::proto::ExtensionInfo {
                    name: e.name,
                    version: e.version,
                    level: e.level,
                    digest: e.digest,
                    file: e.file,
                    active: e.active,
                    refused_reason,
                    refused_message,
                }
            })
            .collect(),
        os_level: phases::extensions::os_level(runtime),
    }
}

/// machined's resident set, from `/proc/self/status` (`VmRSS:   12345 kB`).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
