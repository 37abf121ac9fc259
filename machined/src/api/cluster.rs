//! The cluster's etcd through the API: `plinth bootstrap` (`--recover-from`) and `plinth etcd
//! members | status | snapshot | leave | remove-member`.

use std::sync::Arc;

use api::proto::{
    EtcdMember, EtcdMemberStatus, EtcdMembersResponse, EtcdSnapshotChunk, EtcdStatusResponse,
};
use api::server::SnapshotStream;
use config::node::MachineType;
use phases::Runtime;
use sequencer::EventKind;

use super::error::ApiError;

/// Starts a new one-member cluster on this control plane; the bootstrap, or why it was
/// refused, is an event with the caller's actor id.
pub async fn bootstrap(rt: &Arc<Runtime>, actor: String, recover: bool) -> Result<(), ApiError> {
    let result = phases::etcd::bootstrap(rt, recover).await;
    let what = if recover {
        "bootstrap from the uploaded snapshot"
    } else {
        "bootstrap"
    };
    let (state, message) = match &result {
        Ok(()) => ("starting".to_string(), format!("{what} asked")),
        Err(e) => ("refused".to_string(), format!("{what} refused: {e}")),
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

/// The node's cluster section.
fn cluster(rt: &Runtime) -> Result<config::node::Cluster, ApiError> {
    let cfg = rt
        .config()
        .ok_or_else(|| ApiError::Precondition("no node config loaded".into()))?;
    cfg.cluster.clone().ok_or_else(|| {
        ApiError::Precondition(format!(
            "this node is {}: it belongs to no cluster",
            MachineType::Standalone.as_str()
        ))
    })
}

/// The cluster's members, asked of the control planes with this node's etcd client
/// certificate (a worker asks too: it is a client of the cluster).
pub async fn members(rt: &Arc<Runtime>) -> Result<EtcdMembersResponse, ApiError> {
    let cluster = cluster(rt)?;
    let etcd = etcd::Etcd::connect(
        &etcd::Etcd::endpoints_of(&cluster),
        &etcd::Credentials::of(&cluster),
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

/// Every member's own status, asked at its client URL; one that does not answer says why.
pub async fn status(rt: &Arc<Runtime>) -> Result<EtcdStatusResponse, ApiError> {
    let cluster = cluster(rt)?;
    let creds = etcd::Credentials::of(&cluster);
    let etcd = etcd::Etcd::connect(&etcd::Etcd::endpoints_of(&cluster), &creds).await?;
    let asked = etcd.members().await?.into_iter().map(|m| {
        let creds = creds.clone();
        async move {
            let url = m.client_urls.first().cloned().unwrap_or_default();
            let mut s = EtcdMemberStatus {
                id: m.id,
                name: m.name,
                client_url: url.clone(),
                learner: m.learner,
                ..Default::default()
            };
            if url.is_empty() {
                s.error = "not started (a learner that never ran)".into();
                return s;
            }
            match etcd::Etcd::status_at(&url, &creds).await {
                Ok(st) => {
                    s.leader = st.leader;
                    s.version = st.version;
                    s.db_size = st.db_size;
                    s.raft_index = st.raft_index;
                    s.raft_term = st.raft_term;
                    s.learner = st.learner;
                }
                Err(e) => s.error = e.to_string(),
            }
            s
        }
    });
    Ok(EtcdStatusResponse {
        members: futures::future::join_all(asked).await,
    })
}

/// A snapshot from this control plane's own member, streamed; an audited event.
pub async fn snapshot(rt: &Arc<Runtime>, actor: String) -> Result<SnapshotStream, ApiError> {
    let cluster = cluster(rt)?;
    let cfg = rt
        .config()
        .ok_or_else(|| ApiError::Precondition("no node config loaded".into()))?;
    let me = cluster
        .controlplanes
        .iter()
        .find(|m| {
            m.name == cfg.machine.name && cfg.machine.machine_type == MachineType::Controlplane
        })
        .ok_or_else(|| {
            ApiError::Precondition(format!(
                "this node is a {}: a snapshot is taken on a control plane",
                cfg.machine.machine_type.as_str()
            ))
        })?;
    let started = *rt.etcd.lock().await == phases::etcd::EtcdState::Started;
    if !started {
        return Err(ApiError::Precondition(
            "this node's etcd member does not run (not bootstrapped or joined yet, or it left)"
                .into(),
        ));
    }
    let snap = etcd::Etcd::snapshot_at(&me.client_url(), &etcd::Credentials::of(&cluster)).await;
    audit(rt, &actor, "snapshot", &snap.as_ref().map(drop));
    let snap = snap?;
    let chunks = futures::stream::unfold(Some(snap), |s| async move {
        let mut s = s?;
        match s.next().await {
            Ok(Some(data)) => Some((Ok(EtcdSnapshotChunk { data }), Some(s))),
            Ok(None) => None,
            Err(e) => Some((Err(tonic::Status::unavailable(e.to_string())), None)),
        }
    });
    Ok(Box::pin(chunks))
}

/// Keeps an uploaded snapshot for `bootstrap --recover-from`; an audited event.
pub async fn recover(
    rt: &Arc<Runtime>,
    actor: String,
    options: api::proto::EtcdRecoverOptions,
    snapshot: api::server::BundleStream,
) -> Result<api::proto::EtcdRecoverResponse, ApiError> {
    let kept = phases::etcd::keep_snapshot(rt, options.size, snapshot).await;
    audit(rt, &actor, "snapshot upload", &kept.as_ref().map(drop));
    Ok(api::proto::EtcdRecoverResponse { size: kept? })
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
