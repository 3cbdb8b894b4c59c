//! A local stand-in for AWS Systems Manager Session Manager: the SSM JSON API
//! (SigV4-verified), the ssmmessages websocket endpoint, and the instance
//! agent's behaviour for Port sessions. Built to be faithful to upstream
//! (amazon-ssm-agent, session-manager-plugin), not to our client.

pub mod agent;
pub mod api;
pub mod config;
pub mod kms;
pub mod route53;
pub mod server;
pub mod sigv4;

pub use config::{Config, Faults, Instance, Profile};
pub use server::Emulator;
