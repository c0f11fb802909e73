//! What listens in this network namespace, read from `/proc/net/tcp` and `/proc/net/tcp6`: the
//! hint behind `app_not_listening` ("nothing listens on 8080; 127.0.0.1:8081 does") and the name of
//! the process holding a port that ringside cannot bind.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A listening socket: its address and the socket inode (to find the owning process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenSocket {
    /// Bound address.
    pub addr: SocketAddr,
    /// Socket inode.
    pub inode: u64,
}

/// Parse the text of `/proc/net/tcp` or `/proc/net/tcp6`, keeping LISTEN sockets.
pub fn parse_proc_net_tcp(text: &str) -> Vec<ListenSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                return None;
            }
            let (ip_hex, port_hex) = cols[1].split_once(':')?;
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            let ip = parse_hex_ip(ip_hex)?;
            Some(ListenSocket {
                addr: SocketAddr::new(ip, port),
                inode: cols[9].parse().ok()?,
            })
        })
        .collect()
}

/// Addresses in /proc/net/tcp are the kernel's in-memory words: 4-byte groups in host order.
fn parse_hex_ip(hex: &str) -> Option<IpAddr> {
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(hex, 16).ok()?.swap_bytes(),
        ))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16)
                    .ok()?
                    .swap_bytes();
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_be_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// The listening sockets of this network namespace.
pub fn listening() -> Vec<ListenSocket> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| parse_proc_net_tcp(&t))
        .collect()
}

/// A counter of the `Tcp:` lines of `/proc/net/snmp` (a header line of names, then a line of
/// values), for example `AttemptFails`: connections that went from SYN-SENT to CLOSED, which is what
/// an app's connection refused by the kernel (nothing listening where the redirect rules send it)
/// leaves behind.
pub fn snmp_tcp_counter(text: &str, name: &str) -> Option<u64> {
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let names = tcp.next()?;
    let values = tcp.next()?;
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// Failed TCP connection attempts in this network namespace so far (`AttemptFails`).
pub fn failed_connect_attempts() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    snmp_tcp_counter(&text, "AttemptFails")
}

/// Explain why nothing answered on `port` (tried on loopback and the pod address), given what
/// listens.
pub fn app_hint(port: u16, sockets: &[ListenSocket], tried: &[SocketAddr]) -> String {
    let on_port: Vec<&ListenSocket> = sockets.iter().filter(|s| s.addr.port() == port).collect();
    let tried_text = tried
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if !on_port.is_empty() {
        let addrs = on_port
            .iter()
            .map(|s| s.addr.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return format!(
            "the app listens on port {port} only at {addrs}, which the proxy cannot reach (tried {tried_text}): bind it to 0.0.0.0, 127.0.0.1 or the pod address"
        );
    }
    let mut others: Vec<String> = sockets
        .iter()
        .filter(|s| !(15000..=15021).contains(&s.addr.port()))
        .map(|s| s.addr.to_string())
        .collect();
    others.sort();
    others.dedup();
    if others.is_empty() {
        format!("nothing listens on port {port} in the pod (tried {tried_text}), nor on any other port: is the app running?")
    } else {
        format!(
            "nothing listens on port {port} in the pod (tried {tried_text}); listening: {}: check the service's targetPort or the app's listen address",
            others.join(", ")
        )
    }
}

/// The process (pid and command name) holding a socket with this inode, by scanning /proc/*/fd.
pub fn process_holding(inode: u64) -> Option<(u32, String)> {
    let needle = format!("socket:[{inode}]");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == needle.as_str()) {
                let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                return Some((pid, comm.trim().to_string()));
            }
        }
    }
    None
}

/// "held by pid 123 (nginx)" for a port that is taken, when it can be told.
pub fn who_holds(addr: SocketAddr) -> Option<String> {
    let s = listening().into_iter().find(|s| {
        s.addr.port() == addr.port()
            && (s.addr.ip() == addr.ip()
                || s.addr.ip().is_unspecified()
                || addr.ip().is_unspecified())
    })?;
    let (pid, comm) = process_holding(s.inode)?;
    Some(format!("held by pid {pid} ({comm})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_counters_by_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets\nTcp: 1 200 120000 -1 7 3 4 0\nUdp: InDatagrams\nUdp: 9\n";
        assert_eq!(snmp_tcp_counter(snmp, "AttemptFails"), Some(4));
        assert_eq!(snmp_tcp_counter(snmp, "ActiveOpens"), Some(7));
        assert_eq!(
            snmp_tcp_counter(snmp, "MaxConn"),
            None,
            "negative is not a count"
        );
        assert_eq!(snmp_tcp_counter(snmp, "Nope"), None);
        assert_eq!(snmp_tcp_counter("Tcp: A B\n", "A"), None, "no value line");
    }

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 222 1 0000000000000000 100 0 0 10 0
   2: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
   3: 0212A8C6:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0000000000000000 100 0 0 10 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 444 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn parses_listening_sockets() {
        let v4 = parse_proc_net_tcp(TCP);
        assert_eq!(
            v4.iter().map(|s| s.addr.to_string()).collect::<Vec<_>>(),
            vec!["127.0.0.1:8080", "0.0.0.0:22", "198.168.18.2:8081"]
        );
        assert_eq!(v4[0].inode, 12345);
        let v6 = parse_proc_net_tcp(TCP6);
        assert_eq!(v6[0].addr.to_string(), "[::1]:8082");
    }

    #[test]
    fn hints_name_what_listens() {
        let mut all = parse_proc_net_tcp(TCP);
        all.extend(parse_proc_net_tcp(TCP6));
        let tried: Vec<SocketAddr> = vec!["127.0.0.1:1800".parse().unwrap()];
        let h = app_hint(1800, &all, &tried);
        assert!(h.contains("nothing listens on port 1800"), "{h}");
        assert!(
            h.contains("127.0.0.1:8080") && h.contains("[::1]:8082"),
            "{h}"
        );
        let h = app_hint(8081, &all, &tried);
        assert!(h.contains("only at 198.168.18.2:8081"), "{h}");
        let h = app_hint(1800, &[], &tried);
        assert!(h.contains("is the app running"), "{h}");
    }

    #[test]
    fn finds_the_process_holding_a_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let who = who_holds(addr).expect("this test process holds the port");
        assert!(who.contains(&std::process::id().to_string()), "{who}");
    }
}
