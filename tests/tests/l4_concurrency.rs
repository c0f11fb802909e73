//! 1,000 concurrent connections with random sizes from 0 bytes to 4 MiB, all exact, both drivers.

use std::net::SocketAddr;
use std::time::Duration;

use rand::{Rng, RngCore, SeedableRng};
use ringside_core::config::DriverKind;
use ringside_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xxhash_rust::xxh3::xxh3_64;

const CONNECTIONS: usize = 1000;
const MAX_SIZE: usize = 4 << 20;

/// An echo server on tokio: every byte back, then EOF after the client's EOF.
async fn echo_server() -> SocketAddr {
    // A deep backlog: 1,000 connects arrive at once.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(4096).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

async fn one(proxy: SocketAddr, seed: u64, size: usize) -> Result<(), String> {
    let mut data = vec![0u8; size];
    rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut data);
    let want = xxh3_64(&data);
    let s = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut back = Vec::with_capacity(size);
    r.read_to_end(&mut back)
        .await
        .map_err(|e| format!("read: {e}"))?;
    writer.await.unwrap().map_err(|e| format!("write: {e}"))?;
    if back.len() != size {
        return Err(format!("size {size}: got {} bytes back", back.len()));
    }
    if xxh3_64(&back) != want {
        return Err(format!("size {size}: checksum differs"));
    }
    Ok(())
}

fn run(driver: DriverKind) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let echo = echo_server().await;
        let proxy = forward(driver, vec![echo], |_| {});
        let paddr = proxy.local_addrs()[0];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(42);
        let mut sizes: Vec<usize> = (0..CONNECTIONS)
            .map(|_| rng.gen_range(0..=MAX_SIZE))
            .collect();
        sizes[0] = 0;
        sizes[1] = MAX_SIZE;
        sizes[2] = 1;
        let total: usize = sizes.iter().sum();
        let tasks: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| tokio::spawn(one(paddr, i as u64, size)))
            .collect();
        let mut errors = Vec::new();
        for t in tasks {
            if let Err(e) = tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .expect("bounded")
                .unwrap()
            {
                errors.push(e);
            }
        }
        assert!(
            errors.is_empty(),
            "{} of {CONNECTIONS} connections failed: {:?}; proxy: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)],
            proxy.stats()
        );
        let s = proxy.stats();
        assert_eq!(s.downstream_cx_total, CONNECTIONS as u64);
        assert_eq!(s.downstream_cx_rx_bytes_total, total as u64);
        assert_eq!(s.downstream_cx_tx_bytes_total, total as u64);
        wait_for("all closed", Duration::from_secs(10), || {
            proxy.stats().downstream_cx_active == 0
        });
        assert!(
            proxy.stats().failures.is_empty(),
            "{:?}",
            proxy.stats().failures
        );
        eprintln!(
            "{driver:?}: {CONNECTIONS} connections, {} MiB each way, pipes created: {}",
            total >> 20,
            s.pipes_created
        );
        proxy.shutdown(Duration::from_secs(1));
    });
}

/// Both drivers in one test, one after the other: two such loads at once would only measure how
/// two cores cope with 4,000 busy sockets.
#[test]
fn thousand_concurrent_random_sizes() {
    for d in DRIVERS {
        run(d);
    }
}
