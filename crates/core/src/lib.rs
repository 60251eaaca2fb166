//! Pure, I/O-light core of bot-bottle: manifests, spec, plan, slugs, state layout,
//! egress-policy and credential types, and provenance records.
//!
//! Everything here is plain data and functions over it, so it is tested without a
//! container or a socket. See `docs/architecture.md` for the crate graph.

pub mod credential;
pub mod forge;
pub mod manifest;
pub mod plan;
pub mod policy;
pub mod provenance;
pub mod provider;
pub mod slug;
pub mod state;
pub mod trust;
