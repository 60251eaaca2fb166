//! Integration tests for the gateway. Every upstream is a loopback server created by the
//! test, every gateway runs with `loopback_only`, and host names are routed with the
//! upstream-override map.

mod audit_bounds;
mod audit_chain;
mod clients;
mod custody;
mod disk_full;
mod dlp_cases;
mod dlp_rules;
mod git_refs;
mod holes;
mod limits;
mod mitm;
mod proxy;
mod support;
mod views;
