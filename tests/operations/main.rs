//! What operators install around the binary: the alert rules, the systemd unit, the
//! container files. Checked with the real tools where the machine has them.

#[path = "../support/mod.rs"]
mod support;

mod alerts;
mod packaging;
mod setup;
