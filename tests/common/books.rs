//! Reading `serin demo-gateway`'s books (`GET /books`) in tests: who held which shard when,
//! whether the session start limit held, whether every 429 was waited out.

use std::collections::BTreeMap;

use serde_json::Value;

/// Replays the log: panics if a shard was ever identified while another bot held it, or
/// released by a bot that did not hold it; returns the final owner of each shard.
pub fn replay_holders(log: &[Value]) -> BTreeMap<u64, String> {
    let mut holder: BTreeMap<u64, String> = BTreeMap::new();
    for e in log {
        let shard = e["shard"].as_u64().unwrap();
        let bot = e["bot"].as_str().unwrap().to_owned();
        match e["kind"].as_str().unwrap() {
            "identify" => {
                if let Some(other) = holder.get(&shard) {
                    panic!("shard {shard} identified by {bot} while held by {other}: {e}");
                }
                holder.insert(shard, bot);
            }
            "release" | "expired" => {
                assert_eq!(holder.remove(&shard).as_ref(), Some(&bot), "{e}");
            }
            "rate_limited" => {}
            other => panic!("unknown log kind {other}: {e}"),
        }
    }
    holder
}

/// Panics if a bucket (`shard % buckets`) granted two starts less than `interval_ms` apart;
/// returns the starts.
pub fn assert_buckets_paced(log: &[Value], buckets: u64, interval_ms: u64) -> usize {
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    let mut starts = 0;
    for e in log.iter().filter(|e| e["kind"] == "identify") {
        let (shard, at) = (e["shard"].as_u64().unwrap(), e["at_ms"].as_u64().unwrap());
        if let Some(previous) = last.insert(shard % buckets, at) {
            assert!(
                at - previous >= interval_ms,
                "bucket {} started twice in {} ms: {e}",
                shard % buckets,
                at - previous
            );
        }
        starts += 1;
    }
    starts
}

/// Panics if a bot tried a shard again sooner than the wait a 429 told it; returns the 429s.
pub fn assert_waits_honoured(log: &[Value]) -> usize {
    let mut refused = 0;
    for (i, e) in log.iter().enumerate() {
        if e["kind"] != "rate_limited" {
            continue;
        }
        refused += 1;
        let earliest = e["at_ms"].as_u64().unwrap() + e["retry_after_ms"].as_u64().unwrap();
        let next_try = log[i + 1..].iter().find(|n| {
            n["shard"] == e["shard"]
                && n["bot"] == e["bot"]
                && (n["kind"] == "identify" || n["kind"] == "rate_limited")
        });
        if let Some(n) = next_try {
            let at = n["at_ms"].as_u64().unwrap();
            assert!(
                at >= earliest,
                "{} tried shard {} {} ms early: {e} then {n}",
                e["bot"],
                e["shard"],
                earliest - at
            );
        }
    }
    refused
}
