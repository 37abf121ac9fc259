//! Roles and the table of who may call what.
//!
//! The role comes from the Organization of the client certificate. Every RPC is listed with the
//! roles allowed to call it; an RPC missing from the table is admin-only, so a new RPC is never
//! open by accident.

use std::fmt;
use std::str::FromStr;

/// A caller's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Everything.
    Admin,
    /// Reboot, shutdown, services, and reads.
    Operator,
    /// Reads only, no secrets.
    Reader,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Reader];

    /// The certificate Organization for the role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "os:admin",
            Role::Operator => "os:operator",
            Role::Reader => "os:reader",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of `os:admin`, `os:operator`, `os:reader`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a role (expected os:admin, os:operator or os:reader)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "os:admin" => Ok(Role::Admin),
            "os:operator" => Ok(Role::Operator),
            "os:reader" => Ok(Role::Reader),
            other => Err(UnknownRole(other.into())),
        }
    }
}

const READS: &[Role] = &[Role::Admin, Role::Operator, Role::Reader];
const OPERATE: &[Role] = &[Role::Admin, Role::Operator];
const ADMIN: &[Role] = &[Role::Admin];

/// The gRPC path prefix of the Machine service.
pub const SERVICE: &str = "/plinth.machine.v1.Machine/";

/// Every RPC of the Machine service (for tests that walk the whole table).
pub const RPCS: &[&str] = &[
    "Version",
    "Events",
    "Status",
    "ServiceList",
    "ExtensionList",
    "ImageImport",
    "ImageList",
    "ContainerList",
    "Debug",
    "Reboot",
    "Shutdown",
    "Dmesg",
    "Logs",
    "Upgrade",
    "Rollback",
    "ApplyConfiguration",
    "Reset",
    "GetConfiguration",
    "Bootstrap",
    "EtcdMembers",
    "EtcdLeave",
    "EtcdRemoveMember",
    "EtcdStatus",
    "EtcdSnapshot",
    "EtcdRecover",
];

/// What a node in maintenance mode (no config, no client certificates yet) answers, to anyone.
pub const MAINTENANCE_RPCS: &[&str] = &["Version", "Status", "Events", "ApplyConfiguration"];

/// Services outside the Machine API that every caller may use: the standard gRPC health check
/// (for load balancers) and server reflection (for grpcurl and the like). Neither changes or
/// reveals anything of the node's.
pub const OPEN_SERVICES: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// Whether `path` belongs to one of the [`OPEN_SERVICES`].
pub fn is_open_service(path: &str) -> bool {
    OPEN_SERVICES.iter().any(|s| path.starts_with(s))
}

/// The roles allowed to call `method` (the RPC name, e.g. `Version`).
pub fn allowed_roles(method: &str) -> &'static [Role] {
    match method {
        "Version" | "Events" | "Status" | "ServiceList" | "ExtensionList" | "ImageList"
        | "ContainerList" | "EtcdMembers" | "EtcdStatus" => READS,
        // Logs can carry anything a service prints, secrets included: not for readers.
        "Reboot" | "Shutdown" | "Dmesg" | "Logs" => OPERATE,
        // Anything not listed: admin only.
        _ => ADMIN,
    }
}

/// Whether `role` may call the RPC at gRPC `path` (`/plinth.machine.v1.Machine/Version`).
pub fn may_call(role: Role, path: &str) -> bool {
    match path.strip_prefix(SERVICE) {
        Some(method) => allowed_roles(method).contains(&role),
        None if is_open_service(path) => true,
        // Anything else is not served; only admins get past this check to be told so by the
        // router.
        None => role == Role::Admin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_names() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("admin".parse::<Role>().is_err());
    }

    #[test]
    fn the_rpc_list_is_every_rpc_of_the_proto() {
        let proto = include_str!("../proto/plinth/machine/v1/machine.proto");
        let mut declared: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .filter_map(|l| l.split('(').next())
            .collect();
        let mut listed = RPCS.to_vec();
        declared.sort_unstable();
        listed.sort_unstable();
        assert_eq!(declared, listed);
    }

    #[test]
    fn operators_may_reboot_and_shut_down_readers_may_not() {
        for m in ["Reboot", "Shutdown"] {
            let path = format!("{SERVICE}{m}");
            assert!(may_call(Role::Admin, &path));
            assert!(may_call(Role::Operator, &path));
            assert!(!may_call(Role::Reader, &path));
        }
    }

    #[test]
    fn every_role_may_read_and_unlisted_rpcs_are_admin_only() {
        for r in Role::ALL {
            assert!(may_call(r, "/plinth.machine.v1.Machine/Version"));
            assert!(may_call(r, "/plinth.machine.v1.Machine/Events"));
        }
        assert!(may_call(
            Role::Admin,
            "/plinth.machine.v1.Machine/SomethingNew"
        ));
        assert!(!may_call(
            Role::Operator,
            "/plinth.machine.v1.Machine/SomethingNew"
        ));
        assert!(!may_call(
            Role::Reader,
            "/plinth.machine.v1.Machine/SomethingNew"
        ));
    }
}
