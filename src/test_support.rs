//! Test support shared by the unit tests: the integration tests' nats-server launcher (`tests/common/nats.rs`,
//! included here so there is one), and a gateway connected to a fresh server.
#![cfg(test)]

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{Config, gateway::Gateway};

#[path = "../tests/common/nats.rs"]
mod nats;

/// A real nats-server on a port it picks itself, killed on drop (the integration tests' `NatsServer`).
pub(crate) use nats::NatsServer as Nats;

/// A gateway (TLS off, anonymous allowed, `tweak` applied) connected to a fresh nats-server.
pub(crate) async fn gateway(tweak: impl FnOnce(&mut Config)) -> (Nats, Arc<Gateway>) {
    let nats = Nats::start().await;
    let mut config = Config::default();
    config.tls.enabled = false;
    config.auth.allow_anonymous = true;
    config.nats.url = crate::config::OneOrMany::One(nats.url());
    tweak(&mut config);
    let gw = Gateway::start(config, CancellationToken::new()).await.expect("gateway");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.bridge().is_connected() {
        assert!(Instant::now() < deadline, "NATS connection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (nats, gw)
}
