//! The datagram path allocates nothing per datagram once a session is open.
//!
//! A counting global allocator sees every allocation of this test binary; everything runs
//! on one current-thread runtime (listener loop, reply tasks, client and upstream), and this
//! file holds a single test, so nothing else allocates during the measured window.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use embassy_core::{service::DEFAULT_CONNECT_TIMEOUT, udp::serve_udp, Service};
use embassy_plugin_api::{Endpoint, EndpointView};
use tokio::net::UdpSocket;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: defers to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const ROUND_TRIPS: usize = 1_000;

async fn round_trip(client: &UdpSocket, payload: &[u8], answer: &mut [u8]) {
    client.send(payload).await.expect("send");
    let len = tokio::time::timeout(Duration::from_secs(5), client.recv(answer))
        .await
        .expect("answered within 5 s")
        .expect("recv");
    assert_eq!(&answer[..len], payload, "datagram intact");
}

#[tokio::test(flavor = "current_thread")]
async fn round_trips_on_open_sessions_do_not_allocate() {
    let upstream = UdpSocket::bind("127.0.0.1:0").await.expect("upstream");
    let upstream_addr = upstream.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65_536];
        while let Ok((len, peer)) = upstream.recv_from(&mut buffer).await {
            let _ = upstream.send_to(&buffer[..len], peer).await;
        }
    });
    let first = |views: &[EndpointView]| (!views.is_empty()).then_some(0);
    let service = Arc::new(Service::new(
        "dns;53/udp".parse().expect("descriptor"),
        Box::new(first),
        DEFAULT_CONNECT_TIMEOUT,
    ));
    service
        .endpoints
        .replace(&[Endpoint::new(upstream_addr.to_string())]);
    let listen = UdpSocket::bind("127.0.0.1:0").await.expect("listen");
    let proxy = listen.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tokio::spawn(serve_udp(
        listen,
        Arc::clone(&service),
        stop.clone(),
        tasks.clone(),
    ));

    let mut clients = Vec::new();
    for _ in 0..4 {
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        client.connect(proxy).await.expect("connect");
        clients.push(client);
    }
    let sizes = [1usize, 512, 1_400, 65_507];
    let payloads: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0xa5; n]).collect();
    let mut answer = vec![0u8; 65_536];
    // Opens the sessions and lets the runtime settle its own buffers.
    for index in 0..40 {
        round_trip(&clients[index % 4], &payloads[index % 4], &mut answer).await;
    }
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for index in 0..ROUND_TRIPS {
        round_trip(&clients[index % 4], &payloads[index % 4], &mut answer).await;
    }
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
    assert!(
        allocated < ROUND_TRIPS / 20,
        "{allocated} allocations during {ROUND_TRIPS} round trips through open sessions"
    );
    stop.cancel();
}
