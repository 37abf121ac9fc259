//! `plinth get config`, `plinth patch config` and `plinth edit config`: read the running
//! config, change it, and apply the result through ApplyConfiguration (so the node validates
//! it, and it runs as the applyConfig sequence like any other change).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use api::proto::{ApplyConfigurationRequest, ExtensionListRequest, GetConfigurationRequest};

use super::apply::{send, Mode};
use crate::connect::{status_error, Target};

/// What to get, patch or edit.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    /// The node config.
    Config,
}

/// What `plinth get` shows.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetResource {
    /// The node config.
    Config,
    /// The system extensions: active, or refused with the reason.
    Extensions,
}

#[derive(clap::Args, Debug)]
pub struct GetArgs {
    /// What to show.
    #[arg(value_enum)]
    resource: GetResource,
}

/// How a patch is written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// RFC 7386 JSON merge patch: an object whose fields replace (or, when null, remove) the
    /// config's.
    Merge,
    /// RFC 6902 JSON patch: a list of operations (add, remove, replace, move, copy, test).
    Json,
}

#[derive(clap::Args, Debug, Clone)]
pub struct PatchArgs {
    /// What to patch.
    #[arg(value_enum)]
    resource: Resource,
    /// The patch, as JSON or YAML (`-p '{"machine":{"name":"n2"}}'`).
    #[arg(short = 'p', long, conflicts_with = "patch_file")]
    patch: Option<String>,
    /// A file holding the patch.
    #[arg(long)]
    patch_file: Option<PathBuf>,
    /// The kind of patch.
    #[arg(long = "type", value_enum, default_value_t = PatchType::Merge)]
    kind: PatchType,
    /// Show the change as a diff and apply nothing.
    #[arg(long)]
    dry_run: bool,
    /// How to apply it.
    #[arg(long, value_enum, default_value_t = Mode::NoReboot)]
    mode: Mode,
}

#[derive(clap::Args, Debug)]
pub struct EditArgs {
    /// What to edit.
    #[arg(value_enum)]
    resource: Resource,
    /// How to apply it.
    #[arg(long, value_enum, default_value_t = Mode::NoReboot)]
    mode: Mode,
}

async fn running(target: &Target) -> anyhow::Result<String> {
    let (endpoint, mut c) = target.connect().await?;
    Ok(c.get_configuration(GetConfigurationRequest {})
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner()
        .data)
}

pub async fn get(target: &Target, args: GetArgs) -> anyhow::Result<()> {
    match args.resource {
        GetResource::Config => {
            crate::fanout::documents(target, |endpoint, mut c| async move {
                Ok(c.get_configuration(GetConfigurationRequest {})
                    .await
                    .map_err(|s| status_error(&endpoint, s))?
                    .into_inner()
                    .data)
            })
            .await?
        }
        GetResource::Extensions => {
            crate::fanout::documents(target, |endpoint, mut c| async move {
                let r = c
                    .extension_list(ExtensionListRequest {})
                    .await
                    .map_err(|s| status_error(&endpoint, s))?
                    .into_inner();
                Ok(extensions_table(&r))
            })
            .await?
        }
    }
    Ok(())
}

/// The extensions as a table: name, version, level, state, digest; a refusal's message below
/// its line.
pub fn extensions_table(r: &api::proto::ExtensionListResponse) -> String {
    if r.extensions.is_empty() {
        return format!(
            "no system extensions (this OS provides extension level {})\n",
            r.os_level
        );
    }
    let mut out = format!(
        "{:<16} {:<24} {:>5}  {:<22} {}\n",
        "NAME", "VERSION", "LEVEL", "STATE", "DIGEST"
    );
    for e in &r.extensions {
        let state = if e.active {
            "active".to_string()
        } else {
            format!("refused ({})", e.refused_reason)
        };
        let digest = e.digest.get(..16).unwrap_or(&e.digest);
        out += &format!(
            "{:<16} {:<24} {:>5}  {:<22} {}\n",
            e.name, e.version, e.level, state, digest
        );
        if !e.active {
            out += &format!("  {}: {}\n", e.file, e.refused_message);
        }
    }
    out
}

/// `yaml` with `patch` applied, as YAML; the result must still be a valid node config.
pub fn patched(yaml: &str, patch: &str, kind: PatchType) -> anyhow::Result<String> {
    let mut doc: serde_json::Value =
        serde_norway::from_str(yaml).context("the running config is not YAML")?;
    let patch: serde_json::Value =
        serde_norway::from_str(patch).context("the patch is neither JSON nor YAML")?;
    match kind {
        PatchType::Merge => json_patch::merge(&mut doc, &patch),
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch)
                .context("a JSON patch is a list of operations (RFC 6902)")?;
            json_patch::patch(&mut doc, &ops).context("applying the JSON patch")?;
        }
    }
    let out = serde_norway::to_string(&doc).context("writing the patched config")?;
    config::NodeConfig::from_yaml(&out).context("the patched config is not valid")?;
    Ok(out)
}

/// A unified diff of two configs, as `--dry-run` shows it.
pub fn diff(before: &str, after: &str) -> String {
    similar::TextDiff::from_lines(before, after)
        .unified_diff()
        .header("running", "patched")
        .to_string()
}

async fn apply(target: &Target, yaml: String, mode: Mode) -> anyhow::Result<()> {
    let (endpoint, mut c) = target.connect().await?;
    let request = ApplyConfigurationRequest {
        data: yaml,
        mode: mode.proto() as i32,
        ..Default::default()
    };
    send(&endpoint, &mut c, request).await
}

pub async fn patch(target: &Target, args: PatchArgs) -> anyhow::Result<()> {
    let Resource::Config = args.resource;
    let patch = match (&args.patch, &args.patch_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => bail!("give the patch with -p PATCH or --patch-file FILE"),
    };
    let before = running(target).await?;
    let after = patched(&before, &patch, args.kind)?;
    if args.dry_run {
        let d = diff(&before, &after);
        if d.is_empty() {
            println!("the patch changes nothing");
        } else {
            print!("{d}");
        }
        return Ok(());
    }
    if after == before {
        println!("the patch changes nothing: nothing applied");
        return Ok(());
    }
    apply(target, after, args.mode).await
}

pub async fn edit(target: &Target, args: EditArgs) -> anyhow::Result<()> {
    let Resource::Config = args.resource;
    let before = running(target).await?;
    let mut file = tempfile::Builder::new()
        .prefix("plinth-config-")
        .suffix(".yaml")
        .tempfile()
        .context("making a temporary file")?;
    file.write_all(before.as_bytes())?;
    file.flush()?;
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    // The editor may be a command with arguments (`code --wait`).
    let mut words = editor.split_whitespace();
    let program = words.next().context("$EDITOR is empty")?;
    let status = std::process::Command::new(program)
        .args(words)
        .arg(file.path())
        .status()
        .with_context(|| format!("starting the editor {editor:?}"))?;
    if !status.success() {
        bail!("the editor {editor:?} exited with {status}: nothing applied");
    }
    let after = std::fs::read_to_string(file.path()).context("reading the edited config")?;
    if after == before {
        println!("no change: nothing applied");
        return Ok(());
    }
    if let Err(e) = config::NodeConfig::from_yaml(&after) {
        let kept = keep(file)?;
        bail!(
            "the edited config is not valid, nothing applied (your edit is kept in {}): {e}",
            kept.display()
        );
    }
    apply(target, after, args.mode).await
}

/// Keeps an edited file that could not be applied, so the edit is not lost.
fn keep(file: tempfile::NamedTempFile) -> anyhow::Result<PathBuf> {
    let (_, path) = file.keep().context("keeping the edited config")?;
    Ok(path)
}

/// [`patch`] for a node of its own (`-n`, one after the other).
pub async fn patch_owned(target: Target, args: PatchArgs) -> anyhow::Result<()> {
    patch(&target, args).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_table_shows_each_state_and_a_refusals_message() {
        let empty = extensions_table(&api::proto::ExtensionListResponse {
            extensions: vec![],
            os_level: 1,
        });
        assert_eq!(
            empty,
            "no system extensions (this OS provides extension level 1)\n"
        );
        let info = |name: &str, active: bool, reason: &str| api::proto::ExtensionInfo {
            name: name.into(),
            version: "1.6.20".into(),
            level: 1,
            digest: "ab".repeat(32),
            file: format!("{name}@1.ext"),
            active,
            refused_reason: reason.into(),
            refused_message: if active {
                String::new()
            } else {
                "no key".into()
            },
        };
        let t = extensions_table(&api::proto::ExtensionListResponse {
            extensions: vec![
                info("containerd", true, ""),
                info("tools", false, "signature"),
            ],
            os_level: 1,
        });
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{t}");
        assert!(
            lines[1].contains("containerd") && lines[1].contains("active"),
            "{t}"
        );
        assert!(lines[1].ends_with(&"ab".repeat(8)), "{t}");
        assert!(lines[2].contains("refused (signature)"), "{t}");
        assert_eq!(lines[3], "  tools@1.ext: no key");
    }

    fn config() -> String {
        api::gen::generate(&api::gen::GenOptions {
            name: "n1".into(),
            endpoint: "10.0.0.1".into(),
            interface: "eth0".into(),
            address: Some("10.0.0.1/24".into()),
            gateway: None,
            trusted_keys: vec![],
        })
        .expect("gen")
        .node
        .to_yaml()
        .expect("yaml")
    }

    #[test]
    fn a_merge_patch_changes_only_what_it_names() {
        let before = config();
        let after =
            patched(&before, r#"{"machine":{"name":"n2"}}"#, PatchType::Merge).expect("patched");
        let (b, a) = (
            config::NodeConfig::from_yaml(&before).expect("b"),
            config::NodeConfig::from_yaml(&after).expect("a"),
        );
        assert_eq!(a.machine.name, "n2");
        assert_eq!(a.machine.api, b.machine.api);
        let d = diff(&before, &after);
        assert!(
            d.contains("-  name: n1") && d.contains("+  name: n2"),
            "{d}"
        );
    }

    #[test]
    fn a_json_patch_applies_its_operations_and_a_failing_test_changes_nothing() {
        let before = config();
        let after = patched(
            &before,
            r#"[{"op":"replace","path":"/machine/name","value":"n3"}]"#,
            PatchType::Json,
        )
        .expect("patched");
        assert_eq!(
            config::NodeConfig::from_yaml(&after)
                .expect("a")
                .machine
                .name,
            "n3"
        );
        let err = patched(
            &before,
            r#"[{"op":"test","path":"/machine/name","value":"other"}]"#,
            PatchType::Json,
        )
        .expect_err("test fails");
        assert!(format!("{err:#}").contains("JSON patch"), "{err:#}");
    }

    #[test]
    fn a_patch_that_breaks_the_config_is_refused_with_the_field() {
        let err = patched(
            &config(),
            r#"{"machine":{"api":{"port":"x"}}}"#,
            PatchType::Merge,
        )
        .expect_err("invalid");
        assert!(format!("{err:#}").contains("machine.api.port"), "{err:#}");
    }
}
