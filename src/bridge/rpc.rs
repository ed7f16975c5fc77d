//! Browser calls to NATS services (issue 25): [`Bridge::request`] sends one NATS request with the caller's identity
//! stamped in headers (`HDR_*` and [`HDR_DEADLINE`]) and yields the answer or why there is none ([`RpcFailure`]).

use std::time::{Duration, SystemTime};

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;

use super::{Bridge, HDR_CONN, HDR_GATEWAY, HDR_USER, Origin};

/// Header giving the call's deadline in unix milliseconds.
pub const HDR_DEADLINE: &str = "Roomwire-Deadline";

/// Why a call got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcFailure {
    /// Nobody subscribes to the method's subject.
    NoResponders,
    /// No answer before the deadline.
    Timeout,
    /// The request is over NATS's `max_payload`.
    TooLarge,
    /// NATS is away or refused the request.
    Unavailable,
}

impl Bridge {
    /// Sends a request on `subject` with `payload`, the caller's headers (the client can set none) and `timeout`; the
    /// returned future owns everything it needs, so the connection can keep it beside reading and drop it on close.
    pub fn request(
        &self,
        subject: String,
        origin: Origin<'_>,
        payload: Bytes,
        timeout: Duration,
    ) -> impl Future<Output = Result<async_nats::Message, RpcFailure>> + Send + 'static {
        let client = self.client.clone();
        let max = self.max_payload();
        let connected = self.is_connected();
        let mut headers = HeaderMap::new();
        headers.insert(HDR_GATEWAY, &*self.gateway_id);
        headers.insert(HDR_CONN, origin.conn);
        if let Some(user) = origin.user {
            headers.insert(HDR_USER, user);
        }
        let deadline = SystemTime::now()
            .checked_add(timeout)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis());
        headers.insert(HDR_DEADLINE, deadline.to_string().as_str());
        async move {
            if !connected {
                return Err(RpcFailure::Unavailable);
            }
            if max > 0 && payload.len() > max {
                return Err(RpcFailure::TooLarge);
            }
            let request = async_nats::Request::new()
                .payload(payload)
                .headers(headers)
                .timeout(Some(timeout));
            // The client's own timeout may be late by a scheduling tick; bound it here too.
            match tokio::time::timeout(timeout, client.send_request(subject, request)).await {
                Err(_) => Err(RpcFailure::Timeout),
                Ok(Ok(message)) => Ok(message),
                Ok(Err(e)) => Err(match e.kind() {
                    RequestErrorKind::NoResponders => RpcFailure::NoResponders,
                    RequestErrorKind::TimedOut => RpcFailure::Timeout,
                    _ => RpcFailure::Unavailable,
                }),
            }
        }
    }
}
