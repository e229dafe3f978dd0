//! The contract between llm-gateway and its filters.
//!
//! A filter sees only these types, never Pingora's, so each filter crate is unit-tested by
//! building a [`RequestCtx`] by hand. Filters talk to each other only through the context
//! (`auth` sets [`RequestCtx::principal`], later filters read it).

pub mod batch;
pub mod chunk;
mod ctx;
pub mod defer;
pub mod failing;
mod filter;
pub mod glob;
pub mod go_names;
pub mod labels;
pub mod limits;
pub mod media;
pub mod model_name;
mod options;
pub mod output;
pub mod path;
pub mod prompt;
pub mod redact;
mod rejection;
mod route;
pub mod state;
#[cfg(feature = "testing")]
pub mod testing;
pub mod units;
mod usage;

pub use ctx::{
    client_network, reserved_principal_id, Decision, ModelGate, Overrides, Principal, RequestCtx,
    ANONYMOUS, GLOBAL_ACCOUNT,
};
pub use filter::{with_suffix, BuildContext, Filter, ReloadError};
pub use options::{parse_options, OptionsError};
pub use rejection::{echo, error_json, ErrorShape, Rejection, ECHO_LIMIT};
pub use route::{Route, WireFormat};
pub use state::SharedState;
pub use usage::{FinishReasons, Usage};

/// Re-exported so filter crates name header types without their own `http` dependency.
pub use http;
