//! Link degradation on the replication network: a userspace UDP proxy that delays, drops,
//! duplicates and reorders datagrams from a seeded generator (this kernel has no `tc netem`).
//! Being written (issue 10); the runner will route a host's replication traffic through it.
