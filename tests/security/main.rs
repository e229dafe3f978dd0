//! Security through the real binary: every bypass the hardening rounds found (findings),
//! endpoint and model policy with the path-disguise property test, authentication.

#[path = "../support/mod.rs"]
mod support;

mod auth;
mod findings;
mod policy;
