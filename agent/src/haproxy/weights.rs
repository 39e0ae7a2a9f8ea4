//! HAProxy server weights for a canary share (pure).
//!
//! HAProxy takes absolute weights in `0..=MAX_WEIGHT` (256). The exact-share rule
//! ([`crate::traffic::server_weights`], already reduced by the gcd) is used as is whenever
//! both weights fit, which covers every stage of a fleet with up to two servers per variant
//! and almost every stage of larger ones. When a weight would exceed 256 (three stable
//! servers against one canary at 99%, say: `1 : 297`), [`haproxy_weights`] searches every
//! stable weight `1..=256` for the canary weight that puts the canary *variant* closest to
//! its share; that is the closest value any pair of per-variant weights can reach.
//!
//! Error bound, measured exhaustively by the tests over every share 1..=99: with up to two
//! servers per variant the share is exact; up to four, the canary's achieved share is off by
//! at most [`MAX_SHARE_ERROR`] (0.54 percentage points, at 1% with one stable and four canary
//! servers: 1.54%); up to eight, by at most 2.03 points (1% with one stable and eight canary
//! servers cannot go below 8/264 ≈ 3.03% with a stable weight of at most 256). The error
//! only appears at the extremes (a 1% or 99% stage with many servers on one side); the tests
//! check that the result is the closest achievable pair.
//!
//! Unlike nginx, weight 0 is valid: a variant without traffic keeps its servers in the
//! backend at weight 0 (0% and 100% stages need no membership change).

/// The largest weight HAProxy accepts (`set server … weight N`, `server … weight N`).
pub const MAX_WEIGHT: u32 = 256;

/// The largest deviation of the canary's achieved share from its stage's share (as a
/// fraction: 0.0054 = 0.54 percentage points) with up to four servers per variant, measured
/// by the tests, which fail when it grows.
pub const MAX_SHARE_ERROR: f64 = 0.0054;

/// Per-server weights `(stable, canary)` in `0..=MAX_WEIGHT` giving the canary variant
/// `canary_weight`% (clamped to 100) with `n_stable` and `n_canary` servers: exact when the
/// reduced exact-share weights fit, else the closest achievable pair. A side without
/// traffic (0%, 100%, or no servers on the other side) gets weight 0.
pub fn haproxy_weights(canary_weight: u32, n_stable: usize, n_canary: usize) -> (u32, u32) {
    let w = canary_weight.min(100);
    if w == 0 || n_canary == 0 {
        return (1, 0);
    }
    if w == 100 || n_stable == 0 {
        return (0, 1);
    }
    let (stable, canary) = crate::traffic::server_weights(w, n_stable, n_canary);
    if stable <= u64::from(MAX_WEIGHT) && canary <= u64::from(MAX_WEIGHT) {
        // Both fit in 0..=256, so the conversion cannot fail.
        return (stable as u32, canary as u32);
    }
    closest(w, n_stable, n_canary)
}

/// The canary's share of picks with these per-server weights.
pub fn canary_share(weights: (u32, u32), n_stable: usize, n_canary: usize) -> f64 {
    let stable = f64::from(weights.0) * n_stable as f64;
    let canary = f64::from(weights.1) * n_canary as f64;
    if stable + canary == 0.0 {
        0.0
    } else {
        canary / (stable + canary)
    }
}

/// The pair in `1..=MAX_WEIGHT` whose canary share is closest to `w`%: for each stable
/// weight, the two canary weights around the exact real one (the share grows with the canary
/// weight, so one of them is the closest for that stable weight). Ties keep the first found.
fn closest(w: u32, n_stable: usize, n_canary: usize) -> (u32, u32) {
    let target = f64::from(w) / 100.0;
    // canary/stable weight ratio giving the exact share.
    let ratio = (f64::from(w) * n_stable as f64) / (f64::from(100 - w) * n_canary as f64);
    let mut best = (1, 1);
    let mut best_error = f64::INFINITY;
    for stable in 1..=MAX_WEIGHT {
        let exact = f64::from(stable) * ratio;
        let low = (exact.floor() as u32).clamp(1, MAX_WEIGHT);
        let high = (exact.ceil() as u32).clamp(1, MAX_WEIGHT);
        for canary in [low, high] {
            let error = (canary_share((stable, canary), n_stable, n_canary) - target).abs();
            if error < best_error {
                best = (stable, canary);
                best_error = error;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_shares_are_kept_when_the_reduced_weights_fit() {
        assert_eq!(haproxy_weights(25, 1, 1), (3, 1));
        assert_eq!(haproxy_weights(10, 3, 2), (6, 1));
        assert_eq!(haproxy_weights(1, 2, 1), (99, 2));
        // 99% with two stable, one canary: 1 : 198 fits.
        assert_eq!(haproxy_weights(99, 2, 1), (1, 198));
    }

    #[test]
    fn a_side_without_traffic_gets_weight_zero() {
        assert_eq!(haproxy_weights(0, 2, 1), (1, 0));
        assert_eq!(haproxy_weights(40, 2, 0), (1, 0));
        assert_eq!(haproxy_weights(100, 2, 1), (0, 1));
        assert_eq!(haproxy_weights(130, 2, 1), (0, 1));
        assert_eq!(haproxy_weights(40, 0, 1), (0, 1));
    }

    #[test]
    fn weights_too_large_for_haproxy_are_scaled_to_the_closest_achievable_share() {
        // Exact would be 1 : 297.
        let (s, c) = haproxy_weights(99, 3, 1);
        assert!(
            s <= MAX_WEIGHT && c <= MAX_WEIGHT && s > 0 && c > 0,
            "({s}, {c})"
        );
        // The closest achievable: 1 : 256 gives 256/259.
        assert_eq!((s, c), (1, 256));
        let share = canary_share((s, c), 3, 1);
        assert!((share - 0.99).abs() < 0.012, "{share}");
    }

    #[test]
    fn every_share_is_within_the_documented_bounds_by_fleet_size() {
        let worst = |n: usize| {
            let mut worst: f64 = 0.0;
            for ns in 1..=n {
                for nc in 1..=n {
                    for w in 1..100u32 {
                        let (s, c) = haproxy_weights(w, ns, nc);
                        assert!(
                            (1..=MAX_WEIGHT).contains(&s) && (1..=MAX_WEIGHT).contains(&c),
                            "{ns}x{nc} at {w}%: ({s}, {c})"
                        );
                        let error = (canary_share((s, c), ns, nc) - f64::from(w) / 100.0).abs();
                        worst = worst.max(error);
                    }
                }
            }
            worst
        };
        assert!(
            worst(2) < 1e-12,
            "exact up to two per variant: {}",
            worst(2)
        );
        assert!(worst(4) <= MAX_SHARE_ERROR, "up to four: {}", worst(4));
        assert!(worst(8) <= 0.0204, "up to eight: {}", worst(8));
    }

    #[test]
    fn the_scaled_pair_is_the_closest_of_all_pairs_a_brute_force_finds() {
        for (w, ns, nc) in [(99, 3, 1), (1, 1, 16), (97, 7, 3), (3, 5, 11), (99, 16, 1)] {
            let target = f64::from(w) / 100.0;
            let got = haproxy_weights(w, ns, nc);
            let got_error = (canary_share(got, ns, nc) - target).abs();
            let mut best_error = f64::INFINITY;
            for s in 1..=MAX_WEIGHT {
                for c in 1..=MAX_WEIGHT {
                    best_error = best_error.min((canary_share((s, c), ns, nc) - target).abs());
                }
            }
            assert!(
                got_error <= best_error + 1e-12,
                "{ns}x{nc} at {w}%: {got:?} is off by {got_error}, the best by {best_error}"
            );
        }
    }
}
