//! Gap detection over a stream's sequence numbers: pure, so it is testable without sockets.

/// What one sequence number says about the stream so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqVerdict {
    /// The first message since (re)connecting: a starting point, not a gap.
    First,
    /// Exactly the number expected.
    Next,
    /// Batches `from..to` were never received.
    Gap { from: u64, to: u64 },
    /// Lower than expected: the engine restarted and counts from 0 again.
    Restarted { expected: u64 },
}

/// Judges each sequence number against the last; pure, so gap handling is testable without sockets.
#[derive(Clone, Debug, Default)]
pub struct SeqTracker {
    expected: Option<u64>,
}

impl SeqTracker {
    /// Judges `seq` and takes it as the new position, whatever the verdict.
    pub fn observe(&mut self, seq: u64) -> SeqVerdict {
        let verdict = match self.expected {
            None => SeqVerdict::First,
            Some(e) if seq == e => SeqVerdict::Next,
            Some(e) if seq > e => SeqVerdict::Gap { from: e, to: seq },
            Some(e) => SeqVerdict::Restarted { expected: e },
        };
        self.expected = seq.checked_add(1);
        verdict
    }

    /// Forgets the position, so the next number is a starting point (after a reconnect).
    pub fn reset(&mut self) {
        self.expected = None;
    }
}
