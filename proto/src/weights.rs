//! The exact-share weight rule, shared by the coordinator (which computes a balancer's
//! upstream servers from its inventory) and the agent (which renders them): both must agree, so
//! the rule lives once, next to the wire contract that carries its result.

/// Per-server weights `(stable, canary)` for a weighted upstream, such that the canary variant
/// gets exactly `canary_weight`% of picks in total with `n_stable` and `n_canary` servers.
/// Only meaningful for `0 < canary_weight < 100` with servers on both sides; never returns a
/// zero weight then. Weights above 100% count as 100%.
pub fn server_weights(canary_weight: u32, n_stable: usize, n_canary: usize) -> (u64, u64) {
    let w = u64::from(canary_weight.min(100));
    let stable = (100 - w) * n_canary as u64;
    let canary = w * n_stable as u64;
    let g = gcd(stable, canary).max(1);
    (stable / g, canary / g)
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_weights_give_the_canary_exactly_its_share_and_never_zero() {
        for (ns, nc) in [(1, 1), (2, 1), (1, 2), (3, 2), (2, 3), (5, 7)] {
            for w in 1..100u32 {
                let (ws, wc) = server_weights(w, ns, nc);
                assert!(ws > 0 && wc > 0, "{ns}x{nc} at {w}%: ({ws}, {wc})");
                let canary = wc * nc as u64;
                let total = ws * ns as u64 + canary;
                // canary/total == w/100 exactly, in integers.
                assert_eq!(u64::from(w) * total, 100 * canary, "{ns}x{nc} at {w}%");
            }
        }
        // Spot checks of the reduced weights.
        assert_eq!(server_weights(25, 1, 1), (3, 1));
        assert_eq!(server_weights(25, 2, 1), (3, 2));
        assert_eq!(server_weights(50, 3, 2), (2, 3));
        assert_eq!(server_weights(10, 3, 2), (6, 1));
        assert_eq!(server_weights(25, 3, 1), (1, 1));
    }
}
