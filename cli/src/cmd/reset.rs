//! `plinth reset`.

use api::proto::{ResetRequest, WipeMethod};

use crate::connect::{status_error, Target};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// File system signatures zeroed, the rest discarded.
    Fast,
    /// Every byte overwritten with zeroes.
    Zero,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Stop services in order first (--graceful=false kills them).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    graceful: bool,
    /// Reboot afterwards (otherwise power off).
    #[arg(long)]
    reboot: bool,
    /// What to wipe: partition labels (STATE, EPHEMERAL), or system-disk.
    #[arg(long, value_delimiter = ',', default_value = "STATE,EPHEMERAL")]
    wipe: Vec<String>,
    /// How.
    #[arg(long, value_enum, default_value_t = Method::Fast)]
    method: Method,
}

pub async fn run(target: &Target, args: Args) -> anyhow::Result<()> {
    let system_disk = args.wipe.iter().any(|w| w == "system-disk");
    let labels = if system_disk {
        Vec::new()
    } else {
        args.wipe.clone()
    };
    let request = ResetRequest {
        graceful: args.graceful,
        reboot: args.reboot,
        labels,
        system_disk,
        method: match args.method {
            Method::Fast => WipeMethod::Fast,
            Method::Zero => WipeMethod::Zero,
        } as i32,
    };
    if target.fans_out() {
        return crate::fanout::actions(target, |endpoint, mut c| {
            let request = request.clone();
            async move {
                c.reset(request)
                    .await
                    .map(|r| r.into_inner().actor_id)
                    .map_err(|s| status_error(&endpoint, s))
            }
        })
        .await;
    }
    let (endpoint, mut c) = target.connect().await?;
    let actor = c
        .reset(request)
        .await
        .map_err(|s| status_error(&endpoint, s))?
        .into_inner()
        .actor_id;
    eprintln!(
        "reset started (actor {actor}): wiping {}, then {}",
        args.wipe.join(", "),
        if args.reboot { "reboot" } else { "power off" }
    );
    Ok(())
}
