//! The fuzz targets are `tests/decoders.rs` (see there for how they run). Decoders that live
//! outside `vantage-proto` are included here by path, so that fuzzing them links neither the
//! agent nor its dependencies, and there is still one copy of each:
//!
//! - [`cert_expiry`]: the agent's DER walk to a certificate's notAfter (`agent/src/cert_expiry.rs`).
//! - [`dns_wire`]: the `dns` probe's query writer and reply parser (`agent/src/dns_wire.rs`).

#[path = "../../agent/src/cert_expiry.rs"]
pub mod cert_expiry;

#[path = "../../agent/src/dns_wire.rs"]
pub mod dns_wire;
