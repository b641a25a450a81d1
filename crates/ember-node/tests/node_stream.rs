//! The real node agent (`run_node`) against the real server, through a
//! TCP proxy that can go silent: a work stream whose connection stops
//! carrying bytes (a NAT or proxy that dropped it without a reset) is
//! noticed by the node through the missing keepalives, and the node
//! reconnects and gets the work it missed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ember_api::client::ControlClient;
use ember_control::model::{PinnedImage, RunSpec, RunState};
use ember_control::sqlite::SqliteStore;
use ember_control::store::SystemClock;
use ember_controld::server::{ServerConfig, serve};
use ember_node::{NodeAgentConfig, run_node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One proxied connection.
struct Conn {
    /// It carries a `GET /v1/nodes/{id}/work`.
    work: Arc<AtomicBool>,
    /// Bytes are read and dropped in both directions, sockets kept open.
    frozen: Arc<AtomicBool>,
}

/// A TCP proxy in front of the server that can freeze the work-stream
/// connections it carries.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Conn>>>,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let table = conns.clone();
        tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let work = Arc::new(AtomicBool::new(false));
                let frozen = Arc::new(AtomicBool::new(false));
                table.lock().expect("table").push(Conn {
                    work: work.clone(),
                    frozen: frozen.clone(),
                });
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pump(dr, uw, frozen.clone(), Some(work)));
                tokio::spawn(pump(ur, dw, frozen, None));
            }
        });
        Proxy { addr, conns }
    }

    /// Freezes every work-stream connection open now; returns how many.
    fn freeze_work(&self) -> usize {
        let conns = self.conns.lock().expect("table");
        conns
            .iter()
            .filter(|c| c.work.load(Ordering::SeqCst))
            .map(|c| c.frozen.store(true, Ordering::SeqCst))
            .count()
    }

    /// Work-stream connections seen so far.
    fn work_connections(&self) -> usize {
        let conns = self.conns.lock().expect("table");
        conns
            .iter()
            .filter(|c| c.work.load(Ordering::SeqCst))
            .count()
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    work: Option<Arc<AtomicBool>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(w) = &work
            && buf[..n].starts_with(b"GET /v1/nodes/")
            && buf[..n].windows(6).any(|x| x == b"/work ")
        {
            w.store(true, Ordering::SeqCst);
        }
        if frozen.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    // While frozen the other side must see nothing, not even a close.
    if !frozen.load(Ordering::SeqCst) {
        let _ = to.shutdown().await;
    }
}

fn static_agent() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/x86_64-unknown-linux-gnu/release/ember-agent");
    p.exists().then_some(p)
}

#[tokio::test]
async fn a_silent_work_stream_is_replaced_and_missed_work_arrives() {
    let Some(agent) = static_agent() else {
        eprintln!("skipped: build the static agent (crates/ember-agent/build-static.sh)");
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open_in_memory(Arc::new(SystemClock)).expect("store"));
    let mut config = ServerConfig::new();
    config.keepalive = Duration::from_millis(200);
    // Long enough that the node is never declared lost in this test: the
    // run must reach it through a new stream, not a re-queue.
    config.heartbeat_timeout = Duration::from_secs(600);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        store,
        Arc::new(SystemClock),
        config,
        async {
            let _ = stopped.await;
        },
    ));
    let proxy = Proxy::start(upstream).await;
    let url = format!("http://{}", proxy.addr);

    let (stop_node, node_stopped) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(run_node(
        NodeAgentConfig {
            control: url.clone(),
            token: None,
            id: "n1".into(),
            slots: 1,
            root: tmp.path().join("node"),
            cache: None,
            dircache: None,
            dircache_token: None,
            agent,
            labels: Default::default(),
            heartbeat: Duration::from_secs(1),
            watchdog: None,
            prepull: Default::default(),
            metrics_listen: None,
            criu: None,
            snapshot_spares: 0,
        },
        async {
            let _ = node_stopped.await;
        },
    ));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while proxy.work_connections() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never opened its work stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(proxy.freeze_work(), 1);

    // Work for the node while its stream is silent. The image's registry
    // does not exist, so the node fails the run at the pull: proof it
    // received the assignment.
    let client = ControlClient::new(&url, None).expect("client");
    let image = PinnedImage::new(
        "127.0.0.1:1/nothing:latest",
        format!("sha256:{}", "ab".repeat(32)),
    )
    .expect("pin");
    let submitted = client
        .submit(
            &RunSpec {
                image: Some(image),
                command: vec!["true".into()],
                ..RunSpec::default()
            },
            None,
        )
        .await
        .expect("submit");
    let id = submitted.run.id;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let run = loop {
        let run = client.run(id).await.expect("run");
        if run.state.is_final() {
            break run;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never got the run: {run:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(run.state, RunState::Failed, "{run:?}");
    assert!(
        run.error.as_deref().is_some_and(|e| e.contains("pulling")),
        "{run:?}"
    );
    assert!(
        proxy.work_connections() >= 2,
        "the node did not open a new work stream"
    );

    let _ = stop_node.send(());
    node.await.expect("node task").expect("node");
    let _ = stop_server.send(());
}
