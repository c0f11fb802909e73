//! Who may hold a connection of the sidecar's small servers (admin, health, metrics). The health
//! and metrics ports are reachable from the network, so a hostile pod must not be able to take
//! every slot with clients that never finish a request (the kubelet's readiness probe would then
//! fail and the pod would leave its Service). Two rules, decided here without sockets:
//!
//! - at most `per_source` connections per client address;
//! - when all `total` slots are held, a client whose address holds fewer connections than the
//!   address holding the most takes the slot of that address's oldest connection (that
//!   connection is closed). When every address holds as many as the newcomer would, it is refused.
//!
//! So a client from an address of its own always gets a slot unless `total` other addresses each
//! hold one, however many connections the others open.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// What to do with a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Serve it under `id`; close connection `evict` first when there is one.
    Admit {
        /// The new connection's id (give it back with [`Slots::release`]).
        id: u64,
        /// A held connection whose slot it takes.
        evict: Option<u64>,
    },
    /// Close it at once.
    Refuse,
}

/// The connections held on one port.
#[derive(Debug)]
pub struct Slots {
    total: usize,
    per_source: usize,
    next: u64,
    /// Open connections by id (ids grow with time: the smallest is the oldest).
    open: BTreeMap<u64, IpAddr>,
    held: HashMap<IpAddr, usize>,
}

impl Slots {
    /// A port with `total` slots, at most `per_source` per client address.
    pub fn new(total: usize, per_source: usize) -> Slots {
        Slots {
            total: total.max(1),
            per_source: per_source.max(1),
            next: 0,
            open: BTreeMap::new(),
            held: HashMap::new(),
        }
    }

    /// Decide on a connection from `from`.
    pub fn admit(&mut self, from: IpAddr) -> Admission {
        let mine = self.held.get(&from).copied().unwrap_or(0);
        if mine >= self.per_source {
            return Admission::Refuse;
        }
        let mut evict = None;
        if self.open.len() >= self.total {
            // The address holding the most (ties: the one whose oldest connection is oldest).
            let mut biggest: Option<(usize, u64, IpAddr)> = None;
            for (&id, &ip) in &self.open {
                let n = self.held.get(&ip).copied().unwrap_or(0);
                if biggest.is_none_or(|(bn, _, _)| n > bn) {
                    biggest = Some((n, id, ip));
                }
            }
            match biggest {
                Some((n, id, _)) if n > mine => {
                    self.release(id);
                    evict = Some(id);
                }
                _ => return Admission::Refuse,
            }
        }
        let id = self.next;
        self.next += 1;
        self.open.insert(id, from);
        *self.held.entry(from).or_default() += 1;
        Admission::Admit { id, evict }
    }

    /// A connection ended (or was evicted); unknown ids are ignored.
    pub fn release(&mut self, id: u64) {
        if let Some(ip) = self.open.remove(&id) {
            if let Some(n) = self.held.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.held.remove(&ip);
                }
            }
        }
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// No connection is held.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn admitted(a: Admission) -> (u64, Option<u64>) {
        match a {
            Admission::Admit { id, evict } => (id, evict),
            Admission::Refuse => panic!("refused"),
        }
    }

    #[test]
    fn one_address_cannot_take_more_than_its_share() {
        let mut s = Slots::new(64, 8);
        for _ in 0..8 {
            admitted(s.admit(ip(1)));
        }
        for _ in 0..2000 {
            assert_eq!(s.admit(ip(1)), Admission::Refuse);
        }
        assert_eq!(s.len(), 8);
        assert_eq!(
            admitted(s.admit(ip(2))).1,
            None,
            "another address is served"
        );
    }

    #[test]
    fn a_full_port_gives_a_newcomer_the_oldest_slot_of_the_biggest_holder() {
        let mut s = Slots::new(4, 3);
        let a: Vec<u64> = (0..3).map(|_| admitted(s.admit(ip(1))).0).collect();
        let b = admitted(s.admit(ip(2))).0;
        // Full: ip 3 takes ip 1's oldest connection.
        assert_eq!(admitted(s.admit(ip(3))), (4, Some(a[0])));
        // ip 1 now holds 2, ip 2 and ip 3 one each: ip 4 takes ip 1's next oldest.
        assert_eq!(admitted(s.admit(ip(4))).1, Some(a[1]));
        // Everyone holds one: a fifth address takes the oldest slot of all.
        assert_eq!(admitted(s.admit(ip(5))).1, Some(a[2]));
        // ip 2 (holding one) may not take a slot from an address holding as many as it would.
        assert_eq!(s.admit(ip(2)), Admission::Refuse);
        s.release(b);
        assert_eq!(admitted(s.admit(ip(2))).1, None, "a released slot is free");
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn many_hostile_addresses_leave_room_for_a_new_one() {
        // 100 addresses with 20 connections each, all held: a probe from a new address is
        // admitted, and only a flood of newer connections can take its slot again.
        let mut s = Slots::new(64, 8);
        for round in 0..20 {
            for a in 0..100u8 {
                let _ = s.admit(ip(a));
                assert!(s.len() <= 64, "round {round}");
            }
        }
        let (probe, evict) = admitted(s.admit(IpAddr::from([192, 168, 0, 1])));
        assert!(evict.is_some());
        assert!(s.open.contains_key(&probe));
        assert!(s.held.values().all(|&n| n <= 8));
    }

    #[test]
    fn release_is_idempotent() {
        let mut s = Slots::new(2, 2);
        let (id, _) = admitted(s.admit(ip(1)));
        s.release(id);
        s.release(id);
        s.release(999);
        assert!(s.is_empty());
        assert!(s.held.is_empty());
    }
}
