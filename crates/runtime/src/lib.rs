//! The bottle runtime: the Docker backend, images, the in-bottle shim, and the launch
//! core with the lifecycle operations (freeze, resume, destroy, ps).
//!
//! The pure parts (plan, providers, manifests) are in `bot-bottle-core`; this crate
//! does the I/O: containers, processes, the gateway's lifetime.

pub mod container;
pub mod docker;
pub mod forge;
pub mod gateway;
pub mod images;
pub mod launch;
pub mod progress;
pub mod provenance;
pub mod shim;
pub mod supervise;
pub mod terminal;
pub mod tripwire;

/// Held by every test that starts or reaps child processes. The shim reaps *every* child
/// of its process (`waitpid(-1)`, as a container's init must), so in the one test
/// process it would steal the exit status of a child another test is waiting for.
#[cfg(test)]
pub(crate) static CHILDREN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
