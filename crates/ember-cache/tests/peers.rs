//! Two cache servers sharing the load by rendezvous hashing.

// Helpers outside #[test] functions panic on surprises too.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;

async fn pair(upstream: &str) -> (TestCache, TestCache) {
    init();
    let la = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let lb = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (ua, ub) = (
        format!("http://{}", la.local_addr().unwrap()),
        format!("http://{}", lb.local_addr().unwrap()),
    );
    let mut out = vec![];
    for (l, peer) in [(la, ub), (lb, ua)] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), 1 << 30, &[upstream]);
        cfg.peers = vec![peer];
        let server = ember_cache::spawn(cfg, l).unwrap();
        out.push(TestCache {
            server,
            dir: Some(dir),
        });
    }
    let b = out.pop().unwrap();
    let a = out.pop().unwrap();
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_blob_is_fetched_and_stored_by_its_owner_only() {
    let fake = Fake::start().await;
    let blobs: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| {
            let b = blob(500 + i, 100_000);
            (fake.add_blob(b.clone(), Mode::Normal), b)
        })
        .collect();
    let (a, b) = pair(&fake.url()).await;
    // Everything through A, then everything through B.
    for c in [&a, &b] {
        for (d, data) in &blobs {
            let (s, _, body) = get(&format!("{}/v2/x/blobs/{d}", c.url())).await;
            assert_eq!(s, 200);
            assert_eq!(body.unwrap(), *data);
        }
    }
    for (d, _) in &blobs {
        assert_eq!(fake.requests("GET", d), 1, "{d} fetched more than once");
    }
    // Commits land just after the last byte went out.
    let stored = || {
        (
            a.metric("ember_cache_stored_blobs"),
            b.metric("ember_cache_stored_blobs"),
        )
    };
    for _ in 0..500 {
        if stored().0 + stored().1 >= 12 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (sa, sb) = stored();
    assert_eq!(sa + sb, 12, "each blob stored once ({sa} + {sb})");
    assert!(sa > 0 && sb > 0, "both servers own some ({sa}, {sb})");
    assert_eq!(a.metric("ember_cache_peer_forwards_total"), sb);
    assert_eq!(b.metric("ember_cache_peer_forwards_total"), sa);

    // B goes away: A serves B's blobs itself, from the upstream.
    b.stop().await;
    for (d, data) in &blobs {
        let (s, _, body) = get(&format!("{}/v2/x/blobs/{d}", a.url())).await;
        assert_eq!(s, 200);
        assert_eq!(body.unwrap(), *data);
    }
    assert_eq!(a.metric("ember_cache_peer_fallbacks_total"), sb);
    let refetched: usize = blobs.iter().map(|(d, _)| fake.requests("GET", d) - 1).sum();
    assert_eq!(refetched as u64, sb);
    a.stop().await;
}
