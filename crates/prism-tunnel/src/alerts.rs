//! [`Alerts`]: upstream failures a user must act on, as warning lines a person can read: one
//! line per kind of failure at most every [`EVERY`], saying how many were left out.
//!
//! A destination refusing a connection is the internet working as usual (a closed port), and
//! stays at debug. A proxy that cannot be reached, refuses Prism's credentials or answers
//! nonsense, and local failures (no descriptors left, a protect hook refusing) mean nothing
//! will work until someone acts: those are warned about.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::ConnectError;

/// At most one line per kind of failure this often.
const EVERY: Duration = Duration::from_secs(10);
/// Kinds remembered at most (a flood of distinct messages cannot grow the map).
const KINDS: usize = 64;

/// The rate-limited warnings of one `serve`.
#[derive(Debug, Default)]
pub(crate) struct Alerts {
    /// Per message: when it was last written, and how many times it was left out since.
    last: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Alerts {
    /// Warns about `error` if it needs attention and was not warned about lately.
    pub(crate) fn connect_failed(&self, error: &ConnectError) {
        if !error.needs_attention() {
            return;
        }
        let message = error.to_string();
        let now = Instant::now();
        let left_out = {
            let Ok(mut last) = self.last.lock() else {
                return;
            };
            if last.len() >= KINDS && !last.contains_key(&message) {
                last.retain(|_, (at, _)| now.duration_since(*at) < EVERY);
            }
            match last.get_mut(&message) {
                Some((at, skipped)) if now.duration_since(*at) < EVERY => {
                    *skipped += 1;
                    return;
                }
                Some((at, skipped)) => {
                    *at = now;
                    std::mem::take(skipped)
                }
                None => {
                    last.insert(message.clone(), (now, 0));
                    0
                }
            }
        };
        let hint = error.hint();
        if left_out > 0 {
            warn!(
                "upstream connects fail: {message}{hint} ({left_out} more since the last warning)"
            );
        } else {
            warn!("upstream connects fail: {message}{hint}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_failures_someone_must_act_on_are_warned_about() {
        assert!(!ConnectError::Refused.needs_attention());
        assert!(!ConnectError::HostUnreachable.needs_attention());
        let proxy = ConnectError::Proxy {
            proxy: "10.0.0.9:1080".into(),
            reason: "cannot reach the proxy: connection refused".into(),
        };
        assert!(proxy.needs_attention());
        let no_descriptors = ConnectError::Io(std::io::Error::from_raw_os_error(24));
        assert!(no_descriptors.needs_attention());
        assert!(no_descriptors.hint().contains("--default-route"));
    }

    #[test]
    fn a_repeated_failure_is_counted_not_repeated() {
        let alerts = Alerts::default();
        let proxy = ConnectError::Proxy {
            proxy: "10.0.0.9:1080".into(),
            reason: "cannot reach the proxy: connection refused".into(),
        };
        for _ in 0..5 {
            alerts.connect_failed(&proxy);
        }
        let last = alerts
            .last
            .lock()
            .map(|l| l.values().map(|v| v.1).sum::<u64>());
        assert_eq!(last.ok(), Some(4));
    }
}
