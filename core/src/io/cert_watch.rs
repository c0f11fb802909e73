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
fn dir_mask() -> WatchMask {
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

/// What makes a watched file report: a write to it that shows in no directory watched here (a
/// file mounted on its own, or with another link to it, rewritten through the other name).
fn file_mask() -> WatchMask {
    WatchMask::CLOSE_WRITE | WatchMask::ATTRIB | WatchMask::DELETE_SELF | WatchMask::MOVE_SELF
}

/// What to watch so that any change to what some paths lead to is reported.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    /// The directory each path names (a file renamed into place, or the path replaced by a new
    /// symlink), the directory of every symlink met while resolving it, in the path or in a
    /// link's target (a swapped `tls -> tls.<stamp>` or `..data`), and the directory that really
    /// holds the file (a rewrite in place).
    pub dirs: BTreeSet<PathBuf>,
    /// The files the paths resolve to.
    pub files: BTreeSet<PathBuf>,
}

/// Work out [`Wanted`] for `files`, resolving each path one component at a time; the filesystem
/// is asked through `read_link` (a symlink's target, `None` for anything else), so that this
/// stays a pure rule.
pub fn to_watch(files: &[PathBuf], read_link: impl Fn(&Path) -> Option<PathBuf>) -> Wanted {
    let dir_of = |p: &Path| match p.parent() {
        Some(d) if d.as_os_str().is_empty() => Some(PathBuf::from(".")),
        Some(d) => Some(d.to_path_buf()),
        None => None,
    };
    let mut out = Wanted::default();
    'files: for f in files {
        out.dirs.extend(dir_of(f));
        // Components still to resolve, last first; `cur` is what is resolved so far.
        let mut pending: Vec<std::ffi::OsString> = f
            .components()
            .rev()
            .map(|c| c.as_os_str().to_owned())
            .collect();
        let mut cur = PathBuf::new();
        let mut links = 0;
        while let Some(c) = pending.pop() {
            match c.to_str() {
                Some("/") => cur = PathBuf::from("/"),
                Some(".") => {}
                Some("..") => {
                    cur.pop();
                }
                _ => {
                    let next = cur.join(&c);
                    match read_link(&next) {
                        // A loop of links leads to no file: its links' directories are watched.
                        Some(_) if links >= 40 => continue 'files,
                        Some(target) => {
                            links += 1;
                            out.dirs.extend(dir_of(&next));
                            if target.is_absolute() {
                                cur = PathBuf::new();
                            }
                            pending.extend(
                                target.components().rev().map(|c| c.as_os_str().to_owned()),
                            );
                        }
                        None => cur = next,
                    }
                }
            }
        }
        out.dirs.extend(dir_of(&cur));
        out.files.insert(cur);
    }
    out
}

/// One inotify watch: its descriptor, and the file it was put on (device, inode), so that a path
/// that now leads elsewhere (a swapped link) is watched again.
#[derive(Debug, Clone, PartialEq)]
struct Watched {
    wd: WatchDescriptor,
    id: (u64, u64),
}

fn file_id(p: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p)?;
    Ok((m.dev(), m.ino()))
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
    let mut watched: HashMap<PathBuf, Watched> = HashMap::new();
    let mut refused = false;
    let mut buf = [0u8; 4096];
    while !stopped() {
        // Watch first, then read: a change after this read is reported, one before it is read.
        let all_watched = match ino.as_mut() {
            Some(i) => {
                let want = to_watch(files, |p| std::fs::read_link(p).ok());
                match sync_watches(i, &mut watched, &want) {
                    Ok(()) => {
                        refused = false;
                        true
                    }
                    Err((path, e)) => {
                        if !refused {
                            tracing::warn!(path = %path.display(), error = %e, "cannot watch a certificate file or directory with inotify; looking at the files every 250 ms");
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

/// Remove `wd` from the kernel unless another path still shares it (two paths to one directory,
/// a link and its target, share a watch). Fails quietly when it is gone already.
fn unwatch(ino: &mut Inotify, watched: &HashMap<PathBuf, Watched>, wd: WatchDescriptor) {
    if !watched.values().any(|w| w.wd == wd) {
        let _ = ino.watches().remove(wd);
    }
}

/// Add the watches `want` lacks, put again those whose path now leads to another file, and drop
/// those it no longer has. The first path refused is returned with its error (the others are
/// still tried).
fn sync_watches(
    ino: &mut Inotify,
    watched: &mut HashMap<PathBuf, Watched>,
    want: &Wanted,
) -> Result<(), (PathBuf, std::io::Error)> {
    let mut first_err = None;
    let gone: Vec<PathBuf> = watched
        .keys()
        .filter(|p| !want.dirs.contains(*p) && !want.files.contains(*p))
        .cloned()
        .collect();
    for p in gone {
        if let Some(w) = watched.remove(&p) {
            unwatch(ino, watched, w.wd);
        }
    }
    let all = want
        .dirs
        .iter()
        .map(|d| (d, dir_mask()))
        .chain(want.files.iter().map(|f| (f, file_mask())));
    for (path, mask) in all {
        let id = match file_id(path) {
            Ok(id) => id,
            Err(e) => {
                first_err.get_or_insert((path.clone(), e));
                continue;
            }
        };
        if watched.get(path).is_some_and(|w| w.id == id) {
            continue;
        }
        match ino.watches().add(path, mask) {
            Ok(wd) => {
                if let Some(old) = watched.insert(path.clone(), Watched { wd, id }) {
                    if old.wd != watched[path].wd {
                        unwatch(ino, watched, old.wd);
                    }
                }
            }
            Err(e) => {
                first_err.get_or_insert((path.clone(), e));
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Read every pending event. A watch that ended (its directory or file removed) or whose target
/// moved away leaves `watched`, so that the next round watches the path again (or whatever
/// replaced it); after a queue overflow (events lost) every watch is put again.
fn take_events(ino: &mut Inotify, watched: &mut HashMap<PathBuf, Watched>, buf: &mut [u8]) {
    let mut overflowed = false;
    while let Ok(events) = ino.read_events(buf) {
        let mut any = false;
        let mut ended = Vec::new();
        for e in events {
            any = true;
            if e.mask.contains(EventMask::Q_OVERFLOW) {
                overflowed = true;
            } else if e
                .mask
                .intersects(EventMask::IGNORED | EventMask::DELETE_SELF | EventMask::MOVE_SELF)
            {
                ended.push(e.wd.clone());
            }
        }
        for wd in ended {
            watched.retain(|_, w| w.wd != wd);
            // A directory moved away is still watched by the kernel: not any more.
            let _ = ino.watches().remove(wd);
        }
        if !any {
            break;
        }
    }
    if overflowed {
        for (_, w) in watched.drain() {
            let _ = ino.watches().remove(w.wd);
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
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};

    fn set(v: &[&str]) -> BTreeSet<PathBuf> {
        v.iter().map(PathBuf::from).collect()
    }

    /// A filesystem of symlinks for `to_watch`: (link, target).
    fn links(l: &'static [(&'static str, &'static str)]) -> impl Fn(&Path) -> Option<PathBuf> {
        move |p| {
            l.iter()
                .find(|(at, _)| Path::new(at) == p)
                .map(|(_, t)| PathBuf::from(t))
        }
    }

    #[test]
    fn plain_files_are_watched_in_their_directory() {
        let files = [
            PathBuf::from("/etc/ringside/cert.pem"),
            "/etc/ca/ca.pem".into(),
        ];
        let got = to_watch(&files, links(&[]));
        assert_eq!(got.dirs, set(&["/etc/ringside", "/etc/ca"]));
        assert_eq!(
            got.files,
            set(&["/etc/ringside/cert.pem", "/etc/ca/ca.pem"])
        );
    }

    #[test]
    fn a_relative_path_is_watched_in_the_working_directory() {
        let got = to_watch(&[PathBuf::from("cert.pem")], links(&[]));
        assert_eq!(got.dirs, set(&["."]));
        assert_eq!(got.files, set(&["cert.pem"]));
    }

    /// A certificate agent's layout: `state/tls -> tls.<stamp>`, paths through the link.
    #[test]
    fn a_swapped_directory_link_is_watched_where_the_link_lives() {
        let files = [PathBuf::from("/var/lib/ringside/tls/cert.pem")];
        let got = to_watch(&files, links(&[("/var/lib/ringside/tls", "tls.17")]));
        assert_eq!(
            got.dirs,
            set(&[
                "/var/lib/ringside",
                "/var/lib/ringside/tls",
                "/var/lib/ringside/tls.17"
            ])
        );
        assert_eq!(got.files, set(&["/var/lib/ringside/tls.17/cert.pem"]));
    }

    /// A Kubernetes secret volume: `cert.pem -> ..data/cert.pem`, `..data -> ..2026_12_02`.
    #[test]
    fn a_secret_volume_is_watched_where_data_is_swapped() {
        let files = [PathBuf::from("/certs/cert.pem")];
        let got = to_watch(
            &files,
            links(&[
                ("/certs/cert.pem", "..data/cert.pem"),
                ("/certs/..data", "..2026_12_02"),
            ]),
        );
        assert_eq!(got.dirs, set(&["/certs", "/certs/..2026_12_02"]));
        assert_eq!(got.files, set(&["/certs/..2026_12_02/cert.pem"]));
    }

    /// A link into another directory whose own link is swapped there: both directories of links
    /// are watched, and `..` in a target is resolved.
    #[test]
    fn links_inside_a_links_target_are_followed() {
        let files = [PathBuf::from("/etc/ringside/cert.pem")];
        let got = to_watch(
            &files,
            links(&[
                ("/etc/ringside/cert.pem", "/var/lib/agent/current/cert.pem"),
                ("/var/lib/agent/current", "../agent/gen.5"),
            ]),
        );
        assert_eq!(
            got.dirs,
            set(&["/etc/ringside", "/var/lib/agent", "/var/lib/agent/gen.5"])
        );
        assert_eq!(got.files, set(&["/var/lib/agent/gen.5/cert.pem"]));
    }

    #[test]
    fn a_loop_of_links_ends() {
        let got = to_watch(
            &[PathBuf::from("/a/cert.pem")],
            links(&[
                ("/a/cert.pem", "/b/cert.pem"),
                ("/b/cert.pem", "/a/cert.pem"),
            ]),
        );
        assert_eq!(got.dirs, set(&["/a", "/b"]));
    }

    fn temp(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("ringside-cert-watch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Runs the watcher on a thread; every look at the files records what the `probe` files held
    /// then (`-` for a missing one), joined with `|`.
    struct Running {
        seen: Arc<Mutex<Vec<String>>>,
        stop: Arc<AtomicBool>,
        nudge: UnixStream,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Running {
        fn start(files: Vec<PathBuf>, probe: Vec<PathBuf>, inotify: bool) -> Running {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let (rx, tx) = UnixStream::pair().unwrap();
            rx.set_nonblocking(true).unwrap();
            let (r, s) = (seen.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                run(
                    &files,
                    &rx,
                    || {
                        let look: Vec<String> = probe
                            .iter()
                            .map(|p| std::fs::read_to_string(p).unwrap_or_else(|_| "-".into()))
                            .collect();
                        r.lock().unwrap().push(look.join("|"));
                    },
                    || s.load(SeqCst),
                    inotify,
                )
            });
            let w = Running {
                seen,
                stop,
                nudge: tx,
                thread: Some(thread),
            };
            w.wait_for(1, "the first look");
            w
        }

        fn count(&self) -> usize {
            self.seen.lock().unwrap().len()
        }

        fn looks(&self) -> Vec<String> {
            self.seen.lock().unwrap().clone()
        }

        fn wait_for(&self, n: usize, what: &str) {
            let began = Instant::now();
            while self.count() < n {
                assert!(
                    began.elapsed() < Duration::from_secs(5),
                    "{what}: {} looks, not {n}",
                    self.count()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }

        /// Wait until a look saw `what` (the probe files' contents joined with `|`).
        fn wait_to_see(&self, what: &str) {
            let began = Instant::now();
            while !self.looks().iter().any(|l| l == what) {
                assert!(
                    began.elapsed() < Duration::from_secs(5),
                    "no look saw {what:?}: {:?}",
                    self.looks()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
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
        let (cert, key) = (d.join("cert.pem"), d.join("key.pem"));
        std::fs::write(&cert, "one").unwrap();
        std::fs::write(&key, "k0").unwrap();
        let w = Running::start(
            vec![cert.clone(), key.clone()],
            vec![cert.clone(), key.clone()],
            true,
        );
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(w.looks(), ["one|k0"], "looked without a change");

        // Rewritten in place.
        std::fs::write(&cert, "two").unwrap();
        w.wait_to_see("two|k0");
        // Renamed into place.
        std::fs::write(d.join("cert.tmp"), "three").unwrap();
        std::fs::rename(d.join("cert.tmp"), &cert).unwrap();
        w.wait_to_see("three|k0");
        // A key then a certificate, back to back: read once both are in place, and (when the
        // two writes were not pulled apart by the scheduler) never between them.
        let before = Instant::now();
        std::fs::write(&key, "k").unwrap();
        std::fs::write(&cert, "four").unwrap();
        let between = before.elapsed();
        w.wait_to_see("four|k");
        std::thread::sleep(Duration::from_millis(200));
        if between < SETTLE / 5 {
            assert!(
                !w.looks().iter().any(|l| l == "three|k"),
                "a pair written together was read half-way: {:?}",
                w.looks()
            );
        }
        w.stop();
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A file with a second name elsewhere (as a file mounted on its own is), rewritten in place
    /// through that name: no watched directory reports it, the watch on the file does.
    #[test]
    fn a_file_rewritten_through_another_name_is_seen() {
        let d = temp("hardlink");
        std::fs::create_dir_all(d.join("host")).unwrap();
        std::fs::create_dir_all(d.join("etc")).unwrap();
        let (host, cert) = (d.join("host/cert.pem"), d.join("etc/cert.pem"));
        std::fs::write(&host, "one").unwrap();
        std::fs::hard_link(&host, &cert).unwrap();
        let w = Running::start(vec![cert.clone()], vec![cert.clone()], true);
        std::fs::write(&host, "two").unwrap();
        w.wait_to_see("two");
        w.stop();
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The agent's layout: the files are reached through `tls -> tls.N`, and a new set is a new
    /// directory with the link swapped to it (the old one removed after).
    #[test]
    fn a_swapped_link_is_seen_and_the_new_directory_watched() {
        let d = temp("swap");
        let swap = |n: u32, keep_old: bool| {
            let dir = d.join(format!("tls.{n}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("cert.pem"), format!("{n}")).unwrap();
            let _ = std::fs::remove_file(d.join("tls.tmp"));
            std::os::unix::fs::symlink(format!("tls.{n}"), d.join("tls.tmp")).unwrap();
            std::fs::rename(d.join("tls.tmp"), d.join("tls")).unwrap();
            if n > 1 && !keep_old {
                std::fs::remove_dir_all(d.join(format!("tls.{}", n - 1))).unwrap();
            }
        };
        swap(1, false);
        let cert = d.join("tls/cert.pem");
        let w = Running::start(vec![cert.clone()], vec![cert.clone()], true);
        swap(2, false);
        w.wait_to_see("2");
        // The new directory is watched: a rewrite inside it is seen too.
        std::fs::write(d.join("tls.2/cert.pem"), "2b").unwrap();
        w.wait_to_see("2b");
        // A swap that keeps the old directory is seen as well.
        swap(3, true);
        w.wait_to_see("3");
        std::fs::write(d.join("tls.3/cert.pem"), "3b").unwrap();
        w.wait_to_see("3b");
        w.stop();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn without_inotify_the_files_are_polled() {
        let d = temp("poll");
        let cert = d.join("cert.pem");
        std::fs::write(&cert, "one").unwrap();
        let w = Running::start(vec![cert.clone()], vec![cert], false);
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
        let mut w = Running::start(vec![cert.clone()], vec![cert], true);
        let t = w.thread.take().unwrap();
        drop(w);
        let began = Instant::now();
        t.join().unwrap();
        assert!(began.elapsed() < Duration::from_secs(1));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
