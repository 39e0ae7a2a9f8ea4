//! A damaged data directory, through the real binary: `serin coordinator run` exits non-zero
//! with an error that names the directory and says what to do, never with a panic backtrace
//! (sled 0.34 panics on some damaged files instead of returning an error).

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{SERIN, describe, free_port, spawn_coordinator, stderr, tail};

const SEGMENT: usize = 512 * 1024;

/// Damages a sled directory.
type Damage = Box<dyn FnOnce(&Path)>;

/// Runs `serin coordinator run` on `data_dir`; a coordinator still running after 10 s started
/// (it is killed and the output says so).
async fn run_coordinator(data_dir: &Path) -> Output {
    let child = tokio::process::Command::new(SERIN)
        .args(["coordinator", "run", "--listen"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--data-dir")
        .arg(data_dir)
        .env("NO_COLOR", "1")
        .env("RUST_BACKTRACE", "1")
        .env_remove("SERIN_LOG")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(10), child).await {
        Ok(out) => out.expect("running serin coordinator run"),
        Err(_) => panic!(
            "the coordinator started on the damaged data directory {}",
            data_dir.display()
        ),
    }
}

/// Asserts the refusal: non-zero exit, the directory and the advice named, no panic.
fn assert_refused(out: &Output, data_dir: &Path, case: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "{case}: exit 0\n{}", describe(out));
    for needle in [
        data_dir.display().to_string().as_str(),
        "is corrupted or was written by another program",
        "restore it from a backup",
        "move it aside",
    ] {
        assert!(
            err.contains(needle),
            "{case}: no `{needle}` in\n{}",
            describe(out)
        );
    }
    for panic in ["panicked at", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(
            !err.contains(panic),
            "{case}: `{panic}` in\n{}",
            describe(out)
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Bytes that are nobody's format, deterministic.
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// A copy of `pristine` named `case`, damaged by `damage` (given the sled directory).
fn damaged(root: &Path, pristine: &Path, case: &str, damage: impl FnOnce(&Path)) -> PathBuf {
    let dir = root.join(case);
    copy_dir(pristine, &dir);
    damage(&dir.join("raft.sled"));
    dir
}

#[tokio::test]
async fn a_truncated_or_overwritten_data_directory_is_refused_with_advice() {
    let root = tempfile::tempdir().unwrap();
    let pristine = root.path().join("pristine");
    // A real coordinator's directory: it elects itself and commits its first entry.
    let mut coordinator = spawn_coordinator(root.path(), free_port(), &pristine);
    common::wait_for(
        Duration::from_secs(20),
        "the coordinator to listen",
        async || tail(&coordinator.log, 50).contains("coordinator listening"),
        || tail(&coordinator.log, 50),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    coordinator.kill().await;
    assert!(pristine.join("raft.sled/db").is_file());

    let cases: Vec<(&str, Damage)> = vec![
        // Cut inside its first record. (A cut further on is a torn tail to sled: it recovers
        // the records before it, an older consistent state that the coordinator starts from.)
        (
            "truncated",
            Box::new(|sled: &Path| {
                let db = std::fs::OpenOptions::new()
                    .write(true)
                    .open(sled.join("db"))
                    .unwrap();
                db.set_len(64).unwrap();
            }),
        ),
        (
            "overwritten",
            Box::new(|sled: &Path| {
                let len = std::fs::metadata(sled.join("db")).unwrap().len();
                std::fs::write(sled.join("db"), garbage(len as usize)).unwrap();
            }),
        ),
        (
            "config-overwritten",
            Box::new(|sled: &Path| std::fs::write(sled.join("conf"), garbage(62)).unwrap()),
        ),
    ];
    for (case, damage) in cases {
        let dir = damaged(root.path(), &pristine, case, damage);
        let out = run_coordinator(&dir).await;
        assert_refused(&out, &dir, case);
    }
}

/// The kept sled directory (tests/fixtures) on which sled 0.34 panics in its recovery, every
/// time: a multi-segment raft store with one 512 KiB segment zeroed, found by the search below
/// (which segment makes sled panic depends on its background flushes, so it is kept).
#[tokio::test]
async fn a_data_directory_that_makes_sled_panic_is_refused_without_a_backtrace() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sled-panics-on-open.tar.gz"
    );
    let untar = std::process::Command::new("tar")
        .arg("xzf")
        .arg(fixture)
        .arg("-C")
        .arg(&dir)
        .output()
        .expect("running tar");
    assert!(
        untar.status.success(),
        "tar xzf {fixture}\n{}",
        describe(&untar)
    );
    let out = run_coordinator(&dir).await;
    assert_refused(&out, &dir, "fixture");
    assert!(
        stderr(&out).contains("sled panicked"),
        "sled did not panic on the fixture: the test proves nothing\n{}",
        describe(&out)
    );
}

/// A multi-segment store with one 512 KiB segment zeroed: depending on what the segment held,
/// sled recovers, returns an error or panics in its own recovery. Every case must end in the
/// same refusal.
#[tokio::test]
async fn a_data_directory_with_any_segment_zeroed_is_refused_without_a_backtrace() {
    let root = tempfile::tempdir().unwrap();
    let pristine = root.path().join("pristine");
    {
        // Shaped like the raft log: appended entries, an overwritten state record, and
        // compaction removing old entries, flushed at every step.
        let db = serin_coordinator::raft::storage::open_db(
            &pristine.join("raft.sled"),
            Duration::from_secs(10),
        )
        .unwrap();
        let tree = db.open_tree("raft").unwrap();
        for i in 1..2000u64 {
            let key = |i: u64| [&[b'e'][..], &i.to_be_bytes()].concat();
            tree.insert(key(i), vec![i as u8; 400]).unwrap();
            tree.insert(b"m/applied", vec![i as u8; 2000 + (i as usize % 1000) * 20])
                .unwrap();
            if i % 200 == 0 {
                for j in i - 200..i {
                    tree.remove(key(j)).unwrap();
                }
            }
            db.flush().unwrap();
        }
    }
    let segments = std::fs::metadata(pristine.join("raft.sled/db"))
        .unwrap()
        .len() as usize
        / SEGMENT;
    assert!(segments >= 4, "only {segments} segments written");
    for segment in 1..segments {
        let case = format!("segment-{segment}-zeroed");
        let dir = damaged(root.path(), &pristine, &case, |sled| {
            let mut db = std::fs::read(sled.join("db")).unwrap();
            db[segment * SEGMENT..(segment + 1) * SEGMENT].fill(0);
            std::fs::write(sled.join("db"), db).unwrap();
        });
        let out = run_coordinator(&dir).await;
        assert_refused(&out, &dir, &case);
    }
}
