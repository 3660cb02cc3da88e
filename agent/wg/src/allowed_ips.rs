//! Cryptokey routing: which peer owns an address (longest prefix wins).
//!
//! Pure data, rebuilt whole on every configuration change and read on every packet. The table
//! is small (one entry per peer prefix), so a linear scan over entries sorted by prefix length,
//! longest first, beats a trie in code and is fast enough for tens of peers.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    /// Sorted by prefix length, longest first, so the first match is the longest.
    entries: Vec<(IpNet, T)>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<T: Clone> AllowedIps<T> {
    /// Build from (prefix, owner) pairs; a prefix listed twice goes to the last owner, as
    /// WireGuard moves an allowed IP to the peer that claims it last.
    pub fn build(items: impl IntoIterator<Item = (IpNet, T)>) -> Self {
        let mut entries: Vec<(IpNet, T)> = Vec::new();
        for (net, owner) in items {
            let net = net.trunc();
            entries.retain(|(n, _)| *n != net);
            entries.push((net, owner));
        }
        entries.sort_by_key(|(n, _)| std::cmp::Reverse(n.prefix_len()));
        Self { entries }
    }

    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        self.entries
            .iter()
            .find(|(net, _)| net.contains(&addr))
            .map(|(_, owner)| owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins_and_families_stay_apart() {
        let net = |s: &str| s.parse::<IpNet>().expect("valid prefix");
        let table = AllowedIps::build([
            (net("100.64.0.0/16"), 'a'),
            (net("100.64.2.0/24"), 'b'),
            (net("fd00::/64"), 'c'),
            (net("100.64.2.0/24"), 'd'),
        ]);
        let ip = |s: &str| s.parse::<IpAddr>().expect("valid address");
        assert_eq!(table.lookup(ip("100.64.1.1")), Some(&'a'));
        assert_eq!(table.lookup(ip("100.64.2.1")), Some(&'d'));
        assert_eq!(table.lookup(ip("fd00::1")), Some(&'c'));
        assert_eq!(table.lookup(ip("fd01::1")), None);
        assert_eq!(table.lookup(ip("10.0.0.1")), None);
    }
}
