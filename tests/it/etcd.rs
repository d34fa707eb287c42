//! The etcd state store on real etcd (Debian's `etcd-server`, started here on loopback ports
//! with TLS and client-certificate authentication): writes through one store reach another
//! store's view through its watch, a compacted watch resyncs, and two gateway replicas sharing
//! one etcd enforce each other's locks and posture.

use crate::support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::{drain, free_port, get, raw_client, send, Harness, ServeProcess};
use tokio::sync::broadcast::Receiver;
use ztgate::demo::{DevJwtIssuer, DevSettings};
use ztgate::state::{
    Change, ChangeKind, EtcdConfig, EtcdStore, Lock, LockTarget, Posture, PostureRecord, Store,
};
use ztgate_testkit::pki::{Ca, LeafSpec};
use ztgate_testkit::{CertKey, DevIssuer};

/// An etcd cluster on loopback (client URLs with TLS and client-certificate auth, peers over
/// plain http), its members killed on drop.
struct Etcd {
    members: Vec<Option<Child>>,
    /// Each member's command line, to restart it after a kill.
    args: Vec<Vec<String>>,
    _dir: tempfile::TempDir,
    /// The first member's client URL.
    url: String,
    urls: Vec<String>,
    ca_pem: String,
    /// The CA of etcd's certificates and of the gateway's client certificate.
    ca: Ca,
    ca_file: PathBuf,
    client: CertKey,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl Etcd {
    fn start() -> Etcd {
        Etcd::start_cluster(1)
    }

    fn start_cluster(n: usize) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("etcd-ca");
        // The JSON gateway of etcd 3.4 dials its own gRPC port with the serving certificate, so
        // that certificate must be good for client auth too.
        let server = ca.issue(&LeafSpec {
            common_name: "etcd".into(),
            dns_names: vec!["localhost".into()],
            ip_addresses: vec!["127.0.0.1".parse().unwrap()],
            server: true,
            client: true,
            ..Default::default()
        });
        let client = ca.issue_client("ztgate", &[]);
        let (srv_crt, srv_key) = server.write(dir.path(), "server");
        let (cert_file, key_file) = client.write(dir.path(), "client");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let urls: Vec<String> = ports
            .iter()
            .map(|(c, _)| format!("https://127.0.0.1:{c}"))
            .collect();
        let peers: Vec<String> = ports
            .iter()
            .map(|(_, p)| format!("http://127.0.0.1:{p}"))
            .collect();
        let cluster = peers
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}={p}"))
            .collect::<Vec<_>>()
            .join(",");
        let args: Vec<Vec<String>> = (0..n)
            .map(|i| {
                vec![
                    format!("--name=m{i}"),
                    format!("--data-dir={}", dir.path().join(format!("m{i}")).display()),
                    format!("--listen-client-urls={}", urls[i]),
                    format!("--advertise-client-urls={}", urls[i]),
                    format!("--listen-peer-urls={}", peers[i]),
                    format!("--initial-advertise-peer-urls={}", peers[i]),
                    format!("--initial-cluster={cluster}"),
                    "--initial-cluster-state=new".into(),
                    "--initial-cluster-token=ztgate-test".into(),
                    format!("--cert-file={}", srv_crt.display()),
                    format!("--key-file={}", srv_key.display()),
                    format!("--trusted-ca-file={}", ca_file.display()),
                    "--client-cert-auth".into(),
                    "--log-level=warn".into(),
                ]
            })
            .collect();
        let members = (0..n)
            .map(|i| Some(spawn_member(dir.path(), i, &args[i])))
            .collect();
        Etcd {
            members,
            args,
            url: urls[0].clone(),
            urls,
            ca_pem: ca.cert_pem(),
            ca,
            ca_file,
            client,
            cert_file,
            key_file,
            _dir: dir,
        }
    }

    /// Starts member `i` again after [`Etcd::kill`], on its data directory.
    fn restart(&mut self, i: usize) {
        assert!(self.members[i].is_none(), "member {i} is running");
        self.members[i] = Some(spawn_member(self._dir.path(), i, &self.args[i]));
    }

    /// The index of the member that is the raft leader now.
    async fn leader(&self) -> usize {
        for (i, url) in self.urls.iter().enumerate() {
            let client = raw_client(&self.ca_pem, Some(&self.client), false);
            let req = Request::post(format!("{url}/v3/maintenance/status"))
                .body(Full::new(Bytes::from_static(b"{}")))
                .unwrap();
            let (code, _, body) = send(&client, req).await;
            assert_eq!(code, 200, "{body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            if v["leader"] == v["header"]["member_id"] {
                return i;
            }
        }
        panic!("no member is the leader");
    }

    /// Kills member `i` (SIGKILL).
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The `state.etcd` block for these endpoints (YAML, starting at `etcd:`).
    fn yaml(&self, endpoints: &[String], prefix: &str) -> String {
        self.yaml_with(endpoints, prefix, "  dialTimeout: 2s\n")
    }

    /// [`Etcd::yaml`] with other settings (`extra`: lines indented by two spaces).
    fn yaml_with(&self, endpoints: &[String], prefix: &str, extra: &str) -> String {
        format!(
            "etcd:\n  endpoints: {endpoints:?}\n  keyPrefix: {prefix}\n  caFile: \"{}\"\n  certFile: \"{}\"\n  keyFile: \"{}\"\n{extra}",
            self.ca_file.display(),
            self.cert_file.display(),
            self.key_file.display()
        )
    }

    fn config(&self, endpoints: &[String], prefix: &str) -> EtcdConfig {
        let y: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&self.yaml(endpoints, prefix)).unwrap();
        serde_yaml_ng::from_value(y["etcd"].clone()).unwrap()
    }

    /// A store on this etcd, retried while etcd starts.
    async fn store(&self, endpoints: &[String], prefix: &str) -> EtcdStore {
        let cfg = self.config(endpoints, prefix);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match EtcdStore::connect(&cfg).await {
                Ok(s) => return s,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("etcd store: {e}"),
            }
        }
    }

    /// Calls the JSON gateway directly (with the client certificate).
    async fn call(&self, path: &str, body: Value) -> Value {
        let client = raw_client(&self.ca_pem, Some(&self.client), false);
        let req = Request::post(format!("{}{path}", self.url))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let (code, _, body) = send(&client, req).await;
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn compact_to_now(&self) {
        let rev = self.call("/v3/kv/range", json!({"key": "AA=="})).await["header"]["revision"]
            .as_str()
            .unwrap()
            .to_owned();
        self.call(
            "/v3/kv/compaction",
            json!({"revision": rev, "physical": true}),
        )
        .await;
    }
}

fn spawn_member(dir: &std::path::Path, i: usize, args: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("etcd-m{i}.log")))
        .unwrap();
    Command::new("etcd")
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("etcd runs (scripts/install-test-deps installs etcd-server)")
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A TCP forwarder to etcd that can cut every connection and refuse new ones, so a store's
/// watch can be made to miss events.
struct Cut {
    url: String,
    open: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Cut {
    async fn start(target_url: &str) -> Cut {
        let target = target_url.trim_start_matches("https://").to_owned();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
        let open = Arc::new(AtomicBool::new(true));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = l.accept().await else {
                    return;
                };
                if !o.load(Ordering::SeqCst) {
                    continue;
                }
                let target = target.clone();
                c.lock().unwrap().push(tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                }));
            }
        });
        Cut {
            url,
            open,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

fn lock(user: &str) -> Lock {
    Lock::new(LockTarget::User(user.into()), "stolen laptop", None, "test").unwrap()
}

fn posture(device: &str, ttl: Duration) -> PostureRecord {
    let now = SystemTime::now();
    PostureRecord {
        device_id: device.into(),
        attributes: Posture {
            disk_encrypted: Some(true),
            ..Default::default()
        },
        source: "self".into(),
        collected_at: now,
        expires_at: now + ttl,
    }
}

/// The next change on `rx`, within `within`.
/// How long a change may take to reach another store or replica. It typically takes
/// milliseconds (the tests print the figures); the bound only catches a change that never comes,
/// not a slow machine.
const PROPAGATION: Duration = Duration::from_secs(10);

async fn next_change(rx: &mut Receiver<Change>, within: Duration) -> Change {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("a change arrived in time")
        .expect("change channel open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_one_store_reach_another_through_its_watch() {
    let etcd = Etcd::start();
    let eps = vec![etcd.url.clone()];
    let a = etcd.store(&eps, "/zt").await;
    let b = etcd.store(&eps, "/zt").await;
    let mut rx = b.subscribe();
    let mut latencies = Vec::new();

    // A lock put through a: b sees it, with etcd's revision (the figures are printed).
    let l = lock("alice");
    let t = Instant::now();
    let rev = a.put_lock(l.clone()).await.unwrap();
    let c = next_change(&mut rx, PROPAGATION).await;
    latencies.push(t.elapsed());
    assert_eq!(c.revision, rev);
    assert_eq!(c.kind, ChangeKind::LockPut(l.clone()));
    // The writer reads its own write at once.
    assert_eq!(a.lock(&l.id), Some(l.clone()));
    assert_eq!(b.locks(), vec![l.clone()]);
    assert_eq!(a.revision(), rev);

    // A device id with a slash and a percent sign stays one key.
    let p = posture("laptop/7%", Duration::from_secs(600));
    let t = Instant::now();
    let prev = a.put_posture(p.clone()).await.unwrap();
    let c = next_change(&mut rx, PROPAGATION).await;
    latencies.push(t.elapsed());
    assert!(prev > rev);
    assert_eq!(c.kind, ChangeKind::PosturePut("laptop/7%".into()));
    assert_eq!(b.posture("laptop/7%"), Some(p.clone()));

    // Deletes: the removed record comes back; deleting again writes nothing.
    let t = Instant::now();
    let (_, removed) = a.delete_lock(&l.id).await.unwrap().unwrap();
    assert_eq!(removed, l);
    let c = next_change(&mut rx, PROPAGATION).await;
    latencies.push(t.elapsed());
    assert_eq!(c.kind, ChangeKind::LockDeleted(l.id.clone()));
    assert!(b.locks().is_empty());
    assert!(a.delete_lock(&l.id).await.unwrap().is_none());
    let (_, removed) = b.delete_posture("laptop/7%").await.unwrap().unwrap();
    assert_eq!(removed, p);
    let c = next_change(&mut rx, PROPAGATION).await;
    assert_eq!(c.kind, ChangeKind::PostureDeleted("laptop/7%".into()));
    // a hears of b's delete through its own watch, a moment later.
    support::wait_until(PROPAGATION, "a drops the record b deleted", || {
        a.posture("laptop/7%").is_none()
    })
    .await;

    // A store opened now loads what is there; another prefix sees nothing of it.
    let l2 = lock("bob");
    a.put_lock(l2.clone()).await.unwrap();
    let c2 = etcd.store(&eps, "/zt").await;
    assert_eq!(c2.locks(), vec![l2.clone()]);
    let other = etcd.store(&eps, "/other").await;
    assert!(other.locks().is_empty());

    // An invalid record is refused before anything is written.
    let mut bad = lock("carol");
    bad.id = String::new();
    assert!(a.put_lock(bad).await.is_err());

    latencies.sort();
    eprintln!(
        "etcd store-to-store propagation (write start to change on the other store): {latencies:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_an_expiry_is_deleted_by_its_lease() {
    let etcd = Etcd::start();
    let eps = vec![etcd.url.clone()];
    let a = etcd.store(&eps, "/zt").await;
    let b = etcd.store(&eps, "/zt").await;
    let mut rx = b.subscribe();
    a.put_posture(posture("laptop-1", Duration::from_secs(1)))
        .await
        .unwrap();
    assert!(matches!(
        next_change(&mut rx, PROPAGATION).await.kind,
        ChangeKind::PosturePut(_)
    ));
    // Lease of 1 s + 1 s grace; etcd's lease checks run about every 500 ms.
    let c = next_change(&mut rx, Duration::from_secs(6)).await;
    assert_eq!(c.kind, ChangeKind::PostureDeleted("laptop-1".into()));
    let fresh = etcd.store(&eps, "/zt").await;
    assert!(fresh.posture("laptop-1").is_none());
    assert!(fresh.snapshot().1.posture.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_cut_off_resumes_from_its_revision_and_resyncs_after_compaction() {
    let etcd = Etcd::start();
    let cut = Cut::start(&etcd.url).await;
    let a = etcd.store(std::slice::from_ref(&etcd.url), "/zt").await;
    let b = etcd.store(std::slice::from_ref(&cut.url), "/zt").await;
    let mut rx = b.subscribe();

    // Cut b off; what a writes meanwhile reaches b when it reconnects (resumed watch).
    cut.cut();
    let l1 = lock("alice");
    a.put_lock(l1.clone()).await.unwrap();
    // Nothing may arrive while b is cut off: the sleep gives it the chance to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.locks().is_empty(), "b is cut off");
    cut.restore();
    let c = next_change(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(c.kind, ChangeKind::LockPut(l1.clone()));
    assert_eq!(b.locks(), vec![l1.clone()]);

    // Cut b off again; a writes, deletes, and etcd compacts that history away. b resyncs and
    // tells its subscribers about the difference.
    cut.cut();
    let l2 = lock("bob");
    a.put_lock(l2.clone()).await.unwrap();
    a.delete_lock(&l1.id).await.unwrap().unwrap();
    a.put_posture(posture("laptop-9", Duration::from_secs(600)))
        .await
        .unwrap();
    etcd.compact_to_now().await;
    cut.restore();
    let mut kinds = Vec::new();
    for _ in 0..3 {
        kinds.push(next_change(&mut rx, Duration::from_secs(5)).await.kind);
    }
    assert!(
        kinds.contains(&ChangeKind::LockPut(l2.clone())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&ChangeKind::LockDeleted(l1.id.clone())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&ChangeKind::PosturePut("laptop-9".into())),
        "{kinds:?}"
    );
    assert_eq!(b.locks(), vec![l2.clone()]);
    assert!(b.posture("laptop-9").is_some());
    // b's revision catches up with a's (it is set just after the changes are published).
    support::wait_until(PROPAGATION, "b's revision catches up with a's", || {
        b.applied_revision() >= a.applied_revision()
    })
    .await;

    // And the watch works after the resync.
    let t = Instant::now();
    a.delete_lock(&l2.id).await.unwrap().unwrap();
    let c = next_change(&mut rx, PROPAGATION).await;
    eprintln!("after resync, propagation: {:?}", t.elapsed());
    assert_eq!(c.kind, ChangeKind::LockDeleted(l2.id.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_loses_a_member_without_an_error() {
    let mut etcd = Etcd::start_cluster(3);
    let first = etcd.store(&etcd.urls, "/zt").await;
    drop(first);
    // a writes and b watches through the leader (first in their lists), which is then killed.
    let leader = etcd.leader().await;
    let mut eps = etcd.urls.clone();
    eps.rotate_left(leader);
    let a = etcd.store(&eps, "/zt").await;
    let b = etcd.store(&eps, "/zt").await;
    let mut rx = b.subscribe();
    let l1 = lock("alice");
    a.put_lock(l1.clone()).await.unwrap();
    assert_eq!(
        next_change(&mut rx, PROPAGATION).await.kind,
        ChangeKind::LockPut(l1.clone())
    );

    // Kill the leader: writes wait out the election (retried on the other members).
    etcd.kill(leader);
    let t = Instant::now();
    let l2 = lock("bob");
    a.put_lock(l2.clone())
        .await
        .expect("a write with one member down");
    let wrote = t.elapsed();
    let c = next_change(&mut rx, Duration::from_secs(5)).await;
    let seen = t.elapsed();
    assert_eq!(c.kind, ChangeKind::LockPut(l2.clone()));
    eprintln!("leader killed: write took {wrote:?}, seen on the other store after {seen:?}");

    // Steady state on the two remaining members: deletes and puts propagate as before.
    let t = Instant::now();
    a.delete_lock(&l1.id).await.unwrap().unwrap();
    let c = next_change(&mut rx, PROPAGATION).await;
    eprintln!("two of three members: propagation {:?}", t.elapsed());
    assert_eq!(c.kind, ChangeKind::LockDeleted(l1.id.clone()));
    assert_eq!(b.locks(), vec![l2.clone()]);
    // A store opened now, with the dead member first in its list, loads everything.
    let c2 = etcd.store(&eps, "/zt").await;
    assert_eq!(c2.locks(), vec![l2]);
}

// --- two gateway replicas sharing one etcd ---

const POLICIES: &str = r#"
@id("discovery-read")
permit (principal, action == k8s::Action::"get", resource is k8s::NonResourceURL)
when { resource.path == "/api" || resource.path like "/api/*" || resource.path == "/apis" || resource.path like "/apis/*" || resource.path like "/openapi/*" || resource.path == "/version" };

@id("team-a-namespace")
permit (principal in k8s::Group::"team-a", action, resource in k8s::Namespace::"team-a");

@id("security-manages-locks")
permit (principal in k8s::Group::"security", action, resource is k8s::NonResourceURL)
when { resource.path like "/v1/locks*" };
"#;

const WATCH: &str = "/api/v1/namespaces/team-a/pods?watch=1";
const PODS: &str = "/api/v1/namespaces/team-a/pods";

/// Fields drop in order: the gateways before etcd.
struct Replicas {
    r: Vec<Harness>,
    users: DevIssuer,
    device_ca: Ca,
    _dir: tempfile::TempDir,
    etcd: Etcd,
}

/// `n` gateway replicas on a one-member etcd.
async fn replicas(n: usize) -> Replicas {
    replicas_with(n, 1, "  dialTimeout: 2s\n").await
}

/// `n` gateway replicas, each with its own stand-in kube-apiserver, sharing an etcd cluster of
/// `members` (every replica lists all of them), with `extra` in their `state.etcd`.
async fn replicas_with(n: usize, members: usize, extra: &str) -> Replicas {
    let etcd = Etcd::start_cluster(members);
    // Wait until etcd answers before the gateways start.
    drop(etcd.store(&etcd.urls, "/gw").await);
    let users = DevIssuer::start(&Ca::new("users-idp-ca")).await.unwrap();
    let device_ca = Ca::new("device-ca");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), POLICIES).unwrap();
    let mut r = Vec::new();
    for _ in 0..n {
        r.push(
            Harness::start_with(DevSettings {
                jwt: vec![DevJwtIssuer {
                    url: users.issuer_url(),
                    ca_pem: users.ca_pem(),
                    audience: "ztgate".into(),
                    username_claim: "sub".into(),
                    username_prefix: String::new(),
                    groups_prefix: String::new(),
                }],
                device_ca_pem: Some(device_ca.cert_pem()),
                device_posture_yaml: Some(
                    "posture:\n  required: true\n  selfReports:\n    ttl: 10m\n".into(),
                ),
                policies: vec![dir.path().join("p.cedar")],
                state_etcd_yaml: Some(etcd.yaml_with(&etcd.urls, "/gw", extra)),
                ..Default::default()
            })
            .await,
        );
    }
    Replicas {
        etcd,
        users,
        device_ca,
        _dir: dir,
        r,
    }
}

impl Replicas {
    fn bearer(&self, h: &Harness, user: &str, groups: &[&str], path: &str) -> Request<Full<Bytes>> {
        let token = self.users.token(
            user,
            "ztgate",
            Duration::from_secs(600),
            json!({"groups": groups}),
        );
        Request::get(h.uri(path))
            .header("authorization", format!("Bearer {token}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_through_replica_1_closes_a_watch_on_replica_3_and_refuses_requests_on_all_three() {
    // Three replicas on a three-member etcd cluster.
    let rs = replicas_with(3, 3, "  dialTimeout: 2s\n").await;
    let (r1, r2, r3) = (&rs.r[0], &rs.r[1], &rs.r[2]);
    let admin = r1.demo.env.pki.user("sec-admin", &["security"]);
    let mut latencies = Vec::new();
    let streams = &r3.demo.gateway.gateway.streams;
    for round in 0..3 {
        // The previous round's watch is gone, so the count below is this round's.
        support::wait_until(
            PROPAGATION,
            "the previous round's watch is gone from replica 3",
            || streams.count() == 0,
        )
        .await;
        let alice = r3.client(None, round % 2 == 0);
        let watch = alice
            .request(rs.bearer(r3, "alice", &["team-a"], WATCH))
            .await
            .unwrap();
        assert_eq!(watch.status(), 200);
        let reader = tokio::spawn(drain(watch.into_body()));
        support::wait_until(
            PROPAGATION,
            "replica 3 holds the watch as a live stream",
            || streams.count() == 1,
        )
        .await;

        let t = Instant::now();
        let body = json!({"target": {"kind": "user", "value": "alice"}, "message": "incident 7"});
        let req = Request::post(r1.uri("/v1/locks"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let (code, _, body) = send(&r1.client(Some(&admin), false), req).await;
        assert_eq!(code, 201, "{body}");
        let text = tokio::time::timeout(PROPAGATION, reader)
            .await
            .expect("the watch on replica 3 was closed")
            .unwrap();
        latencies.push(t.elapsed());
        let last: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(last["type"], "ERROR", "{text}");
        assert_eq!(last["object"]["code"], 403, "{text}");
        assert!(text.contains("incident 7"), "{text}");

        // New requests on all three replicas are refused.
        for r in [r1, r2, r3] {
            let (code, _, body) = send(
                &r.client(None, false),
                rs.bearer(r, "alice", &["team-a"], PODS),
            )
            .await;
            assert_eq!(code, 403, "{body}");
            assert!(body.contains("access is locked: incident 7"), "{body}");
        }

        // Deleted through replica 2 (where it is listed): alice works again through replica 1.
        let admin2 = r2.demo.env.pki.user("sec-admin", &["security"]);
        let (code, _, body) =
            send(&r2.client(Some(&admin2), false), get(&r2.uri("/v1/locks"))).await;
        assert_eq!(code, 200, "{body}");
        let list: Value = serde_json::from_str(&body).unwrap();
        let id = list["items"][0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("a lock listed on replica 2: {list}"))
            .to_owned();
        let del = Request::delete(r2.uri(&format!("/v1/locks/{id}")))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (code, _, body) = send(&r2.client(Some(&admin2), false), del).await;
        assert_eq!(code, 200, "{body}");
        support::eventually(
            PROPAGATION,
            "alice is let in on replica 1 once the lock is removed",
            || async {
                let (code, _, _) = send(
                    &r1.client(None, false),
                    rs.bearer(r1, "alice", &["team-a"], PODS),
                )
                .await;
                (code == 200).then_some(())
            },
        )
        .await;
    }
    // The bound is on the median and far above the typical figure (printed), so a loaded
    // machine does not fail the test, while a lock that only lands on some later sweep does.
    latencies.sort();
    eprintln!("lock on replica 1 -> watch closed on replica 3: {latencies:?}");
    assert!(latencies[1] < Duration::from_secs(1), "{latencies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posture_report_to_one_replica_lets_requests_through_another() {
    let rs = replicas(2).await;
    let (r1, r2) = (&rs.r[0], &rs.r[1]);
    let laptop = rs.device_ca.issue_client("laptop-1", &[]);

    // Without posture, the device is refused on replica 1.
    let (code, _, body) = send(
        &r1.client(Some(&laptop), false),
        rs.bearer(r1, "alice", &["team-a"], PODS),
    )
    .await;
    assert_eq!(code, 401, "{body}");

    // The device reports to replica 2; replica 1 lets it through soon after.
    let report = Request::post(r2.uri("/v1/devices/posture"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"attributes": {"os": "linux", "diskEncrypted": true}}).to_string(),
        )))
        .unwrap();
    let t = Instant::now();
    let (code, _, body) = send(&r2.client(Some(&laptop), false), report).await;
    assert!(code == 200 || code == 201, "{code} {body}");
    support::eventually(
        PROPAGATION,
        "replica 1 lets the device through after its report to replica 2",
        || async {
            let (code, _, _) = send(
                &r1.client(Some(&laptop), false),
                rs.bearer(r1, "alice", &["team-a"], PODS),
            )
            .await;
            (code == 200).then_some(())
        },
    )
    .await;
    let took = t.elapsed();
    eprintln!("posture report on replica 2 -> request allowed on replica 1: {took:?}");

    // The replicas' config, with a directory added next to etcd, is refused, naming the field.
    let path = &r1.demo.env.config_path;
    let text = std::fs::read_to_string(path).unwrap();
    assert!(ztgate::config::load_str(&text, "r1", path.parent().unwrap()).is_ok());
    let both = text.replace("state:\n", "state:\n  directory: state\n");
    let err = ztgate::config::load_str(&both, "r1", path.parent().unwrap())
        .expect_err("directory and etcd together are refused")
        .to_string();
    assert!(
        err.contains("state") && err.contains("either directory or etcd, not both"),
        "{err}"
    );
}

// --- quorum lost and regained ---

async fn readyz(h: &Harness) -> (u16, String) {
    let (code, _, body) = send(&h.client(None, false), get(&h.uri("/readyz?verbose"))).await;
    (code, body)
}

/// Adds a lock through `h`, as its security admin.
async fn post_lock(h: &Harness, user: &str, message: &str) -> (u16, String) {
    let admin = h.demo.env.pki.user("sec-admin", &["security"]);
    let body = json!({"target": {"kind": "user", "value": user}, "message": message});
    let req = Request::post(h.uri("/v1/locks"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let (code, _, body) = send(&h.client(Some(&admin), false), req).await;
    (code, body)
}

/// Polls `f` every 50 ms until it is true, for at most `within`; how long it took.
async fn until<F, Fut>(within: Duration, what: &str, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let t = Instant::now();
    loop {
        if f().await {
            return t.elapsed();
        }
        assert!(t.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_quorum_makes_replicas_not_ready_refuses_writes_then_fails_closed_and_all_resumes() {
    const MAX_STALENESS: Duration = Duration::from_secs(6);
    let mut rs = replicas_with(
        3,
        3,
        "  dialTimeout: 1s\n  heartbeatInterval: 200ms\n  maxStaleness: 6s\n",
    )
    .await;
    let code_of = |rs: &Replicas, i: usize, user: &'static str| {
        let req = rs.bearer(&rs.r[i], user, &["team-a"], PODS);
        let client = rs.r[i].client(None, false);
        async move { send(&client, req).await }
    };

    // A lock written before the outage, in force on every replica.
    let (code, body) = post_lock(&rs.r[0], "mallory", "before the outage").await;
    assert_eq!(code, 201, "{body}");
    for i in 0..3 {
        until(
            Duration::from_secs(1),
            "the lock reached every replica",
            || async { code_of(&rs, i, "mallory").await.0 == 403 },
        )
        .await;
    }
    // Alice's watch through replica 2.
    let watch = rs.r[1]
        .client(None, false)
        .request(rs.bearer(&rs.r[1], "alice", &["team-a"], WATCH))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let reader = tokio::spawn(drain(watch.into_body()));

    // One member (not the leader) down: quorum kept, nothing changes.
    let leader = rs.etcd.leader().await;
    let follower = (leader + 1) % 3;
    rs.etcd.kill(follower);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        for h in &rs.r {
            let (code, body) = readyz(h).await;
            assert_eq!(code, 200, "one member down: {body}");
        }
        assert_eq!(code_of(&rs, 0, "alice").await.0, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, body) = post_lock(&rs.r[2], "bob", "one member down").await;
    assert_eq!(code, 201, "a write with one member down: {body}");
    until(PROPAGATION, "bob's lock reached replica 1", || async {
        code_of(&rs, 0, "bob").await.0 == 403
    })
    .await;
    assert!(
        !reader.is_finished(),
        "alice's watch ended with one member down"
    );

    // The leader down too: quorum lost.
    rs.etcd.kill(leader);
    let lost = Instant::now();
    for h in &rs.r {
        until(
            Duration::from_secs(5),
            "replicas report not-ready",
            || async {
                let (code, body) = readyz(h).await;
                code == 503 && body.contains("[-]state store: not confirmed current")
            },
        )
        .await;
    }
    let not_ready = lost.elapsed();
    // Within the bound, decisions still come from the last view: alice in, mallory locked.
    let (code, _, body) = code_of(&rs, 0, "alice").await;
    assert_eq!(
        code, 200,
        "within maxStaleness the last view decides: {body}"
    );
    let (code, _, body) = code_of(&rs, 2, "mallory").await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("before the outage"), "{body}");
    // Writes are refused with a clear 503, quickly.
    let t = Instant::now();
    let (code, body) = post_lock(&rs.r[0], "carol", "during the outage").await;
    let refused_in = t.elapsed();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("state store cannot be written"), "{body}");
    assert!(
        refused_in < Duration::from_secs(3),
        "write refused after {refused_in:?}"
    );

    // Past maxStaleness: alice's watch is closed with a 503 Status, and requests fail closed.
    let text = tokio::time::timeout(MAX_STALENESS + Duration::from_secs(4), reader)
        .await
        .expect("the watch was closed once the state went stale")
        .unwrap();
    let closed = lost.elapsed();
    let last: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(last["type"], "ERROR", "{text}");
    assert_eq!(last["object"]["code"], 503, "{text}");
    assert!(
        last["object"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot confirm that its locks and device posture are current"),
        "{text}"
    );
    for i in 0..3 {
        // Each replica's bound runs from its own last confirmation (they differ by a heartbeat).
        until(
            Duration::from_secs(3),
            "every replica fails closed",
            || async { code_of(&rs, i, "alice").await.0 == 503 },
        )
        .await;
        let (code, headers, body) = code_of(&rs, i, "alice").await;
        assert_eq!(code, 503, "replica {}: fail closed: {body}", i + 1);
        assert!(body.contains("cannot confirm"), "{body}");
        assert!(headers.contains_key("retry-after"), "{headers:?}");
        let (code, body) = readyz(&rs.r[i]).await;
        assert_eq!(code, 503);
        assert!(body.contains("failing closed"), "{body}");
        assert!(
            !body.contains("127.0.0.1"),
            "readyz names no etcd member: {body}"
        );
    }

    // Both members back: every replica resumes without a restart, and everything written
    // before the outage is still in force.
    rs.etcd.restart(leader);
    rs.etcd.restart(follower);
    let back = Instant::now();
    for h in &rs.r {
        until(Duration::from_secs(30), "replicas ready again", || async {
            readyz(h).await.0 == 200
        })
        .await;
    }
    let ready_again = back.elapsed();
    for i in 0..3 {
        assert_eq!(code_of(&rs, i, "alice").await.0, 200, "replica {}", i + 1);
        let (code, _, body) = code_of(&rs, i, "mallory").await;
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("before the outage"), "{body}");
        let (code, _, body) = code_of(&rs, i, "bob").await;
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("one member down"), "{body}");
    }
    let (code, body) = post_lock(&rs.r[2], "dave", "after the outage").await;
    assert_eq!(code, 201, "{body}");
    until(
        Duration::from_secs(1),
        "dave's lock reached replica 1",
        || async { code_of(&rs, 0, "dave").await.0 == 403 },
    )
    .await;
    eprintln!(
        "quorum lost: not-ready after {not_ready:?}, write refused in {refused_in:?}, \
         watch closed (stale) after {closed:?}; members back: ready again after {ready_again:?}"
    );
}

// --- three gateway processes behind one address, one killed mid-stream ---

/// A TCP round-robin balancer in front of the replicas, as a Service spreads connections: a
/// backend that refuses the connection is skipped. Records which backend took each connection.
struct Balancer {
    url: String,
    taken: Arc<Mutex<Vec<usize>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(backends: Vec<String>) -> Balancer {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
        let taken: Arc<Mutex<Vec<usize>>> = Arc::default();
        let t = taken.clone();
        let accept = tokio::spawn(async move {
            let mut next = 0usize;
            loop {
                let Ok((mut down, _)) = l.accept().await else {
                    return;
                };
                let n = backends.len();
                for k in 0..n {
                    let i = (next + k) % n;
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&backends[i]).await {
                        t.lock().unwrap().push(i);
                        tokio::spawn(async move {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        });
                        break;
                    }
                }
                next = (next + 1) % n;
            }
        });
        Balancer { url, taken, accept }
    }

    fn last_backend(&self) -> usize {
        *self.taken.lock().unwrap().last().expect("a connection")
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Reads watch events (one JSON object per line) from `body` until it ends or fails; sends
/// each as it arrives.
fn watch_events(
    mut body: hyper::body::Incoming,
) -> tokio::sync::mpsc::UnboundedReceiver<Result<Value, String>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            match body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=nl).collect();
                            let _ =
                                tx.send(serde_json::from_slice(&line).map_err(|e| e.to_string()));
                        }
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.send(Err(format!("stream failed: {e}")));
                    return;
                }
                None => {
                    let _ = tx.send(Err("stream ended".into()));
                    return;
                }
            }
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_stream_leaves_the_others_serving_and_the_client_resumes_through_them()
{
    support::init_logs();
    let etcd = Etcd::start();
    drop(etcd.store(&etcd.urls, "/gw").await);
    let pki = ztgate_testkit::TestPki::new();
    let apiserver = ztgate_testkit::ApiServer::start(ztgate_testkit::ApiServerOptions::new(&pki))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let env = ztgate::demo::DevEnv::create(
        dir.path(),
        pki,
        &apiserver.url(),
        &DevSettings {
            listen: format!("127.0.0.1:{}", ports[0]),
            operations: false,
            state_etcd_yaml: Some(etcd.yaml(&etcd.urls, "/gw")),
            ..Default::default()
        },
    )
    .unwrap();
    // The same configuration on three addresses: three replicas.
    let text = std::fs::read_to_string(&env.config_path).unwrap();
    let first = format!("address: 127.0.0.1:{}", ports[0]);
    assert!(text.contains(&first), "{text}");
    let configs: Vec<PathBuf> = (0..3)
        .map(|i| {
            let p = dir.path().join(format!("replica-{i}.yaml"));
            std::fs::write(
                &p,
                text.replace(&first, &format!("address: 127.0.0.1:{}", ports[i])),
            )
            .unwrap();
            p
        })
        .collect();
    let ca = env.pki.gateway_ca.cert_pem();
    let mut gateways = Vec::new();
    for (c, p) in configs.iter().zip(&ports) {
        gateways.push(ServeProcess::start(c, &format!("https://127.0.0.1:{p}"), &ca).await);
    }
    let lb = Balancer::start(ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()).await;
    let alice = env.pki.user("alice", &["team-a"]);

    // A client lists, then watches from the list's resourceVersion, through the balancer.
    let (code, _, body) = send(
        &raw_client(&ca, Some(&alice), false),
        get(&format!("{}{PODS}", lb.url)),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    let mut rv = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let watch = raw_client(&ca, Some(&alice), true)
        .request(get(&format!(
            "{}{PODS}?watch=1&resourceVersion={rv}",
            lb.url
        )))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    let holder = lb.last_backend();
    let mut events = watch_events(watch.into_body());
    apiserver.create_pod("team-a", "before-kill");
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("an event")
        .unwrap()
        .unwrap();
    assert_eq!(ev["type"], "ADDED");
    assert_eq!(ev["object"]["metadata"]["name"], "before-kill");
    rv = ev["object"]["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();

    // kill -9 the replica holding the watch: the client's stream breaks.
    gateways[holder].kill9().await;
    let end = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("the broken stream is noticed")
        .unwrap();
    assert!(end.is_err(), "{end:?}");
    apiserver.create_pod("team-a", "while-reconnecting");

    // The other replicas keep serving through the same address...
    for _ in 0..20 {
        let (code, _, body) = send(
            &raw_client(&ca, Some(&alice), false),
            get(&format!("{}{PODS}", lb.url)),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_ne!(lb.last_backend(), holder);
    }
    // ...and the client's watch resumes from its last resourceVersion, missing nothing.
    let t = Instant::now();
    let watch = raw_client(&ca, Some(&alice), true)
        .request(get(&format!(
            "{}{PODS}?watch=1&resourceVersion={rv}",
            lb.url
        )))
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);
    assert_ne!(lb.last_backend(), holder);
    let mut events = watch_events(watch.into_body());
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("the missed event")
        .unwrap()
        .unwrap();
    assert_eq!(ev["type"], "ADDED", "{ev}");
    assert_eq!(
        ev["object"]["metadata"]["name"], "while-reconnecting",
        "{ev}"
    );
    eprintln!(
        "replica {} killed mid-watch; resumed through replica {} in {:?}",
        holder + 1,
        lb.last_backend() + 1,
        t.elapsed()
    );
    drop(gateways);
    apiserver.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_etcd_client_certificate_is_used_without_a_restart() {
    let mut etcd = Etcd::start();
    drop(etcd.store(&etcd.urls, "/zt").await);
    // Both stores start with a client certificate that expires in a few seconds, in files of
    // their own; one of them re-reads its files.
    let expires = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
    let short = etcd.ca.issue(&LeafSpec {
        common_name: "ztgate".into(),
        client: true,
        not_after: Some(expires),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str| {
        let (cert, key) = short.write(dir.path(), name);
        let mut cfg = etcd.config(&etcd.urls, "/zt");
        cfg.cert_file = Some(cert);
        cfg.key_file = Some(key);
        cfg
    };
    let (renewing_cfg, fixed_cfg) = (config("renewing"), config("fixed"));
    let renewing = EtcdStore::connect(&renewing_cfg).await.unwrap();
    let fixed = EtcdStore::connect(&fixed_cfg).await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    renewing.spawn_tls_reloaders(&renewing_cfg, Duration::from_millis(100), stop.clone());
    renewing.put_lock(lock("alice")).await.unwrap();

    // Renewed (as cert-manager would) before it expires; the old one then lapses.
    let renewed = etcd.ca.issue_client("ztgate", &[]);
    renewed.write(dir.path(), "renewing");
    // The sleep is the case under test: the first certificate has expired.
    let wait =
        (expires - time::OffsetDateTime::now_utc()).unsigned_abs() + Duration::from_millis(500);
    tokio::time::sleep(wait).await;

    // etcd restarts: every connection is new, and must present a valid certificate.
    etcd.kill(0);
    etcd.restart(0);
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match renewing.put_lock(lock("bob")).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "the renewed certificate was not used: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    eprintln!(
        "renewed client certificate: writes after an etcd restart in {:?}",
        t.elapsed()
    );
    // The store that kept the expired certificate is refused: the renewal is what made the
    // difference.
    let err = fixed
        .put_lock(lock("carol"))
        .await
        .expect_err("an expired client certificate is refused by etcd");
    assert!(
        matches!(err, ztgate::state::StoreError::Unavailable(_)),
        "{err}"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_lock_already_gone_from_etcd_but_held_here_reports_it_deleted() {
    // The case of a delete retried after an attempt that committed but whose answer was lost:
    // etcd no longer has the key while this replica's view still does.
    let etcd = Etcd::start();
    let cut = Cut::start(&etcd.url).await;
    let a = etcd.store(std::slice::from_ref(&etcd.url), "/zt").await;
    let b = etcd.store(std::slice::from_ref(&cut.url), "/zt").await;
    let mut rx = b.subscribe();
    let l = lock("alice");
    a.put_lock(l.clone()).await.unwrap();
    assert_eq!(
        next_change(&mut rx, Duration::from_secs(2)).await.kind,
        ChangeKind::LockPut(l.clone())
    );
    cut.cut();
    a.delete_lock(&l.id).await.unwrap().unwrap();
    // Nothing may arrive while b is cut off: the sleep gives it the chance to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.lock(&l.id).as_ref(),
        Some(&l),
        "b has not seen the delete"
    );
    cut.restore();
    let (_, deleted) = b
        .delete_lock(&l.id)
        .await
        .unwrap()
        .expect("reported deleted, not 'no such lock'");
    assert_eq!(deleted, l);
    // A lock nobody has is still "no such lock".
    assert!(b.delete_lock("no-such-lock").await.unwrap().is_none());
    // And b catches up: the lock is gone from its view.
    let c = next_change(&mut rx, Duration::from_secs(5)).await;
    assert_eq!(c.kind, ChangeKind::LockDeleted(l.id.clone()));
    assert!(b.lock(&l.id).is_none());
}
