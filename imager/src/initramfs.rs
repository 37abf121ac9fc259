//! The initramfs: a cpio (newc) archive with machined as `/init` and the kernel modules.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use cpio::newc::{Builder, ModeFileType};

use crate::kernel::Kernel;
use crate::ImageError;

/// One archive member.
enum Member<'a> {
    Dir,
    /// Character device (major, minor).
    Char(u32, u32),
    Bytes(&'a [u8], u32),
    File(&'a Path, u32),
}

struct Archive<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Archive<W> {
    fn add(&mut self, name: &str, member: Member<'_>) -> Result<(), ImageError> {
        self.ino += 1;
        let io = |e| ImageError::Io {
            what: "writing initramfs member",
            path: name.to_string(),
            source: e,
        };
        let b = Builder::new(name).ino(self.ino).uid(0).gid(0);
        let out = &mut self.out;
        match member {
            Member::Dir => {
                let w = b
                    .mode(0o755)
                    .set_mode_file_type(ModeFileType::Directory)
                    .nlink(2)
                    .write(out, 0);
                w.finish().map_err(io)?;
            }
            Member::Char(major, minor) => {
                let w = b
                    .mode(0o600)
                    .set_mode_file_type(ModeFileType::Char)
                    .rdev_major(major)
                    .rdev_minor(minor)
                    .write(out, 0);
                w.finish().map_err(io)?;
            }
            Member::Bytes(data, mode) => {
                let size = u32::try_from(data.len())
                    .map_err(|_| ImageError::Invalid(format!("{name} is too big for cpio")))?;
                let mut w = b
                    .mode(mode)
                    .set_mode_file_type(ModeFileType::Regular)
                    .write(out, size);
                w.write_all(data).map_err(io)?;
                w.finish().map_err(io)?;
            }
            Member::File(path, mode) => {
                let mut f = File::open(path).map_err(ImageError::io("opening", path))?;
                let len = f.metadata().map_err(ImageError::io("reading", path))?.len();
                let size = u32::try_from(len).map_err(|_| {
                    ImageError::Invalid(format!("{} is too big for cpio", path.display()))
                })?;
                let mut w = b
                    .mode(mode)
                    .set_mode_file_type(ModeFileType::Regular)
                    .write(out, size);
                std::io::copy(&mut f, &mut w).map_err(io)?;
                w.finish().map_err(io)?;
            }
        }
        Ok(())
    }
}

/// Writes the initramfs: `/init` (machined), `/etc/initrd-release` (which tells machined it is in
/// the initramfs), `/dev/console` (the kernel opens it for init before devtmpfs exists), the
/// modules and their order.
pub fn write(
    out: &Path,
    machined: &Path,
    ballast: Option<&Path>,
    kernel: &Kernel,
    modules: &[crate::kernel::Module],
    late: &[crate::kernel::Module],
) -> Result<(), ImageError> {
    let file = File::create(out).map_err(ImageError::io("creating", out))?;
    let mut a = Archive {
        out: BufWriter::new(file),
        ino: 0,
    };
    for d in [
        "dev",
        "proc",
        "sys",
        "run",
        "sysroot",
        "etc",
        "lib",
        "lib/modules",
    ] {
        a.add(d, Member::Dir)?;
    }
    a.add("dev/console", Member::Char(5, 1))?;
    a.add("dev/null", Member::Char(1, 3))?;
    a.add(
        "etc/initrd-release",
        Member::Bytes(b"NAME=\"Plinth initramfs\"\nID=plinth\n", 0o644),
    )?;
    a.add("init", Member::File(machined, 0o755))?;
    if let Some(b) = ballast {
        a.add("lib/plinth", Member::Dir)?;
        a.add("lib/plinth/ballast", Member::File(b, 0o644))?;
    }
    let order = crate::kernel::order_text(modules);
    a.add(
        "lib/modules/plinth.order",
        Member::Bytes(order.as_bytes(), 0o644),
    )?;
    let order = crate::kernel::order_text(late);
    a.add(
        "lib/modules/plinth.late",
        Member::Bytes(order.as_bytes(), 0o644),
    )?;
    let all: Vec<&crate::kernel::Module> = modules.iter().chain(late).collect();

    let base = format!("lib/modules/{}", kernel.release);
    let mut dirs: Vec<String> = vec![base.clone()];
    for m in all.iter().map(|m| &m.path) {
        let mut parent = Path::new(m).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(format!("{base}/{}", p.display()));
            parent = p.parent();
        }
        for d in chain.into_iter().rev() {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    for d in &dirs {
        a.add(d, Member::Dir)?;
    }
    for m in all.iter().map(|m| &m.path) {
        a.add(
            &format!("{base}/{m}"),
            Member::File(&kernel.modules_dir().join(m), 0o644),
        )?;
    }
    let out_w = cpio::newc::trailer(a.out).map_err(ImageError::io("finishing", out))?;
    out_w
        .into_inner()
        .map_err(|e| ImageError::Io {
            what: "flushing",
            path: out.display().to_string(),
            source: e.into_error(),
        })?
        .sync_all()
        .map_err(ImageError::io("syncing", out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_archive_holds_init_the_console_node_and_the_modules_in_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("k");
        let mdir = root.join("lib/modules/6.1.0-1-amd64/kernel/fs");
        std::fs::create_dir_all(&mdir).expect("mkdir");
        std::fs::write(mdir.join("a.ko"), b"AAAA").expect("write");
        let machined = dir.path().join("machined");
        std::fs::write(&machined, b"\x7fELF").expect("write");
        let kernel = Kernel {
            release: "6.1.0-1-amd64".into(),
            root,
            vmlinuz: dir.path().join("vmlinuz"),
        };
        let out = dir.path().join("initrd.cpio");
        let modules = [crate::kernel::Module {
            path: "kernel/fs/a.ko".into(),
            params: vec![],
            after: vec![],
        }];
        write(&out, &machined, None, &kernel, &modules, &[]).expect("write");

        let mut names = Vec::new();
        let mut f = File::open(&out).expect("open");
        loop {
            let r = cpio::newc::Reader::new(f).expect("entry");
            if r.entry().is_trailer() {
                break;
            }
            let e = r.entry();
            names.push((
                e.name().to_string(),
                e.mode() & 0o170000,
                e.rdev_major(),
                e.rdev_minor(),
            ));
            f = r.finish().expect("next");
        }
        assert!(names.contains(&("init".into(), 0o100000, 0, 0)));
        assert!(names.contains(&("dev/console".into(), 0o020000, 5, 1)));
        assert!(names
            .iter()
            .any(|n| n.0 == "lib/modules/6.1.0-1-amd64/kernel/fs/a.ko"));
        // Parent directories come before the files in them.
        let pos = |n: &str| names.iter().position(|e| e.0 == n).expect(n);
        assert!(
            pos("lib/modules/6.1.0-1-amd64/kernel/fs")
                < pos("lib/modules/6.1.0-1-amd64/kernel/fs/a.ko")
        );
    }
}
