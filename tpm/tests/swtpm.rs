//! Sealing and unsealing against a real TPM 2.0 implementation: swtpm (libtpms), started the
//! way QEMU's guests get it, talking the raw command protocol over its socket. The PCR signing
//! key and its signatures come from openssl, as the image builder's would.

use std::io::{Read, Write};

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tpm::policy::{self, PcrSignature, RsaPublic};
use tpm::seal::{self, Sealed};
use tpm::{Tpm, TpmError};

const PARENT: u32 = 0x8150_6C01;

struct Swtpm {
    child: Child,
    dir: tempfile::TempDir,
}

impl Swtpm {
    /// A fresh TPM (its own state directory: its own keys).
    fn start() -> Swtpm {
        let dir = tempfile::tempdir().expect("tmp");
        let mut child = Command::new("swtpm")
            .args([
                "socket",
                "--tpm2",
                "--flags",
                "not-need-init,startup-clear",
                "--tpmstate",
            ])
            .arg(format!("dir={}", dir.path().display()))
            .arg("--server")
            .arg(format!(
                "type=unixio,path={}",
                dir.path().join("cmd").display()
            ))
            .arg("--ctrl")
            .arg(format!(
                "type=unixio,path={}",
                dir.path().join("ctrl").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm (apt-get install swtpm)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.path().join("cmd").exists() || !dir.path().join("ctrl").exists() {
            assert!(child.try_wait().expect("wait").is_none(), "swtpm exited");
            assert!(Instant::now() < deadline, "swtpm did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Swtpm { child, dir }
    }

    fn tpm(&self) -> Tpm {
        // The socket's file appears at bind(), before swtpm listens: a connect in between is
        // refused, so it is retried for a while.
        let deadline = Instant::now() + Duration::from_secs(10);
        let t = loop {
            match tpm::device::Socket::connect(&self.dir.path().join("cmd")) {
                Ok(t) => break t,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("connect: {e:?}"),
            }
        };
        let mut tpm = Tpm::new(Box::new(t));
        tpm.startup().expect("startup");
        tpm
    }

    /// A power cycle: the PCRs start from zero again, persistent keys stay. swtpm serves one
    /// client at a time, so the old connection goes first.
    fn reboot(&self, old: Tpm) -> Tpm {
        drop(old);
        self.power_cycle();
        self.tpm()
    }

    fn power_cycle(&self) {
        let mut c =
            std::os::unix::net::UnixStream::connect(self.dir.path().join("ctrl")).expect("ctrl");
        // CMD_INIT (2) with no flags; the answer is a 4-byte result code.
        c.write_all(&[0, 0, 0, 2, 0, 0, 0, 0]).expect("init");
        let mut res = [0u8; 4];
        c.read_exact(&mut res).expect("init result");
        assert_eq!(res, [0; 4], "CMD_INIT");
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An RSA-2048 PCR signing key made by openssl.
struct PcrKey {
    dir: tempfile::TempDir,
    public: RsaPublic,
}

impl PcrKey {
    fn new() -> PcrKey {
        let dir = tempfile::tempdir().expect("tmp");
        let key = dir.path().join("k.pem");
        run(Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key));
        run(Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(dir.path().join("pub.pem")));
        let public = RsaPublic::from_pem(&std::fs::read(dir.path().join("pub.pem")).expect("pub"))
            .expect("public key");
        PcrKey { dir, public }
    }

    /// The `.pcrsig` a UKI measuring to `pcr11` would carry.
    fn sign(&self, pcr11: &[u8; 32]) -> PcrSignature {
        PcrSignature::sign(pcr11, &self.public, |msg| {
            let m = self.dir.path().join("msg");
            std::fs::write(&m, msg).expect("write");
            let sig = self.dir.path().join("sig");
            run(Command::new("openssl")
                .args(["dgst", "-sha256", "-sign"])
                .arg(self.dir.path().join("k.pem"))
                .arg("-out")
                .arg(&sig)
                .arg(&m));
            Ok(std::fs::read(&sig).expect("sig"))
        })
        .expect("sign")
    }
}

fn run(c: &mut Command) {
    let out = c.output().expect("openssl (apt-get install openssl)");
    assert!(out.status.success(), "{out:?}");
}

/// Plays the firmware and systemd-stub: PCR 7 gets the Secure Boot state, PCR 11 the UKI.
fn boot(tpm: &mut Tpm, secure_boot: &[u8], uki: &[u8]) -> [u8; 32] {
    tpm.pcr_extend(7, &policy::sha256(&[secure_boot]))
        .expect("pcr7");
    let sections: [(&str, &[u8]); 2] = [(".linux", uki), (".cmdline", b"plinth.slot=A")];
    for (name, data) in sections {
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        tpm.pcr_extend(11, &policy::sha256(&[&n])).expect("pcr11");
        tpm.pcr_extend(11, &policy::sha256(&[data])).expect("pcr11");
    }
    let pcr11 = tpm.pcr_read(&[11]).expect("read")[0];
    assert_eq!(
        pcr11,
        policy::predict_pcr11(&sections),
        "the prediction is the TPM's"
    );
    pcr11
}

fn policy_error(r: Result<Vec<u8>, TpmError>) -> String {
    match r {
        Err(TpmError::Policy(m)) => m,
        other => panic!("expected a policy refusal, got {other:?}"),
    }
}

#[test]
fn a_sealed_key_unseals_only_under_its_policy_and_never_after_its_parent_is_evicted() {
    let sw = Swtpm::start();
    let mut tpm = sw.tpm();
    let key = PcrKey::new();
    let pcr11 = boot(&mut tpm, b"secure boot on, our keys", b"kernel A");
    let sig_a = key.sign(&pcr11);

    seal::new_parent(&mut tpm, PARENT).expect("parent");
    let secret = [0x5au8; 64];
    let sealed = seal::seal(&mut tpm, PARENT, &secret, &key.public, true).expect("seal");
    assert_eq!(sealed.pcrs(), [7, 11]);
    // The blob survives a trip through JSON (a volume header keeps it so).
    let sealed: Sealed =
        serde_json::from_str(&serde_json::to_string(&sealed).expect("json")).expect("back");
    assert_eq!(
        seal::unseal(&mut tpm, &sealed, &sig_a, &key.public).expect("unseal"),
        secret
    );

    // PCR 11 extended after the stub (what machined does once it has unsealed): locked.
    tpm.pcr_extend(11, &policy::sha256(&[b"plinth: volumes unlocked"]))
        .expect("extend");
    let err = policy_error(seal::unseal(&mut tpm, &sealed, &sig_a, &key.public));
    assert!(
        err.contains("no signed PCR policy approves PCR 11"),
        "{err}"
    );

    // Next boot, another UKI signed by the same key (an A/B upgrade): it unseals.
    let mut tpm = sw.reboot(tpm);
    let pcr11_b = boot(&mut tpm, b"secure boot on, our keys", b"kernel B");
    assert_ne!(pcr11_b, pcr11);
    assert_eq!(
        seal::unseal(&mut tpm, &sealed, &key.sign(&pcr11_b), &key.public).expect("unseal B"),
        secret
    );
    // ...but not with A's signature, nor with another key's.
    let err = policy_error(seal::unseal(&mut tpm, &sealed, &sig_a, &key.public));
    assert!(err.contains("no signed PCR policy"), "{err}");
    let other = PcrKey::new();
    let err = policy_error(seal::unseal(
        &mut tpm,
        &sealed,
        &other.sign(&pcr11_b),
        &other.public,
    ));
    assert!(err.contains("signed by key"), "{err}");

    // Secure Boot turned off (PCR 7 differs): refused, naming PCR 7.
    let mut tpm = sw.reboot(tpm);
    let pcr11 = boot(&mut tpm, b"secure boot off", b"kernel A");
    let err = policy_error(seal::unseal(
        &mut tpm,
        &sealed,
        &key.sign(&pcr11),
        &key.public,
    ));
    assert!(err.contains("PCR 7"), "{err}");

    // The parent evicted (a reset's crypto-erase): nothing unseals, even a saved blob under
    // the right PCRs; a new parent at the same handle does not bring it back.
    let mut tpm = sw.reboot(tpm);
    let pcr11 = boot(&mut tpm, b"secure boot on, our keys", b"kernel A");
    let sig = key.sign(&pcr11);
    assert!(seal::erase(&mut tpm, PARENT).expect("erase"));
    assert!(!seal::erase(&mut tpm, PARENT).expect("erase again"));
    let err = policy_error(seal::unseal(&mut tpm, &sealed, &sig, &key.public));
    assert!(err.contains("holds no parent key"), "{err}");
    seal::new_parent(&mut tpm, PARENT).expect("new parent");
    let err = policy_error(seal::unseal(&mut tpm, &sealed, &sig, &key.public));
    assert!(err.contains("does not belong"), "{err}");
}

#[test]
fn a_key_sealed_by_one_tpm_does_not_unseal_on_another() {
    let key = PcrKey::new();
    let first = Swtpm::start();
    let mut tpm = first.tpm();
    let pcr11 = boot(&mut tpm, b"sb", b"kernel");
    seal::new_parent(&mut tpm, PARENT).expect("parent");
    let sealed = seal::seal(&mut tpm, PARENT, b"secret", &key.public, false).expect("seal");
    assert_eq!(sealed.pcrs(), [11], "PCR 7 not bound");

    let second = Swtpm::start();
    let mut other = second.tpm();
    boot(&mut other, b"sb", b"kernel");
    let err = policy_error(seal::unseal(
        &mut other,
        &sealed,
        &key.sign(&pcr11),
        &key.public,
    ));
    assert!(err.contains("another machine's TPM"), "{err}");
    // Even with a parent of its own at the same handle.
    seal::new_parent(&mut other, PARENT).expect("parent");
    let err = policy_error(seal::unseal(
        &mut other,
        &sealed,
        &key.sign(&pcr11),
        &key.public,
    ));
    assert!(err.contains("another machine's TPM"), "{err}");
}
