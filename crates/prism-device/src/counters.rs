//! [`counters!`](crate::counters): one way every Prism crate declares what it counts.

/// Declares `Counters` (atomics, updated where things happen and readable from any thread) and
/// `Snapshot` (a copy at one moment, with its fields by name and a `Display` of the non-zero
/// ones) from one list of documented field names. The fields of `Counters` are `pub(crate)`:
/// only the crate that counts may count.
#[macro_export]
macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Live counters, updated where things happen and readable from any thread.
        #[derive(Debug, Default)]
        pub struct Counters {
            $($(#[$doc])* pub(crate) $name: ::std::sync::atomic::AtomicU64,)*
        }

        /// A copy of the counters at one moment.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Snapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot {
                    $($name: self.$name.load(::std::sync::atomic::Ordering::Relaxed),)*
                }
            }
        }

        impl Snapshot {
            /// Every counter by name, in a fixed order.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }

        impl ::std::fmt::Display for Snapshot {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                let mut first = true;
                $(
                    if self.$name != 0 {
                        if !first {
                            f.write_str(" ")?;
                        }
                        first = false;
                        write!(f, "{}={}", stringify!($name), self.$name)?;
                    }
                )*
                if first {
                    f.write_str("(all zero)")?;
                }
                Ok(())
            }
        }
    };
}
