//! Slot assignment and runtime command planning (pure): which server goes in which
//! pre-provisioned slot of a backend, and the `set server` commands that turn the live
//! slots into the desired ones.
//!
//! Assignment keeps every server that is already in a slot (same IP and port) in that slot,
//! so a weight change or another server's arrival never moves it; new servers take free
//! slots, parked ones (in maintenance) first. Commands are ordered so that the backend never
//! has less capacity than before or after the change: servers coming in and weights going
//! up first, then weights going down, then servers going out (`state maint`: their
//! established connections finish, new requests go elsewhere).

use std::net::IpAddr;

use super::runtime_api::LiveSlot;

/// A server as a slot holds it: the instance's name (for the rendered config's comments),
/// its IP and port (the runtime API's `set server … addr` takes an IP, not a name) and its
/// HAProxy weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotServer {
    pub name: String,
    pub ip: IpAddr,
    pub port: u16,
    pub weight: u32,
}

impl SlotServer {
    fn is_at(&self, slot: &LiveSlot) -> bool {
        slot.addr == self.ip.to_string() && slot.port == self.port
    }
}

/// The name of slot `index`: `slot0`, `slot1`, …
pub fn slot_name(index: usize) -> String {
    format!("slot{index}")
}

/// How many slots a backend with `servers` servers gets: `per_step` (the `slots` setting),
/// or the next multiple of it that holds them all. A change of this number is structural
/// (a reload); growing in steps keeps reloads rare while a fleet grows.
pub fn slot_count(servers: usize, per_step: usize) -> usize {
    let step = per_step.max(1);
    servers.div_ceil(step).max(1) * step
}

/// Puts `servers` into `slot_count` slots given the `live` ones (empty when unknown):
/// `result[i]` is what slot `i` should hold, `None` for a parked slot. Needs
/// `servers.len() <= slot_count`; extra servers are dropped (the caller sizes the slots).
pub fn assign(
    live: &[LiveSlot],
    servers: &[SlotServer],
    slot_count: usize,
) -> Vec<Option<SlotServer>> {
    let mut slots: Vec<Option<SlotServer>> = vec![None; slot_count];
    let mut unplaced = Vec::new();
    for server in servers {
        let kept = live
            .iter()
            .enumerate()
            .take(slot_count)
            .find(|(i, slot)| slots[*i].is_none() && server.is_at(slot));
        match kept {
            Some((i, _)) => slots[i] = Some(server.clone()),
            None => unplaced.push(server),
        }
    }
    // Free slots, parked (or unknown) ones first, then free ones still taking traffic.
    let ready = |i: usize| live.get(i).is_some_and(|s| s.ready);
    let mut free: Vec<usize> = (0..slot_count).filter(|i| slots[*i].is_none()).collect();
    free.sort_by_key(|i| (ready(*i), *i));
    for (server, i) in unplaced.into_iter().zip(free) {
        slots[i] = Some(server.clone());
    }
    slots
}

/// The runtime commands that turn `live` into `desired` for `backend`, in a safe order (see
/// the module doc). Empty when the live slots already are the desired ones. A slot missing
/// from `live` counts as parked with an unknown address.
pub fn commands(backend: &str, live: &[LiveSlot], desired: &[Option<SlotServer>]) -> Vec<String> {
    let mut incoming = Vec::new();
    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut out = Vec::new();
    for (i, want) in desired.iter().enumerate() {
        let server = format!("{backend}/{}", slot_name(i));
        let slot = live.get(i);
        let ready = slot.is_some_and(|s| s.ready);
        match want {
            Some(s) => {
                let moved = !slot.is_some_and(|l| s.is_at(l));
                let weight = slot.map(|l| l.weight);
                if moved {
                    let address = format!("set server {server} addr {} port {}", s.ip, s.port);
                    if ready { &mut up } else { &mut incoming }.push(address);
                }
                if weight != Some(s.weight) {
                    let command = format!("set server {server} weight {}", s.weight);
                    if !ready {
                        incoming.push(command);
                    } else if weight.is_some_and(|w| w > s.weight) {
                        down.push(command);
                    } else {
                        up.push(command);
                    }
                }
                if !ready {
                    incoming.push(format!("set server {server} state ready"));
                }
            }
            None if ready => out.push(format!("set server {server} state maint")),
            None => {}
        }
    }
    incoming
        .into_iter()
        .chain(up)
        .chain(down)
        .chain(out)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, last: u8, port: u16, weight: u32) -> SlotServer {
        SlotServer {
            name: name.into(),
            ip: IpAddr::from([10, 0, 0, last]),
            port,
            weight,
        }
    }

    fn live(index: usize, last: u8, port: u16, weight: u32, ready: bool) -> LiveSlot {
        LiveSlot {
            name: slot_name(index),
            addr: format!("10.0.0.{last}"),
            port,
            weight,
            ready,
        }
    }

    fn parked(index: usize) -> LiveSlot {
        LiveSlot {
            name: slot_name(index),
            addr: "127.0.0.1".into(),
            port: 1,
            weight: 0,
            ready: false,
        }
    }

    #[test]
    fn slot_counts_grow_in_steps_of_the_setting() {
        assert_eq!(slot_count(0, 8), 8);
        assert_eq!(slot_count(8, 8), 8);
        assert_eq!(slot_count(9, 8), 16);
        assert_eq!(slot_count(3, 1), 3);
        assert_eq!(slot_count(0, 0), 1);
    }

    #[test]
    fn servers_keep_their_slots_and_new_ones_take_parked_slots_first() {
        let live_now = [
            live(0, 1, 80, 3, true),
            live(1, 9, 80, 1, true), // a server that left
            parked(2),
            live(3, 2, 80, 1, true),
        ];
        let servers = [
            server("a", 2, 80, 1),
            server("b", 1, 80, 3),
            server("c", 5, 80, 1),
        ];
        let slots = assign(&live_now, &servers, 4);
        assert_eq!(
            slots,
            [
                Some(servers[1].clone()),
                None,
                Some(servers[2].clone()),
                Some(servers[0].clone()),
            ]
        );
        // Unknown live state: in order.
        assert_eq!(
            assign(&[], &servers[..2], 3),
            [Some(servers[0].clone()), Some(servers[1].clone()), None]
        );
        // The same port on another IP is another server.
        let slots = assign(&[live(0, 1, 80, 3, true)], &[server("x", 1, 81, 3)], 2);
        assert_eq!(slots, [None, Some(server("x", 1, 81, 3))]);
    }

    #[test]
    fn nothing_to_do_when_the_live_slots_are_the_desired_ones() {
        let live_now = [live(0, 1, 80, 3, true), parked(1)];
        let desired = [Some(server("a", 1, 80, 3)), None];
        assert!(commands("serin_web", &live_now, &desired).is_empty());
    }

    #[test]
    fn a_weight_change_raises_before_it_lowers() {
        // 0% -> 25% with one stable and one canary: canary 0 -> 1 first, stable 1 -> 3 is
        // also a raise; then a later 25% -> 10% lowers the canary after raising stable.
        let live_now = [live(0, 1, 80, 1, true), live(1, 2, 80, 0, true)];
        let desired = [Some(server("s", 1, 80, 3)), Some(server("c", 2, 80, 1))];
        assert_eq!(
            commands("b", &live_now, &desired),
            ["set server b/slot0 weight 3", "set server b/slot1 weight 1"]
        );
        let live_now = [live(0, 1, 80, 3, true), live(1, 2, 80, 1, true)];
        let desired = [Some(server("s", 1, 80, 9)), Some(server("c", 2, 80, 0))];
        assert_eq!(
            commands("b", &live_now, &desired),
            ["set server b/slot0 weight 9", "set server b/slot1 weight 0"]
        );
    }

    #[test]
    fn membership_changes_bring_servers_in_first_and_take_them_out_last() {
        let live_now = [live(0, 1, 80, 1, true), live(1, 9, 80, 1, true), parked(2)];
        let desired = [
            Some(server("s", 1, 80, 2)),
            None,
            Some(server("n", 3, 8080, 1)),
        ];
        assert_eq!(
            commands("serin_web", &live_now, &desired),
            [
                "set server serin_web/slot2 addr 10.0.0.3 port 8080",
                "set server serin_web/slot2 weight 1",
                "set server serin_web/slot2 state ready",
                "set server serin_web/slot0 weight 2",
                "set server serin_web/slot1 state maint",
            ]
        );
    }

    #[test]
    fn a_server_in_maintenance_with_the_right_address_is_only_made_ready() {
        let live_now = [live(0, 1, 80, 1, false)];
        assert_eq!(
            commands("b", &live_now, &[Some(server("s", 1, 80, 1))]),
            ["set server b/slot0 state ready"]
        );
        // Slots HAProxy did not report are set in full.
        assert_eq!(
            commands("b", &[], &[Some(server("s", 1, 80, 1))]),
            [
                "set server b/slot0 addr 10.0.0.1 port 80",
                "set server b/slot0 weight 1",
                "set server b/slot0 state ready",
            ]
        );
    }

    #[test]
    fn applying_the_commands_reaches_the_desired_slots() {
        // A tiny model of HAProxy's slots, to check that the plan is complete.
        fn run(live: &mut [LiveSlot], commands: &[String]) {
            for c in commands {
                let words: Vec<&str> = c.split_whitespace().collect();
                let index: usize = words[2].rsplit_once("/slot").unwrap().1.parse().unwrap();
                let slot = &mut live[index];
                match words[3] {
                    "addr" => {
                        slot.addr = words[4].into();
                        slot.port = words[6].parse().unwrap();
                    }
                    "weight" => slot.weight = words[4].parse().unwrap(),
                    "state" => slot.ready = words[4] == "ready",
                    other => panic!("unexpected {other}"),
                }
            }
        }
        let mut live_now = vec![
            live(0, 1, 80, 5, true),
            parked(1),
            live(2, 7, 80, 2, true),
            parked(3),
        ];
        for servers in [
            vec![server("a", 1, 80, 1), server("b", 2, 80, 1)],
            vec![
                server("b", 2, 80, 4),
                server("c", 3, 80, 1),
                server("d", 4, 80, 0),
            ],
            vec![],
            vec![server("a", 1, 80, 256)],
        ] {
            let desired = assign(&live_now, &servers, 4);
            let planned = commands("b", &live_now, &desired);
            run(&mut live_now, &planned);
            assert!(commands("b", &live_now, &desired).is_empty(), "{planned:?}");
            let mut held: Vec<&str> = desired.iter().flatten().map(|s| s.name.as_str()).collect();
            held.sort_unstable();
            let mut wanted: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
            wanted.sort_unstable();
            assert_eq!(held, wanted);
        }
    }
}
