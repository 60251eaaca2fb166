//! Integration tests of the `bot-bottle` binary. One binary for the crate keeps link
//! time down; modules group the cases.
//!
//! Tests marked "docker" use the real Docker engine, which CI installs and starts.
//! They fail (never skip) when it is missing. Every launch runs the gateway with
//! `BOT_BOTTLE_LOOPBACK_ONLY=1`, so a mistake fails a test instead of reaching out.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step is a failed test

mod agents;
mod alert;
mod api;
mod audit_log;

mod common;
mod errors;
mod escape;
mod forge;
mod interactive;
mod lifecycle;
mod provenance;
mod supervise;
