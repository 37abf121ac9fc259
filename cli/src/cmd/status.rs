//! `plinth status`.

use api::proto::{StatusRequest, StatusResponse};

use crate::connect::{status_error, Target};
use crate::fanout::{print, Show};
use crate::output::Format;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t)]
    output: Format,
    /// Ask a node in maintenance mode (no config yet, or its STATE locked): no client
    /// certificate; the node's self-signed certificate is accepted and its fingerprint shown.
    #[arg(long)]
    insecure: bool,
    /// With --insecure: only accept the node certificate with this SHA-256 (as its console
    /// prints it).
    #[arg(long, requires = "insecure")]
    cert_fingerprint: Option<String>,
}

pub async fn run(target: &Target, args: Args) -> anyhow::Result<()> {
    if args.insecure {
        if target.fans_out() {
            anyhow::bail!("--insecure asks one node in maintenance mode (-e), not -n/--nodes");
        }
        let endpoint = target.insecure_endpoint()?;
        let fingerprint = match args.cert_fingerprint.clone() {
            Some(fp) => fp,
            None => api::client::server_fingerprint(&endpoint).await?,
        };
        eprintln!("node certificate SHA-256 {fingerprint} (compare it with the node's console)");
        let mut c = api::client::connect_insecure(&endpoint, Some(fingerprint)).await?;
        let s = c
            .status(StatusRequest {})
            .await
            .map_err(|e| status_error(&endpoint, e))?
            .into_inner();
        match args.output {
            Format::Json => println!("{}", status_json(&endpoint, &s)),
            Format::Text => render(&endpoint, &s),
        }
        return Ok(());
    }
    let replies = target
        .each(|endpoint, mut c| async move {
            c.status(StatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|e| status_error(&endpoint, e))
        })
        .await?;
    let show = Show {
        json: status_json,
        key: "status",
        header: |_| {},
        render: |endpoint: &str, many: bool, s: &StatusResponse| {
            render(endpoint, s);
            if many {
                println!();
            }
        },
    };
    print(target, replies, args.output, show)
}

/// The node's status as a JSON document.
fn status_json(endpoint: &str, s: &StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "endpoint": endpoint,
        "state": s.state,
        "superstate": s.superstate,
        "running_sequence": s.running_sequence,
        "running_actor_id": s.running_actor_id,
        "slot": s.slot,
        "boot_id": s.boot_id,
        "trial": s.trial,
        "committed": s.committed,
        "security_floor": s.security_floor,
        "machined_rss_kib": s.machined_rss_kib,
        "machine_type": s.machine_type,
        "cluster": s.cluster,
        "slots": s.slots.iter().map(|x| serde_json::json!({
            "slot": x.slot, "state": x.state, "version": x.version, "attempts": x.attempts,
            "failure": x.failure, "breadcrumbs": x.breadcrumbs,
            "security_version": x.security_version,
        })).collect::<Vec<_>>(),
        "last_failure": s.last_failure.as_ref().map(|f| serde_json::json!({
            "slot": f.slot, "version": f.version, "reason": f.reason, "unix_ms": f.unix_ms,
        })),
        "boot_current": s.boot_current,
        "boot_next": s.boot_next,
        "boot_order": s.boot_order,
        "boot_entries": s.boot_entries.iter().map(|e| serde_json::json!({
            "number": e.number, "description": e.description, "path": e.path, "active": e.active,
        })).collect::<Vec<_>>(),
        "trust": s.trust.as_ref().map(|t| serde_json::json!({
            "secure_boot": t.secure_boot,
            "verity_root": t.verity_root,
            "verity_state": t.verity_state,
            "tpm": t.tpm,
            "volumes": t.volumes.iter().map(|v| serde_json::json!({
                "label": v.label, "encrypted": v.encrypted, "detail": v.detail, "pcrs": v.pcrs,
            })).collect::<Vec<_>>(),
            "pcrs": t.pcrs.iter().map(|p| serde_json::json!({
                "index": p.index, "sha256": p.sha256,
            })).collect::<Vec<_>>(),
        })),
    })
}

/// The node's status for people.
fn render(endpoint: &str, s: &StatusResponse) {
    println!("Node:     {endpoint}");
    println!("State:    {} ({})", s.state, s.superstate);
    if !s.cluster.is_empty() {
        println!("Cluster:  {} ({})", s.cluster, s.machine_type);
    }
    if !s.running_sequence.is_empty() {
        println!(
            "Running:  {} (actor {})",
            s.running_sequence, s.running_actor_id
        );
    }
    println!(
        "Booted:    slot {}{}",
        s.slot,
        if s.trial { " (trial)" } else { "" }
    );
    println!("Committed: slot {}", s.committed);
    println!("Boot ID:  {}", s.boot_id);
    if s.machined_rss_kib > 0 {
        println!("machined: {} KiB resident", s.machined_rss_kib);
    }
    if let Some(t) = &s.trust {
        println!("Secure Boot: {}", t.secure_boot);
        if t.verity_root.is_empty() {
            println!("Root:     not verified (no dm-verity mapping)");
        } else {
            println!(
                "Root:     dm-verity {}, root hash {}",
                t.verity_state, t.verity_root
            );
        }
        println!("TPM:      {}", t.tpm);
        for v in &t.volumes {
            println!("{:<9} {}", format!("{}:", v.label), v.detail);
        }
        for p in &t.pcrs {
            println!("PCR {:<5} {}", p.index, p.sha256);
        }
    }
    println!(
        "Security floor: {} (bundles below it are refused)",
        s.security_floor
    );
    println!();
    println!(
        "{:<5} {:<8} {:<20} {:>8} {:>8}  DETAIL",
        "SLOT", "STATE", "VERSION", "SECURITY", "ATTEMPTS"
    );
    for slot in &s.slots {
        let detail = if slot.failure.is_empty() {
            slot.breadcrumbs.last().cloned().unwrap_or_default()
        } else {
            slot.failure.clone()
        };
        println!(
            "{:<5} {:<8} {:<20} {:>8} {:>8}  {detail}",
            slot.slot, slot.state, slot.version, slot.security_version, slot.attempts
        );
    }
    if let Some(f) = &s.last_failure {
        println!();
        println!(
            "Last failed trial: slot {} ({}): {}",
            f.slot, f.version, f.reason
        );
    }
    println!();
    let hex = |n: &Option<u32>| n.map(|n| format!("{n:04X}")).unwrap_or_else(|| "-".into());
    let order: Vec<String> = s.boot_order.iter().map(|n| format!("{n:04X}")).collect();
    println!(
        "BootCurrent: {}  BootNext: {}  BootOrder: {}",
        hex(&s.boot_current),
        hex(&s.boot_next),
        order.join(",")
    );
    for e in &s.boot_entries {
        println!(
            "Boot{:04X}{} {}\t{}",
            e.number,
            if e.active { "*" } else { " " },
            e.description,
            e.path
        );
    }
}
