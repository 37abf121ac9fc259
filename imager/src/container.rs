//! A small container image for tests and examples: Debian's busybox-static in an OCI image
//! layout (`plinth image busybox`), imported with `plinth image import` like any other archive.

use std::path::Path;
use std::process::Command;

use workloads::oci::{write_layout, LayerEntry};

use crate::tools::{debian_package, own_dir, require, run};
use crate::ImageError;

/// The default name of the image.
pub const BUSYBOX_NAME: &str = "plinth.local/busybox:latest";

/// The busybox applets linked in `/bin` (busybox itself answers to any of its applets' names).
const APPLETS: &[&str] = &[
    "sh", "ash", "cat", "echo", "env", "false", "grep", "head", "hostname", "httpd", "id", "ip",
    "kill", "ls", "mkdir", "mount", "nc", "ps", "rm", "sleep", "tail", "touch", "true", "uname",
    "wget",
];

/// Writes the busybox image named `name` to `out`; returns its manifest digest. The package
/// comes from `cache/debs` (downloaded there the first time).
pub fn busybox(
    cache: &Path,
    name: &str,
    out: &mut impl std::io::Write,
) -> Result<String, ImageError> {
    require(&[("dpkg-deb", "dpkg")])?;
    let deb = debian_package(&cache.join("debs"), "busybox-static")?;
    // A directory of this build's own: another build may be unpacking beside it.
    let work = own_dir(cache, "busybox.unpack.")?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(work.path()))?;
    let program = work.path().join("bin/busybox");
    let busybox = std::fs::read(&program).map_err(ImageError::io("reading", &program))?;
    let mut files = vec![
        LayerEntry::Dir("bin".into(), 0o755),
        LayerEntry::File("bin/busybox".into(), 0o755, busybox),
    ];
    files.extend(
        APPLETS
            .iter()
            .map(|a| LayerEntry::Symlink(format!("bin/{a}"), "busybox".into())),
    );
    files.extend([
        LayerEntry::Dir("etc".into(), 0o755),
        LayerEntry::File(
            "etc/passwd".into(),
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n".to_vec(),
        ),
        LayerEntry::File(
            "etc/group".into(),
            0o644,
            b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        ),
        LayerEntry::Dir("root".into(), 0o700),
        LayerEntry::Dir("tmp".into(), 0o1777),
        LayerEntry::Dir("var".into(), 0o755),
        LayerEntry::Dir("var/www".into(), 0o755),
    ]);
    let config = serde_json::json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["/bin/sh"],
        "WorkingDir": "/",
    });
    write_layout(out, name, &files, config).map_err(|e| ImageError::Invalid(e.to_string()))
}
