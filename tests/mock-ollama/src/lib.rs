//! A fast fake model server for tests and benchmarks.
//!
//! It speaks the wire formats of Ollama (`/api/*`, NDJSON streaming) and of OpenAI-compatible
//! servers (`/v1/*`, SSE streaming with a final usage event), with failure injection, and it
//! records every request it sees so a test can prove that a request did or did not reach it.
//!
//! Per-request knobs travel as headers (so they pass through the gateway untouched):
//! `x-mock-chunks: N`, `x-mock-delay-ms: N` (between chunks), `x-mock-end-delay-ms: N` (between a
//! stream's last event and its end), `x-mock-fail: MODE`.
//! Process-wide failure injection: [`MockServer::set_fail`] or `POST /_mock/fail {"mode":…}`.
//! Modes: `none`, `error500`, `error429`, `error500-inference`, `hang`, `close-mid-stream`,
//! `refuse`.

mod formats;
mod server;
mod state;

pub use server::{MockConfig, MockServer};
pub use state::{FailMode, SeenRequest};
