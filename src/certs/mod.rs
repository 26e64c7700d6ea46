//! The certificates the node makes itself: a development CA with node and service certificates
//! (`roomwire certs init`, [`dev`]), and the short-lived WebTransport certificate that browsers
//! trust by its hash ([`webtransport`]).

pub mod dev;
pub mod webtransport;

pub use dev::{DevCa, Issued, init, service_uri};
