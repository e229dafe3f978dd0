//! Resilience through the real binary: backends dying, slow and stalled clients, restarts,
//! kill -9, Ctrl-C.

#[path = "../support/mod.rs"]
mod support;

mod backends;
mod restarts;
mod slow_clients;
