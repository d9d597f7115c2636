//! Where a warm invocation's time goes, hop by hop (`kindling serve --trace-hops`, which
//! `kindling bench` turns on): stamps the components take anyway, on
//! [`kindling_wire::monotonic_ns`], added up into the answer's [`HEADER_HOPS`].
//!
//! The host stamps the caller's request (head read, body read), the hand-over to the
//! environment's Runtime API, the `/next` answer, the result's arrival and the
//! completion; the agent stamps the event's arrival and the runtime's result, and sends
//! them back in the report that rides on the result. A sandbox shares the host's
//! monotonic clock, so the crossings each way are told apart; a microVM's clock is its
//! own, so only the two crossings together are (`vsock`).

/// The answer header (Invoke API) that carries the hops: `name=µs` pairs, `;`-separated,
/// in the order of [`HOPS`] (the ones not measured left out).
pub const HEADER_HOPS: &str = "kindling-hops";

/// Every hop a [`HEADER_HOPS`] may name, in the invocation's order, with what it covers.
pub const HOPS: [(&str, &str); 10] = [
    ("read", "caller's body read (head parsed → body read)"),
    (
        "schedule",
        "scheduler: pool, environment taken, START logged",
    ),
    (
        "dispatch",
        "event submitted → /next answered (the runtime's next /next on its way)",
    ),
    ("to-agent", "/next answer: host → agent"),
    ("runtime", "agent → runtime → agent (event in, result in)"),
    ("to-host", "result: agent → host (report, log flush)"),
    ("vsock", "host ↔ agent both ways (microVM: clocks differ)"),
    ("guest", "host's /next answer → result (no agent stamps)"),
    ("result", "result body read → invocation completed"),
    ("answer", "END/REPORT, scheduler wake-up, answer built"),
];

/// The host's stamps of one invocation in its environment's Runtime API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestStamps {
    /// `/next` answered with the event.
    pub handed_ns: u64,
    /// The result's request head arrived.
    pub result_ns: u64,
    /// The invocation was completed, its body read.
    pub done_ns: u64,
}

/// The stamps of one invocation that the scheduler gathers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamps {
    /// Handed to the environment's Runtime API.
    pub submitted_ns: u64,
    pub guest: GuestStamps,
    /// The agent's (event in, result in), on its own clock.
    pub agent: Option<(u64, u64)>,
    /// Whether the agent's clock is the host's (a sandbox).
    pub same_clock: bool,
}

impl Stamps {
    /// The hops, given the caller's request stamps (head read, body read) and now (the
    /// answer built): the value of [`HEADER_HOPS`].
    pub fn header(&self, head_ns: u64, body_ns: u64, answer_ns: u64) -> String {
        let g = self.guest;
        let mut hops = vec![
            ("read", span(head_ns, body_ns)),
            ("schedule", span(body_ns, self.submitted_ns)),
            ("dispatch", span(self.submitted_ns, g.handed_ns)),
        ];
        match self.agent {
            Some((event_in, result_in))
                if self.same_clock && g.handed_ns <= event_in && result_in <= g.result_ns =>
            {
                hops.push(("to-agent", span(g.handed_ns, event_in)));
                hops.push(("runtime", span(event_in, result_in)));
                hops.push(("to-host", span(result_in, g.result_ns)));
            }
            Some((event_in, result_in)) => {
                let runtime = span(event_in, result_in);
                hops.push(("runtime", runtime));
                hops.push(("vsock", (span(g.handed_ns, g.result_ns) - runtime).max(0.0)));
            }
            None => hops.push(("guest", span(g.handed_ns, g.result_ns))),
        }
        hops.push(("result", span(g.result_ns, g.done_ns)));
        hops.push(("answer", span(g.done_ns, answer_ns)));
        let mut out = String::with_capacity(16 * hops.len());
        for (name, us) in hops {
            if !out.is_empty() {
                out.push(';');
            }
            out.push_str(&format!("{name}={us:.1}"));
        }
        out
    }
}

/// Microseconds from `from` to `to` (0 when the clock says otherwise).
fn span(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1000.0
}

/// The hops of a [`HEADER_HOPS`] value, in µs; `None` when it does not parse.
pub fn parse(header: &str) -> Option<Vec<(String, f64)>> {
    header
        .split(';')
        .map(|pair| {
            let (name, us) = pair.split_once('=')?;
            Some((name.to_string(), us.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamps(agent: Option<(u64, u64)>, same_clock: bool) -> Stamps {
        Stamps {
            submitted_ns: 20_000,
            guest: GuestStamps {
                handed_ns: 30_000,
                result_ns: 200_000,
                done_ns: 205_000,
            },
            agent,
            same_clock,
        }
    }

    #[test]
    fn a_sandbox_splits_the_crossings() {
        let header = stamps(Some((70_000, 160_000)), true).header(0, 2_000, 215_000);
        assert_eq!(
            parse(&header).unwrap(),
            [
                ("read", 2.0),
                ("schedule", 18.0),
                ("dispatch", 10.0),
                ("to-agent", 40.0),
                ("runtime", 90.0),
                ("to-host", 40.0),
                ("result", 5.0),
                ("answer", 10.0),
            ]
            .map(|(n, v)| (n.to_string(), v))
        );
    }

    #[test]
    fn a_clock_of_its_own_gives_both_crossings_together() {
        // A microVM's clock started at its boot: far below the host's.
        let header = stamps(Some((1_000, 91_000)), false).header(0, 2_000, 215_000);
        let hops = parse(&header).unwrap();
        assert!(hops.contains(&("runtime".to_string(), 90.0)), "{hops:?}");
        assert!(hops.contains(&("vsock".to_string(), 80.0)), "{hops:?}");
        // Claimed the same clock, yet out of order: never a negative crossing.
        let hops = parse(&stamps(Some((1_000, 91_000)), true).header(0, 2_000, 215_000));
        assert!(hops.unwrap().iter().all(|(name, _)| name != "to-agent"));
        let hops = parse(&stamps(None, true).header(0, 2_000, 215_000)).unwrap();
        assert!(hops.contains(&("guest".to_string(), 170.0)), "{hops:?}");
        for (name, _) in &hops {
            assert!(HOPS.iter().any(|(known, _)| known == name), "{name}");
        }
    }

    #[test]
    fn a_broken_header_does_not_parse() {
        assert!(parse("read=1.0;schedule").is_none());
        assert!(parse("read=soon").is_none());
    }
}
