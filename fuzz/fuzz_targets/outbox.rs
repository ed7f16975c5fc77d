//! The outbox against its plain model (`src/outbox/model.rs`): random room pushes under mixed policies, control
//! pushes, drains, leaves and closes; any disagreement or broken property panics.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| roomwire::outbox::model::fuzz_ops(data));
