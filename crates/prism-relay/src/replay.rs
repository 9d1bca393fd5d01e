//! [`ReplayWindow`]: accepts each counter once, within a window behind the highest seen.

/// Counters this far behind the highest one seen are still accepted (once).
pub(crate) const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// A sliding bitmap of the counters seen recently (as in IPsec and WireGuard).
#[derive(Debug, Clone, Default)]
pub(crate) struct ReplayWindow {
    /// Highest counter accepted plus one (0: none yet).
    next: u64,
    bits: [u64; WORDS],
}

impl ReplayWindow {
    /// Whether `counter` is new and recent enough; if so, it is marked seen. Call only after
    /// the datagram authenticated, or a forger could advance the window.
    pub(crate) fn accept(&mut self, counter: u64) -> bool {
        if counter == u64::MAX {
            return false;
        }
        if counter >= self.next {
            let advance = counter + 1 - self.next;
            if advance >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for seq in self.next..=counter {
                    self.clear(seq);
                }
            }
            self.next = counter + 1;
            self.set(counter);
            return true;
        }
        if self.next - counter > WINDOW {
            return false;
        }
        if self.is_set(counter) {
            return false;
        }
        self.set(counter);
        true
    }

    fn slot(seq: u64) -> (usize, u64) {
        let bit = seq % WINDOW;
        ((bit / 64) as usize, 1 << (bit % 64))
    }

    fn set(&mut self, seq: u64) {
        let (word, mask) = Self::slot(seq);
        if let Some(w) = self.bits.get_mut(word) {
            *w |= mask;
        }
    }

    fn clear(&mut self, seq: u64) {
        let (word, mask) = Self::slot(seq);
        if let Some(w) = self.bits.get_mut(word) {
            *w &= !mask;
        }
    }

    fn is_set(&self, seq: u64) -> bool {
        let (word, mask) = Self::slot(seq);
        self.bits.get(word).is_some_and(|w| w & mask != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_is_accepted_once() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(5));
        assert!(w.accept(3), "late but inside the window");
        assert!(!w.accept(3));
        assert!(!w.accept(5));
    }

    #[test]
    fn the_window_edges() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(5000));
        assert!(
            w.accept(5000 - WINDOW + 1),
            "the oldest counter still inside"
        );
        assert!(!w.accept(5000 - WINDOW - 1), "just outside");
        assert!(!w.accept(0), "far behind");
        // A jump further than the window forgets everything behind it.
        assert!(w.accept(5000 + 3 * WINDOW));
        assert!(!w.accept(5000));
        assert!(w.accept(5000 + 3 * WINDOW - 1));
        assert!(!w.accept(u64::MAX));
    }

    #[test]
    fn out_of_order_delivery_within_the_window_is_all_accepted() {
        let mut w = ReplayWindow::default();
        let mut order: Vec<u64> = (0..2000).collect();
        // A deterministic shuffle within blocks of 100.
        for block in order.chunks_mut(100) {
            block.reverse();
        }
        for c in &order {
            assert!(w.accept(*c), "{c}");
        }
        for c in 1000..2000 {
            assert!(!w.accept(c), "{c} replayed");
        }
    }
}
