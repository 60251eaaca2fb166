//! The bottle runtime: the Docker backend, images, the in-bottle shim, and the launch
//! core with the lifecycle operations (freeze, resume, destroy, ps).
//!
//! The pure parts (plan, providers, manifests) are in `bot-bottle-core`; this crate
//! does the I/O: containers, processes, the gateway's lifetime.

pub mod container;
pub mod docker;
pub mod gateway;
pub mod images;
pub mod launch;
pub mod progress;
pub mod provenance;
pub mod shim;
pub mod terminal;
pub mod tripwire;
