//! The cluster's etcd through the API: `plinth bootstrap` and `plinth etcd members`.

use std::sync::Arc;

use api::proto::{EtcdMember, EtcdMembersResponse};
use config::node::MachineType;
use phases::Runtime;
use sequencer::EventKind;

use super::error::ApiError;

/// Starts a new one-member cluster on this control plane; the bootstrap, or why it was
/// refused, is an event with the caller's actor id.
pub async fn bootstrap(rt: &Arc<Runtime>, actor: String) -> Result<(), ApiError> {
    let result = phases::etcd::bootstrap(rt).await;
    let (state, message) = match &result {
        Ok(()) => ("starting".to_string(), "bootstrap asked".to_string()),
        Err(e) => ("refused".to_string(), format!("bootstrap refused: {e}")),
    };
    rt.bus.publish(
        EventKind::Service {
            service: phases::etcd::SERVICE.into(),
            state,
            message,
        },
        Some(&actor),
    );
    Ok(result?)
}

/// The cluster's members, asked of the control planes with this node's etcd client
/// certificate (a worker asks too: it is a client of the cluster).
pub async fn members(rt: &Arc<Runtime>) -> Result<EtcdMembersResponse, ApiError> {
    let cfg = rt
        .config()
        .ok_or_else(|| ApiError::Precondition("no node config loaded".into()))?;
    let Some(cluster) = cfg.cluster.as_ref() else {
        return Err(ApiError::Precondition(format!(
            "this node is {}: it belongs to no cluster",
            MachineType::Standalone.as_str()
        )));
    };
    let etcd = etcd::Etcd::connect(
        &etcd::Etcd::endpoints_of(cluster),
        &etcd::Credentials::of(cluster),
    )
    .await?;
    let members = etcd
        .members()
        .await?
        .into_iter()
        .map(|m| EtcdMember {
            id: m.id,
            name: m.name,
            peer_urls: m.peer_urls,
            client_urls: m.client_urls,
            learner: m.learner,
        })
        .collect();
    Ok(EtcdMembersResponse { members })
}

/// Takes this control plane out of the cluster; an event with the caller's actor id either way.
pub async fn leave(rt: &Arc<Runtime>, actor: String) -> Result<(), ApiError> {
    let result = phases::etcd::leave(rt).await;
    audit(rt, &actor, "leave", &result);
    Ok(result?)
}

/// Removes another node's member; an event with the caller's actor id either way.
pub async fn remove_member(rt: &Arc<Runtime>, actor: String, id: u64) -> Result<(), ApiError> {
    let result = phases::etcd::remove_member(rt, id).await;
    audit(rt, &actor, &format!("remove-member {id:x}"), &result);
    Ok(result?)
}

fn audit<E: std::fmt::Display>(rt: &Runtime, actor: &str, what: &str, result: &Result<(), E>) {
    let (state, message) = match result {
        Ok(()) => ("running", format!("{what} done")),
        Err(e) => ("refused", format!("{what} refused: {e}")),
    };
    rt.bus.publish(
        EventKind::Service {
            service: phases::etcd::SERVICE.into(),
            state: state.into(),
            message,
        },
        Some(actor),
    );
}
