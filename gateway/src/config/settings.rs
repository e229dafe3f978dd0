//! The running model of the configuration, built from the file format and validated.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::file::{BackendEntry, BackendKind, FileConfig};

/// A problem found while validating, as (YAML path, message).
pub type Invalid = (String, String);

#[derive(Debug, Clone)]
pub struct Settings {
    pub file: PathBuf,
    pub listen: Vec<SocketAddr>,
    pub backends: Vec<BackendSpec>,
    pub limits: Limits,
    pub threads: usize,
    pub drain_timeout: Duration,
    pub filters: Vec<FilterSpec>,
}

#[derive(Debug, Clone)]
pub struct BackendSpec {
    pub name: Arc<str>,
    pub kind: BackendKind,
    /// Resolved once at load; never looked up on the request path.
    pub addr: SocketAddr,
    /// `host:port` from the URL, sent as the `Host` header (Ollama rejects foreign hosts).
    pub authority: String,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body: usize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub send_timeout: Duration,
    pub client_body_timeout: Duration,
}

/// One `filters:` entry: the registry name, where it stands in the file, and its options.
#[derive(Debug, Clone)]
pub struct FilterSpec {
    pub name: String,
    pub yaml_path: String,
    pub options: serde_json::Value,
}

pub fn build(file: PathBuf, cfg: FileConfig) -> Result<Settings, Invalid> {
    let listen = match cfg.listen {
        None => vec![SocketAddr::from(([127, 0, 0, 1], 8080))],
        Some(list) if list.is_empty() => {
            return Err((
                "listen".into(),
                "needs at least one entry, e.g. `- addr: 127.0.0.1:8080`".into(),
            ))
        }
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.addr.parse::<SocketAddr>().map_err(|_| {
                    (
                        format!("listen[{i}].addr"),
                        format!(
                            "{:?} is not an ip:port address, e.g. 127.0.0.1:8080",
                            l.addr
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };

    let mut backends: Vec<BackendSpec> = Vec::with_capacity(cfg.backends.len());
    for (i, b) in cfg.backends.iter().enumerate() {
        let spec = backend(b).map_err(|(k, m)| (format!("backends[{i}]{k}"), m))?;
        if backends.iter().any(|o| o.name == spec.name) {
            return Err((
                format!("backends[{i}].name"),
                format!(
                    "duplicate backend name {:?}; names must be unique",
                    spec.name
                ),
            ));
        }
        backends.push(spec);
    }

    let l = &cfg.limits;
    if l.max_body.0 == 0 {
        return Err(("limits.max_body".into(), "must be greater than 0".into()));
    }
    for (key, d) in [
        ("connect_timeout", l.connect_timeout),
        ("read_timeout", l.read_timeout),
        ("send_timeout", l.send_timeout),
        ("client_body_timeout", l.client_body_timeout),
    ] {
        if d.0.is_zero() {
            return Err((format!("limits.{key}"), "must be greater than 0".into()));
        }
    }
    let limits = Limits {
        max_body: usize::try_from(l.max_body.0).unwrap_or(usize::MAX),
        connect_timeout: l.connect_timeout.0,
        read_timeout: l.read_timeout.0,
        send_timeout: l.send_timeout.0,
        client_body_timeout: l.client_body_timeout.0,
    };

    let threads = match cfg.server.threads {
        Some(0) => return Err(("server.threads".into(), "must be at least 1".into())),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };

    let filters = cfg
        .filters
        .into_iter()
        .enumerate()
        .map(|(i, v)| filter_spec(i, v))
        .collect::<Result<Vec<_>, _>>()?;

    Ok(Settings {
        file,
        listen,
        backends,
        limits,
        threads,
        drain_timeout: cfg.server.drain_timeout.0,
        filters,
    })
}

fn backend(b: &BackendEntry) -> Result<BackendSpec, Invalid> {
    let uri: http::Uri = b.url.parse().map_err(|e| {
        (
            ".url".to_string(),
            format!(
                "{:?} is not a URL ({e}); write it like http://127.0.0.1:11434",
                b.url
            ),
        )
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err((
                ".url".into(),
                format!("scheme {other:?} is not supported for backends yet; use http://"),
            ))
        }
        None => {
            return Err((
                ".url".into(),
                format!(
                    "{:?} has no scheme; write it like http://127.0.0.1:11434",
                    b.url
                ),
            ))
        }
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err((
            ".url".into(),
            format!("{:?} has a path; give only scheme, host and port: the client's path is forwarded as is", b.url),
        ));
    }
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let addr = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| {
            (
                ".url".to_string(),
                format!("cannot resolve host {host:?}; check the name or use an IP address"),
            )
        })?;
    let authority = match uri.port_u16() {
        Some(p) => format!("{}:{p}", uri.host().unwrap_or_default()),
        None => uri.host().unwrap_or_default().to_string(),
    };
    let name = b.name.clone().unwrap_or_else(|| format!("{host}:{port}"));
    if name.is_empty() {
        return Err((".name".into(), "must not be empty".into()));
    }
    Ok(BackendSpec {
        name: name.into(),
        kind: b.kind,
        addr,
        authority,
    })
}

fn filter_spec(i: usize, v: serde_norway::Value) -> Result<FilterSpec, Invalid> {
    let at = format!("filters[{i}]");
    let serde_norway::Value::Mapping(mut map) = v else {
        return Err((
            at,
            "each filter is a mapping with `use: NAME` and that filter's options".into(),
        ));
    };
    let name = match map.remove("use") {
        Some(serde_norway::Value::String(s)) => s,
        Some(_) => {
            return Err((
                format!("{at}.use"),
                "must be a filter name such as auth or ratelimit".into(),
            ))
        }
        None => return Err((at, "missing `use: NAME` naming the filter".into())),
    };
    let options = serde_json::to_value(serde_norway::Value::Mapping(map))
        .map_err(|e| (at.clone(), format!("options cannot be read: {e}")))?;
    Ok(FilterSpec {
        name,
        yaml_path: at,
        options,
    })
}
