//! Debian's etcd run with the command lines [`Member`] makes, and machined's client calls
//! against it: a new one-member cluster, two more joining as learners and promoted once caught
//! up, a quorum read, a live member's name or URL refused, a member that lost its data removed
//! and added anew, and a cluster that lost quorum reported unhealthy.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::gen::{generate_cluster, ClusterNode, ClusterOptions};
use config::MachineType;
use etcd::{Credentials, Etcd, Member, PkiFiles, Start};

mod common;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(member: &Member, how: &Start, log: &Path) -> Running {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()));
    assert!(
        found,
        "etcd is missing: apt-get install etcd-server (./x test does)"
    );
    let log = std::fs::File::create(log).expect("log");
    Running(
        Command::new("etcd")
            .args(member.args(how))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd"),
    )
}

async fn until<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd::EtcdError>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_join_as_learners_are_promoted_and_quorum_is_checked() {
    let nodes = common::free_ports(9)
        .chunks(3)
        .zip(1..)
        .map(|(ports, i)| ClusterNode {
            name: format!("cp-{i}"),
            machine_type: MachineType::Controlplane,
            address: "127.0.0.1/8".into(),
            endpoint: format!("127.0.0.1:{}", ports[0]),
            etcd_ports: (ports[1], ports[2]),
        })
        .collect();
    let g = generate_cluster(&ClusterOptions {
        cluster: "joins".into(),
        nodes,
        interface: "lo".into(),
        gateway: None,
        trusted_keys: vec![],
    })
    .expect("configs");
    let dir = tempfile::tempdir().expect("tmp");
    let members: Vec<Member> = g
        .nodes
        .iter()
        .map(|n| {
            let c = n.cluster.as_ref().expect("cluster");
            let d = dir.path().join(&n.machine.name);
            let pki = PkiFiles::under(&d.join("pki"));
            std::fs::create_dir_all(d.join("pki")).expect("mkdir");
            let m = c.etcd.member.as_ref().expect("member");
            std::fs::write(&pki.ca, &c.etcd.ca).expect("ca");
            std::fs::write(&pki.cert, &m.cert).expect("cert");
            std::fs::write(&pki.key, &m.key).expect("key");
            Member::of(&n.machine.name, c, &d.join("data"), pki).expect("member")
        })
        .collect();
    let cluster = g.nodes[0].cluster.clone().expect("cluster");
    let creds = Credentials::of(&cluster);
    let endpoints = Etcd::endpoints_of(&cluster);
    let log = |i: usize| dir.path().join(format!("etcd-{i}.log"));

    let mut running = vec![start(&members[0], &Start::New, &log(0))];
    let first = [members[0].me.client_url()];
    let etcd = until("the first member's quorum", 30, || async {
        let e = Etcd::connect(&first, &creds).await?;
        e.check_quorum().await?;
        Ok(e)
    })
    .await;
    etcd.put("/plinth/test", "before").await.expect("put");

    for (i, m) in members.iter().enumerate().skip(1) {
        // etcd refuses a new member until the cluster has been healthy for a few seconds.
        let peer = m.me.peer_url();
        let joined = until("adding a learner", 30, || etcd.join(&m.name, &peer, &creds)).await;
        let list = etcd.members().await.expect("members");
        assert!(
            list.iter().any(|x| x.id == joined.id && x.learner),
            "{list:?}"
        );
        assert_eq!(joined.initial.len(), i + 1, "{joined:?}");
        // Asked again before it started (a join cut short): the same learner.
        let again = etcd.join(&m.name, &peer, &creds).await.expect("again");
        assert_eq!(again.id, joined.id);
        running.push(start(m, &Start::Join(joined.initial), &log(i)));
        until("promoting the learner", 60, || etcd.promote(joined.id)).await;
    }
    let all = Etcd::connect(&endpoints, &creds).await.expect("connect");
    let list = all.members().await.expect("members");
    let mut names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["cp-1", "cp-2", "cp-3"], "{list:?}");
    assert!(list.iter().all(|m| !m.learner), "{list:?}");
    all.check_quorum().await.expect("quorum");
    assert_eq!(
        all.get("/plinth/test").await.expect("get").as_deref(),
        Some("before")
    );

    // A live member's name, or another name at a live member's peer URL: refused, nothing
    // changed.
    let err = all
        .join("cp-2", &members[1].me.peer_url(), &creds)
        .await
        .expect_err("cp-2 is alive");
    assert!(matches!(err, etcd::EtcdError::Conflict(_)), "{err}");
    let err = all
        .join("cp-9", &members[1].me.peer_url(), &creds)
        .await
        .expect_err("cp-2's URL");
    assert!(matches!(err, etcd::EtcdError::Conflict(_)), "{err}");
    assert_eq!(all.members().await.expect("members").len(), 3);

    // cp-3 loses its data (a reset): joining again removes the stale member of its name and
    // adds it anew.
    let old = all
        .find(&members[2].me.peer_url())
        .await
        .expect("find")
        .expect("cp-3 listed");
    drop(running.pop());
    std::fs::remove_dir_all(&members[2].data_dir).expect("wipe cp-3");
    let peer = members[2].me.peer_url();
    let joined = until("joining again", 30, || all.join("cp-3", &peer, &creds)).await;
    assert_ne!(joined.id, old.id);
    let list = all.members().await.expect("members");
    assert!(list.iter().all(|m| m.id != old.id), "{list:?}");
    running.push(start(&members[2], &Start::Join(joined.initial), &log(3)));
    until("promoting the new cp-3", 60, || all.promote(joined.id)).await;
    all.check_quorum().await.expect("quorum");
    assert_eq!(all.members().await.expect("members").len(), 3);

    // Two of three gone: no quorum, and the read says so instead of hanging.
    drop(running.split_off(1));
    let lone = Etcd::connect(&first, &creds).await.expect("connect");
    let err = lone.check_quorum().await.expect_err("no quorum");
    assert!(!err.to_string().is_empty());
}
