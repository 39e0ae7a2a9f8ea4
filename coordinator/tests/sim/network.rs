//! The simulated network: which endpoint can reach which (partitions), how long a message
//! takes, and whether it is lost or duplicated. Pure: the harness passes the time and the
//! random numbers come from the seed's one RNG, so a seed replays the same deliveries.

use std::collections::BTreeMap;

use rand::Rng;
use rand::rngs::StdRng;

/// An endpoint's address: raft node ids are 1..=n, agents are [`AGENT_BASE`] + i.
pub type Endpoint = u64;

/// The first agent endpoint.
pub const AGENT_BASE: Endpoint = 100;

/// How the links behave at the moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkProfile {
    /// Probability that a message is lost.
    pub loss: f64,
    /// Probability that a message is delivered twice.
    pub duplication: f64,
    /// Usual one-way delay range in milliseconds (inclusive).
    pub delay_ms: (u64, u64),
    /// Probability of a long delay (up to `slow_ms`), which reorders messages.
    pub slow: f64,
    /// The longest delay.
    pub slow_ms: u64,
}

impl LinkProfile {
    /// A healthy LAN: no loss, 1-5 ms.
    pub const CALM: LinkProfile = LinkProfile {
        loss: 0.0,
        duplication: 0.0,
        delay_ms: (1, 5),
        slow: 0.0,
        slow_ms: 5,
    };

    /// A profile drawn from the seed: up to 20% loss, 5% duplication, some long delays.
    pub fn random(rng: &mut StdRng) -> LinkProfile {
        let low = rng.random_range(1..=20);
        LinkProfile {
            loss: rng.random_range(0.0..0.2),
            duplication: rng.random_range(0.0..0.05),
            delay_ms: (low, low + rng.random_range(0..=60)),
            slow: rng.random_range(0.0..0.05),
            slow_ms: rng.random_range(100..=1500),
        }
    }
}

/// Partitions and link behaviour.
#[derive(Debug, Clone)]
pub struct Network {
    /// Endpoint → its side; endpoints reach each other only on the same side.
    sides: BTreeMap<Endpoint, u32>,
    /// The links' behaviour.
    pub profile: LinkProfile,
}

impl Network {
    /// Everyone reaches everyone over calm links.
    pub fn new() -> Network {
        Network {
            sides: BTreeMap::new(),
            profile: LinkProfile::CALM,
        }
    }

    /// Whether `from` reaches `to` now.
    pub fn connected(&self, from: Endpoint, to: Endpoint) -> bool {
        self.side(from) == self.side(to)
    }

    fn side(&self, endpoint: Endpoint) -> u32 {
        self.sides.get(&endpoint).copied().unwrap_or(0)
    }

    /// Splits the network: each endpoint of `endpoints` lands on side 0 or 1 at random (at
    /// least one on each side), or a single endpoint is cut off. Returns the description.
    pub fn partition(&mut self, endpoints: &[Endpoint], rng: &mut StdRng) -> String {
        self.sides.clear();
        if rng.random_bool(0.4) {
            let alone = endpoints[rng.random_range(0..endpoints.len())];
            self.sides.insert(alone, 1);
        } else {
            loop {
                for &e in endpoints {
                    self.sides.insert(e, u32::from(rng.random_bool(0.5)));
                }
                let ones = self.sides.values().filter(|&&s| s == 1).count();
                if ones > 0 && ones < endpoints.len() {
                    break;
                }
            }
        }
        self.describe()
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        self.sides.clear();
    }

    /// The endpoints cut off from side 0, e.g. `{1, 3, 101}`.
    pub fn describe(&self) -> String {
        let apart: Vec<String> = self
            .sides
            .iter()
            .filter(|&(_, &s)| s == 1)
            .map(|(e, _)| e.to_string())
            .collect();
        if apart.is_empty() {
            "no partition".into()
        } else {
            format!("{{{}}} apart from the rest", apart.join(", "))
        }
    }

    /// The delays after which copies of a message sent now arrive: none (lost or partitioned),
    /// one, or two (duplicated).
    pub fn deliveries(&self, from: Endpoint, to: Endpoint, rng: &mut StdRng) -> Vec<u64> {
        if !self.connected(from, to) {
            return Vec::new();
        }
        let p = self.profile;
        if p.loss > 0.0 && rng.random_bool(p.loss) {
            return Vec::new();
        }
        let copies = if p.duplication > 0.0 && rng.random_bool(p.duplication) {
            2
        } else {
            1
        };
        (0..copies)
            .map(|_| {
                if p.slow > 0.0 && rng.random_bool(p.slow) {
                    rng.random_range(p.delay_ms.0..=p.slow_ms.max(p.delay_ms.0))
                } else {
                    rng.random_range(p.delay_ms.0..=p.delay_ms.1)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn a_partition_cuts_both_directions_and_a_heal_restores_them() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut net = Network::new();
        let endpoints = [1, 2, 3, 101];
        net.partition(&endpoints, &mut rng);
        let cut: Vec<_> = endpoints
            .iter()
            .flat_map(|&a| endpoints.iter().map(move |&b| (a, b)))
            .filter(|&(a, b)| !net.connected(a, b))
            .collect();
        assert!(!cut.is_empty(), "{}", net.describe());
        for &(a, b) in &cut {
            assert!(!net.connected(b, a));
            assert!(net.deliveries(a, b, &mut rng).is_empty());
        }
        net.heal();
        assert!(cut.iter().all(|&(a, b)| net.connected(a, b)));
    }

    #[test]
    fn calm_links_deliver_every_message_once_within_their_delay() {
        let mut rng = StdRng::seed_from_u64(1);
        let net = Network::new();
        for _ in 0..100 {
            let d = net.deliveries(1, 2, &mut rng);
            assert_eq!(d.len(), 1);
            assert!((1..=5).contains(&d[0]));
        }
    }

    #[test]
    fn lossy_links_lose_some_messages_but_not_all() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut net = Network::new();
        net.profile.loss = 0.5;
        let delivered = (0..1000)
            .filter(|_| !net.deliveries(1, 2, &mut rng).is_empty())
            .count();
        assert!((300..700).contains(&delivered), "{delivered}");
    }
}
