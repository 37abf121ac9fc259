//! The VM scenario tests and benchmarks (under `tests/` and `benches/`). The harness they use
//! to boot nodes, shared with `plinth cluster create`, is the provisioning crate; it is
//! re-exported here so the tests name it as before.

pub use provision::*;
