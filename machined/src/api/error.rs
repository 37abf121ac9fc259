//! Every way an RPC can be refused or fail, and the one place each becomes a gRPC code.
//!
//! | error | code |
//! |---|---|
//! | a request field the node does not understand, an invalid config, a bad bundle | `INVALID_ARGUMENT` |
//! | another sequence in the way, a sequence taken over | `ABORTED` |
//! | the node's state forbids it (not committed, nothing to roll back to, below the security floor) | `FAILED_PRECONDITION` |
//! | a maintenance call after the node got its config | `PERMISSION_DENIED` |
//! | an unknown service | `NOT_FOUND` |
//! | a corrupt or self-contradicting image archive, an image without a name | `INVALID_ARGUMENT` |
//! | no container runtime on the node, or not healthy | `FAILED_PRECONDITION` |
//! | another image import running | `ABORTED` |
//! | an archive larger than EPHEMERAL's free space | `RESOURCE_EXHAUSTED` |
//! | containerd not answering | `UNAVAILABLE` |
//! | an image upload that stalls | `DEADLINE_EXCEEDED` |
//! | a source that stalled or ran out of time | `DEADLINE_EXCEEDED` |
//! | an upload that broke off, a log that cannot be opened | `UNAVAILABLE` |
//! | the disk did not keep what was written | `DATA_LOSS` |
//! | the node's own I/O failed | `INTERNAL` |

use phases::apply::ApplyError;
use phases::upgrade::{AdmitError, UpgradeError};
use sequencer::{Denied, SequenceError};
use tonic::{Code, Status};
use upgrade::policy::PolicyError;

/// An RPC's refusal or failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is not one the node understands.
    #[error("{0}")]
    BadRequest(String),
    /// The lifecycle machine refused the sequence.
    #[error("{denied} (actor id {actor})")]
    Denied {
        /// Why.
        denied: Denied,
        /// The request's actor id.
        actor: String,
    },
    /// The sequence was taken over before it finished.
    #[error("{error} (actor id {actor})")]
    Cancelled {
        /// What took it over.
        error: SequenceError,
        /// The request's actor id.
        actor: String,
    },
    /// An upgrade or rollback may not start now.
    #[error("{0}")]
    Admit(#[from] AdmitError),
    /// An upgrade failed; `changed` says what it had changed by then.
    #[error("upgrade refused: {error}; {changed} (actor id {actor})")]
    Upgrade {
        /// Why.
        error: UpgradeError,
        /// What changed on the disk before it stopped.
        changed: String,
        /// The request's actor id.
        actor: String,
    },
    /// A config was not applied.
    #[error("{error} (actor id {actor})")]
    Apply {
        /// Why.
        error: ApplyError,
        /// The request's actor id.
        actor: String,
    },
    /// A reset names what the node does not have.
    #[error("{0}")]
    Reset(#[from] phases::reset::ResetError),
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// The node cannot do it in its present state (no container runtime, for instance).
    #[error("{0}")]
    Precondition(String),
    /// Another call of the kind runs.
    #[error("{0}")]
    Busy(String),
    /// More than the node has room for.
    #[error("{0}")]
    TooLarge(String),
    /// An upload that stopped sending.
    #[error("{0}")]
    Stalled(String),
    /// An image archive was refused.
    #[error("the image archive is refused: {0}")]
    Archive(#[from] workloads::oci::ArchiveError),
    /// containerd refused or failed.
    #[error("{0}")]
    Workload(#[from] workloads::Error),
    /// No reboot slot of the cluster's semaphore.
    #[error("{0}")]
    RebootSlot(#[from] phases::reboot_slot::SlotError),
    /// Something the call needs is not there now.
    #[error("{0}")]
    Unavailable(String),
    /// The node failed at its own work.
    #[error("{0}")]
    Internal(String),
    /// A bootstrap was refused.
    #[error("{0}")]
    Bootstrap(#[from] phases::etcd::BootstrapError),
    /// etcd refused or did not answer.
    #[error("{0}")]
    Etcd(#[from] etcd::EtcdError),
    /// Leaving or removing a member was refused.
    #[error("{0}")]
    Member(#[from] phases::etcd::MemberError),
}

impl ApiError {
    fn etcd_code(e: &etcd::EtcdError) -> Code {
        match e {
            etcd::EtcdError::NotAMember(_) | etcd::EtcdError::Conflict(_) => {
                Code::FailedPrecondition
            }
            // etcd's own refusal keeps its code (removing the last started member is
            // FAILED_PRECONDITION); a member that cannot be reached is UNAVAILABLE.
            etcd::EtcdError::Client { .. } => e.grpc_code().map_or(Code::Unavailable, Code::from),
            etcd::EtcdError::Timeout { .. } => Code::Unavailable,
        }
    }

    /// The gRPC code: every variant, and every inner error that decides, named here.
    pub fn code(&self) -> Code {
        match self {
            ApiError::BadRequest(_) => Code::InvalidArgument,
            ApiError::Bootstrap(e) => match e {
                phases::etcd::BootstrapError::NotControlPlane(_) => Code::Unimplemented,
                phases::etcd::BootstrapError::NotReady(_) => Code::FailedPrecondition,
                phases::etcd::BootstrapError::AlreadyBootstrapped(_) => Code::AlreadyExists,
                phases::etcd::BootstrapError::BadSnapshot(_) => Code::InvalidArgument,
            },
            ApiError::Member(e) => match e {
                phases::etcd::MemberError::NotReady(_) | phases::etcd::MemberError::Own(_) => {
                    Code::FailedPrecondition
                }
                phases::etcd::MemberError::NotFound(_) => Code::NotFound,
                phases::etcd::MemberError::Etcd(e) => ApiError::etcd_code(e),
            },
            ApiError::Etcd(e) => ApiError::etcd_code(e),
            ApiError::Reset(e) => match e {
                phases::reset::ResetError::LabelsAndDisk
                | phases::reset::ResetError::UnknownLabel { .. } => Code::InvalidArgument,
            },
            ApiError::Denied { denied, .. } => match denied {
                Denied::Busy { .. } => Code::Aborted,
                Denied::NotAllowed { .. } => Code::FailedPrecondition,
            },
            ApiError::Cancelled { .. } => Code::Aborted,
            ApiError::Admit(e) => match e {
                AdmitError::NotBooted
                | AdmitError::NoConfig
                | AdmitError::NoTrustedKeys
                | AdmitError::NotCommitted { .. }
                | AdmitError::NoGoodSlot { .. }
                | AdmitError::BelowFloor { .. }
                | AdmitError::NoMeta => Code::FailedPrecondition,
                AdmitError::Meta(_) => Code::Internal,
                AdmitError::Source(_) => Code::InvalidArgument,
            },
            ApiError::Upgrade { error, .. } => match error {
                UpgradeError::Bundle(_)
                | UpgradeError::Uki(_)
                | UpgradeError::Trailing(_)
                | UpgradeError::Policy(PolicyError::NotExpected { .. }) => Code::InvalidArgument,
                UpgradeError::Orphans { .. }
                | UpgradeError::EspFull { .. }
                | UpgradeError::Policy(
                    PolicyError::BelowFloor { .. }
                    | PolicyError::Expired { .. }
                    | PolicyError::Downgrade { .. },
                ) => Code::FailedPrecondition,
                UpgradeError::Stalled(_) => Code::DeadlineExceeded,
                UpgradeError::Source(_) => Code::Unavailable,
                UpgradeError::Verify { .. } => Code::DataLoss,
                UpgradeError::Node(_) => Code::Internal,
            },
            ApiError::Apply { error, .. } => match error {
                ApplyError::AlreadyConfigured => Code::PermissionDenied,
                ApplyError::NotConfigured
                | ApplyError::NothingToConfirm
                | ApplyError::Encryption(_)
                | ApplyError::Locked(_) => Code::FailedPrecondition,
                ApplyError::Install(e) => match e {
                    phases::install::AdmitError::NotMedia
                    | phases::install::AdmitError::NoTarget
                    | phases::install::AdmitError::NoTrustedKeys
                    | phases::install::AdmitError::NotADisk(_)
                    | phases::install::AdmitError::Partition(_)
                    | phases::install::AdmitError::Media(_)
                    | phases::install::AdmitError::NotBlank { .. }
                    | phases::install::AdmitError::NoTpm(_)
                    | phases::install::AdmitError::ForeignSecureBootKeys { .. }
                    | phases::install::AdmitError::TooSmall { .. } => Code::FailedPrecondition,
                    phases::install::AdmitError::Unreadable { .. } => Code::Internal,
                },
                ApplyError::Yaml(_) | ApplyError::Write(_) | ApplyError::Containers(_) => {
                    Code::Internal
                }
            },
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::Precondition(_) => Code::FailedPrecondition,
            ApiError::Busy(_) => Code::Aborted,
            ApiError::TooLarge(_) => Code::ResourceExhausted,
            ApiError::Stalled(_) => Code::DeadlineExceeded,
            ApiError::Archive(e) => match e {
                workloads::oci::ArchiveError::Invalid(_) => Code::InvalidArgument,
                workloads::oci::ArchiveError::Io { .. } => Code::Internal,
            },
            ApiError::Workload(e) => match e {
                workloads::Error::Refused(_) => Code::InvalidArgument,
                workloads::Error::Connect { .. } | workloads::Error::Timeout { .. } => {
                    Code::Unavailable
                }
                workloads::Error::Call { .. } => Code::Internal,
            },
            ApiError::RebootSlot(e) => {
                use phases::reboot_slot::SlotError;
                match e {
                    SlotError::NotInCluster | SlotError::Quorum(_) => Code::FailedPrecondition,
                    SlotError::Busy | SlotError::Gone => Code::Aborted,
                    SlotError::Etcd(_) => Code::Unavailable,
                    SlotError::Record(_) => Code::Internal,
                }
            }
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }

    /// A lifecycle refusal for `actor`.
    pub fn denied(actor: &str) -> impl FnOnce(Denied) -> ApiError + '_ {
        move |denied| ApiError::Denied {
            denied,
            actor: actor.to_string(),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        Status::new(e.code(), e.to_string())
    }
}

/// How a sequence's failure reached the caller: its typed task error, if it has one of type
/// `E`, or the whole sequence error.
pub enum Failure<E> {
    /// A task failed with `E`.
    Typed(E),
    /// It was taken over.
    Cancelled(SequenceError),
    /// A task failed with something else (a bug: every task of the sequence returns `E`).
    Other(SequenceError),
}

impl<E: std::error::Error + Send + Sync + 'static> Failure<E> {
    /// Sorts a sequence's result.
    pub fn of(error: SequenceError) -> Failure<E> {
        match error {
            SequenceError::Failed {
                sequence,
                phase,
                task,
                source,
            } => match source.downcast::<E>() {
                Ok(typed) => Failure::Typed(*typed),
                Err(source) => Failure::Other(SequenceError::Failed {
                    sequence,
                    phase,
                    task,
                    source,
                }),
            },
            cancelled @ SequenceError::Cancelled { .. } => Failure::Cancelled(cancelled),
        }
    }
}
