//! The counters of the `session summary` lines `ssm-proxy` logs (at info)
//! when a session ends.
#![allow(dead_code)] // Each test binary uses its own part.

#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub messages_sent: u64,
    pub distinct: u64,
    pub resends: u64,
}

impl Summary {
    /// The first summary in `log`.
    pub fn parse(log: &str) -> Summary {
        Summary::all(log).into_iter().next().unwrap_or_else(|| panic!("no session summary:\n{log}"))
    }

    /// Every session's summary in `log`, in order.
    pub fn all(log: &str) -> Vec<Summary> {
        log.lines().filter(|l| l.contains("session summary")).map(Summary::of_line).collect()
    }

    fn of_line(line: &str) -> Summary {
        let field = |name: &str| -> u64 {
            let key = format!(" {name}=");
            let at = line.find(&key).unwrap_or_else(|| panic!("no {name} in {line}")) + key.len();
            line[at..].split(|c: char| !c.is_ascii_digit()).next().and_then(|v| v.parse().ok()).expect("a number")
        };
        Summary { messages_sent: field("messages_sent"), distinct: field("distinct"), resends: field("resends") }
    }

    pub fn resend_ratio(&self) -> f64 {
        self.resends as f64 / self.messages_sent.max(1) as f64
    }
}
