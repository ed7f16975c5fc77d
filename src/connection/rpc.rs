//! The `rpc` op (issue 25): a NATS request to a service on `<rpc.subject_prefix>.<method>`, answered with
//! `rpc_result` or an error frame. The call is a future the connection polls beside reading, like a publish's
//! confirmation ([`Confirm`]), never a spawned task: a connection that closes drops its calls and no reply is ever
//! written for them. Its slot of `rpc.max_inflight_per_connection` is given back when the future ends or is dropped.
//! Every call is counted once in `roomwire_rpc_calls_total{result}`, refusals included; calls that reached NATS also
//! in `roomwire_rpc_seconds`. A call dropped with its connection is counted in neither: it has no result.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{Confirm, Conn, replies};
use crate::{
    bridge::RpcFailure,
    metrics::RpcResult,
    outbox::Outbox,
    protocol::{self, ErrorCode},
};

/// ADR-32: the code of a service's error answer.
const HDR_SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";
/// ADR-32: the text of a service's error answer.
const HDR_SERVICE_ERROR: &str = "Nats-Service-Error";

/// One taken RPC slot of a connection, given back on drop.
struct Slot(Arc<Outbox>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release_rpc();
    }
}

impl Conn {
    /// Checks and sends one call; returns the future that yields its reply frame.
    pub(super) async fn rpc(
        &mut self,
        id: Option<&str>,
        method: &str,
        data: &str,
        timeout_ms: Option<u64>,
    ) -> Option<Confirm> {
        let config = &self.gw.config().rpc;
        let calls = &self.gw.metrics().rpc_calls;
        if !config.enabled {
            calls.inc(RpcResult::BadRequest);
            self.error(id, ErrorCode::BadRequest, "rpc is not enabled on this gateway")
                .await;
            return None;
        }
        if !protocol::valid_method(method) {
            calls.inc(RpcResult::BadRequest);
            self.error(
                id,
                ErrorCode::BadRequest,
                "method names are 1-128 characters: dot-separated tokens of A-Z a-z 0-9 _ - : @ = +",
            )
            .await;
            return None;
        }
        if !self.identity.may_call(method) {
            calls.inc(RpcResult::Forbidden);
            self.error(id, ErrorCode::Forbidden, "not allowed to call this method")
                .await;
            return None;
        }
        if !self.outbox.try_acquire_rpc(config.max_inflight_per_connection) {
            calls.inc(RpcResult::RateLimited);
            self.error(id, ErrorCode::RateLimited, "too many calls awaiting an answer")
                .await;
            return None;
        }
        let slot = Slot(self.outbox.clone());
        let timeout = timeout_ms
            .map_or(config.timeout, Duration::from_millis)
            .min(config.max_timeout)
            .max(Duration::from_millis(1));
        let subject = protocol::room_subject(&config.subject_prefix, method);
        let call = self
            .gw
            .bridge()
            .request(subject, self.origin(), Bytes::copy_from_slice(data.as_bytes()), timeout);
        let id: String = id.unwrap_or("null").to_owned();
        let gw = self.gw.clone();
        Some(Box::pin(async move {
            // The clock starts at the first poll, which is when the request is written to NATS.
            let started = Instant::now();
            let result = call.await;
            drop(slot);
            let metrics = gw.metrics();
            metrics.rpc_seconds.observe(started.elapsed().as_secs_f64());
            let (code, message) = match result {
                Ok(answer) => {
                    let (frame, ended) = match answer.headers.as_ref().and_then(|h| h.get(HDR_SERVICE_ERROR_CODE)) {
                        Some(code) => {
                            let text = answer
                                .headers
                                .as_ref()
                                .and_then(|h| h.get(HDR_SERVICE_ERROR))
                                .map_or("", |v| v.as_str());
                            (protocol::rpc_error(&id, code.as_str(), text), RpcResult::ServiceError)
                        }
                        None => (protocol::rpc_result(&id, &answer.payload), RpcResult::Ok),
                    };
                    if frame.len() <= gw.config().limits.max_message_size {
                        metrics.rpc_calls.inc(ended);
                        return Some(frame);
                    }
                    metrics.rpc_calls.inc(RpcResult::TooLarge);
                    (ErrorCode::TooLarge, "answer over the maximum message size")
                }
                Err(e) => {
                    metrics.rpc_calls.inc(failed(e));
                    replies::rpc_failed(e)
                }
            };
            metrics.errors.inc(code);
            Some(protocol::error(Some(&id), code, message))
        }))
    }
}

/// The metric's result for a call that got no answer.
fn failed(e: RpcFailure) -> RpcResult {
    match e {
        RpcFailure::NoResponders => RpcResult::NoResponders,
        RpcFailure::Timeout => RpcResult::Timeout,
        RpcFailure::TooLarge => RpcResult::TooLarge,
        RpcFailure::Unavailable => RpcResult::Unavailable,
    }
}
