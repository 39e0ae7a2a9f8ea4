//! Containing a library's panic on bad input from disk, shared by the coordinator's raft
//! storage and the agent's store (sled 0.34 panics in its recovery on some damaged files).

thread_local! {
    /// Set while [`contain_panic`] runs on this thread: the panic hook stays quiet.
    static CONTAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`; a panic inside it becomes `Err(message)` instead of a message and backtrace on
/// stderr. For libraries that panic on bad input from disk (sled 0.34 does in its recovery).
/// Only panics on this thread are contained; other threads' panics are reported as usual.
pub fn contain_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINING.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    let was = CONTAINING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(was));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_contain_panic_becomes_its_message() {
        assert_eq!(contain_panic(|| 7), Ok(7));
        let owned = contain_panic(|| -> u8 { panic!("bad page {}", 3) });
        assert_eq!(owned, Err("bad page 3".to_owned()));
        let literal = contain_panic(|| -> u8 { panic!("literal") });
        assert_eq!(literal, Err("literal".to_owned()));
    }
}
