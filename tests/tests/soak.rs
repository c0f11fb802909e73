//! The soak: through a pair of sidecars with mesh mTLS (configured by the daemon, certificates
//! from its CA), many connections are held open while new connections open and close at a steady
//! rate and a byte-checked transfer runs; certificates are re-issued and intentions changed (still
//! allowing the pair) during it. It checks what a sidecar that runs for months must keep: every
//! byte arrives unchanged, no connection is lost, no new connection fails, the sidecars' memory
//! stays flat and their descriptors return to the baseline.
//!
//! The suite runs it for 60 s; `bench/soak.sh` runs it for 10 minutes with 8,000 held connections
//! and 1,000 new connections per second (and a CA rollover) and writes a report. Settings:
//! `RINGSIDE_SOAK_SECS`, `RINGSIDE_SOAK_HELD`, `RINGSIDE_SOAK_RATE`, `RINGSIDE_SOAK_REPORT` (a
//! markdown file to write the figures to). Needs root.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::open_fds;
use ringside_tests::pod::{pods_available, sh, Net, Pod, Sidecar, PROXY_UID};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALLOW: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: store
spec:
  destination:
    name: store
  sources:
    - name: client
      action: allow
";

/// The same pair still allowed, with one more rule: applying it is a change every proxy takes.
const ALLOW_AND_DENY_OTHERS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: store
spec:
  destination:
    name: store
  sources:
    - name: client
      action: allow
    - name: batch
      action: deny
";

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Raise this process's descriptor limit to its hard limit (the held connections need them).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit through a valid pointer.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// The app of the destination pod: an echo server on a runtime of its own, in the pod.
fn echo_app(pod: &Pod, addr: SocketAddr) {
    let (tx, rx) = std::sync::mpsc::channel();
    pod.enter(move || {
        let l = std::net::TcpListener::bind(addr).expect("bind the app");
        l.set_nonblocking(true).unwrap();
        tx.send(()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("app listening");
}

/// A deterministic byte stream (xorshift), to check the transfer byte by byte.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

/// What the client side saw.
#[derive(Debug, Default)]
struct Seen {
    ramp: Duration,
    held: usize,
    held_failed: Vec<String>,
    held_lost: usize,
    churn_ok: u64,
    churn_failed: Vec<String>,
    churn_skipped: u64,
    transfer_bytes: u64,
    transfer_corrupt: u64,
}

async fn echo_once(s: &mut tokio::net::TcpStream, msg: &[u8]) -> Result<(), String> {
    s.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .map_err(|_| "no echo within 10 s".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if got != msg {
        return Err("the echo differs".into());
    }
    Ok(())
}

async fn connect(to: SocketAddr) -> Result<tokio::net::TcpStream, String> {
    tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(to))
        .await
        .map_err(|_| "connect: no answer within 10 s".to_string())?
        .map_err(|e| format!("connect: {e}"))
}

/// The client pod's workload, on a runtime inside the pod: ramp up the held connections, then
/// churn and transfer until `secs` have passed, then check every held connection.
async fn workload(
    to: SocketAddr,
    held_n: usize,
    rate: u64,
    secs: u64,
    ramped: std::sync::mpsc::Sender<()>,
    release: tokio::sync::oneshot::Receiver<()>,
) -> Seen {
    let mut seen = Seen::default();
    let t0 = Instant::now();
    // Held connections, opened 100 at a time.
    let mut held = Vec::with_capacity(held_n);
    let gate = Arc::new(tokio::sync::Semaphore::new(100));
    let mut opening = tokio::task::JoinSet::new();
    for i in 0..held_n as u64 {
        let permit = gate.clone().acquire_owned().await.unwrap();
        opening.spawn(async move {
            let _permit = permit;
            let mut s = connect(to).await?;
            echo_once(&mut s, &i.to_be_bytes()).await?;
            Ok::<_, String>((i, s))
        });
    }
    while let Some(r) = opening.join_next().await {
        match r.unwrap() {
            Ok(x) => held.push(x),
            Err(e) => seen.held_failed.push(e),
        }
    }
    seen.ramp = t0.elapsed();
    seen.held = held.len();
    ramped.send(()).unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    // The byte-checked transfer: one connection, about 16 MB/s each way.
    let transfer = tokio::spawn(async move {
        let s = connect(to).await?;
        let (mut r, mut w) = s.into_split();
        let writer = tokio::spawn(async move {
            let mut src = Stream(0x9e37_79b9_7f4a_7c15);
            let mut buf = vec![0u8; 64 << 10];
            let mut sent = 0u64;
            while tokio::time::Instant::now() < deadline {
                src.fill(&mut buf);
                w.write_all(&buf).await.map_err(|e| format!("write: {e}"))?;
                sent += buf.len() as u64;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            Ok::<u64, String>(sent)
        });
        let mut expect = Stream(0x9e37_79b9_7f4a_7c15);
        let (mut got, mut corrupt) = (0u64, 0u64);
        let mut buf = vec![0u8; 64 << 10];
        let mut want = vec![0u8; 64 << 10];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = r.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            got += n as u64;
            pending.extend_from_slice(&buf[..n]);
            while pending.len() >= want.len() {
                expect.fill(&mut want);
                corrupt += pending[..want.len()]
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a != b)
                    .count() as u64;
                pending.drain(..want.len());
            }
        }
        let sent = writer.await.unwrap()?;
        if got != sent || !pending.is_empty() {
            return Err(format!("sent {sent} bytes, {got} came back"));
        }
        Ok::<(u64, u64), String>((got, corrupt))
    });
    // New connections at `rate` per second: connect, echo 16 bytes, close.
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(2000));
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate.max(1)));
    let mut churn = tokio::task::JoinSet::new();
    let mut n = 0u64;
    while tokio::time::Instant::now() < deadline {
        tick.tick().await;
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            seen.churn_skipped += 1;
            continue;
        };
        n += 1;
        let (ok, failed) = (ok.clone(), failed.clone());
        churn.spawn(async move {
            let _permit = permit;
            let r = async {
                let mut s = connect(to).await?;
                echo_once(&mut s, &[n as u8; 16]).await?;
                s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
                let mut rest = [0u8; 1];
                match s.read(&mut rest).await {
                    Ok(0) => Ok(()),
                    Ok(_) => Err("bytes after the echo".to_string()),
                    Err(e) => Err(format!("close: {e}")),
                }
            }
            .await;
            match r {
                Ok(()) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => failed.lock().unwrap().push(e),
            }
        });
        while churn.try_join_next().is_some() {}
    }
    while churn.join_next().await.is_some() {}
    seen.churn_ok = ok.load(Ordering::Relaxed);
    seen.churn_failed = std::mem::take(&mut *failed.lock().unwrap());
    match transfer.await.unwrap() {
        Ok((bytes, corrupt)) => {
            seen.transfer_bytes = bytes;
            seen.transfer_corrupt = corrupt;
        }
        Err(e) => seen.churn_failed.push(format!("transfer: {e}")),
    }
    // Every held connection still carries bytes both ways.
    for (i, s) in &mut held {
        if echo_once(s, &(!*i).to_be_bytes()).await.is_err() {
            seen.held_lost += 1;
        }
    }
    // Held until the sidecars' memory is measured.
    let _ = release.await;
    drop(held);
    seen
}

#[test]
fn soak_through_a_pair_of_sidecars() {
    if !pods_available("soak_through_a_pair_of_sidecars") {
        return;
    }
    raise_nofile();
    let secs = setting("RINGSIDE_SOAK_SECS", 60);
    let held_n = setting("RINGSIDE_SOAK_HELD", 4000) as usize;
    let rate = setting("RINGSIDE_SOAK_RATE", 400);
    let mut net = Net::new();
    let client = net.pod("client");
    let store = net.pod("store");
    // Many short connections: ports in TIME_WAIT are reused for new outgoing connections.
    for p in [&client, &store] {
        sh(&[
            "ip",
            "netns",
            "exec",
            &p.name,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.tcp_tw_reuse=1",
            "net.ipv4.ip_local_port_range=1024 65000",
        ]);
    }
    let range = format!("{}/29", net.virtual_ip(0));
    let daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "store", "--port", "7000:7000"]);
    daemon.ok(&["register", "service", "client"]);
    daemon.apply(ALLOW);
    for p in [&client, &store] {
        p.install_redirect(&[]);
    }
    echo_app(&store, "127.0.0.1:7000".parse().unwrap());
    let yaml = "sidecar: {}\nproxy:\n  max_connections: 20000\n  stats_interval: 1s\n";
    let start = |pod: &Pod, service: &str| {
        let args = daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Sidecar::start_with(pod, yaml, &args)
    };
    let sc_store = start(&store, "store");
    let sc_client = start(&client, "client");
    let pids = [sc_client.child.pid(), sc_store.child.pid()];
    let vip: IpAddr = daemon.virtual_ip("store");
    let to = SocketAddr::new(vip, 7000);
    // The baseline once the sidecars have carried a connection (what they open on their first
    // one, such as the control connection's renewals and pooled pipes, is not a leak).
    client
        .enter(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10)).unwrap();
            s.write_all(b"warm").unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
        })
        .join()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let fds_base = pids.map(open_fds);

    let (ramped_tx, ramped_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel();
    let work = client.enter(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(workload(to, held_n, rate, secs, ramped_tx, release_rx))
    });
    ramped_rx
        .recv_timeout(Duration::from_secs(180))
        .expect("the held connections opened");
    let t0 = Instant::now();
    let rss_start = [sc_client.child.rss_kib(), sc_store.child.rss_kib()];
    let fds_start = pids.map(open_fds);
    let cpu_start = [sc_client.child.cpu_time(), sc_store.child.cpu_time()];

    // Changes during the run: certificates re-issued, intentions changed twice (the pair stays
    // allowed), and on long runs a CA rollover.
    let at = |f: f64| Duration::from_secs_f64(secs as f64 * f);
    let mut events = Vec::new();
    let wait_until = |d: Duration| std::thread::sleep(d.saturating_sub(t0.elapsed()));
    wait_until(at(0.25));
    daemon.ok(&["cert", "rotate"]);
    events.push(format!(
        "{:.0} s: certificates re-issued",
        t0.elapsed().as_secs_f64()
    ));
    wait_until(at(0.4));
    daemon.apply(ALLOW_AND_DENY_OTHERS);
    events.push(format!(
        "{:.0} s: intentions changed",
        t0.elapsed().as_secs_f64()
    ));
    wait_until(at(0.55));
    daemon.apply(ALLOW);
    events.push(format!(
        "{:.0} s: intentions changed back",
        t0.elapsed().as_secs_f64()
    ));
    if secs >= 300 {
        wait_until(at(0.6));
        daemon.ok(&["ca", "rotate", "--timeout", "120s"]);
        events.push(format!(
            "{:.0} s: CA rolled over",
            t0.elapsed().as_secs_f64()
        ));
    }
    // The run ends when the workload has checked its held connections.
    while !work.is_finished() && t0.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(
        Duration::from_secs(secs).saturating_sub(t0.elapsed()) + Duration::from_secs(3),
    );
    let rss_end = [sc_client.child.rss_kib(), sc_store.child.rss_kib()];
    let cpu_end = [sc_client.child.cpu_time(), sc_store.child.cpu_time()];
    let cpu = [0, 1].map(|i| cpu_end[i].saturating_sub(cpu_start[i]));
    let _ = release_tx.send(());
    let seen = work.join().unwrap();
    // Descriptors back to the baseline once everything is closed.
    let mut fds_end = pids.map(open_fds);
    let settle = Instant::now();
    while (fds_end[0] > fds_base[0] || fds_end[1] > fds_base[1])
        && settle.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(200));
        fds_end = pids.map(open_fds);
    }
    let settled = settle.elapsed();
    let counters = [sc_client.stop(), sc_store.stop()];
    let failures: Vec<String> = counters
        .iter()
        .zip(["client", "store"])
        .flat_map(|(c, side)| {
            c.iter()
                .filter(|(k, v)| k.starts_with("fail.") && **v > 0)
                .map(move |(k, v)| format!("{side} {k}={v}"))
        })
        .collect();
    let report = format!(
        "| figure | client's sidecar | store's sidecar |\n|---|---|---|\n\
         | RSS with {held} connections held, at start | {} KiB | {} KiB |\n\
         | RSS at the end ({secs} s later) | {} KiB | {} KiB |\n\
         | descriptors: before, with the connections held, after (back within {:.1} s) | {} / {} / {} | {} / {} / {} |\n\
         | CPU time over the run (user + system) | {:.1} s | {:.1} s |\n\n\
         Held connections: {held} of {held_n} opened in {:.1} s, {} lost by the end. New connections: \
         {} echoed and closed ({:.0}/s, {} failed, {} not started because 2,000 were in flight). \
         Transfer: {} MB checked byte by byte, {} bytes differed. Sidecar failure counters: {}.\n\n\
         During the run: {}.\n",
        rss_start[0],
        rss_start[1],
        rss_end[0],
        rss_end[1],
        settled.as_secs_f64(),
        fds_base[0],
        fds_start[0],
        fds_end[0],
        fds_base[1],
        fds_start[1],
        fds_end[1],
        cpu[0].as_secs_f64(),
        cpu[1].as_secs_f64(),
        seen.ramp.as_secs_f64(),
        seen.held_lost,
        seen.churn_ok,
        seen.churn_ok as f64 / secs as f64,
        seen.churn_failed.len(),
        seen.churn_skipped,
        seen.transfer_bytes / 1_000_000,
        seen.transfer_corrupt,
        if failures.is_empty() { "none".to_string() } else { failures.join(", ") },
        events.join("; "),
        held = seen.held,
    );
    eprintln!("{report}");
    if let Ok(path) = std::env::var("RINGSIDE_SOAK_REPORT") {
        std::fs::write(&path, &report).unwrap();
    }
    assert!(
        seen.held_failed.is_empty() && seen.held == held_n,
        "held connections failed to open: {:?}",
        &seen.held_failed[..seen.held_failed.len().min(5)]
    );
    assert_eq!(seen.held_lost, 0, "held connections lost");
    assert!(
        seen.churn_failed.is_empty(),
        "{} new connections failed, e.g. {:?}",
        seen.churn_failed.len(),
        &seen.churn_failed[..seen.churn_failed.len().min(5)]
    );
    assert!(
        seen.churn_ok as f64 >= rate as f64 * secs as f64 * 0.8,
        "only {} new connections in {secs} s at {rate}/s",
        seen.churn_ok
    );
    assert!(seen.transfer_bytes > 0 && seen.transfer_corrupt == 0);
    assert!(
        failures.is_empty(),
        "the sidecars counted failures: {failures:?}"
    );
    for i in 0..2 {
        // Flat memory: within 5 % (and 2 MiB, for the allocator's granularity).
        assert!(
            rss_end[i] <= rss_start[i] + (rss_start[i] / 20).max(2048),
            "RSS grew from {} to {} KiB\n{report}",
            rss_start[i],
            rss_end[i]
        );
        assert!(
            fds_end[i] <= fds_base[i],
            "descriptors did not return to the baseline\n{report}"
        );
        assert!(fds_start[i] >= fds_base[i] + seen.held, "{report}");
    }
    drop(daemon);
}
