//! The fleet's reboot semaphore: at most K nodes of a cluster down at once, whoever asks.
//!
//! A node that is about to go down (an upgrade's trial reboot) puts its key under [`PREFIX`],
//! attached to a lease it keeps alive, and holds a slot once its key is among the first K by
//! creation revision. That is etcd's queue recipe: a key's rank only ever falls (keys ahead
//! are deleted, new ones come after), so every node that believes it holds a slot does, and
//! two operators or two rollouts sharing the prefix can never have more than K nodes down.
//! A node that dies holding a slot frees it when its lease expires. A control plane also waits
//! while as many control planes are ahead of it as etcd can lose without its quorum.
//!
//! etcd's own `concurrency` lock is a mutex (K = 1) and etcd 3.4 has no semaphore, so the
//! recipe is written here over plain transactions.

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
};
use serde::{Deserialize, Serialize};

use crate::{timed, Etcd, EtcdError};

/// Where the slots' keys live: one per node, named by the node.
pub const PREFIX: &str = "/plinth/reboot-slots/";

/// What a node's key says (JSON), for whoever lists the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The node.
    pub node: String,
    /// Whether it is a control plane (its etcd member goes down with it).
    pub controlplane: bool,
    /// Why it goes down ("upgrade to 2.0").
    pub reason: String,
    /// The K it was asked to respect.
    pub max_unavailable: u32,
}

/// A key in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its claim.
    pub claim: Claim,
    /// Its lease.
    pub lease: i64,
}

/// Where a node stands in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// It holds a slot.
    Held,
    /// It waits behind these nodes.
    Waiting(Vec<String>),
    /// Its key is gone (its lease expired, or somebody released it).
    Gone,
}

fn key(node: &str) -> String {
    format!("{PREFIX}{node}")
}

impl Etcd {
    /// A lease of `ttl_s` seconds; returns its id.
    pub async fn grant(&self, ttl_s: i64) -> Result<i64, EtcdError> {
        let mut c = self.client.clone();
        let r = timed(
            &self.endpoints,
            "granting a lease",
            c.lease_grant(ttl_s, None),
        )
        .await?;
        Ok(r.id())
    }

    /// Renews lease `id` once; returns the seconds it has left (0: it has expired).
    pub async fn keep_alive(&self, id: i64) -> Result<i64, EtcdError> {
        let mut c = self.client.clone();
        let (mut keeper, mut stream) =
            timed(&self.endpoints, "renewing a lease", c.lease_keep_alive(id)).await?;
        timed(&self.endpoints, "renewing a lease", keeper.keep_alive()).await?;
        let reply = timed(&self.endpoints, "renewing a lease", stream.message()).await?;
        Ok(reply.map(|r| r.ttl()).unwrap_or(0))
    }

    /// Revokes lease `id` (its keys are deleted with it).
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        let mut c = self.client.clone();
        timed(&self.endpoints, "revoking a lease", c.lease_revoke(id))
            .await
            .map(drop)
    }

    /// Puts `claim`'s key in the queue under `lease`. A key the node has already keeps its
    /// place (a put on an existing key keeps its creation revision) and takes the new lease.
    pub async fn enqueue(&self, claim: &Claim, lease: i64) -> Result<(), EtcdError> {
        let value = serde_json::to_string(claim).unwrap_or_default();
        let k = key(&claim.node);
        let put = TxnOp::put(
            k.as_str(),
            value.as_str(),
            Some(PutOptions::new().with_lease(lease)),
        );
        let txn = Txn::new()
            .when([Compare::create_revision(k.as_str(), CompareOp::Equal, 0)])
            .and_then([put.clone()])
            .or_else([put]);
        let mut kv = self.client.kv_client();
        timed(&self.endpoints, "joining the reboot queue", kv.txn(txn))
            .await
            .map(drop)
    }

    /// Every key in the queue, first come first.
    pub async fn queue(&self) -> Result<Vec<Queued>, EtcdError> {
        let mut kv = self.client.kv_client();
        let r = timed(
            &self.endpoints,
            "listing the reboot queue",
            kv.get(
                PREFIX,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend),
                ),
            ),
        )
        .await?;
        Ok(r.kvs()
            .iter()
            .map(|kv| Queued {
                claim: serde_json::from_slice(kv.value()).unwrap_or_else(|_| Claim {
                    // A key somebody else wrote: it still counts, as a worker.
                    node: kv
                        .key_str()
                        .unwrap_or_default()
                        .trim_start_matches(PREFIX)
                        .into(),
                    controlplane: false,
                    reason: String::new(),
                    max_unavailable: 0,
                }),
                lease: kv.lease(),
            })
            .collect())
    }

    /// Where `node` stands when at most `k` nodes may hold a slot and at most `controlplanes`
    /// of them control planes.
    pub async fn standing(
        &self,
        node: &str,
        k: u32,
        controlplanes: u32,
    ) -> Result<Standing, EtcdError> {
        Ok(standing(&self.queue().await?, node, k, controlplanes))
    }

    /// Deletes `node`'s key (its slot, or its place in the queue).
    pub async fn release(&self, node: &str) -> Result<(), EtcdError> {
        let mut kv = self.client.kv_client();
        timed(
            &self.endpoints,
            "leaving the reboot queue",
            kv.delete(key(node), None::<DeleteOptions>),
        )
        .await
        .map(drop)
    }
}

/// Where `node` stands in `queue` (first come first): it holds a slot when fewer keys are
/// ahead of it than the smallest K asked by it (`k`) or by any key ahead of it, and, for a
/// control plane, fewer than `controlplanes` control planes. Taking the smallest K keeps every
/// holder's own K: the holders are a prefix of the queue, and the last of them counts them all
/// against every K asked up to it.
pub fn standing(queue: &[Queued], node: &str, k: u32, controlplanes: u32) -> Standing {
    let Some(at) = queue.iter().position(|q| q.claim.node == node) else {
        return Standing::Gone;
    };
    let ahead = &queue[..at];
    let cps_ahead = ahead.iter().filter(|q| q.claim.controlplane).count();
    let k = ahead
        .iter()
        .map(|q| q.claim.max_unavailable)
        .filter(|&m| m > 0)
        .fold(k, u32::min);
    let held =
        at < k as usize && (!queue[at].claim.controlplane || cps_ahead < controlplanes as usize);
    if held {
        Standing::Held
    } else {
        Standing::Waiting(ahead.iter().map(|q| q.claim.node.clone()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(nodes: &[(&str, bool)]) -> Vec<Queued> {
        nodes
            .iter()
            .map(|(n, cp)| Queued {
                claim: Claim {
                    node: n.to_string(),
                    controlplane: *cp,
                    reason: String::new(),
                    max_unavailable: 3,
                },
                lease: 1,
            })
            .collect()
    }

    #[test]
    fn the_first_k_hold_and_the_others_wait_behind_them() {
        let queue = q(&[("w1", false), ("w2", false), ("w3", false), ("w4", false)]);
        assert_eq!(standing(&queue, "w3", 3, 1), Standing::Held);
        assert_eq!(
            standing(&queue, "w4", 3, 1),
            Standing::Waiting(vec!["w1".into(), "w2".into(), "w3".into()])
        );
        assert_eq!(standing(&queue, "w9", 3, 1), Standing::Gone);
    }

    #[test]
    fn the_smallest_k_asked_ahead_bounds_everyone_behind_it() {
        let mut queue = q(&[("w1", false), ("w2", false), ("w3", false)]);
        // w1 asked for at most 1 node down: w2 and w3, asking 3, wait for it.
        queue[0].claim.max_unavailable = 1;
        assert_eq!(standing(&queue, "w1", 1, 1), Standing::Held);
        assert!(matches!(standing(&queue, "w2", 3, 1), Standing::Waiting(_)));
        assert!(matches!(standing(&queue, "w3", 3, 1), Standing::Waiting(_)));
        // Behind two nodes asking 3, one asking 1 waits until it is first.
        let mut queue = q(&[("w1", false), ("w2", false), ("w3", false)]);
        queue[2].claim.max_unavailable = 1;
        assert!(matches!(standing(&queue, "w3", 1, 1), Standing::Waiting(_)));
        assert_eq!(standing(&queue, "w2", 3, 1), Standing::Held);
    }

    #[test]
    fn a_control_plane_waits_for_the_control_planes_ahead_that_quorum_cannot_spare() {
        let queue = q(&[("cp1", true), ("w1", false), ("cp2", true)]);
        assert_eq!(standing(&queue, "cp1", 3, 1), Standing::Held);
        assert_eq!(standing(&queue, "w1", 3, 1), Standing::Held);
        assert!(matches!(
            standing(&queue, "cp2", 3, 1),
            Standing::Waiting(_)
        ));
        assert_eq!(standing(&queue, "cp2", 3, 2), Standing::Held);
    }
}
