//! The small integers of the ABI as typed enums: each value is written out, never reused, and
//! its name (the string the agent prints in JSON events, metrics and `status`) lives beside it.
//!
//! Map structs keep raw `u32` fields (bytes read back from the kernel may hold any value):
//! convert with `TryFrom<u32>` (or [`Verdict::from_raw`], which fails closed) when reading,
//! and with `as u32` when writing.

/// Declares a `#[repr(u32)]` enum with explicit values, its names, `ALL`, and `TryFrom<u32>`.
macro_rules! abi_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $var:ident = $val:literal => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $var = $val, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$var),+];

            /// The name the agent prints for this value.
            pub const fn name(self) -> &'static str {
                match self {
                    $( Self::$var => $text, )+
                }
            }

            /// The value for a raw `u32`, if it is one.
            #[inline(always)]
            pub const fn from_u32(v: u32) -> Option<Self> {
                match v {
                    $( $val => Some(Self::$var), )+
                    _ => None,
                }
            }
        }

        impl TryFrom<u32> for $name {
            type Error = u32;
            #[inline(always)]
            fn try_from(v: u32) -> Result<Self, u32> {
                Self::from_u32(v).ok_or(v)
            }
        }

        impl From<$name> for u32 {
            #[inline(always)]
            fn from(v: $name) -> u32 {
                v as u32
            }
        }
    };
}

abi_enum! {
    /// Verdicts, as stored in rules ([`crate::RuleValue::verdict`]) and reported in events.
    pub enum Verdict {
        Allow = 1 => "allow",
        Deny = 2 => "deny",
        /// A would-be deny that was allowed (audit mode, or `unattested: audit`).
        Audit = 3 => "audit",
    }
}

impl Verdict {
    /// The verdict a raw value stands for; anything that is not allow or audit is a deny
    /// (fail closed).
    #[inline(always)]
    pub const fn from_raw(v: u32) -> Self {
        match Self::from_u32(v) {
            Some(v) => v,
            None => Self::Deny,
        }
    }
}

abi_enum! {
    /// Policy mode of a generation ([`crate::GenConfig::mode`]).
    pub enum Mode {
        Enforce = 1 => "enforce",
        Audit = 2 => "audit",
    }
}

abi_enum! {
    /// Action for processes with no identity ([`crate::GenConfig::unattested`]).
    pub enum Action {
        Allow = 1 => "allow",
        Audit = 2 => "audit",
        Deny = 3 => "deny",
    }
}

abi_enum! {
    /// Event kinds in [`crate::Event::kind`].
    pub enum EventKind {
        Connect = 1 => "connect",
        Fork = 2 => "fork",
        Exec = 3 => "exec",
        Exit = 4 => "exit",
        /// A process tampered with another ([`crate::Event::tgid`] the target,
        /// [`crate::Event::aux`] the tamperer, [`crate::Event::flags`] the syscall number).
        Tamper = 5 => "tamper",
        /// A socket of a kind the connect hooks never judge ([`SocketKind`]), refused (or
        /// audited) at creation.
        Socket = 6 => "socket",
    }
}

abi_enum! {
    /// Socket hooks, in [`crate::Event::aux`] of a connect event. The name is the cgroup
    /// attach point (`cgroup/<name>`).
    pub enum Hook {
        Connect4 = 1 => "connect4",
        Connect6 = 2 => "connect6",
        Sendmsg4 = 3 => "sendmsg4",
        Sendmsg6 = 4 => "sendmsg6",
        /// `cgroup/sock_create`: socket creation (a [`SocketKind`] event).
        SockCreate = 5 => "sock_create",
    }
}

impl Hook {
    /// True for the IPv4 hooks (the destination is `user_ip4`).
    #[inline(always)]
    pub const fn is_v4(self) -> bool {
        matches!(self, Self::Connect4 | Self::Sendmsg4)
    }
}

abi_enum! {
    /// Counters (`ENF_COUNTERS`, per-CPU array of u64, indexed by these). The names are the
    /// ones `status` and the metrics print.
    pub enum Counter {
        Allow = 0 => "allowed",
        Deny = 1 => "denied",
        Audit = 2 => "audited",
        Unattested = 3 => "unattested",
        Pending = 4 => "pending",
        Untracked = 5 => "untracked",
        EventsLost = 6 => "events_lost",
        ProcInsertFail = 7 => "proc_insert_failed",
        Held = 8 => "held_at_exec",
        ExecKnown = 9 => "exec_known",
        ExecPending = 10 => "exec_pending",
        NoConfig = 11 => "no_config",
        /// Sockets refused at creation (raw, ICMP ping, SCTP, UDP-Lite, other protocols).
        SocketRefused = 12 => "socket_refused",
        /// Execs whose identity was withheld (loader environment).
        Withheld = 13 => "withheld",
        /// Processes marked tampered (a target with an entry in `ENF_PROCS`).
        Tampered = 14 => "tampered",
        /// A never-seen exec in an enforced scope that was not held because no live agent
        /// would release it (stale heartbeat): it runs pending, every connect denied.
        HoldSkipped = 15 => "hold_skipped",
    }
}

abi_enum! {
    /// Kinds of `AF_INET`/`AF_INET6` sockets the connect and sendmsg hooks never judge, refused
    /// at creation unless the identity's `sockets:` list names them
    /// ([`crate::socket_kind`]). The name is the policy's word for it; the bit in
    /// `ENF_SOCKETS` is [`SocketKind::bit`].
    pub enum SocketKind {
        /// `SOCK_RAW`, any protocol (needs `CAP_NET_RAW`, which a user namespace gives).
        Raw = 0 => "raw",
        /// ICMP / ICMPv6 "ping" datagram sockets (`net.ipv4.ping_group_range`).
        Icmp = 1 => "icmp",
        Sctp = 2 => "sctp",
        UdpLite = 3 => "udplite",
        /// Any other IP protocol (DCCP, L2TP, SMC over `AF_INET`, ...).
        Other = 4 => "other",
    }
}

impl SocketKind {
    /// The bit of this kind in an `ENF_SOCKETS` mask.
    #[inline(always)]
    pub const fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// Slots of `ENF_COUNTERS` (room for counters to come).
pub const COUNTERS: u32 = 16;
const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!((Counter::ALL[i] as u32) < COUNTERS);
        i += 1;
    }
};

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: Copy + Into<u32> + TryFrom<u32, Error = u32> + PartialEq + core::fmt::Debug>(
        all: &[T],
        name: impl Fn(T) -> &'static str,
    ) {
        for (i, a) in all.iter().enumerate() {
            let raw: u32 = (*a).into();
            assert_eq!(T::try_from(raw), Ok(*a));
            for b in &all[i + 1..] {
                assert_ne!(raw, (*b).into(), "value reused");
                assert_ne!(name(*a), name(*b), "name reused");
            }
        }
    }

    #[test]
    fn values_and_names_are_unique_and_round_trip() {
        check(Verdict::ALL, Verdict::name);
        check(Mode::ALL, Mode::name);
        check(Action::ALL, Action::name);
        check(EventKind::ALL, EventKind::name);
        check(Hook::ALL, Hook::name);
        check(Counter::ALL, Counter::name);
        check(SocketKind::ALL, SocketKind::name);
        assert_eq!(Verdict::try_from(0), Err(0));
        assert_eq!(Verdict::from_raw(0), Verdict::Deny);
        assert_eq!(Verdict::from_raw(77), Verdict::Deny);
    }

    #[test]
    fn values_are_the_abi() {
        // These numbers are in pinned maps and events: they never change.
        assert_eq!(
            [
                Verdict::Allow as u32,
                Verdict::Deny as u32,
                Verdict::Audit as u32
            ],
            [1, 2, 3]
        );
        assert_eq!([Mode::Enforce as u32, Mode::Audit as u32], [1, 2]);
        assert_eq!(
            [
                Action::Allow as u32,
                Action::Audit as u32,
                Action::Deny as u32
            ],
            [1, 2, 3]
        );
        assert_eq!(Counter::NoConfig as u32, 11);
        assert_eq!(Counter::HoldSkipped as u32, 15);
        assert_eq!(Hook::Sendmsg6 as u32, 4);
        assert_eq!(EventKind::Exit as u32, 4);
        assert_eq!(
            [
                EventKind::Socket as u32,
                Hook::SockCreate as u32,
                Counter::SocketRefused as u32
            ],
            [6, 5, 12]
        );
        assert_eq!(SocketKind::Other.bit(), 16);
    }
}
