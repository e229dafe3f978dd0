//! The client's message framing, judged before anything else: the gateway forwards with
//! framing it chose itself, so any doubt about where a request ends is refused, never passed
//! on (request smuggling lives in the gap between two parsers' readings).

use gateway_filter::http::{header, HeaderMap, Method, StatusCode};
use gateway_filter::Rejection;
use pingora_http::RequestHeader;
use pingora_proxy::Session;

fn bad(message: &'static str) -> Rejection {
    Rejection::new(StatusCode::BAD_REQUEST, "invalid_framing", message)
}

/// Refuses framing two parsers could read differently (RFC 9112 §6): more than one
/// Content-Length (or a list in one), more than one Transfer-Encoding, any coding but
/// `chunked`, and both headers at once. (Look-alike names with `_` for `-` are not refused
/// here: they are never forwarded, see `headers.rs`.)
pub fn check(req: &RequestHeader) -> Result<(), Rejection> {
    check_headers(&req.headers)
}

/// A body with a `Content-Encoding` other than `identity` is refused (415): the gateway
/// checks the bytes as sent, and a backend (or a hop) that decompresses bodies would act on
/// JSON nobody checked. (The framing is sound: the refusal drains the body as others do.)
pub fn check_encoding(h: &HeaderMap) -> Result<(), Rejection> {
    let encoded = h.get_all(header::CONTENT_ENCODING).iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|c| {
            !c.trim_ascii().is_empty() && !c.trim_ascii().eq_ignore_ascii_case(b"identity")
        })
    });
    if encoded {
        return Err(Rejection::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_encoding",
            "request bodies must be sent unencoded (no Content-Encoding): the gateway checks the body as it is sent",
        ));
    }
    Ok(())
}

pub const BOTH_LENGTHS: &str = "Content-Length and Transfer-Encoding must not be sent together";

/// Whether a request of this method may carry a body. Servers do not read one on GET, HEAD,
/// OPTIONS or TRACE (cpp-httplib, which llama.cpp's server is built on, reads a body only for
/// POST, PUT, PATCH and DELETE): a body forwarded with such a request would be read by the
/// backend as the next request on the connection, unchecked, and its answer handed to
/// whichever client used the connection next.
pub fn body_allowed(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

fn check_headers(h: &HeaderMap) -> Result<(), Rejection> {
    let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
    if let Some(v) = lengths.next() {
        if lengths.next().is_some() || !v.as_bytes().iter().all(u8::is_ascii_digit) {
            return Err(bad("one Content-Length with one number is accepted"));
        }
    }
    let mut codings = h.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(v) = codings.next() {
        if codings.next().is_some() || !v.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(bad("only `Transfer-Encoding: chunked` is accepted"));
        }
        if h.contains_key(header::CONTENT_LENGTH) {
            return Err(bad(BOTH_LENGTHS));
        }
    }
    Ok(())
}

/// The refusal of a body on a method that carries none ([`body_allowed`]).
pub fn body_not_allowed(method: &Method) -> Rejection {
    Rejection::new(
        StatusCode::BAD_REQUEST,
        "body_not_allowed",
        format!(
            "a {} request carries no body; send it without one",
            gateway_filter::echo(method.as_str())
        ),
    )
}

/// Whether the head announces a body: chunked framing or a length other than zero (on
/// HTTP/2, where data may come unannounced, the body read is judged as well).
pub fn declares_body(session: &Session) -> bool {
    let h = &session.req_header().headers;
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().iter().any(|b| *b != b'0'))
}

/// Whether the request carries a body (announced length, chunked framing, or an HTTP/2
/// stream still open for data).
pub fn has_body(session: &mut Session) -> bool {
    if session.is_http2() {
        return !session.is_body_done();
    }
    declares_body(session)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::http::HeaderValue;

    fn headers(list: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for bad in [
            &[("content-length", "13, 13")][..],
            &[("content-length", "13"), ("content-length", "13")],
            &[("content-length", "+13")],
            &[("transfer-encoding", "gzip, chunked")],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
            &[("transfer-encoding", "identity")],
        ] {
            assert!(check_headers(&headers(bad)).is_err(), "{bad:?}");
        }
        for good in [
            &[("content-length", "13")][..],
            &[("transfer-encoding", "Chunked")],
            &[],
        ] {
            assert!(check_headers(&headers(good)).is_ok(), "{good:?}");
        }
    }

    /// Review: a gzip body was checked as the bytes it is (not JSON: nothing in it read) and
    /// forwarded with its Content-Encoding, for any hop that decompresses to act on.
    #[test]
    fn encoded_bodies_are_refused() {
        for bad in [
            &[("content-encoding", "gzip")][..],
            &[("content-encoding", "identity, br")],
            &[
                ("content-encoding", "identity"),
                ("content-encoding", "deflate"),
            ],
        ] {
            let r = check_encoding(&headers(bad)).unwrap_err();
            assert_eq!(
                (r.status.as_u16(), r.code),
                (415, "unsupported_content_encoding")
            );
        }
        for good in [&[("content-encoding", "identity")][..], &[]] {
            assert!(check_encoding(&headers(good)).is_ok(), "{good:?}");
        }
    }
}
