//! The `rpc` op (issue 25): a NATS request to a service on `<rpc.subject_prefix>.<method>`, answered with
//! `rpc_result` or an error frame. The call is a future the connection polls beside reading, like a publish's
//! confirmation ([`Confirm`]), never a spawned task: a connection that closes drops its calls and no reply is ever
//! written for them. Its slot of `rpc.max_inflight_per_connection` is given back when the future ends or is dropped.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use super::{Confirm, Conn, replies};
use crate::{
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
        if !config.enabled {
            self.error(id, ErrorCode::BadRequest, "rpc is not enabled on this gateway")
                .await;
            return None;
        }
        if !protocol::valid_method(method) {
            self.error(
                id,
                ErrorCode::BadRequest,
                "method names are 1-128 characters: dot-separated tokens of A-Z a-z 0-9 _ - : @ = +",
            )
            .await;
            return None;
        }
        if !self.identity.may_call(method) {
            self.error(id, ErrorCode::Forbidden, "not allowed to call this method")
                .await;
            return None;
        }
        if !self.outbox.try_acquire_rpc(config.max_inflight_per_connection) {
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
            let result = call.await;
            drop(slot);
            let (code, message) = match result {
                Ok(answer) => {
                    let frame = match answer.headers.as_ref().and_then(|h| h.get(HDR_SERVICE_ERROR_CODE)) {
                        Some(code) => {
                            let text = answer
                                .headers
                                .as_ref()
                                .and_then(|h| h.get(HDR_SERVICE_ERROR))
                                .map_or("", |v| v.as_str());
                            protocol::rpc_error(&id, code.as_str(), text)
                        }
                        None => protocol::rpc_result(&id, &answer.payload),
                    };
                    if frame.len() <= gw.config().limits.max_message_size {
                        return Some(frame);
                    }
                    (ErrorCode::TooLarge, "answer over the maximum message size")
                }
                Err(e) => replies::rpc_failed(e),
            };
            gw.metrics().errors.inc(code);
            Some(protocol::error(Some(&id), code, message))
        }))
    }
}
