//! [`Timers`]: when each connection next needs the stack, ordered by time.

use std::collections::{BTreeSet, HashMap};

use tokio::time::Instant;

use crate::conn::ConnId;

/// One deadline per connection; the earliest first.
#[derive(Debug, Default)]
pub(crate) struct Timers {
    order: BTreeSet<(Instant, ConnId)>,
    deadlines: HashMap<ConnId, Instant>,
}

impl Timers {
    /// Sets (or clears) `id`'s deadline.
    pub(crate) fn set(&mut self, id: ConnId, deadline: Option<Instant>) {
        if let Some(old) = self.deadlines.remove(&id) {
            self.order.remove(&(old, id));
        }
        if let Some(at) = deadline {
            self.deadlines.insert(id, at);
            self.order.insert((at, id));
        }
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.order.first().map(|&(at, _)| at)
    }

    /// Removes and returns every connection due at `now`.
    pub(crate) fn expired(&mut self, now: Instant, due: &mut Vec<ConnId>) {
        while let Some(&(at, id)) = self.order.first() {
            if at > now {
                break;
            }
            self.order.pop_first();
            self.deadlines.remove(&id);
            due.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn deadlines_come_due_in_order_and_can_move() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut timers = Timers::default();
        timers.set(1, Some(ms(30)));
        timers.set(2, Some(ms(10)));
        timers.set(3, Some(ms(20)));
        timers.set(3, Some(ms(40))); // moved
        timers.set(1, None); // cleared
        assert_eq!(timers.next(), Some(ms(10)));

        let mut due = Vec::new();
        timers.expired(ms(39), &mut due);
        assert_eq!(due, [2]);
        timers.expired(ms(40), &mut due);
        assert_eq!(due, [2, 3]);
        assert_eq!(timers.next(), None);
    }
}
