//! The few places where the fast path talks to the kernel directly: non-blocking `splice`, `recv`
//! and `send`, pipes, and socket options. Everything here works on raw file descriptors owned by
//! the caller; the event loop (io_uring or epoll) only tells the caller when to retry.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn cvt(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Move up to `len` bytes from `fd_in` to `fd_out` (one of them a pipe) without blocking.
#[inline]
pub fn splice(fd_in: RawFd, fd_out: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice takes two descriptors and null offsets (both ends are streams); the caller
    // keeps both descriptors open for the duration of the call.
    let ret = unsafe {
        libc::splice(
            fd_in,
            std::ptr::null_mut(),
            fd_out,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    cvt(ret)
}

/// Receive into `buf` without blocking.
#[inline]
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `buf`, which is valid for writes for the call.
    let ret = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    cvt(ret)
}

/// Look at the first bytes without consuming them, without blocking.
pub fn peek(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `buf`, which is valid for writes for the call.
    let ret = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    cvt(ret)
}

/// Send from `buf` without blocking and without SIGPIPE.
#[inline]
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `buf`, which is valid for reads for the call.
    let ret = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    cvt(ret)
}

/// Non-blocking gathered send (`sendmsg` with `MSG_NOSIGNAL`): every slice in one system call.
pub fn send_vectored(fd: RawFd, bufs: &[std::io::IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr is valid (no name, no control data); `IoSlice` is ABI-compatible with
    // `iovec`, and the slices stay borrowed, valid for reads, for the duration of the call.
    let ret = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
        libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    cvt(ret)
}

/// Non-blocking scattered receive (`recvmsg`): fills the slices in order.
pub fn recv_vectored(fd: RawFd, bufs: &mut [std::io::IoSliceMut<'_>]) -> io::Result<usize> {
    // SAFETY: a zeroed msghdr is valid (no name, no control data); `IoSliceMut` is ABI-compatible
    // with `iovec`, and the slices stay borrowed, valid for writes, for the duration of the call.
    let ret = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = bufs.as_mut_ptr() as *mut libc::iovec;
        msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
        libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT)
    };
    cvt(ret)
}

/// Half-close: no more bytes will be written to `fd` (sends FIN). Errors (already reset, not
/// connected) are ignored: the peer is gone either way.
pub fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown on a descriptor the caller owns; no memory is passed.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Stop accepting on a listening socket: a pending accept() returns with an error. Used by the
/// control thread to begin a drain without a cross-thread waker.
pub fn shutdown_listener(fd: RawFd) {
    // SAFETY: shutdown on a listening descriptor that stays open until the worker exits.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Close a refused client connection: after a TLS failure the alert this side sent must reach the
/// peer, so the close is orderly (FIN after the alert); any other refusal resets (RST), so that the
/// client sees a refusal rather than an empty answer.
pub fn close_after_failure(fd: RawFd, reason: crate::reason::Reason) {
    if reason.is_tls() {
        shutdown_write(fd);
    } else {
        set_linger_zero(fd);
    }
}

/// Make the next close() send RST instead of FIN (propagating a reset to the peer).
pub fn set_linger_zero(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value points to a properly sized `linger` that lives for the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Put a descriptor in non-blocking mode (needed for the direct splice/recv/send calls).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    let mut on: libc::c_int = 1;
    // SAFETY: FIONBIO reads one c_int from the pointer, which is valid for the call.
    let ret = unsafe { libc::ioctl(fd, libc::FIONBIO, &mut on) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Disable Nagle: the proxy forwards what it got at once, it never waits to coalesce.
pub fn set_nodelay(fd: RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: the option value points to a c_int that lives for the call.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// `IP6T_SO_ORIGINAL_DST` from `linux/netfilter_ipv6/ip6_tables.h` (not in libc).
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination a redirected connection was addressed to before netfilter's REDIRECT rewrote it
/// (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`). Fails with `ENOENT` when the connection was not
/// redirected.
pub fn original_dst(fd: RawFd, ipv6: bool) -> io::Result<std::net::SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let (level, name) = if ipv6 {
        (libc::SOL_IPV6, IP6T_SO_ORIGINAL_DST)
    } else {
        (libc::SOL_IP, libc::SO_ORIGINAL_DST)
    };
    // SAFETY: the kernel writes at most `len` bytes into `storage`, which is that large.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    sockaddr_to_std(&storage)
}

fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> io::Result<std::net::SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which fits in it.
            let a: &libc::sockaddr_in =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Ok((ip, u16::from_be(a.sin_port)).into())
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, which fits in it.
            let a: &libc::sockaddr_in6 =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Ok(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        f => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected address family {f}"),
        )),
    }
}

/// A non-blocking pipe used to splice between two sockets.
#[derive(Debug)]
pub struct Pipe {
    /// Read end.
    pub r: OwnedFd,
    /// Write end.
    pub w: OwnedFd,
}

impl Pipe {
    /// Create a pipe and try to size it to `size` bytes (the kernel may refuse above
    /// `/proc/sys/fs/pipe-max-size`; then the default size stays).
    pub fn new(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array, which has room for two.
        let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ takes an int argument; failure leaves the default size.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) };
        Ok(Pipe { r, w })
    }
}

/// Raise the soft open-file limit to the hard limit. Returns the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one rlimit from the valid pointer.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Take a socket out of the monoio runtime (deregistered from it) as a std socket, to hand it to
/// another runtime.
pub fn into_std(stream: monoio::net::TcpStream) -> std::net::TcpStream {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = stream.into_raw_fd();
    // SAFETY: `into_raw_fd` gave up ownership of an open socket descriptor; it is owned by the
    // returned value from here on and by nothing else.
    unsafe { std::net::TcpStream::from_raw_fd(fd) }
}

/// Set the receive low-water mark: the socket reports readable only once `bytes` are queued (or
/// the peer closed, or an error is pending). Protocol detection uses it so that a client that
/// sent part of what is needed wakes nobody until the rest arrives.
pub fn set_rcvlowat(fd: RawFd, bytes: usize) -> io::Result<()> {
    let v: libc::c_int = bytes.clamp(1, libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: `v` is a valid c_int for the duration of the call; the length matches its size.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(ret as isize).map(|_| ())
}

/// Whether the peer has shut down its sending side (or the socket has an error): a readable
/// socket with fewer bytes than the low-water mark means one of those.
pub fn peer_closed(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call; the timeout is 0.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// The addresses of this host's (pod's) interfaces.
pub fn local_ips() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: `ifa_addr` is non-null and points to a sockaddr of the family it names.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            match family {
                libc::AF_INET => {
                    // SAFETY: the family says this is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(std::net::IpAddr::V4(std::net::Ipv4Addr::from(
                        u32::from_be(sin.sin_addr.s_addr),
                    )));
                }
                libc::AF_INET6 => {
                    // SAFETY: the family says this is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(std::net::IpAddr::V6(std::net::Ipv6Addr::from(
                        sin6.sin6_addr.s6_addr,
                    )));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn splice_moves_bytes_between_sockets_through_a_pipe() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l2.local_addr().unwrap()).unwrap();
        let (mut d, _) = l2.accept().unwrap();
        set_nonblocking(b.as_raw_fd()).unwrap();
        set_nonblocking(c.as_raw_fd()).unwrap();
        let pipe = Pipe::new(65536).unwrap();
        assert_eq!(
            splice(b.as_raw_fd(), pipe.w.as_raw_fd(), 65536)
                .unwrap_err()
                .kind(),
            io::ErrorKind::WouldBlock
        );
        a.write_all(b"hello").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(splice(b.as_raw_fd(), pipe.w.as_raw_fd(), 65536).unwrap(), 5);
        assert_eq!(splice(pipe.r.as_raw_fd(), c.as_raw_fd(), 5).unwrap(), 5);
        let mut got = [0u8; 5];
        d.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        drop(a);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(
            splice(b.as_raw_fd(), pipe.w.as_raw_fd(), 65536).unwrap(),
            0,
            "EOF"
        );
    }
}
