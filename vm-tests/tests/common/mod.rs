//! What every VM test shares: where the workspace and the built image are, and how to get a
//! booted node.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use vm_tests::node::{ensure_artifacts, prepare, NodeSpec, PreparedNode};

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The built image (`PLINTH_IMAGE_DIR`, or `out/` in the workspace), built now if missing.
pub fn artifacts() -> imager::Artifacts {
    let image_dir = std::env::var_os("PLINTH_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("out"));
    let machined = workspace().join("target/x86_64-unknown-linux-gnu/release/machined");
    ensure_artifacts(&image_dir, &machined, "0.1.0-test").unwrap_or_else(|e| panic!("image: {e}"))
}

/// A fresh node directory under the target dir (kept after the test for inspection).
pub fn node(name: &str) -> PreparedNode {
    let dir = workspace().join("target/vm-tests").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let spec = NodeSpec {
        name: name.into(),
        dir,
        image_dir: PathBuf::new(),
        memory_mb: 1024,
    };
    prepare(&spec, &artifacts()).unwrap_or_else(|e| panic!("preparing node {name}: {e}"))
}

/// How long a boot through OVMF under TCG may take before a test gives up.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
