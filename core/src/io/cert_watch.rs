//! The certificate watcher: one thread per proxy with TLS that reloads the certificate files when
//! they change and otherwise sleeps. It watches, with inotify, the directories where a change
//! shows: a file rewritten in place, a file renamed into place, a symlink swapped (a certificate
//! agent's `tls -> tls.<stamp>`, a Kubernetes secret volume's `..data`). Where inotify cannot be
//! had (an instance or a watch refused: 128 instances per user by default, one per sidecar), it
//! looks at the files four times a second instead. Whether a look finds a change (and whether the
//! new set is whole and valid) is `MeshTls::reload_if_changed`'s business; this file only decides
//! when to look.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

/// How often the files are looked at where inotify is not available.
pub const POLL: Duration = Duration::from_millis(250);
/// With every directory watched, the files are still looked at once a minute: a change that
/// inotify does not report (a network filesystem written from another host) is taken within it.
pub const RESCAN: Duration = Duration::from_secs(60);
/// After a change, how long the directories must stay quiet before the files are read, so that a
/// writer that replaces the key and then the certificate is read once, with both in place.
pub const SETTLE: Duration = Duration::from_millis(50);
/// A directory that never stays quiet is read after this much anyway.
const SETTLE_AT_MOST: Duration = Duration::from_millis(500);

/// What makes a watched directory report: anything that can change which bytes a path in it
/// leads to.
fn mask() -> WatchMask {
    WatchMask::CLOSE_WRITE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::ATTRIB
        | WatchMask::DELETE_SELF
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// The directories to watch so that any change to what `files` lead to is reported: the
/// directory each path names (a file renamed into place, or the path replaced by a new symlink),
/// the directory of every symlink along the way (a swapped `tls -> tls.<stamp>` or `..data`), and
/// the directory that really holds each file (rewritten in place). The filesystem is asked through
/// the two functions, so that this stays a pure rule.
pub fn dirs_to_watch(
    files: &[PathBuf],
    is_symlink: impl Fn(&Path) -> bool,
    canonical: impl Fn(&Path) -> Option<PathBuf>,
) -> BTreeSet<PathBuf> {
    let parent = |p: &Path| match p.parent() {
        Some(d) if d.as_os_str().is_empty() => Some(PathBuf::from(".")),
        Some(d) => Some(d.to_path_buf()),
        None => None,
    };
    let mut out = BTreeSet::new();
    for f in files {
        out.extend(parent(f));
        for a in f.ancestors().skip(1) {
            if !a.as_os_str().is_empty() && is_symlink(a) {
                out.extend(parent(a));
            }
        }
        if let Some(real) = canonical(f) {
            out.extend(parent(&real));
        }
    }
    out
}

/// Watch `files` until `stopped()` (asked after every wake-up) or until the other end of `nudge`
/// is closed; call `reload` once at the start, after every change and at every rescan. A byte on
/// `nudge` wakes the thread to ask `stopped()` (and to look at the files once more). Without
/// `inotify` the files are polled (as when inotify is refused).
pub fn run(
    files: &[PathBuf],
    nudge: &UnixStream,
    mut reload: impl FnMut(),
    stopped: impl Fn() -> bool,
    inotify: bool,
) {
    let mut ino = match inotify.then(Inotify::init) {
        None => None,
        Some(Ok(i)) => Some(i),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "cannot watch the certificate files with inotify; looking at them every 250 ms");
            None
        }
    };
    let mut watched: HashMap<PathBuf, WatchDescriptor> = HashMap::new();
    let mut refused = false;
    let mut buf = [0u8; 4096];
    while !stopped() {
        // Watch first, then read: a change after this read is reported, one before it is read.
        let all_watched = match ino.as_mut() {
            Some(i) => {
                let want = dirs_to_watch(
                    files,
                    |p| p.symlink_metadata().is_ok_and(|m| m.is_symlink()),
                    |p| std::fs::canonicalize(p).ok(),
                );
                match sync_watches(i, &mut watched, &want) {
                    Ok(()) => {
                        refused = false;
                        true
                    }
                    Err((dir, e)) => {
                        if !refused {
                            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a certificate directory with inotify; looking at the files every 250 ms");
                            refused = true;
                        }
                        false
                    }
                }
            }
            None => false,
        };
        reload();
        let ino_fd = ino.as_ref().map(|i| i.as_raw_fd());
        let wait = if all_watched { RESCAN } else { POLL };
        let [nudged, changed] = wait_readable([Some(nudge.as_raw_fd()), ino_fd], Some(wait));
        if nudged && !read_nudges(nudge) {
            return;
        }
        if let (true, Some(i)) = (changed, ino.as_mut()) {
            let began = Instant::now();
            loop {
                take_events(i, &mut watched, &mut buf);
                if began.elapsed() >= SETTLE_AT_MOST
                    || !wait_readable([ino_fd, None], Some(SETTLE))[0]
                {
                    break;
                }
            }
        }
    }
}

/// Add the watches `want` lacks and drop those it no longer has. The first directory refused is
/// returned with its error (the others are still tried).
fn sync_watches(
    ino: &mut Inotify,
    watched: &mut HashMap<PathBuf, WatchDescriptor>,
    want: &BTreeSet<PathBuf>,
) -> Result<(), (PathBuf, std::io::Error)> {
    let mut first_err = None;
    let gone: Vec<PathBuf> = watched
        .keys()
        .filter(|d| !want.contains(*d))
        .cloned()
        .collect();
    for dir in gone {
        if let Some(wd) = watched.remove(&dir) {
            // Two paths to one directory (a link and its target) share a watch: it goes with the
            // last of them. Removing fails when the directory is gone (its watch went with it).
            if !watched.values().any(|w| *w == wd) {
                let _ = ino.watches().remove(wd);
            }
        }
    }
    for dir in want {
        if watched.contains_key(dir) {
            continue;
        }
        match ino.watches().add(dir, mask()) {
            Ok(wd) => {
                watched.insert(dir.clone(), wd);
            }
            Err(e) => {
                first_err.get_or_insert((dir.clone(), e));
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Read every pending event. A directory whose watch ended (it was removed or moved) leaves
/// `watched`, so that the next round watches it again (or whatever replaced it).
fn take_events(ino: &mut Inotify, watched: &mut HashMap<PathBuf, WatchDescriptor>, buf: &mut [u8]) {
    while let Ok(events) = ino.read_events(buf) {
        let mut any = false;
        for e in events {
            any = true;
            if e.mask
                .intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF)
            {
                watched.retain(|_, wd| *wd != e.wd);
            }
        }
        if !any {
            break;
        }
    }
}

/// Empty the nudge socket. False when its other end is closed (the proxy is gone).
fn read_nudges(nudge: &UnixStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match crate::io::sys::recv(nudge.as_raw_fd(), &mut b) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return true,
        }
    }
}

/// Wait until one of the descriptors is readable (or closed), at most `timeout` (`None`: without
/// end). Which ones are; none after the timeout or an interrupted wait.
fn wait_readable<const N: usize>(fds: [Option<RawFd>; N], timeout: Option<Duration>) -> [bool; N] {
    let mut pfds = fds.map(|fd| libc::pollfd {
        // A negative descriptor is ignored by poll(2).
        fd: fd.unwrap_or(-1),
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: `pfds` is an array of N initialised pollfd structures that lives for the call, and
    // its length is passed with it; poll(2) writes only their `revents`.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
    if n <= 0 {
        return [false; N];
    }
    pfds.map(|p| p.revents != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;

    fn set(v: &[&str]) -> BTreeSet<PathBuf> {
        v.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn plain_files_are_watched_in_their_directory() {
        let files = [
            PathBuf::from("/etc/ringside/cert.pem"),
            "/etc/ca/ca.pem".into(),
        ];
        let got = dirs_to_watch(&files, |_| false, |p| Some(p.to_path_buf()));
        assert_eq!(got, set(&["/etc/ringside", "/etc/ca"]));
    }

    #[test]
    fn a_relative_path_is_watched_in_the_working_directory() {
        let got = dirs_to_watch(&[PathBuf::from("cert.pem")], |_| false, |_| None);
        assert_eq!(got, set(&["."]));
    }

    /// A certificate agent's layout: `state/tls -> tls.<stamp>`, paths through the link.
    #[test]
    fn a_swapped_directory_link_is_watched_where_the_link_lives() {
        let files = [PathBuf::from("/var/lib/ringside/tls/cert.pem")];
        let got = dirs_to_watch(
            &files,
            |p| p == Path::new("/var/lib/ringside/tls"),
            |_| Some("/var/lib/ringside/tls.17/cert.pem".into()),
        );
        assert_eq!(
            got,
            set(&[
                "/var/lib/ringside",
                "/var/lib/ringside/tls",
                "/var/lib/ringside/tls.17"
            ])
        );
    }

    /// A Kubernetes secret volume: `cert.pem -> ..data/cert.pem`, `..data -> ..2026_12_02`.
    #[test]
    fn a_secret_volume_is_watched_where_data_is_swapped() {
        let files = [PathBuf::from("/certs/cert.pem")];
        let got = dirs_to_watch(
            &files,
            |p| p == Path::new("/certs/cert.pem"),
            |_| Some("/certs/..2026_12_02/cert.pem".into()),
        );
        assert_eq!(got, set(&["/certs", "/certs/..2026_12_02"]));
    }

    fn temp(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ringside-cert-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Runs the watcher on a thread; `reloads` counts its looks at the files.
    struct Running {
        reloads: Arc<AtomicUsize>,
        stop: Arc<AtomicBool>,
        nudge: UnixStream,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Running {
        fn start(files: Vec<PathBuf>, inotify: bool) -> Running {
            let reloads = Arc::new(AtomicUsize::new(0));
            let stop = Arc::new(AtomicBool::new(false));
            let (rx, tx) = UnixStream::pair().unwrap();
            rx.set_nonblocking(true).unwrap();
            let (r, s) = (reloads.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                run(
                    &files,
                    &rx,
                    || {
                        r.fetch_add(1, SeqCst);
                    },
                    || s.load(SeqCst),
                    inotify,
                )
            });
            let w = Running {
                reloads,
                stop,
                nudge: tx,
                thread: Some(thread),
            };
            w.wait_for(1, "the first look");
            w
        }

        fn count(&self) -> usize {
            self.reloads.load(SeqCst)
        }

        fn wait_for(&self, n: usize, what: &str) -> Duration {
            let began = Instant::now();
            while self.count() < n {
                assert!(
                    began.elapsed() < Duration::from_secs(5),
                    "{what}: {} looks, not {n}",
                    self.count()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            began.elapsed()
        }

        fn stop(mut self) {
            self.stop.store(true, SeqCst);
            use std::io::Write;
            (&self.nudge).write_all(&[1]).unwrap();
            let began = Instant::now();
            self.thread.take().unwrap().join().unwrap();
            assert!(began.elapsed() < Duration::from_secs(1));
        }
    }

    #[test]
    fn a_watched_file_is_looked_at_when_it_changes_and_not_otherwise() {
        let d = temp("inotify");
        let cert = d.join("cert.pem");
        std::fs::write(&cert, "one").unwrap();
        let w = Running::start(vec![cert.clone()], true);
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(w.count(), 1, "looked without a change");

        // Rewritten in place.
        std::fs::write(&cert, "two").unwrap();
        w.wait_for(2, "after a rewrite");
        // Renamed into place.
        std::fs::write(d.join("cert.tmp"), "three").unwrap();
        std::fs::rename(d.join("cert.tmp"), &cert).unwrap();
        w.wait_for(3, "after a rename");
        std::thread::sleep(Duration::from_millis(200));
        let settled = w.count();
        // A key then a certificate, back to back: one look, once both are in place.
        std::fs::write(d.join("key.pem"), "k").unwrap();
        std::fs::write(&cert, "four").unwrap();
        w.wait_for(settled + 1, "after a pair");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            w.count(),
            settled + 1,
            "a pair written together was read twice"
        );
        w.stop();
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The agent's layout: the files are reached through `tls -> tls.N`, and a new set is a new
    /// directory with the link swapped to it (the old one removed after).
    #[test]
    fn a_swapped_link_is_seen_and_the_new_directory_watched() {
        let d = temp("swap");
        let swap = |n: u32| {
            let dir = d.join(format!("tls.{n}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("cert.pem"), format!("{n}")).unwrap();
            let _ = std::fs::remove_file(d.join("tls.tmp"));
            std::os::unix::fs::symlink(format!("tls.{n}"), d.join("tls.tmp")).unwrap();
            std::fs::rename(d.join("tls.tmp"), d.join("tls")).unwrap();
            if n > 1 {
                std::fs::remove_dir_all(d.join(format!("tls.{}", n - 1))).unwrap();
            }
        };
        swap(1);
        let w = Running::start(vec![d.join("tls/cert.pem")], true);
        swap(2);
        w.wait_for(2, "after the first swap");
        std::thread::sleep(Duration::from_millis(200));
        // The new directory is watched: a rewrite inside it is seen too.
        let n = w.count();
        std::fs::write(d.join("tls.2/cert.pem"), "2b").unwrap();
        w.wait_for(n + 1, "after a rewrite in the new directory");
        w.stop();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn without_inotify_the_files_are_polled() {
        let d = temp("poll");
        let cert = d.join("cert.pem");
        std::fs::write(&cert, "one").unwrap();
        let w = Running::start(vec![cert], false);
        std::thread::sleep(Duration::from_millis(1100));
        let n = w.count();
        assert!(
            (4..=7).contains(&n),
            "{n} looks in 1.1 s, polling every 250 ms"
        );
        w.stop();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_closed_nudge_socket_ends_the_watcher() {
        let d = temp("closed");
        let cert = d.join("cert.pem");
        std::fs::write(&cert, "one").unwrap();
        let mut w = Running::start(vec![cert], true);
        let t = w.thread.take().unwrap();
        drop(w);
        let began = Instant::now();
        t.join().unwrap();
        assert!(began.elapsed() < Duration::from_secs(1));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
